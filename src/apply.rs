//! The executor: runs a plan's changes against the providers in dependency order (a user before
//! its keys, delivery before anything is recorded, a new key before the old one is revoked),
//! users concurrently up to `settings.concurrency`, and writes the state to the store after
//! every change so an interrupted or partly failed apply is finished by the next run. It
//! reports precisely what was done, what failed and what was not attempted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkConfig};
use crate::model::{KeyTag, Observed, RemoteKey, RemoteUser};
use crate::oplog::Event;
use crate::plan::{Action, Change, Op, Plan, SlotTarget};
use crate::providers::{NewKey, Provider};
use crate::sinks::{self, SinkDocument};
use crate::state::{KeyRecord, State};
use crate::store::{JournalLog, Store};
use crate::text::short_id;

/// Changes with their position in the plan.
type Numbered = Vec<(usize, Change)>;

/// How one user's changes ended (with their position in the plan), and the user as they left
/// it when every one was done.
type UserOutcome = (Vec<(usize, ChangeResult)>, Option<UserAfter>);

/// How one change ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done, with a detail for the progress line.
    Done(String),
    /// Failed, with the error chain (masked when printed).
    Failed(String),
    /// Not attempted (keyward is shutting down, or an earlier change for the same user failed),
    /// with why.
    NotAttempted(String),
}

/// One change of the plan and how it ended.
#[derive(Debug, Clone)]
pub struct ChangeResult {
    /// The change.
    pub change: Change,
    /// How it ended.
    pub outcome: Outcome,
}

/// A service user as an apply left it, from the provider's answers to its writes: the user
/// (`None`: deleted) and the keys it owns.
#[derive(Debug, Clone)]
pub struct UserAfter {
    /// Provider account.
    pub provider: String,
    /// Service user name.
    pub name: String,
    /// The user, as the provider last answered; `None` when it was deleted.
    pub remote: Option<RemoteUser>,
    /// The keys it owns, with every key created, updated or revoked by the apply accounted for.
    pub keys: Vec<RemoteKey>,
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every change of the executed plan, in plan order.
    pub results: Vec<ChangeResult>,
    /// The users whose every change was done, as the apply left them (the daemon folds them
    /// into what it knows of the accounts instead of reading them again).
    pub after: Vec<UserAfter>,
}

impl Report {
    /// How many changes failed.
    pub fn failed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .count()
    }

    /// How many changes were not attempted.
    pub fn not_attempted(&self) -> usize {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::NotAttempted(_)))
            .count()
    }

    /// How many changes were done.
    pub fn done(&self) -> usize {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Done(_)))
            .count()
    }

    /// Whether every change was done.
    pub fn ok(&self) -> bool {
        self.failed() == 0 && self.not_attempted() == 0
    }

    fn count_done(&self, actions: &[Action]) -> usize {
        self.results
            .iter()
            .filter(|r| {
                matches!(r.outcome, Outcome::Done(_)) && actions.contains(&r.change.action())
            })
            .count()
    }

    /// The closing summary, for stdout: a failed apply ends telling the operator to run the
    /// same command again.
    pub fn summary(&self) -> String {
        self.summary_closing(
            "Everything done is recorded; run the same command again to finish the rest.",
        )
    }

    /// The closing summary; a failed apply's ends with `closing` (one line: what finishes the
    /// rest).
    pub fn summary_closing(&self, closing: &str) -> String {
        let counts = format!(
            "{} created, {} updated, {} rotated, {} revoked, {} deleted",
            self.count_done(&[Action::CreateUser, Action::CreateKey]),
            self.count_done(&[Action::UpdateUser, Action::UpdateKey]),
            self.count_done(&[Action::RotateKey]),
            self.count_done(&[Action::RevokeKey]),
            self.count_done(&[Action::DeleteUser]),
        );
        if self.ok() {
            return format!("Apply complete: {counts}.\n");
        }
        let mut out = format!(
            "Apply failed: {} of {} changes done ({counts}), {} failed, {} not attempted.\n",
            self.done(),
            self.results.len(),
            self.failed(),
            self.not_attempted()
        );
        for r in &self.results {
            let what = describe(&r.change);
            match &r.outcome {
                Outcome::Failed(e) => out.push_str(&format!(
                    "  failed:        {what}: {}\n",
                    crate::text::escape(&crate::redact::mask(e, None))
                )),
                Outcome::NotAttempted(why) => out.push_str(&format!(
                    "  not attempted: {what}: {}\n",
                    crate::text::escape(why)
                )),
                Outcome::Done(_) => {}
            }
        }
        out.push_str(closing);
        out.push('\n');
        out
    }
}

