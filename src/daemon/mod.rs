//! `keyward daemon`: decides *when* to reconcile, never *what* — every run is the same
//! observe → plan → apply pipeline as the commands, recomputed from the file, the remote and
//! the state (level-triggered). It runs at start, then on the earliest of: the `interval`, the
//! next instant a key becomes due or an overlap ends (it sleeps until then: no polling), an
//! edit of the config file, SIGHUP. Triggers arriving during a run coalesce into one follow-up
//! run. A failing provider account backs off exponentially with jitter on its own; the others
//! carry on. SIGTERM/SIGINT let the change in flight finish (a minted secret is delivered and
//! recorded), start nothing new, and exit 0.

pub mod metrics;
pub mod systemd;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;
use secrecy::zeroize::Zeroizing;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Mode};
use crate::engine::Engine;
use crate::plan::PlanOptions;
use metrics::Metrics;

/// First retry after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest wait between retries of a failing account.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// After a run that changed something, look again this soon (metrics, retiring keys).
const REQUEUE_AFTER_CHANGES: Duration = Duration::from_secs(1);
/// When another keyward holds the state lock, try again this soon.
const LOCKED_RETRY: Duration = Duration::from_secs(5);

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
    requeue: Option<Instant>,
    last_outcome: String,
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

    /// The earliest trigger time.
    fn next_wake(&self) -> Instant {
        let mut wake = self.next_interval;
        for t in self
            .next_due
            .iter()
            .chain(self.requeue.iter())
            .chain(self.health.values().filter_map(|h| h.retry_at.as_ref()))
        {
            wake = wake.min(*t);
        }
        wake
    }

    /// Re-reads the config. Without `force`, does nothing unless the bytes changed. An invalid
    /// file is reported and ignored: the last good config stays in force.
    fn reload(&mut self, force: bool) -> bool {
        let hash = watch::file_hash(&self.path);
        if !force && hash == self.hash {
            return false;
        }
        self.hash = hash;
        match config::load(&self.path) {
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
                match Engine::new(loaded) {
                    Ok(engine) => {
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
                                "config reloaded from {} (unchanged)",
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

    /// One run of the pipeline.
    async fn reconcile(&mut self, shutdown: &CancellationToken) {
        let now = Instant::now();
        let now_ts = Timestamp::now();
        self.next_interval = after(now, self.interval());
        self.requeue = None;
        let lock = match self.engine.lock() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e:#}; trying again in {}s", LOCKED_RETRY.as_secs());
                self.requeue = Some(now + LOCKED_RETRY);
                return;
            }
        };
        let mode = self.engine.config.settings.mode;
        let health = self.health.clone();
        let include = |name: &str| {
            health
                .get(name)
                .and_then(|h| h.retry_at)
                .is_none_or(|t| t <= now)
        };
        let obs = match self
            .engine
            .observe_where(mode == Mode::Apply, include)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("reconcile failed: {e:#}");
                self.metrics.reconciled("failed");
                self.last_outcome = format!("failed: {e}");
                self.requeue = Some(Instant::now() + backoff(1));
                return;
            }
        };
        for e in &obs.failures {
            let h = self.health.entry(e.provider.clone()).or_default();
            h.failures += 1;
            let wait = backoff(h.failures);
            // From the end of the observation, not the start of the run: an observation that
            // spent minutes retrying would otherwise be due again at once, and the loop would
            // never get to a config edit or a SIGHUP.
            h.retry_at = Some(Instant::now() + wait);
            tracing::error!("{e}; retrying this account in {}s", wait.as_secs());
        }
        for name in obs.observed.keys() {
            self.health.remove(name);
        }
        let opts = PlanOptions {
            only: Vec::new(),
            force: obs.recovery.force.clone(),
        };
        let plan = self.engine.plan(&obs, &opts, now_ts);
        self.metrics.set_pending(plan.changes.len());
        self.next_due = plan
            .upcoming
            .iter()
            .map(|u| u.at)
            .min()
            .map(|at| after(now, until(at, now_ts)));

        let mut outcome = if obs.failures.is_empty() {
            "ok"
        } else {
            "partial"
        };
        let mut summary = format!("{} change(s) planned", plan.changes.len());
        if plan.has_changes() && mode == Mode::Apply {
            match self.engine.check_deletions(&plan) {
                Err(e) => {
                    tracing::error!("{e:#}");
                    outcome = "refused";
                    summary = e.to_string();
                }
                Ok(()) => {
                    tracing::info!("applying {} change(s)", plan.changes.len());
                    match self
                        .engine
                        .execute(&plan, &obs.observed, obs.state.clone(), shutdown.clone())
                        .await
                    {
                        Ok(report) => {
                            summary = report
                                .summary()
                                .lines()
                                .next()
                                .unwrap_or_default()
                                .to_string();
                            if report.ok() {
                                tracing::info!("{summary}");
                                outcome = if obs.failures.is_empty() {
                                    "changed"
                                } else {
                                    "partial"
                                };
                            } else {
                                tracing::error!("{}", report.summary().trim_end());
                                outcome = "partial";
                                // Back off the accounts whose changes failed.
                                for r in &report.results {
                                    if matches!(r.outcome, crate::apply::Outcome::Failed(_)) {
                                        let h = self
                                            .health
                                            .entry(r.change.provider.clone())
                                            .or_default();
                                        if h.retry_at.is_none() {
                                            h.failures += 1;
                                            h.retry_at = Some(Instant::now() + backoff(h.failures));
                                        }
                                    }
                                }
                            }
                            if report.done() > 0 {
                                self.requeue = Some(Instant::now() + REQUEUE_AFTER_CHANGES);
                            }
                        }
                        Err(e) => {
                            tracing::error!("apply failed: {e:#}");
                            outcome = "failed";
                            summary = e.to_string();
                        }
                    }
                }
            }
        } else if plan.has_changes() {
            tracing::info!(
                "observe mode: {} change(s) pending, none applied",
                plan.changes.len()
            );
        }
        drop(lock);

        // Metrics from what was observed and the state as it is now on disk.
        let state = self.engine.state_dir.load().unwrap_or(obs.state);
        self.metrics.set_keys(&crate::status::entries(
            &self.engine.config,
            &obs.observed,
            &state,
            Timestamp::now(),
        ));
        for (name, p) in &self.engine.providers {
            let up = if obs.observed.contains_key(name) {
                Some(true)
            } else if obs.failures.iter().any(|f| &f.provider == name) {
                Some(false)
            } else {
                None
            };
            self.metrics
                .provider_totals(name, p.requests_sent(), p.rate_limited(), up);
        }
        self.metrics.reconciled(outcome);
        if matches!(outcome, "ok" | "changed") {
            self.metrics.succeeded_at(Timestamp::now());
        }
        self.last_outcome = format!("{outcome}: {summary}");
    }

    /// The `STATUS=` line: one line, whatever an error quoted (a line break there would add
    /// assignments such as `READY=1` to the notify message).
    fn status_line(&self) -> String {
        let wake = self.next_wake();
        let secs = wake.saturating_duration_since(Instant::now()).as_secs();
        crate::text::escape(&format!("{}; next run in {secs}s", self.last_outcome)).into_owned()
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

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(path: PathBuf) -> anyhow::Result<()> {
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
    let engine = Engine::new(loaded)?;
    for w in &engine.warnings {
        tracing::warn!("{w}");
    }
    metrics.set_config_valid(true);
    let mut daemon = Daemon {
        hash: watch::file_hash(&path),
        path: path.clone(),
        text,
        metrics: Arc::clone(&metrics),
        health: BTreeMap::new(),
        next_interval: Instant::now(),
        next_due: None,
        requeue: None,
        last_outcome: "starting".to_string(),
        engine,
    };

    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: finishing the change in flight, then exiting"),
                _ = int.recv() => tracing::info!("SIGINT: finishing the change in flight, then exiting"),
            }
            systemd::stopping();
            shutdown.cancel();
            crate::providers::http::shut_down();
        });
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut watch = watch::watch(&path)?;
    let metrics_task = daemon.engine.config.settings.metrics.map(|addr| {
        let (m, stop) = (Arc::clone(&metrics), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m, stop).await {
                tracing::error!("{e:#}");
            }
        })
    });
    let heartbeat = systemd::start_watchdog();
    systemd::ready("config loaded; first reconcile starting");
    tracing::info!(
        "keyward daemon started: config {}, mode {:?}, interval {}",
        path.display(),
        daemon.engine.config.settings.mode,
        crate::duration::format(daemon.engine.config.settings.interval)
    );

    let mut run_now = true;
    let mut settle_until: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if run_now {
            run_now = false;
            // The loop answers the watchdog while the run is under way: a run that waits on the
            // network is alive; a wedged one (or runtime) stops answering, and the pings stop.
            {
                let run = daemon.reconcile(&shutdown);
                tokio::pin!(run);
                loop {
                    tokio::select! {
                        _ = &mut run => break,
                        _ = heartbeat.asked() => heartbeat.answer(),
                    }
                }
            }
            let status = daemon.status_line();
            tracing::debug!("{status}");
            systemd::status(&status);
            metrics.set_next_wakeup(
                Timestamp::now()
                    .checked_add(daemon.next_wake().saturating_duration_since(Instant::now()))
                    .unwrap_or(Timestamp::MAX),
            );
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(daemon.next_wake()) => run_now = true,
            // An editor's save is a burst of events: let it settle before re-reading.
            Some(()) = watch.events.recv() => {
                settle_until.get_or_insert(Instant::now() + watch::SETTLE);
            }
            _ = sleep_until_or_forever(settle_until) => {
                settle_until = None;
                while watch.events.try_recv().is_ok() {}
                // A symlink may point elsewhere now: watch where the file lives before reading it.
                watch.refresh();
                run_now = daemon.reload(false);
                if !run_now {
                    systemd::status(&daemon.status_line());
                }
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                systemd::reloading();
                watch.refresh();
                daemon.reload(true);
                run_now = true;
                systemd::ready(&daemon.status_line());
            }
            _ = heartbeat.asked() => heartbeat.answer(),
        }
    }
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    tracing::info!("keyward daemon stopped");
    Ok(())
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
