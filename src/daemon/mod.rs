//! `keyward daemon`: decides *when* to reconcile, never *what* — every run is the same
//! observe → plan → apply pipeline as the commands, recomputed from the file, the remote and
//! the state (level-triggered). It runs at start, then on the earliest of: the `interval`, the
//! next instant a key becomes due or an overlap ends (it sleeps until then: no polling), an
//! edit of the config file, SIGHUP. Triggers arriving during a run coalesce into one follow-up
//! run. A failing provider account backs off exponentially with jitter on its own; the others
//! carry on. SIGTERM/SIGINT let the change in flight finish (a minted secret is delivered and
//! recorded), start nothing new, and exit 0.
//!
//! Work that comes due reads only the users it concerns (targeted reads). A full listing of
//! the accounts runs as a task beside the loop: at every `interval` it reads its pages at no
//! more than `settings.resync_share` of each account's budget, while due work goes on; one
//! someone waits for (start, a config edit, SIGHUP, a failure) goes at the whole budget. A
//! listing cut short keeps its pages and goes on from where it stopped. When it is complete, the
//! users that targeted runs read or changed meanwhile are taken from those newer reads, and the
//! run plans and applies over it.

pub mod metrics;
pub mod systemd;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use rand::Rng;
use secrecy::zeroize::Zeroizing;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Mode};
use crate::engine::{Engine, Listed, Operator, RunMode, RunOutcome, RunRequest};
use crate::model::Observed;
use crate::plan::PlanOptions;
use crate::providers::http::Pace;
use crate::providers::{Listing, ProviderError};
use metrics::Metrics;

/// First retry after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest wait between retries of a failing account.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// After a run that changed something, look again this soon (metrics, retiring keys).
const REQUEUE_AFTER_CHANGES: Duration = Duration::from_secs(1);
/// How often the metrics that move between runs (requests, budget, listing pages) are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(5);
/// When another keyward holds the state lock, try again this soon.
const LOCKED_RETRY: Duration = Duration::from_secs(5);
/// A standby tries to take the shared state's lock this often.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Why a reconcile runs (kube-rs's `ReconcileReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The daemon started.
    Start,
    /// The full resync `interval` came round.
    Interval,
    /// A key came due, or a retiring key's overlap ended.
    Due,
    /// Changes were made: look again (metrics, retiring keys).
    Requeue,
    /// A failing account's backoff ended, or the state lock was busy.
    Retry,
    /// The config file changed.
    ConfigEdited,
    /// SIGHUP.
    Hangup,
    /// A full listing finished: plan and apply over it.
    Listed,
}

/// What a listing task hands back per account: its name, the listing (read to the end or cut
/// short), how it ended, and the pages it had read before this task.
type ListingResult = (String, Listing, Result<(), ProviderError>, u64);

/// The daemon's full listing under way: a task that reads every included account from where
/// its listing stands and hands each back, read to the end or cut short.
struct Resync {
    task: tokio::task::JoinHandle<Vec<ListingResult>>,
    /// Set when someone waits for it (start, a config edit, SIGHUP): it stops pacing itself.
    urgent: Arc<AtomicBool>,
    /// When it began.
    began: Instant,
    /// Per account, pages begun so far, and how many of them the metrics have counted.
    pages: BTreeMap<String, (Arc<std::sync::atomic::AtomicU64>, u64)>,
}

/// The daemon's part in a run: nobody to ask; it says what it applies.
struct DaemonOperator;

impl Operator for DaemonOperator {
    fn approve(&mut self, plan: &crate::plan::Plan) -> anyhow::Result<()> {
        tracing::info!("applying {} change(s)", plan.changes.len());
        Ok(())
    }
}

/// When to run next, and why (kube-rs's `Action`).
#[derive(Debug, Clone, Copy)]
struct Next {
    at: Instant,
    because: Wake,
}

/// How one reconcile ended, as `keyward_reconcile_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Nothing to do, or planned only, and every account answered.
    Ok,
    /// Changes were made and every account answered.
    Changed,
    /// Some account did not answer, or some change failed.
    Partial,
    /// More deletions than `max_deletions`: nothing was changed.
    Refused,
    /// The run itself failed (state or journal unreadable, say).
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Changed => "changed",
            Outcome::Partial => "partial",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
}

struct Daemon {
    path: PathBuf,
    engine: Engine,
    hash: Option<String>,
    text: Zeroizing<String>,
    metrics: Arc<Metrics>,
    health: BTreeMap<String, Health>,
    next_interval: Instant,
    next_due: Option<Instant>,
    requeue: Option<Next>,
    /// The accounts as last seen: the last full listing with every targeted read since merged
    /// in. `None` until a full run: targeted runs need it.
    seen: Option<crate::model::Observed>,
    /// Work to come, from the last plan over `seen`: what a `Due` wake reads.
    upcoming: Vec<crate::plan::Upcoming>,
    /// The users the last run changed: what a `Requeue` wake reads.
    changed: BTreeSet<(String, String)>,
    /// Full listings cut short, by account: the next listing goes on from them.
    listings: BTreeMap<String, Listing>,
    /// The full listing under way.
    resync: Option<Resync>,
    /// By account, the users targeted runs read since its listing began: what is known of
    /// them (in `seen`) is newer than what the listing read.
    fresher: BTreeMap<String, BTreeSet<String>>,
    /// By account, the users changed since its listing began and not read since: read again
    /// before the listing's plan.
    stale: BTreeMap<String, BTreeSet<String>>,
    last_outcome: String,
    shutdown: CancellationToken,
    /// While another daemon leads (the state is shared and its lock held elsewhere): when to
    /// try to take the lock next. Nothing is planned or applied meanwhile.
    standby: Option<Instant>,
    /// What the last try for the lock said (a standby logs it when it changes, not every try).
    standby_note: String,
}

fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(BACKOFF_CAP);
    // ±20 % jitter so many daemons (or accounts) do not retry in lockstep.
    capped.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// The longest the daemon waits for anything: the longest duration a config may hold (a trigger
/// further away, from a provider's timestamp, is re-computed when it wakes).
const MAX_SLEEP: Duration = Duration::from_secs(36_500 * 86_400);

/// `now + d`, with `d` capped at [`MAX_SLEEP`]: never an overflow, whatever a config or a
/// provider's timestamp says.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(MAX_SLEEP)).unwrap_or(now)
}

fn until(at: Timestamp, now: Timestamp) -> Duration {
    let d = at.duration_since(now);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

impl Daemon {
    fn interval(&self) -> Duration {
        Duration::try_from(self.engine.config.settings.interval)
            .unwrap_or(MAX_SLEEP)
            .clamp(Duration::from_secs(1), MAX_SLEEP)
    }

    /// What comes first: the interval, a due key, a requeue, an account's retry.
    fn next(&self) -> Next {
        let mut next = Next {
            at: self.next_interval,
            because: Wake::Interval,
        };
        let candidates = self
            .next_due
            .map(|at| Next {
                at,
                because: Wake::Due,
            })
            .into_iter()
            .chain(self.requeue)
            .chain(self.health.values().filter_map(|h| {
                h.retry_at.map(|at| Next {
                    at,
                    because: Wake::Retry,
                })
            }));
        for c in candidates {
            if c.at < next.at {
                next = c;
            }
        }
        next
    }

    /// Re-reads the config. Without `force`, does nothing unless the bytes changed. An invalid
    /// file is reported and ignored: the last good config stays in force.
    fn reload(&mut self, force: bool) -> bool {
        let hash = config::digest_of(&self.path, &self.engine.config.include_patterns);
        if !force && hash == self.hash {
            return false;
        }
        self.hash = hash;
        let loaded = config::load(&self.path);
        if let Ok(l) = &loaded {
            // What was read, should the file have changed again since the digest above.
            self.hash = Some(l.config.digest.clone());
        }
        match loaded {
            Err(diags) => {
                for d in &diags {
                    tracing::error!("{d}");
                }
                tracing::error!(
                    "{}: the edited config is not valid; the last good config stays in force",
                    self.path.display()
                );
                self.metrics.set_config_valid(false);
                self.last_outcome = "config invalid (last good config in force)".to_string();
                false
            }
            Ok(loaded) => {
                let text = read_config_text(&self.path);
                let old_metrics = self.engine.config.settings.metrics;
                match Engine::new(loaded, self.shutdown.clone()) {
                    Ok(mut engine) => {
                        if let Err(e) = self.hand_over_lock(&mut engine) {
                            tracing::error!(
                                "config reload failed: {e:#}; the last good config stays in force"
                            );
                            self.metrics.set_config_valid(false);
                            return false;
                        }
                        for w in &engine.warnings {
                            tracing::warn!("{w}");
                        }
                        if text != self.text {
                            // One log line per diff line: a log line never holds a line break.
                            tracing::info!("config reloaded from {}:", self.path.display());
                            for line in watch::config_diff(&self.text, &text).trim_end().lines() {
                                tracing::info!("  {line}");
                            }
                        } else {
                            tracing::info!(
                                "config reloaded from {} (its own text unchanged; an included file may have changed)",
                                self.path.display()
                            );
                        }
                        if engine.config.settings.metrics != old_metrics {
                            tracing::warn!(
                                "settings.metrics changed: restart keyward to move the listener"
                            );
                        }
                        // A reload is often the fix (a new credential): retry every account now.
                        self.health.clear();
                        // The listing under way read for the old config (its accounts, their
                        // clients, the users that matter): the run after the edit lists anew.
                        if let Some(r) = self.resync.take() {
                            r.task.abort();
                        }
                        self.listings.clear();
                        self.fresher.clear();
                        self.stale.clear();
                        self.metrics
                            .set_resync_share(engine.config.settings.resync_share);
                        self.engine = engine;
                        self.text = text;
                        self.metrics.set_config_valid(true);
                        true
                    }
                    Err(e) => {
                        tracing::error!(
                            "config reload failed: {e:#}; the last good config stays in force"
                        );
                        self.metrics.set_config_valid(false);
                        false
                    }
                }
            }
        }
    }

    /// Gives the reloaded `engine` the state lock the daemon holds (or takes the one of a new
    /// state directory); an engine in observe mode holds none.
    fn hand_over_lock(&mut self, engine: &mut Engine) -> anyhow::Result<()> {
        let same = engine.store.location() == self.engine.store.location();
        if same {
            // The same state: the same store (a database session is what holds its lock).
            engine.replace_store(Arc::clone(&self.engine.store));
        }
        if engine.config.settings.mode != Mode::Apply {
            return Ok(());
        }
        if same {
            engine.held_lock = self.engine.held_lock.take();
        }
        if engine.held_lock.is_none() && (self.standby.is_none() || !same) {
            match engine.lock() {
                Ok(lock) => {
                    engine.held_lock = Some(lock);
                    self.standby = None;
                }
                Err(e)
                    if engine.store.shared()
                        && e.downcast_ref::<crate::store::Locked>().is_some() =>
                {
                    tracing::info!("standby: {e:#}; waiting to take over");
                    // Said: the retries say it again only when it changes.
                    self.standby_note = format!("{e:#}");
                    self.standby = Some(Instant::now() + STANDBY_RETRY);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One run of the pipeline; returns when to run next, and why. A wake that needs every
    /// account read in full begins (or hurries) the listing and returns: the run comes when
    /// the listing is complete, with `listed`.
    async fn reconcile(&mut self, why: Wake, listed: Option<Listed>) -> Next {
        let started = Instant::now();
        tracing::debug!("reconciling ({why:?})");
        // The look-again (or retry) fires now; one still to come stays for its own time.
        if self.requeue.is_some_and(|r| r.because == why) {
            self.requeue = None;
        }
        let mode = self.engine.config.settings.mode;
        // A wake for keys that came due, or to look again at what the last run changed, reads
        // only those users; everything else (start, interval, edits, signals, retries) reads
        // every account in full.
        let scope = match why {
            Wake::Due => self.due_scope(),
            Wake::Requeue => {
                let changed = std::mem::take(&mut self.changed);
                self.scope_of(changed)
            }
            _ => None,
        };
        if scope.is_none() && listed.is_none() {
            // Someone waits for a listing at start, after an edit, a signal or a failure, and
            // for work that came due to more users than targeted reads would be worth; the one
            // at every interval (and the look-again after many changes) takes its share.
            let urgent = !matches!(why, Wake::Interval | Wake::Requeue);
            if why == Wake::Due {
                // The listing's run plans the due work; until then, nothing else is due.
                self.next_due = None;
            }
            self.begin_listing(urgent);
            return self.next();
        }
        let health = self.health.clone();
        let include = move |name: &str| {
            health
                .get(name)
                .and_then(|h| h.retry_at)
                .is_none_or(|t| t <= started)
        };
        if let Some(scope) = &scope {
            tracing::debug!(
                "targeted run: {} user(s)",
                scope.values().map(Vec::len).sum::<usize>()
            );
        }
        let run = self
            .engine
            .run(
                RunRequest {
                    mode: match mode {
                        Mode::Apply => RunMode::Apply,
                        Mode::Observe => RunMode::Plan,
                    },
                    opts: PlanOptions::default(),
                    include: &include,
                    every_account: false,
                    scope: scope.as_ref(),
                    listed,
                },
                &mut DaemonOperator,
            )
            .await;
        let run = match run {
            Ok(run) => run,
            Err(e) if e.downcast_ref::<crate::store::Locked>().is_some() => {
                tracing::warn!("{e:#}; trying again in {}s", LOCKED_RETRY.as_secs());
                let retry = Instant::now() + LOCKED_RETRY;
                self.requeue = Some(Next {
                    at: retry,
                    because: Wake::Retry,
                });
                // What came due waits for the lock too, not in a loop of its own.
                self.next_due = self.next_due.map(|d| d.max(retry));
                return self.next();
            }
            Err(e) => {
                tracing::error!("reconcile failed: {e:#}");
                self.finish(Outcome::Failed, e.to_string());
                self.requeue = Some(Next {
                    at: Instant::now() + backoff(1),
                    because: Wake::Retry,
                });
                return self.next();
            }
        };
        for e in &run.failures {
            let h = self.health.entry(e.provider.clone()).or_default();
            h.failures += 1;
            let wait = backoff(h.failures);
            // From the end of the observation, not the start of the run: an observation that
            // spent minutes retrying would otherwise be due again at once, and the loop would
            // never get to a config edit or a SIGHUP.
            h.retry_at = Some(Instant::now() + wait);
            tracing::error!("{e}; retrying this account in {}s", wait.as_secs());
        }
        for name in run.observed.keys() {
            self.health.remove(name);
        }
        let plan = &run.plan;
        // What is known of every account now: a full listing replaces it, a targeted one is
        // merged into it, and the users an apply changed are taken as the provider answered
        // its writes (with the state the apply left) instead of being read again; the work to
        // come is planned over all of it (no request). Without the apply's state (it failed
        // before it could record anything, say) the state the run read is used and the changed
        // users are read again by the look-again.
        let now_ts = Timestamp::now();
        let mut whole = match (&scope, self.seen.take()) {
            (Some(scope), Some(mut seen)) => {
                merge(&mut seen, &run.observed, scope);
                seen
            }
            (None, Some(mut seen)) => {
                // An account the listing could not read stays as it was known.
                seen.retain(|name, _| !run.observed.contains_key(name));
                seen.extend(run.observed.iter().map(|(n, s)| (n.clone(), s.clone())));
                seen
            }
            (None, None) | (Some(_), None) => run.observed.clone(),
        };
        let (state_now, folded) = match (&run.state_after, &run.report) {
            (Some(after), Some(report)) => (after, fold(&mut whole, &report.after)),
            _ => (&run.state, BTreeSet::new()),
        };
        let overall = if scope.is_some() || !folded.is_empty() {
            crate::plan::plan(
                &self.engine.config,
                &whole,
                state_now,
                now_ts,
                &PlanOptions::default(),
            )
        } else {
            plan.clone()
        };
        self.metrics.set_pending(overall.changes.len());
        self.next_due = overall
            .upcoming
            .iter()
            .map(|u| u.at)
            .min()
            .map(|at| after(Instant::now(), until(at, now_ts)));
        self.upcoming = overall.upcoming;
        // Changed users not folded in are read again by the look-again, however many runs
        // come before it.
        let changed_now: BTreeSet<(String, String)> = run
            .report
            .iter()
            .flat_map(|r| r.results.iter())
            .filter(|r| matches!(r.outcome, crate::apply::Outcome::Done(_)))
            .map(|r| (r.change.provider.clone(), r.change.user.clone()))
            .filter(|u| !folded.contains(u))
            .collect();
        self.changed.extend(changed_now.iter().cloned());
        // While an account's listing is under way, what targeted runs read of its users (and
        // what an apply answered of those it changed) is newer than what the listing read, and
        // what runs changed without an answer must be read again before the listing's plan.
        let read_now = scope
            .iter()
            .flat_map(|s| s.iter())
            .flat_map(|(p, users)| users.iter().map(move |(n, _)| (p.clone(), n.clone())))
            .chain(folded.iter().cloned());
        for (provider, name) in read_now.collect::<Vec<_>>() {
            if !self.listing_underway(&provider) {
                continue;
            }
            if let Some(stale) = self.stale.get_mut(&provider) {
                stale.remove(&name);
            }
            self.fresher.entry(provider).or_default().insert(name);
        }
        for (provider, user) in &changed_now {
            if self.listing_underway(provider) {
                self.stale
                    .entry(provider.clone())
                    .or_default()
                    .insert(user.clone());
            }
        }

        for e in &plan.errors {
            tracing::error!("{e}");
        }
        let reached_all = run.failures.is_empty() && plan.errors.is_empty();
        let (outcome, summary) = match &run.outcome {
            RunOutcome::Unchanged => (Outcome::Ok, "0 change(s) planned".to_string()),
            RunOutcome::Planned => {
                tracing::info!(
                    "observe mode: {} change(s) pending, none applied",
                    plan.changes.len()
                );
                (
                    Outcome::Ok,
                    format!("{} change(s) planned", plan.changes.len()),
                )
            }
            RunOutcome::Refused(why) => {
                tracing::error!("{why}");
                (Outcome::Refused, why.clone())
            }
            RunOutcome::Executed => {
                let report = run.report.clone().unwrap_or_default();
                let summary = report
                    .summary()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if report.ok() {
                    tracing::info!("{summary}");
                } else {
                    let closing = if self.engine.store.lost().is_some() {
                        "The lead was lost: whichever daemon leads next finishes the rest, recovering from the journal what this one could not record."
                    } else {
                        "Everything done is recorded; the next run finishes the rest."
                    };
                    for line in report.summary_closing(closing).lines() {
                        tracing::error!("{line}");
                    }
                    // Back off the accounts whose changes failed.
                    for r in &report.results {
                        if matches!(r.outcome, crate::apply::Outcome::Failed(_)) {
                            let h = self.health.entry(r.change.provider.clone()).or_default();
                            if h.retry_at.is_none() {
                                h.failures += 1;
                                h.retry_at = Some(Instant::now() + backoff(h.failures));
                            }
                        }
                    }
                }
                if !changed_now.is_empty() {
                    self.requeue = Some(Next {
                        at: Instant::now() + REQUEUE_AFTER_CHANGES,
                        because: Wake::Requeue,
                    });
                }
                let outcome = if report.ok() && reached_all {
                    Outcome::Changed
                } else {
                    Outcome::Partial
                };
                (outcome, summary)
            }
        };
        let outcome = if outcome == Outcome::Ok && !reached_all {
            Outcome::Partial
        } else {
            outcome
        };

        // Metrics from what is known of every account and the state as it is now on disk.
        let now = Timestamp::now();
        self.metrics.set_keys(
            &crate::status::entries(&self.engine.config, &whole, state_now, now),
            self.engine.config.settings.metrics_per_key,
            now,
        );
        self.seen = Some(whole);
        for (name, p) in &self.engine.providers {
            let up = if run.observed.contains_key(name) {
                Some(true)
            } else if run.failures.iter().any(|f| &f.provider == name) {
                Some(false)
            } else {
                None
            };
            self.metrics
                .provider_totals(name, p.requests_sent(), p.rate_limited(), up);
        }
        self.budget_metrics();
        self.finish(outcome, summary);
        self.next()
    }

    /// Brings the metrics that move while a listing or a run goes on up to date: requests,
    /// answers 429, the budget used, and the pages of the listing under way.
    fn live_metrics(&mut self) {
        for (name, p) in &self.engine.providers {
            self.metrics
                .provider_totals(name, p.requests_sent(), p.rate_limited(), None);
        }
        self.budget_metrics();
        if let Some(r) = self.resync.as_mut() {
            for (name, (counter, counted)) in r.pages.iter_mut() {
                let now = counter.load(Ordering::Relaxed);
                self.metrics
                    .listing(name, now.saturating_sub(*counted), true);
                *counted = now;
            }
        }
    }

    /// The share of every account's budget its last window took (`keyward_provider_budget_used_ratio`).
    fn budget_metrics(&self) {
        for (name, p) in &self.engine.providers {
            self.metrics.budget_used(name, p.budget_used());
        }
    }

    /// Whether `provider`'s listing is under way or cut short (waiting to go on).
    fn listing_underway(&self, provider: &str) -> bool {
        self.listings.contains_key(provider)
            || self.resync.as_ref().is_some_and(|r| !r.task.is_finished())
    }

    /// Begins the full listing of every account not backing off, each from where its last
    /// listing stopped, as a task beside the loop; paced at `settings.resync_share` of each
    /// account's budget unless `urgent`. A listing already under way goes on (hurried if
    /// `urgent`).
    fn begin_listing(&mut self, urgent: bool) {
        let now = Instant::now();
        self.next_interval = after(now, self.interval());
        if let Some(r) = &self.resync {
            if urgent && !r.urgent.swap(true, Ordering::Relaxed) {
                tracing::info!("the full listing under way goes on at the whole rate budget");
            }
            return;
        }
        let included: Vec<String> = self
            .engine
            .providers
            .keys()
            .filter(|n| {
                self.health
                    .get(*n)
                    .and_then(|h| h.retry_at)
                    .is_none_or(|t| t <= now)
            })
            .cloned()
            .collect();
        if included.is_empty() {
            // Every account backs off: its retry begins the listing.
            return;
        }
        for name in &included {
            if let Some(h) = self.health.get_mut(name) {
                h.retry_at = None;
            }
        }
        // Okta ASA lists keys user by user: only those of the users that matter (declared or
        // recorded), which needs the state; ngrok's key lists are account-wide.
        let needs_state = included.iter().any(|n| {
            self.engine
                .providers
                .get(n)
                .is_some_and(|p| p.scoped_listing())
        });
        let mut managed = if needs_state {
            match self.engine.store.load() {
                Ok(state) => self.engine.managed_users(&state),
                Err(e) => {
                    tracing::error!("reconcile failed: {e:#}");
                    self.finish(Outcome::Failed, e.to_string());
                    self.requeue = Some(Next {
                        at: now + backoff(1),
                        because: Wake::Retry,
                    });
                    return;
                }
            }
        } else {
            // No account here reads the scope.
            BTreeMap::new()
        };
        let urgent_flag = Arc::new(AtomicBool::new(urgent));
        let share = self.engine.config.settings.resync_share;
        let mut jobs = Vec::new();
        let mut pages = BTreeMap::new();
        for name in included {
            let (Some(p), Some(account)) = (
                self.engine.providers.get(&name),
                self.engine.config.providers.get(&name),
            ) else {
                continue;
            };
            let listing = self.listings.remove(&name).unwrap_or_default();
            if listing.begun() {
                tracing::info!(
                    "provider {name}: the full listing goes on from page {}",
                    listing.pages + 1
                );
            } else {
                // A listing from the start sees every change made before it.
                self.fresher.remove(&name);
                self.stale.remove(&name);
            }
            self.metrics.listing(&name, 0, true);
            let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
            pages.insert(name.clone(), (Arc::clone(&counter), 0));
            let pace = Pace::new(account.rate_limit, share, Arc::clone(&urgent_flag), counter);
            let users = managed.remove(&name).unwrap_or_default();
            jobs.push((name, Arc::clone(p), listing, users, pace));
        }
        tracing::debug!(
            "full listing begun{}",
            if urgent {
                String::new()
            } else {
                format!(" at {share}% of each account's rate budget")
            }
        );
        let task = tokio::spawn(async move {
            futures::future::join_all(jobs.into_iter().map(
                |(name, p, mut listing, users, pace)| async move {
                    let before = listing.pages;
                    let read = p.list(Some(&users), &mut listing, Some(&pace)).await;
                    (name, listing, read, before)
                },
            ))
            .await
        });
        self.resync = Some(Resync {
            task,
            urgent: urgent_flag,
            began: now,
            pages,
        });
    }

    /// Takes in what the listing task handed back: the accounts read to the end, with what
    /// targeted runs read since taken from those newer reads (and the users changed since read
    /// again now); the accounts cut short are kept to go on from, and back off.
    async fn listing_done(&mut self, results: Vec<ListingResult>) -> Listed {
        self.live_metrics();
        let took = self
            .resync
            .take()
            .map(|r| r.began.elapsed())
            .unwrap_or_default();
        let mut observed = Observed::new();
        let mut failures = Vec::new();
        for (name, listing, read, before) in results {
            let pages = listing.pages.saturating_sub(before);
            match read {
                Ok(()) => {
                    // The share of the budget it took, stated: its pages against what the
                    // account's rate_limit allows over the time it took (at least one window
                    // of the limit: the budget is counted per window).
                    let share = self.engine.config.providers.get(&name).map(|a| {
                        let window = a.rate_limit.per.as_secs_f64().max(0.001);
                        let span = took.as_secs_f64().max(window);
                        let allowed = f64::from(a.rate_limit.requests) * span / window;
                        (pages as f64 / allowed.max(1.0) * 100.0, span, allowed)
                    });
                    tracing::info!(
                        "provider {name}: full listing complete: {} page(s), {pages} of them in {:.1}s{}",
                        listing.pages,
                        took.as_secs_f64(),
                        share
                            .map(|(percent, span, allowed)| format!(
                                ": {percent:.0}% of its rate_limit ({allowed:.0} requests in {span:.0}s)"
                            ))
                            .unwrap_or_default()
                    );
                    self.metrics.listing(&name, 0, false);
                    observed.insert(name, listing.into_snapshot());
                }
                Err(e) => {
                    self.metrics.listing(&name, 0, listing.begun());
                    if listing.begun() {
                        tracing::warn!(
                            "provider {name}: the full listing stopped after page {}; it goes on from there",
                            listing.pages
                        );
                        self.listings.insert(name, listing);
                    }
                    failures.push(e);
                }
            }
        }
        self.read_stale(&observed).await;
        if let Some(seen) = &self.seen {
            overlay(&mut observed, seen, &self.fresher);
        }
        for name in observed.keys() {
            self.fresher.remove(name);
            self.stale.remove(name);
        }
        Listed { observed, failures }
    }

    /// Reads the users changed since their account's listing began and not read since (a few
    /// requests each), into `seen` and `fresher`, for [`overlay`].
    async fn read_stale(&mut self, observed: &Observed) {
        let stale: BTreeSet<(String, String)> = self
            .stale
            .iter()
            .filter(|(p, _)| observed.contains_key(*p))
            .flat_map(|(p, users)| users.iter().map(move |u| (p.clone(), u.clone())))
            .collect();
        if stale.is_empty() {
            return;
        }
        let Ok(state) = self.engine.store.load() else {
            return;
        };
        let mut scope = crate::engine::Scope::new();
        for (provider, user) in stale {
            // A user with no id was deleted: the listing's word on it stands.
            if let Some(id) = state
                .user(&provider, &user)
                .map(|r| r.id.clone())
                .or_else(|| {
                    observed
                        .get(&provider)
                        .and_then(|s| s.user_by_name(&user))
                        .map(|u| u.id.clone())
                })
            {
                scope.entry(provider).or_default().push((user, id));
            }
        }
        for (provider, users) in &scope {
            let Some(p) = self.engine.providers.get(provider) else {
                continue;
            };
            match p.observe_users(users).await {
                Ok(snap) => {
                    let fresh: Observed = [(provider.clone(), snap)].into();
                    let one: crate::engine::Scope = [(provider.clone(), users.clone())].into();
                    if let Some(seen) = self.seen.as_mut() {
                        merge(seen, &fresh, &one);
                    }
                    self.fresher
                        .entry(provider.clone())
                        .or_default()
                        .extend(users.iter().map(|(n, _)| n.clone()));
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    /// One turn of the loop: the run a wake asks for, or the run over a listing that finished.
    async fn turn(&mut self, why: Wake, results: Option<Vec<ListingResult>>) -> Next {
        match results {
            Some(results) => {
                let listed = self.listing_done(results).await;
                self.reconcile(why, Some(listed)).await
            }
            None => self.reconcile(why, None).await,
        }
    }

    /// The users whose work has come due (from the last plan's upcoming list), to read alone;
    /// `None` when a full run is needed instead.
    fn due_scope(&self) -> Option<crate::engine::Scope> {
        // A second of slack: the timer fires at the due time, not after it.
        let now = Timestamp::now() + jiff::SignedDuration::from_secs(1);
        let users: BTreeSet<(String, String)> = self
            .upcoming
            .iter()
            .filter(|u| u.at <= now)
            .map(|u| (u.provider.clone(), u.user.clone()))
            .collect();
        self.scope_of(users)
    }

    /// A scope of `users` with their ids from the state; `None` (read everything) when there is
    /// nothing to go on: no full listing yet, no user, or a user the state has no id for.
    fn scope_of(&self, users: BTreeSet<(String, String)>) -> Option<crate::engine::Scope> {
        let seen = self.seen.as_ref()?;
        if users.is_empty() {
            return None;
        }
        // What an interrupted run left is finished by a run over every account.
        if self.engine.has_unfinished().unwrap_or(true) {
            return None;
        }
        // Reading users one by one costs about three requests each (the user, its API keys,
        // its credentials); a full listing one per hundred objects. The cheaper one is used.
        let pages = |n: usize| n.div_ceil(100).max(1);
        let listing: usize = seen
            .values()
            .map(|snap| pages(snap.users.len()) + 2 * pages(snap.keys.len()))
            .sum();
        if users.len() * 3 >= listing {
            return None;
        }
        let state = self.engine.store.load().ok()?;
        let mut scope = crate::engine::Scope::new();
        for (provider, user) in users {
            let id = state.user(&provider, &user)?.id.clone();
            scope.entry(provider).or_default().push((user, id));
        }
        Some(scope)
    }

    /// Counts the run and says how it went.
    fn finish(&mut self, outcome: Outcome, summary: String) {
        self.metrics.reconciled(outcome.label());
        if matches!(outcome, Outcome::Ok | Outcome::Changed) {
            self.metrics.succeeded_at(Timestamp::now());
        }
        self.last_outcome = format!("{}: {summary}", outcome.label());
    }

    /// The `STATUS=` line: one line, whatever an error quoted (a line break there would add
    /// assignments such as `READY=1` to the notify message).
    /// Tries to take the shared state's lock; true when this daemon now leads.
    fn try_lead(&mut self) -> bool {
        if self.engine.store.lost().is_some() {
            // A lost connection is not reused: a new one waits for the lock.
            let fresh = crate::engine::store_for(&self.engine.config.settings);
            self.engine.replace_store(fresh);
        }
        // A database that does not answer may keep this a while: the other tasks run on.
        match tokio::task::block_in_place(|| self.engine.lock()) {
            Ok(lock) => {
                self.engine.held_lock = Some(lock);
                self.standby = None;
                self.standby_note.clear();
                let leader = tokio::task::block_in_place(|| self.engine.store.leader());
                tracing::info!(
                    "leading: took the lock of the state in {}{}",
                    self.engine.store.location(),
                    leader
                        .as_deref()
                        .map(|l| format!(" ({l})"))
                        .unwrap_or_default()
                );
                self.metrics.set_leader(true, leader.as_deref());
                self.metrics
                    .set_lease(Some(crate::store::lease_fence(&self.engine.store)));
                // As at start: every account listed, what an earlier leader left recovered.
                self.next_interval = Instant::now();
                true
            }
            Err(e) => {
                let note = format!("{e:#}");
                if note != self.standby_note {
                    if e.downcast_ref::<crate::store::Locked>().is_some() {
                        tracing::info!("standby: {note}");
                    } else {
                        tracing::warn!("standby: cannot take the lock: {note}; trying again");
                    }
                    self.standby_note = note;
                }
                let leader = tokio::task::block_in_place(|| self.engine.store.leader());
                self.metrics.set_leader(false, leader.as_deref());
                self.last_outcome = "standby (another keyward daemon leads)".to_string();
                self.standby = Some(Instant::now() + STANDBY_RETRY);
                false
            }
        }
    }

    /// Gives up the lead once the shared state's connection (and with it the lock) is lost:
    /// nothing more is started, what is known of the accounts is dropped, and the daemon waits
    /// to take over again like any standby.
    fn step_down_if_lost(&mut self) {
        let Some(why) = self.engine.store.lost() else {
            return;
        };
        if self.standby.is_some() {
            return;
        }
        tracing::error!("lost the lead: {why}; no change is started, waiting to take over again");
        self.engine.held_lock = None;
        let fresh = crate::engine::store_for(&self.engine.config.settings);
        self.engine.replace_store(fresh);
        if let Some(r) = self.resync.take() {
            r.task.abort();
        }
        self.listings.clear();
        self.fresher.clear();
        self.stale.clear();
        self.health.clear();
        self.seen = None;
        self.upcoming.clear();
        self.changed.clear();
        self.requeue = None;
        self.metrics.set_leader(false, None);
        self.last_outcome = "standby (lost the lead)".to_string();
        self.standby = Some(Instant::now() + STANDBY_RETRY);
    }

    fn status_line(&self) -> String {
        let wake = self.next().at;
        let secs = wake.saturating_duration_since(Instant::now()).as_secs();
        crate::text::escape(&format!("{}; next run in {secs}s", self.last_outcome)).into_owned()
    }
}

/// Folds a targeted read into what is known of the accounts: the scoped users and the keys
/// they own are replaced by what `fresh` says of them (a user absent there is gone). One pass
/// over each touched account.
fn merge(
    seen: &mut crate::model::Observed,
    fresh: &crate::model::Observed,
    scope: &crate::engine::Scope,
) {
    for (provider, users) in scope {
        let Some(new) = fresh.get(provider) else {
            // The account did not answer: what was known stays.
            continue;
        };
        let names: HashSet<&str> = users.iter().map(|(n, _)| n.as_str()).collect();
        seen.entry(provider.clone()).or_default().replace_users(
            &names,
            users.iter().map(|(_, id)| id.clone()),
            new.users.clone(),
            new.keys.clone(),
        );
    }
}

/// Folds what an apply left into `seen`: each user in `after` (as the provider answered the
/// apply's writes) replaces what was known of it, with the keys it owns; a deleted one is gone.
/// Returns the users folded in. One pass over each touched account.
fn fold(seen: &mut Observed, after: &[crate::apply::UserAfter]) -> BTreeSet<(String, String)> {
    let mut by_provider: BTreeMap<&str, Vec<&crate::apply::UserAfter>> = BTreeMap::new();
    for a in after {
        by_provider.entry(&a.provider).or_default().push(a);
    }
    let mut folded = BTreeSet::new();
    for (provider, users) in by_provider {
        let names: HashSet<&str> = users.iter().map(|a| a.name.as_str()).collect();
        seen.entry(provider.to_string()).or_default().replace_users(
            &names,
            std::iter::empty(),
            users.iter().filter_map(|a| a.remote.clone()).collect(),
            users.iter().flat_map(|a| a.keys.iter().cloned()).collect(),
        );
        folded.extend(users.iter().map(|a| (a.provider.clone(), a.name.clone())));
    }
    folded
}

/// Takes the users `newer` names, and the keys they own, from `seen` (what targeted reads found
/// after the listing read them) into `fresh`, a listing just completed. One pass over each
/// touched account.
fn overlay(fresh: &mut Observed, seen: &Observed, newer: &BTreeMap<String, BTreeSet<String>>) {
    for (provider, names) in newer {
        let (Some(snap), Some(known)) = (fresh.get_mut(provider), seen.get(provider)) else {
            continue;
        };
        if names.is_empty() {
            continue;
        }
        let names: HashSet<&str> = names.iter().map(String::as_str).collect();
        let users: Vec<_> = known
            .users
            .iter()
            .filter(|u| names.contains(u.name.as_str()))
            .cloned()
            .collect();
        let ids: HashSet<&str> = users.iter().map(|u| u.id.as_str()).collect();
        let keys = known
            .keys
            .iter()
            .filter(|k| k.owner_id.as_deref().is_some_and(|o| ids.contains(o)))
            .cloned()
            .collect();
        snap.replace_users(&names, std::iter::empty(), users, keys);
    }
}

/// The config file's text for the reload diff (bounded like every config read; zeroized when
/// dropped, as it may hold an inline secret). Unreadable reads as empty.
fn read_config_text(path: &std::path::Path) -> Zeroizing<String> {
    let bytes = crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, true)
        .map(Zeroizing::new)
        .unwrap_or_default();
    Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs the daemon until `shutdown` is cancelled (the process's SIGTERM or SIGINT).
pub async fn run(path: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(diags) => {
            for d in &diags {
                tracing::error!("{d}");
            }
            anyhow::bail!("{}: the config is not valid; not starting", path.display());
        }
    };
    let text = read_config_text(&path);
    let mut engine = Engine::new(loaded, shutdown.clone())?;
    let mut standby = None;
    let mut standby_note = String::new();
    if engine.config.settings.mode == Mode::Apply {
        // One daemon applies to a state, and no one-shot apply or rotate changes it under the
        // daemon's feet: the daemon holds the lock for its life. A state several hosts share
        // (a database) has one leader: the others wait to take over.
        match engine.lock() {
            Ok(lock) => engine.held_lock = Some(lock),
            Err(e) if engine.store.shared() => {
                // Another daemon leads, or the database is not up yet (a host booting): wait
                // for it rather than exit, as a standby does.
                if e.downcast_ref::<crate::store::Locked>().is_some() {
                    tracing::info!("standby: {e:#}; waiting to take over");
                } else {
                    tracing::warn!("standby: cannot take the lock: {e:#}; trying again");
                }
                // Said: the retries say it again only when it changes.
                standby_note = format!("{e:#}");
                standby = Some(Instant::now() + STANDBY_RETRY);
            }
            Err(e) => return Err(e.context(format!("{}: not starting", path.display()))),
        }
    }
    for w in &engine.warnings {
        tracing::warn!("{w}");
    }
    metrics.set_config_valid(true);
    let mut daemon = Daemon {
        // The digest of exactly what was loaded: an edit made since is seen below.
        hash: Some(engine.config.digest.clone()),
        path: path.clone(),
        text,
        metrics: Arc::clone(&metrics),
        health: BTreeMap::new(),
        next_interval: Instant::now(),
        next_due: None,
        requeue: None,
        seen: None,
        upcoming: Vec::new(),
        changed: BTreeSet::new(),
        listings: BTreeMap::new(),
        resync: None,
        fresher: BTreeMap::new(),
        stale: BTreeMap::new(),
        last_outcome: if standby.is_some() {
            "standby (another keyward daemon leads)".to_string()
        } else {
            "starting".to_string()
        },
        shutdown: shutdown.clone(),
        standby,
        standby_note,
        engine,
    };
    if daemon.engine.config.settings.mode == Mode::Apply {
        let leader = daemon.engine.store.leader();
        metrics.set_leader(daemon.standby.is_none(), leader.as_deref());
        if daemon.standby.is_none() {
            metrics.set_lease(Some(crate::store::lease_fence(&daemon.engine.store)));
        }
    }

    {
        // The process's signal handler cancels `shutdown`; systemd hears about it at once.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            systemd::stopping();
        });
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut watch = watch::watch(&path)?;
    watch.include(&daemon.engine.config.include_patterns);
    // An edit made while the daemon started, before the watch was set up (of the file or of an
    // included one), is read now.
    if config::digest_of(&path, &daemon.engine.config.include_patterns) != daemon.hash
        && daemon.reload(true)
    {
        watch.include(&daemon.engine.config.include_patterns);
    }
    let listener = match daemon.engine.config.settings.metrics {
        Some(addr) => Some(
            metrics::listen(addr)
                .await
                .with_context(|| format!("{}: not starting", path.display()))?,
        ),
        None => None,
    };
    let metrics_task = listener.map(|listener| {
        let (m, stop) = (Arc::clone(&metrics), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve_on(listener, m, stop).await {
                tracing::error!("{e:#}");
            }
        })
    });
    let heartbeat = systemd::start_watchdog();
    systemd::ready("config loaded; first reconcile starting");
    tracing::info!(
        "keyward daemon started: config {}, mode {:?}, interval {}, the listing at every interval at no more than {}% of each account's rate_limit",
        path.display(),
        daemon.engine.config.settings.mode,
        crate::duration::format(daemon.engine.config.settings.interval),
        daemon.engine.config.settings.resync_share
    );

    metrics.set_resync_share(daemon.engine.config.settings.resync_share);
    // The next run and why; `Some` = run now.
    let mut run_now = Some(Wake::Start);
    // A full listing that has finished, to plan and apply over.
    let mut listed_now: Option<Vec<ListingResult>> = None;
    let mut next = daemon.next();
    let mut settle_until: Option<Instant> = None;
    // Requests, the budget used and a listing's pages move between runs: scrapes see them live.
    let mut metrics_tick = tokio::time::interval(METRICS_REFRESH);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A leader of a shared state looks at its lease every second: one that lost it says so
    // (`keyward_leader 0`) and stops at once.
    let mut lease_tick = tokio::time::interval(Duration::from_secs(1));
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let work = if daemon.standby.is_some() {
            // A standby plans and applies nothing; its turn comes when it takes the lock.
            listed_now = None;
            run_now = None;
            None
        } else {
            match listed_now.take() {
                Some(results) => Some((Wake::Listed, Some(results))),
                None => run_now.take().map(|why| (why, None)),
            }
        };
        if let Some((why, results)) = work {
            // The loop answers the watchdog while the run is under way: a run that waits on the
            // network is alive; a wedged one (or runtime) stops answering, and the pings stop.
            {
                let run = daemon.turn(why, results);
                tokio::pin!(run);
                loop {
                    tokio::select! {
                        n = &mut run => {
                            next = n;
                            break;
                        }
                        _ = heartbeat.asked() => heartbeat.answer(),
                    }
                }
            }
            daemon.step_down_if_lost();
            let status = daemon.status_line();
            tracing::debug!("{status}; next run because of {:?}", next.because);
            systemd::status(&status);
            metrics.set_next_wakeup(
                Timestamp::now()
                    .checked_add(next.at.saturating_duration_since(Instant::now()))
                    .unwrap_or(Timestamp::MAX),
            );
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep_until_or_forever(daemon.standby.is_none().then_some(next.at)) => {
                run_now = Some(next.because);
            }
            _ = sleep_until_or_forever(daemon.standby) => {
                if daemon.try_lead() {
                    run_now = Some(Wake::Start);
                }
                systemd::status(&daemon.status_line());
            }
            // An editor's save is a burst of events: let it settle before re-reading.
            Some(()) = watch.events.recv() => {
                settle_until.get_or_insert(Instant::now() + watch::SETTLE);
            }
            _ = sleep_until_or_forever(settle_until) => {
                settle_until = None;
                while watch.events.try_recv().is_ok() {}
                // A symlink may point elsewhere now: watch where the file lives before reading it.
                watch.refresh();
                let before = daemon.hash.clone();
                if daemon.reload(false) {
                    watch.include(&daemon.engine.config.include_patterns);
                    run_now = Some(Wake::ConfigEdited);
                } else if daemon.hash != before {
                    // An edit that did not validate: say so. Other files written in the
                    // watched directory change nothing and are not worth a word.
                    systemd::status(&daemon.status_line());
                }
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                systemd::reloading();
                watch.refresh();
                if daemon.reload(true) {
                    watch.include(&daemon.engine.config.include_patterns);
                }
                run_now = Some(Wake::Hangup);
                systemd::ready(&daemon.status_line());
            }
            results = listing_finished(&mut daemon.resync) => listed_now = Some(results),
            _ = lease_tick.tick(), if daemon.engine.store.shared() && daemon.standby.is_none() => {
                daemon.step_down_if_lost();
            }
            _ = metrics_tick.tick() => {
                daemon.step_down_if_lost();
                daemon.live_metrics();
            }
            _ = heartbeat.asked() => heartbeat.answer(),
        }
    }
    if let Some(r) = daemon.resync.take() {
        // A listing only reads: nothing is lost by stopping it.
        r.task.abort();
    }
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    tracing::info!("keyward daemon stopped");
    Ok(())
}

/// What the listing under way hands back when it is done; never, while there is none.
async fn listing_finished(resync: &mut Option<Resync>) -> Vec<ListingResult> {
    match resync {
        Some(r) => match (&mut r.task).await {
            Ok(results) => results,
            Err(e) => {
                tracing::error!("the full listing failed: {e}");
                Vec::new()
            }
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_forever(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b1 = backoff(1);
        assert!(
            b1 >= Duration::from_secs(4) && b1 <= Duration::from_secs(6),
            "{b1:?}"
        );
        let b3 = backoff(3);
        assert!(
            b3 >= Duration::from_secs(16) && b3 <= Duration::from_secs(24),
            "{b3:?}"
        );
        for n in [10, 20, 40] {
            assert!(backoff(n) <= BACKOFF_CAP.mul_f64(1.2));
        }
    }
}