/// A delivery that failed for good: the error, and the first sink that received the key and
/// cannot be put back (an exec sink that ran to success), if any.
struct DeliveryFailure {
    error: anyhow::Error,
    reached: Option<String>,
}

/// One line naming a change, for progress and reports.
pub fn describe(c: &Change) -> String {
    crate::plan::describe_change(c.action(), &c.provider, &c.user, c.slot(), c.key_id())
}

/// Everything the executor works with.
pub struct Executor {
    /// The config, shared with the engine.
    pub config: Arc<Config>,
    /// One client per provider account, by account name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    /// Where the state and the journal are kept.
    pub store: Arc<dyn Store>,
    /// keyward's state, saved to the store after every change.
    pub state: Mutex<State>,
    /// The highest state serial known to be on disk (group commit).
    pub written: Mutex<u64>,
    /// Users changed since the last write, by (provider, name): the next write records them.
    dirty: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    journal: Arc<dyn JournalLog>,
    /// Journal operations begun and not yet finished.
    open_ops: AtomicUsize,
    /// Once cancelled, no new change starts (the one in flight finishes).
    cancel: CancellationToken,
}

impl Executor {
    /// An executor over `state` (already recovered from any journal left by an earlier run).
    pub fn new(
        config: Arc<Config>,
        providers: BTreeMap<String, Arc<dyn Provider>>,
        store: Arc<dyn Store>,
        state: State,
    ) -> anyhow::Result<Arc<Self>> {
        Self::with_cancel(config, providers, store, state, CancellationToken::new())
    }

    /// Like [`Executor::new`]; once `cancel` fires no new change starts (the one in flight for
    /// each user finishes, so a minted secret is still delivered and recorded).
    pub fn with_cancel(
        config: Arc<Config>,
        providers: BTreeMap<String, Arc<dyn Provider>>,
        store: Arc<dyn Store>,
        state: State,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let journal = store.journal()?;
        Ok(Arc::new(Executor {
            config,
            providers,
            store,
            written: Mutex::new(state.serial),
            dirty: std::sync::Mutex::default(),
            state: Mutex::new(state),
            journal,
            open_ops: AtomicUsize::new(0),
            cancel,
        }))
    }

    async fn log(&self, seq: u64, event: Event, durable: bool) -> anyhow::Result<()> {
        let journal = Arc::clone(&self.journal);
        tokio::task::spawn_blocking(move || journal.append(seq, event, durable)).await?
    }

    /// Records, durably, that the remote write of `change` is about to happen.
    async fn begin(
        &self,
        change: &Change,
        user_id: Option<&str>,
        key_id: Option<&str>,
        forced: bool,
    ) -> anyhow::Result<u64> {
        self.begin_as(change.action(), change, user_id, key_id, forced)
            .await
    }

    /// [`Self::begin`] for a write of another kind than the change's own (the revocation of
    /// the key a rotation with `overlap: 0s` replaced).
    async fn begin_as(
        &self,
        action: Action,
        change: &Change,
        user_id: Option<&str>,
        key_id: Option<&str>,
        forced: bool,
    ) -> anyhow::Result<u64> {
        let seq = self.journal.next_seq();
        self.open_ops.fetch_add(1, Ordering::SeqCst);
        let intent = Event::Intent {
            action,
            provider: change.provider.clone(),
            user: change.user.clone(),
            user_id: user_id.map(str::to_string),
            slot: change.slot().map(str::to_string),
            key_id: key_id.map(str::to_string),
            forced,
        };
        if let Err(e) = self.log(seq, intent, true).await {
            self.open_ops.fetch_sub(1, Ordering::SeqCst);
            return Err(e.context("recording the intent in the journal; nothing was changed"));
        }
        Ok(seq)
    }

    /// Marks an operation finished (whatever its outcome: the state says what it left).
    async fn finish(&self, seq: u64) {
        if let Err(e) = self.log(seq, Event::Done, false).await {
            tracing::warn!("journal: {e:#}");
            return;
        }
        self.open_ops.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The per-user context carried across that user's changes.
struct UserRun {
    provider: Arc<dyn Provider>,
    remote: Option<RemoteUser>,
    keys: Vec<RemoteKey>,
}

impl UserRun {
    /// The user's key `id` as last seen, or an error saying it is gone.
    fn key(&self, id: &str) -> anyhow::Result<RemoteKey> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("key {id} is not on this user any more"))
    }
}

impl Executor {
    /// Runs `plan`; `observed` is the listing the plan was checked against.
    pub async fn run(self: &Arc<Self>, plan: &Plan, observed: &Observed) -> Report {
        self.run_with(plan, observed, None).await
    }

    /// [`Executor::run`], telling `progress` of each change as it ends.
    pub async fn run_with(
        self: &Arc<Self>,
        plan: &Plan,
        observed: &Observed,
        progress: Option<Arc<dyn crate::progress::Progress>>,
    ) -> Report {
        // Group by user, keeping the plan's order (create user < update < keys < revoke < delete),
        // and remember each change's place so the report follows the plan.
        let mut slots: HashMap<(&str, &str), usize> = HashMap::new();
        let mut groups: Vec<(String, String, Numbered)> = Vec::new();
        for (i, c) in plan.changes.iter().enumerate() {
            let g = *slots.entry((&c.provider, &c.user)).or_insert_with(|| {
                groups.push((c.provider.clone(), c.user.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[g].2.push((i, c.clone()));
        }
        // Index the observed accounts once: users by name, keys by owner.
        let mut users: HashMap<(&str, &str), &RemoteUser> = HashMap::new();
        let mut keys: HashMap<(&str, &str), Vec<RemoteKey>> = HashMap::new();
        for (provider, snap) in observed {
            for u in snap.users.iter().filter(|u| !u.deleted) {
                users.entry((provider, &u.name)).or_insert(u);
            }
            for k in &snap.keys {
                if let Some(owner) = &k.owner_id {
                    keys.entry((provider, owner)).or_default().push(k.clone());
                }
            }
        }
        let concurrency = self.config.settings.concurrency.max(1);
        let runs = groups.into_iter().map(|(provider, user, changes)| {
            let remote = users
                .get(&(provider.as_str(), user.as_str()))
                .map(|u| (*u).clone());
            let owned = remote
                .as_ref()
                .and_then(|u| keys.get(&(provider.as_str(), u.id.as_str())).cloned())
                .unwrap_or_default();
            let this = Arc::clone(self);
            let progress = progress.clone();
            async move {
                this.run_user(&provider, changes, remote, owned, progress.as_deref())
                    .await
            }
        });
        let results: Vec<UserOutcome> = futures::stream::iter(runs)
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let (results, after): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        if self.open_ops.load(Ordering::SeqCst) == 0 {
            // Everything this run began is finished and recorded in the durable state; what an
            // unreachable account left unfinished stays for a later run.
            let journal = Arc::clone(&self.journal);
            let reached: std::collections::HashSet<String> = observed.keys().cloned().collect();
            match tokio::task::spawn_blocking(move || {
                journal.compact(&|op| !reached.contains(&op.provider))
            })
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("clearing the journal: {e:#}"),
                Err(e) => tracing::warn!("clearing the journal: {e}"),
            }
        }
        let mut ordered: Vec<(usize, ChangeResult)> = results.into_iter().flatten().collect();
        ordered.sort_by_key(|(i, _)| *i);
        Report {
            results: ordered.into_iter().map(|(_, r)| r).collect(),
            after: after.into_iter().flatten().collect(),
        }
    }

    async fn run_user(
        &self,
        provider: &str,
        changes: Numbered,
        remote: Option<RemoteUser>,
        keys: Vec<RemoteKey>,
        progress: Option<&dyn crate::progress::Progress>,
    ) -> UserOutcome {
        let out = self.run_user_changes(provider, changes, remote, keys).await;
        if let Some(p) = progress {
            for (_, r) in &out.0 {
                p.ended(&r.change);
            }
        }
        out
    }

    async fn run_user_changes(
        &self,
        provider: &str,
        changes: Numbered,
        remote: Option<RemoteUser>,
        keys: Vec<RemoteKey>,
    ) -> UserOutcome {
        let mut out = Vec::with_capacity(changes.len());
        let Some(p) = self.providers.get(provider).cloned() else {
            for (i, change) in changes {
                out.push((
                    i,
                    ChangeResult {
                        change,
                        outcome: Outcome::Failed(format!("provider {provider} is not configured")),
                    },
                ));
            }
            return (out, None);
        };
        let mut run = UserRun {
            provider: p,
            remote,
            keys,
        };
        let mut failed_before = false;
        for (i, change) in changes {
            if self.cancel.is_cancelled() {
                out.push((
                    i,
                    ChangeResult {
                        change,
                        outcome: Outcome::NotAttempted("keyward is shutting down".to_string()),
                    },
                ));
                continue;
            }
            if failed_before {
                out.push((
                    i,
                    ChangeResult {
                        change,
                        outcome: Outcome::NotAttempted(
                            "an earlier change for this user failed".to_string(),
                        ),
                    },
                ));
                continue;
            }
            let outcome = match self.execute(&mut run, &change).await {
                Ok(detail) => {
                    tracing::info!(
                        "{}: done{}",
                        describe(&change),
                        if detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({detail})")
                        }
                    );
                    Outcome::Done(detail)
                }
                Err(e) => {
                    tracing::error!("{}: {e:#}", describe(&change));
                    failed_before = true;
                    Outcome::Failed(format!("{e:#}"))
                }
            };
            out.push((i, ChangeResult { change, outcome }));
        }
        let all_done = out
            .iter()
            .all(|(_, r)| matches!(r.outcome, Outcome::Done(_)));
        let after = match out.first() {
            Some((_, first)) if all_done => Some(UserAfter {
                provider: provider.to_string(),
                name: first.change.user.clone(),
                remote: run.remote,
                keys: run.keys,
            }),
            _ => None,
        };
        (out, after)
    }

    /// Applies `update` (a change to the record of `user`, a (provider, name) pair) to the state
    /// and returns once the store holds it durably. Only the users changed since the last write
    /// are written, so a change costs the same whatever the size of the state. Writes are
    /// group-committed: while one write is in flight, later updates queue up and the next write
    /// carries all of them, so concurrent users share fsyncs.
    async fn save(
        &self,
        user: (&str, &str),
        update: impl FnOnce(&mut State),
    ) -> anyhow::Result<()> {
        let my_generation = {
            let mut state = self.state.lock().await;
            update(&mut state);
            state.serial += 1;
            if let Ok(mut dirty) = self.dirty.lock() {
                dirty.insert((user.0.to_string(), user.1.to_string()));
            }
            state.serial
        };
        let mut written = self.written.lock().await;
        if *written >= my_generation {
            return Ok(());
        }
        let (rows, generation) = {
            let state = self.state.lock().await;
            let dirty = self
                .dirty
                .lock()
                .map(|mut d| std::mem::take(&mut *d))
                .unwrap_or_default();
            let rows: Vec<crate::store::UserRow> = dirty
                .into_iter()
                .map(|(p, n)| {
                    let rec = state.user(&p, &n).cloned();
                    (p, n, rec)
                })
                .collect();
            (rows, state.serial)
        };
        let store = Arc::clone(&self.store);
        let written_rows = rows.clone();
        match tokio::task::spawn_blocking(move || store.record_users(generation, &written_rows))
            .await
        {
            Ok(Ok(())) => {
                *written = generation;
                Ok(())
            }
            failed => {
                // Not recorded: the next write carries these users again.
                if let Ok(mut dirty) = self.dirty.lock() {
                    dirty.extend(rows.into_iter().map(|(p, n, _)| (p, n)));
                }
                match failed {
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                    Ok(Ok(())) => Ok(()),
                }
            }
        }
    }

    async fn execute(&self, run: &mut UserRun, change: &Change) -> anyhow::Result<String> {
        let provider = change.provider.as_str();
        let name = change.user.as_str();
        match &change.op {
            Op::CreateKey { slot, .. } => self.mint(run, change, slot, None, false).await,
            Op::RotateKey {
                slot, from, forced, ..
            } => self.mint(run, change, slot, Some(&from.id), *forced).await,
            Op::RevokeKey { key, .. } => {
                let key = run.key(&key.id)?;
                self.revoke(run, &key, change).await?;
                Ok(String::new())
            }
            Op::UpdateKey { key, after, .. } => {
                let remote = run.key(&key.id)?;
                let user_id = run.remote.as_ref().map(|u| u.id.clone());
                let work = async {
                    let updated = run.provider.update_key(name, &remote, after).await?;
                    if let Some(k) = run.keys.iter_mut().find(|k| k.id == updated.id) {
                        *k = updated;
                    }
                    Ok(String::new())
                };
                self.journaled(
                    change.action(),
                    change,
                    user_id.as_deref(),
                    Some(&key.id),
                    work,
                )
                .await
            }
            Op::CreateUser { active, .. } => {
                let work = async {
                    let user = run.provider.create_user(name, *active).await?;
                    let id = user.id.clone();
                    self.save((provider, name), |s| {
                        s.record_user(provider, name, &user.id, true, user.created_at)
                    })
                    .await?;
                    run.remote = Some(user);
                    run.keys.clear();
                    Ok(id)
                };
                self.journaled(change.action(), change, None, None, work)
                    .await
            }
            Op::UpdateUser { active, .. } => {
                let user = run
                    .remote
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("the user no longer exists"))?;
                let work = async {
                    run.remote = Some(run.provider.update_user(&user, *active).await?);
                    Ok(String::new())
                };
                self.journaled(change.action(), change, Some(&user.id), None, work)
                    .await
            }
            Op::DeleteUser { .. } => {
                let user = run
                    .remote
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("the user no longer exists"))?;
                let work = async {
                    run.provider.delete_user(&user).await?;
                    self.save((provider, name), |s| s.forget_user(provider, name))
                        .await?;
                    run.remote = None;
                    Ok(String::new())
                };
                self.journaled(change.action(), change, Some(&user.id), None, work)
                    .await
            }
        }
    }

    /// Runs `work` as one journaled operation: its intent durable before it starts, done
    /// after it ends, whatever its outcome (the state says what it left).
    async fn journaled<T>(
        &self,
        action: Action,
        change: &Change,
        user_id: Option<&str>,
        key_id: Option<&str>,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let seq = self
            .begin_as(action, change, user_id, key_id, false)
            .await?;
        let result = work.await;
        self.finish(seq).await;
        result
    }

    /// Revokes a key (journaled) and drops it from the state.
    async fn revoke(
        &self,
        run: &mut UserRun,
        key: &RemoteKey,
        change: &Change,
    ) -> anyhow::Result<()> {
        let user_id = run.remote.as_ref().map(|u| u.id.clone());
        let work = self.revoke_unjournaled(run, key);
        self.journaled(
            Action::RevokeKey,
            change,
            user_id.as_deref(),
            Some(&key.id),
            work,
        )
        .await
    }

    async fn revoke_unjournaled(&self, run: &mut UserRun, key: &RemoteKey) -> anyhow::Result<()> {
        let (provider, name) = (
            run.provider.name().to_string(),
            run.remote
                .as_ref()
                .map(|u| u.name.clone())
                .unwrap_or_default(),
        );
        run.provider.revoke_key(&name, key).await?;
        run.keys.retain(|k| k.id != key.id);
        self.save((&provider, &name), |s| {
            s.forget_key(&provider, &name, &key.id)
        })
        .await
    }

    /// Creates a key for a slot, delivers it to every sink, records it as current, and (for a
    /// rotation) moves the previous key to retiring — revoking it at once when `overlap` is 0.
    /// Each step is journaled: intent (durable) → created → delivered (durable) → recorded in
    /// the state (durable) → done, so a crash anywhere leaves enough to recover.
    async fn mint(
        &self,
        run: &mut UserRun,
        change: &Change,
        target: &SlotTarget,
        replaces: Option<&str>,
        forced: bool,
    ) -> anyhow::Result<String> {
        let slot = &target.spec;
        let user = run.remote.clone().ok_or_else(|| {
            anyhow::anyhow!("the user does not exist (its creation failed or was not planned)")
        })?;
        let provider = change.provider.clone();
        let new_key = NewKey {
            kind: slot.kind,
            slot: slot.name.clone(),
            description: slot
                .description
                .clone()
                .unwrap_or_else(|| format!("keyward: {}/{}", user.name, slot.name)),
            metadata: KeyTag::new(&self.config.settings.owner, &slot.name).to_metadata(),
            acl: slot.acl.clone(),
        };
        // Every sink must be able to take this key before one is minted: a name its path cannot
        // hold would otherwise mint, fail delivery and revoke on every run.
        for sink in &target.sinks {
            sinks::precheck(sink, &provider, &user.name, &slot.name)
                .map_err(|e| anyhow::anyhow!("{e}; no key was created"))?;
        }
        let seq = self.begin(change, Some(&user.id), replaces, forced).await?;
        let created = match run.provider.create_key(&user, &new_key).await {
            Ok(c) => c,
            Err(e) => {
                // A refusal (4xx) created nothing: the operation is over. After a transient
                // failure the provider may have created the key and only the answer was lost:
                // the operation stays open in the journal, so the next run's recovery finds
                // that key (by its tag, or as the only new untagged key) and revokes it.
                if e.class != crate::providers::ErrorClass::Transient {
                    self.finish(seq).await;
                }
                return Err(e.into());
            }
        };
        let key = created.key.clone();
        self.log(
            seq,
            Event::Created {
                key_id: key.id.clone(),
                kind: key.kind,
                created_at: key.created_at,
            },
            false,
        )
        .await?;
        let account = self.config.providers.get(&provider);
        let doc = SinkDocument {
            provider: provider.clone(),
            provider_type: account
                .map(|a| a.kind)
                .unwrap_or(crate::model::ProviderType::Ngrok),
            team: account.and_then(|a| match &a.auth {
                crate::config::ProviderAuth::OktaAsa { team, .. } => Some(team.clone()),
                _ => None,
            }),
            user: user.name.clone(),
            user_id: user.id.clone(),
            slot: slot.name.clone(),
            kind: slot.kind,
            key_id: key.id.clone(),
            secret: created.secret,
            created_at: key.created_at,
            expires_at: key.expires_at,
            rotate_after: slot
                .rotate_every
                .and_then(|d| key.created_at.checked_add(d).ok()),
        };
        // From here on a sink may hold the secret: recovery must not revoke it at once.
        self.log(seq, Event::Delivering, true).await?;
        if let Err(failure) = self.deliver_all(&target.sinks, &doc).await {
            let e = failure.error;
            if let Some(sink) = failure.reached {
                // A sink that cannot be put back (an exec program ran to success) holds the
                // new key: revoking it would cut that sink's consumers off. It is kept until a
                // later key reaches every sink (the next run rotates the slot), and the current
                // key stays.
                let pending = KeyRecord {
                    id: key.id.clone(),
                    kind: key.kind,
                    created_at: key.created_at,
                    delivered_at: Timestamp::now(),
                    sinks: Vec::new(),
                    retire_after: None,
                    delivery: crate::state::Delivery::Delivered,
                };
                let saved = self
                    .save((&provider, &user.name), |s| {
                        s.slot_entry(&provider, &user, &slot.name)
                            .add_pending(pending)
                    })
                    .await;
                self.finish(seq).await;
                run.keys.push(key.clone());
                saved?;
                return Err(e.context(format!(
                    "delivery failed after sink {sink} received the new key {}; it is kept (not revoked) until a new key reaches every sink: the next run rotates the slot again",
                    key.id
                )));
            }
            // The secret exists nowhere else: without delivery the key is useless, so it goes,
            // and the key it would have replaced stays.
            let revoked = run.provider.revoke_key(&user.name, &key).await;
            let err = match revoked {
                Ok(()) => e.context(format!(
                    "delivery failed; the new key {} was revoked and the current key left in place",
                    key.id
                )),
                Err(r) => {
                    // Remember it, so the next run revokes it even where keys carry no tag.
                    if let Err(w) = self
                        .save((&provider, &user.name), |s| {
                            s.slot_entry(&provider, &user, &slot.name)
                                .add_orphan(&key.id)
                        })
                        .await
                    {
                        tracing::error!(
                            "recording the undelivered key {} as an orphan: {w:#}; the journal still names it",
                            key.id
                        );
                    }
                    e.context(format!(
                        "delivery failed; revoking the undelivered key {} also failed ({r}); the next run revokes it",
                        key.id
                    ))
                }
            };
            self.finish(seq).await;
            return Err(err);
        }
        self.log(
            seq,
            Event::Delivered {
                sinks: slot.sinks.clone(),
            },
            true,
        )
        .await?;
        let now = Timestamp::now();
        let record = KeyRecord {
            id: key.id.clone(),
            kind: key.kind,
            created_at: key.created_at,
            delivered_at: now,
            sinks: slot.sinks.clone(),
            retire_after: None,
            delivery: crate::state::Delivery::Delivered,
        };
        let retire_after = crate::rotation::revoke_after(now, slot.overlap);
        let mut replaced: Vec<String> = Vec::new();
        let remote_ids: std::collections::HashSet<String> =
            run.keys.iter().map(|k| k.id.clone()).collect();
        // If this write fails the journal still says "delivered": the next run adopts the key.
        self.save((&provider, &user.name), |s| {
            // A previous key that vanished remotely has nothing left to retire.
            replaced =
                s.slot_entry(&provider, &user, &slot.name)
                    .promote(record, retire_after, |id| remote_ids.contains(id));
        })
        .await?;
        self.finish(seq).await;
        run.keys.push(key.clone());
        let mut detail = format!("{} delivered to {}", key.id, slot.sinks.join(", "));
        for old in replaced {
            if slot.overlap <= jiff::SignedDuration::ZERO {
                if let Some(old_key) = run.keys.iter().find(|k| k.id == old).cloned() {
                    self.revoke(run, &old_key, change).await?;
                    detail.push_str(&format!("; {} revoked (overlap 0s)", short_id(&old)));
                }
            } else {
                detail.push_str(&format!(
                    "; {} retiring until {}",
                    short_id(&old),
                    retire_after.strftime("%Y-%m-%d %H:%M:%SZ")
                ));
            }
        }
        Ok(detail)
    }

    /// Delivers to every sink of the slot, each retried with backoff. If one fails for good, the
    /// file sinks already written are put back as they were (the previous document, or no file),
    /// so that no sink is left holding the new key the caller is about to revoke: the key left
    /// in place must still be what every sink holds.
    async fn deliver_all(
        &self,
        sinks: &[SinkConfig],
        doc: &SinkDocument,
    ) -> Result<(), DeliveryFailure> {
        let mut written: Vec<(std::path::PathBuf, Option<Zeroizing<Vec<u8>>>)> = Vec::new();
        let mut reached = None;
        let result = self
            .deliver_each(sinks, doc, &mut written, &mut reached)
            .await;
        if result.is_err() {
            // Fenced like the delivery: a leader that lost its lead puts nothing back, since
            // the next leader may have written the file since.
            let fence = crate::store::lease_fence(&self.store);
            for (path, previous) in written.into_iter().rev() {
                let shown = path.display().to_string();
                let fence = Arc::clone(&fence);
                let undone = tokio::task::spawn_blocking(move || match previous {
                    Some(bytes) => crate::files::write_private_file_fenced(&path, &bytes, &fence),
                    None => crate::files::remove_private_file_fenced(&path, &fence),
                })
                .await;
                match undone {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("restoring file sink {shown}: {e:#}"),
                    Err(e) => tracing::error!("restoring file sink {shown}: {e}"),
                }
            }
        }
        result.map_err(|error| DeliveryFailure { error, reached })
    }

    /// [`Self::deliver_all`]'s loop; records each file sink it wrote with what the file held
    /// before.
    async fn deliver_each(
        &self,
        sinks: &[SinkConfig],
        doc: &SinkDocument,
        written: &mut Vec<(std::path::PathBuf, Option<Zeroizing<Vec<u8>>>)>,
        reached: &mut Option<String>,
    ) -> anyhow::Result<()> {
        for sink in sinks {
            let name = &sink.name;
            // What a file sink holds now, to put back should a later sink fail.
            let before = sinks::file_path(sink, doc).map(|p| {
                let previous = crate::files::read_own_file(&p);
                (p, previous)
            });
            // A leader that may have lost its lead (a long pause) delivers nothing: the next
            // leader may have moved the slot on, and this key would overwrite its newer one.
            // Checked again right before a file sink's file is replaced, under its lock.
            self.store.check_lease()?;
            let fence = crate::store::lease_fence(&self.store);
            let watch = self.store.shared();
            (|| async { sinks::deliver(sink, doc, &fence, watch).await })
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(5))
                        .with_max_times(4)
                        .with_jitter(),
                )
                // A failure no retry can fix (a name the path cannot hold, a directory others
                // can write) fails at once.
                .when(|e: &sinks::SinkError| !e.permanent)
                .notify(|e, wait| {
                    tracing::warn!("sink {name}: {e}; retrying in {:.1}s", wait.as_secs_f64())
                })
                .await
                .map_err(|e| e.error.context(format!("sink {name}")))?;
            match before {
                Some(b) => written.push(b),
                // A sink that cannot be put back (an exec program) now holds the key.
                None => {
                    reached.get_or_insert_with(|| name.clone());
                }
            }
        }
        Ok(())
    }
}
