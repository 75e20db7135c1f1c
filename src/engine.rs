//! One reconcile pipeline shared by the commands and the daemon: a loaded config with its
//! provider clients and state store, and one entry point, [`Engine::run`]: observe (with
//! crash recovery) → plan → review → check → approve → execute, returning a [`RunReport`].
//! `keyward plan`, `apply`, `rotate`, a saved-plan apply and every daemon reconcile are this
//! one run with different options; the caller decides only what to show and what to approve.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::apply::{Executor, Report};
use crate::config::{Config, Diagnostic, Loaded};
use crate::model::Observed;
use crate::oplog::Unfinished;
use crate::plan::{self, Plan, PlanOptions, Warning};
use crate::providers::{self, Provider, ProviderError};
use crate::recovery::{self, Recovery, SinkProbes};
use crate::state::State;
use crate::store::{StateDir, Store, StoreLock};

/// What an observation reads at each account.
#[derive(Clone, Copy)]
enum Observe<'a> {
    /// Every user, and the keys of the users that matter (declared or recorded).
    Managed,
    /// Every user and every user's keys (`keyward import`).
    EveryUser,
    /// Only these users and their keys; accounts not named are not read.
    Users(&'a Scope),
}

impl<'a> From<Option<&'a Scope>> for Observe<'a> {
    fn from(scope: Option<&'a Scope>) -> Self {
        scope.map_or(Observe::Managed, Observe::Users)
    }
}

/// What one observation found.
pub struct Observation {
    /// The accounts that answered.
    pub observed: Observed,
    /// keyward's state with any unfinished journal operations folded in.
    pub state: State,
    /// What crash recovery made of the journal.
    pub recovery: Recovery,
    /// The accounts that did not answer, and why.
    pub failures: Vec<ProviderError>,
}

/// A loaded config, ready to reconcile.
pub struct Engine {
    /// The config, shared with the executor.
    pub config: Arc<Config>,
    /// The config's warnings (an inline secret, say); every plan carries them.
    pub warnings: Vec<Diagnostic>,
    /// One client per provider account, by account name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    /// Where the state, the journal and the lock live (replace it with
    /// [`Engine::replace_store`]).
    pub store: Arc<dyn Store>,
    /// The store the provider clients check their lease against before each request.
    current_store: Arc<std::sync::RwLock<Arc<dyn Store>>>,
    /// The process's shutdown: the clients stop waiting and sending, the executor stops
    /// starting changes (the one in flight finishes).
    pub shutdown: CancellationToken,
    /// The state lock, when this engine holds it for its whole life (the daemon): its runs
    /// then take it no more, and no other keyward process changes the state meanwhile.
    pub held_lock: Option<StoreLock>,
    /// How long a one-shot command waits for the state lock another process holds
    /// (`--lock-timeout`; zero: fail at once).
    pub lock_timeout: std::time::Duration,
}

/// What a run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Observe and plan; write nothing (no lock, no recovery written back).
    Plan,
    /// Take the lock, write recovery back, and execute what the plan holds.
    Apply,
}

/// The caller's part in a run: what it shows, what it lets through.
pub trait Operator {
    /// Sees the plan before anything changes (to print it); may narrow it (a saved plan is
    /// held against it) or refuse it (`Err`: nothing is changed).
    fn review(&mut self, plan: Plan) -> anyhow::Result<Plan> {
        Ok(plan)
    }

    /// Approves a plan that has changes and passed the deletion check (`Err`: nothing is
    /// changed).
    fn approve(&mut self, _plan: &Plan) -> anyhow::Result<()> {
        Ok(())
    }

    /// What shows the approved plan's progress while it runs (none by default).
    fn progress(&mut self, _plan: &Plan) -> Option<Arc<dyn crate::progress::Progress>> {
        None
    }
}

/// An operator that shows nothing and approves everything (the daemon).
pub struct Unattended;

impl Operator for Unattended {}

/// Fails with the last of `failures` (logging the others) when any account did not answer: a
/// command acts only on a complete observation.
pub fn every_account_answered(failures: &[ProviderError]) -> anyhow::Result<()> {
    match failures.split_last() {
        None => Ok(()),
        Some((last, rest)) => {
            for failure in rest {
                tracing::error!("{failure}");
            }
            Err(last.clone().into())
        }
    }
}

/// The service users a targeted run reads, by provider account: (name, id at the provider).
pub type Scope = BTreeMap<String, Vec<(String, String)>>;

/// One run's request.
pub struct RunRequest<'a> {
    /// Plan only, or apply.
    pub mode: RunMode,
    /// `--only`, and slots to rotate now.
    pub opts: PlanOptions,
    /// The accounts to observe (the daemon leaves out those backing off).
    pub include: &'a (dyn Fn(&str) -> bool + Sync),
    /// Whether an account that does not answer fails the run (the commands) or only its own
    /// part (the daemon).
    pub every_account: bool,
    /// Read and plan only these users (the daemon's run for the keys that came due); `None`:
    /// every account in full. Operations an interrupted run left unfinished make it a full
    /// run.
    pub scope: Option<&'a Scope>,
    /// The accounts as a listing made beforehand found them (the daemon's paced full
    /// listing): the run reads nothing more from the providers. `None`: the run lists.
    pub listed: Option<Listed>,
}

/// A full listing made before the run: the accounts it read to the end, and the accounts it
/// could not.
pub struct Listed {
    /// The accounts read to the end.
    pub observed: Observed,
    /// The accounts whose listing failed, and why.
    pub failures: Vec<ProviderError>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Nothing to do.
    Unchanged,
    /// Planned only (`RunMode::Plan`, or the daemon in observe mode).
    Planned,
    /// More deletions than `settings.max_deletions`; nothing was changed.
    Refused(String),
    /// Executed; the report says what was done.
    Executed,
}

/// What one run observed, planned and did.
pub struct RunReport {
    /// The plan, as computed (before any narrowing by a saved plan).
    pub plan: Plan,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// The executor's report, when the plan was executed.
    pub report: Option<Report>,
    /// The accounts that did not answer.
    pub failures: Vec<ProviderError>,
    /// The accounts that did.
    pub observed: Observed,
    /// The state the plan was made from (recovery folded in).
    pub state: State,
    /// The state as the apply left it, when the plan was executed.
    pub state_after: Option<State>,
}

/// The store the settings name: the PostgreSQL database of `state_url`, else the state
/// directory. Nothing is opened or connected yet.
pub fn store_for(settings: &crate::config::Settings) -> Arc<dyn Store> {
    match &settings.state_url {
        Some(url) => Arc::new(
            crate::pgstore::PgStore::new(url.clone()).migrating_from(settings.state_dir.clone()),
        ),
        None => Arc::new(StateDir::new(settings.state_dir.clone())),
    }
}

impl Engine {
    /// Loads the engine for `loaded`, its provider clients bound to `shutdown`.
    pub fn new(loaded: Loaded, shutdown: CancellationToken) -> anyhow::Result<Engine> {
        let config = Arc::new(loaded.config);
        let mut clients = BTreeMap::new();
        let marks = Arc::new(providers::marks::PageMarks::new(
            config.settings.state_dir.clone(),
        ));
        if let Some(password) = config
            .settings
            .state_url
            .as_ref()
            .and_then(crate::pgstore::password_of)
        {
            crate::redact::remember("settings.state_url", &password);
        }
        for (name, account) in &config.providers {
            // Whatever keyward quotes later (a sink program's output, an error body) is masked
            // for these.
            match &account.auth {
                crate::config::ProviderAuth::Ngrok { api_key } => {
                    crate::redact::remember(&format!("{name}.api_key"), api_key)
                }
                crate::config::ProviderAuth::OktaAsa { key_secret, .. } => {
                    crate::redact::remember(&format!("{name}.key_secret"), key_secret)
                }
            }
            clients.insert(
                name.clone(),
                providers::connect(
                    account,
                    config.settings.concurrency,
                    shutdown.clone(),
                    Some(Arc::clone(&marks)),
                )?,
            );
        }
        let store = store_for(&config.settings);
        let current: Arc<std::sync::RwLock<Arc<dyn Store>>> =
            Arc::new(std::sync::RwLock::new(Arc::clone(&store)));
        for client in clients.values() {
            let current = Arc::clone(&current);
            client.fence_requests(Arc::new(move || {
                let store = current
                    .read()
                    .map(|s| Arc::clone(&*s))
                    .map_err(|_| anyhow::anyhow!("the state store handle is poisoned"))?;
                store.check_lease()
            }));
        }
        Ok(Engine {
            store,
            current_store: current,
            config,
            warnings: loaded.warnings,
            providers: clients,
            shutdown,
            held_lock: None,
            lock_timeout: std::time::Duration::ZERO,
        })
    }

    /// Puts `store` in the place of the engine's store, for the provider clients' checks too.
    pub fn replace_store(&mut self, store: Arc<dyn Store>) {
        if let Ok(mut current) = self.current_store.write() {
            *current = Arc::clone(&store);
        }
        self.store = store;
    }

    /// Takes the state directory's exclusive lock.
    pub fn lock(&self) -> anyhow::Result<StoreLock> {
        self.store.lock()
    }

    /// Takes the state lock, waiting up to `lock_timeout` for another process to let it go
    /// (trying every second); then the holder is named in the error.
    pub async fn take_lock(&self) -> anyhow::Result<StoreLock> {
        let until = tokio::time::Instant::now() + self.lock_timeout;
        // Said once, and again only when the holder changes: not once a second.
        let mut said = String::new();
        loop {
            match self.store.lock() {
                Err(e) if e.downcast_ref::<crate::store::Locked>().is_some() => {
                    let now = tokio::time::Instant::now();
                    if now >= until {
                        return Err(e);
                    }
                    let holder = format!("{e:#}");
                    if holder != said {
                        tracing::info!(
                            "{holder}; waiting up to {}s for it",
                            (until - now).as_secs_f64().ceil()
                        );
                        said = holder;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep((until - now).min(std::time::Duration::from_secs(1))) => {}
                        _ = self.shutdown.cancelled() => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    /// Runs the pipeline once: observe (recovering what an interrupted run left) → plan (the
    /// forced rotations recovery hands back included, so `plan` shows what `apply` will do) →
    /// the operator's review → the deletion check → the operator's approval → execute.
    pub async fn run(
        &self,
        req: RunRequest<'_>,
        operator: &mut dyn Operator,
    ) -> anyhow::Result<RunReport> {
        let apply = req.mode == RunMode::Apply;
        let _lock = if apply && self.held_lock.is_none() {
            Some(self.take_lock().await?)
        } else {
            None
        };
        let scope = match req.scope {
            Some(s) if !self.has_unfinished()? => Some(s),
            _ => None,
        };
        let obs = self
            .observe_where(apply, req.include, Observe::from(scope), req.listed)
            .await?;
        if req.every_account {
            every_account_answered(&obs.failures)?;
        }
        let mut opts = req.opts;
        if let Some(scope) = scope {
            opts.only.extend(
                scope
                    .iter()
                    .flat_map(|(p, users)| users.iter().map(move |(n, _)| format!("{p}:{n}"))),
            );
        }
        for f in &obs.recovery.force {
            if !opts.force.contains(f) {
                opts.force.push(f.clone());
            }
        }
        let planning = std::time::Instant::now();
        let computed = self.plan(&obs, &opts, Timestamp::now());
        tracing::debug!(
            "planned {} change(s) and {} warning(s) in {:.1} ms",
            computed.changes.len(),
            computed.warnings.len(),
            planning.elapsed().as_secs_f64() * 1000.0
        );
        let plan = operator.review(computed)?;
        let mut state_after = None;
        let (outcome, report) = if !plan.has_changes() {
            (RunOutcome::Unchanged, None)
        } else if !apply {
            (RunOutcome::Planned, None)
        } else if let Err(e) = self.check_deletions(&plan) {
            (RunOutcome::Refused(format!("{e:#}")), None)
        } else {
            operator.approve(&plan)?;
            let progress = operator.progress(&plan);
            // The executor works on its own copy; the report keeps the state the plan read.
            let done = self
                .execute(&plan, &obs.observed, obs.state.clone(), progress.clone())
                .await;
            if let Some(p) = progress {
                p.finish();
            }
            let (done, after) = done?;
            state_after = after;
            (RunOutcome::Executed, Some(done))
        };
        Ok(RunReport {
            plan,
            outcome,
            report,
            failures: obs.failures,
            observed: obs.observed,
            state: obs.state,
            state_after,
        })
    }

    /// Whether the journal holds operations an interrupted run left unfinished: those are
    /// finished by a run over every account, never by a targeted one.
    pub fn has_unfinished(&self) -> anyhow::Result<bool> {
        Ok(!crate::oplog::unfinished(&self.store.journal_entries()?).is_empty())
    }

    /// Lists every provider account concurrently and loads the state, with whatever an
    /// interrupted earlier run left in the journal folded in (in memory only: see
    /// [`Engine::run`] for the run that writes it back). For `keyward status`.
    pub async fn observe(&self) -> anyhow::Result<Observation> {
        self.observe_where(false, &|_| true, Observe::Managed, None)
            .await
    }

    /// Observes the accounts `include` names: the keys of the users that matter (declared or
    /// recorded), or with `every_user` the keys of every user (`keyward import`). With
    /// `persist` (the caller holds the state lock) the recovered state is written and the
    /// journal compacted: only operations of accounts that did not answer stay in it, for a
    /// later run to finish.
    async fn observe_where(
        &self,
        persist: bool,
        include: &(dyn Fn(&str) -> bool + Sync),
        what: Observe<'_>,
        listed: Option<Listed>,
    ) -> anyhow::Result<Observation> {
        let (mut state, observed, failures) = match listed {
            Some(l) => {
                let store = Arc::clone(&self.store);
                let state = tokio::task::spawn_blocking(move || store.load()).await??;
                (state, l.observed, l.failures)
            }
            None => self.read_accounts(include, what).await?,
        };
        let entries = self.store.journal_entries()?;
        let unfinished = crate::oplog::unfinished(&entries);
        // What the sinks hold is read here, off the async threads; recovery itself is pure. The
        // keys asked about: those of unfinished operations, and keys no state records on
        // declared slots.
        // The accounts indexed once, for finding the untracked keys and for recovery.
        let index: std::collections::HashMap<&str, crate::model::AccountIndex> = observed
            .iter()
            .map(|(p, s)| (p.as_str(), s.index()))
            .collect();
        let found = recovery::untracked(&self.config, &index, &state);
        let untracked: Vec<(String, String, String, String, Vec<String>)> = {
            found
                .iter()
                .map(|u| {
                    (
                        u.provider.to_string(),
                        u.user.to_string(),
                        u.slot.to_string(),
                        u.key.id.clone(),
                        u.spec.sinks.clone(),
                    )
                })
                .collect()
        };
        let probes = {
            let (ops, config) = (unfinished.clone(), Arc::clone(&self.config));
            tokio::task::spawn_blocking(move || {
                let mut held = probe_sinks(&ops, &config);
                for (p, u, slot, key, sinks) in untracked {
                    if sinks_hold(&config, &sinks, &p, &u, &slot, &key) {
                        held.insert((p, u, slot, key));
                    }
                }
                held
            })
            .await?
        };
        let recovery = recovery::recover_indexed(
            &unfinished,
            &self.config,
            &index,
            &probes,
            &mut state,
            Timestamp::now(),
            Some(&found),
        );
        drop(found);
        drop(index);
        // Beside a process that holds the lock (a daemon, an apply), its unfinished operations
        // are in flight, not interrupted: said once, and what is shown may change under it.
        let in_flight = (!persist && self.held_lock.is_none() && !unfinished.is_empty())
            .then(|| self.store.busy())
            .flatten();
        match in_flight {
            Some(holder) => tracing::info!(
                "{holder} holds the lock and is at work: its {} unfinished operation(s) are shown as they stand now, not as an interrupted run; what it leaves may differ",
                unfinished.len()
            ),
            None => {
                for note in &recovery.notes {
                    tracing::warn!("recovery: {note}");
                }
            }
        }
        if persist && recovery.changed {
            state.serial += 1;
            self.store.write(&state)?;
        }
        if persist && !entries.is_empty() {
            self.store
                .journal()?
                .compact(&|op| !observed.contains_key(&op.provider))?;
        }
        Ok(Observation {
            observed,
            state,
            recovery,
            failures,
        })
    }

    /// The service users whose keys matter, by account: the declared ones, and those keyward
    /// recorded in `state` (for prune).
    pub fn managed_users(&self, state: &State) -> BTreeMap<String, BTreeSet<String>> {
        let mut managed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for u in &self.config.users {
            managed
                .entry(u.provider.clone())
                .or_default()
                .insert(u.name.clone());
        }
        for (provider, account) in &state.accounts {
            managed
                .entry(provider.clone())
                .or_default()
                .extend(account.users.keys().cloned());
        }
        managed
    }

    /// Loads the state and reads the accounts `include` names, as `what` says: the state, the
    /// observed accounts, and the failures of those that did not answer. The state loads off
    /// the async threads while the accounts that list everything whoever is managed (ngrok) are
    /// listed; the others wait for it to learn whose keys to list.
    async fn read_accounts(
        &self,
        include: &(dyn Fn(&str) -> bool + Sync),
        what: Observe<'_>,
    ) -> anyhow::Result<(State, Observed, Vec<ProviderError>)> {
        let loading = {
            let store = Arc::clone(&self.store);
            tokio::task::spawn_blocking(move || store.load())
        };
        let targeted = match what {
            Observe::Users(s) => Some(s),
            _ => None,
        };
        let chosen: Vec<(&String, &Arc<dyn Provider>)> = self
            .providers
            .iter()
            .filter(|(name, _)| include(name))
            .filter(|(name, _)| targeted.is_none_or(|s| s.contains_key(name.as_str())))
            .collect();
        let needs_state =
            |p: &Arc<dyn Provider>| matches!(what, Observe::Managed) && p.scoped_listing();
        let unscoped =
            futures::future::join_all(chosen.iter().filter(|(_, p)| !needs_state(p)).map(
                |(name, p)| async move {
                    let listed = match targeted.and_then(|s| s.get(name.as_str())) {
                        Some(users) => p.observe_users(users).await,
                        // The scope is not read: nothing is named.
                        None => p.observe(None).await,
                    };
                    ((*name).clone(), listed)
                },
            ));
        let scoped = async {
            let state = loading.await??;
            let scoped: Vec<_> = chosen.iter().filter(|(_, p)| needs_state(p)).collect();
            if scoped.is_empty() {
                return anyhow::Ok((state, Vec::new()));
            }
            let managed = self.managed_users(&state);
            let empty = BTreeSet::new();
            let lists = futures::future::join_all(scoped.iter().map(|(name, p)| {
                let scope = managed.get(name.as_str()).unwrap_or(&empty);
                async move { ((*name).clone(), p.observe(Some(scope)).await) }
            }))
            .await;
            drop(managed);
            Ok((state, lists))
        };
        let (mut lists, scoped) = futures::future::join(unscoped, scoped).await;
        let (state, more) = scoped?;
        lists.extend(more);
        // In the accounts' order, as when they were listed together.
        lists.sort_by(|a, b| a.0.cmp(&b.0));
        let mut observed = Observed::new();
        let mut failures = Vec::new();
        for (name, result) in lists {
            match result {
                Ok(snapshot) => {
                    observed.insert(name, snapshot);
                }
                Err(e) => failures.push(e),
            }
        }
        Ok((state, observed, failures))
    }

    /// `keyward import`: under the state lock, observes the selected accounts (every user's
    /// keys), writes the recovered state, and records the undeclared users `selection` names
    /// with their keys as adopted. Returns the config document for them and how many users and
    /// keys it recorded. Nothing remote changes.
    pub async fn import(
        &self,
        selection: &crate::import::Selection,
    ) -> anyhow::Result<(String, usize, usize)> {
        let _lock = self.take_lock().await?;
        let wanted = |name: &str| {
            selection.providers.is_empty() || selection.providers.iter().any(|p| p == name)
        };
        let mut obs = self
            .observe_where(true, &wanted, Observe::EveryUser, None)
            .await?;
        every_account_answered(&obs.failures)?;
        let users = crate::import::select(&self.config, &obs.observed, selection)?;
        let keys = crate::import::record(&mut obs.state, &users, Timestamp::now());
        obs.state.serial += 1;
        self.store.write(&obs.state)?;
        Ok((crate::import::document(&users), users.len(), keys))
    }

    /// `keyward import [PROVIDER:]USER/SLOT KEY_ID`: under the state lock, adopts `key_id` as
    /// the current key of the declared slot (see [`crate::import::adopt_one`] for what is
    /// refused). Nothing remote changes.
    pub async fn import_key(&self, target: (&str, &str, &str), key_id: &str) -> anyhow::Result<()> {
        let _lock = self.take_lock().await?;
        let provider = target.0;
        let mut obs = self
            .observe_where(true, &|name: &str| name == provider, Observe::Managed, None)
            .await?;
        every_account_answered(&obs.failures)?;
        crate::import::adopt_one(
            &self.config,
            &obs.observed,
            &mut obs.state,
            target,
            key_id,
            Timestamp::now(),
        )?;
        obs.state.serial += 1;
        self.store.write(&obs.state)
    }

    /// The plan for `observation`, with the config's warnings (an inline secret, say) in it:
    /// scripts read them there.
    pub fn plan(&self, obs: &Observation, opts: &PlanOptions, now: Timestamp) -> Plan {
        let mut plan = plan::plan(&self.config, &obs.observed, &obs.state, now, opts);
        // What recovery made of keys no state recorded: the plan says which, and why.
        plan.warnings.extend(obs.recovery.explained.iter().cloned());
        for w in &self.warnings {
            plan.warnings.push(Warning {
                kind: crate::plan::WarningKind::Config,
                detail: w.to_string(),
                provider: None,
                user: None,
                key_id: None,
                message: w.to_string(),
            });
        }
        plan
    }

    /// Refuses a plan that deletes more than `settings.max_deletions` objects.
    fn check_deletions(&self, plan: &Plan) -> anyhow::Result<()> {
        let n = plan.deletions();
        let max = self.config.settings.max_deletions;
        if n > max {
            anyhow::bail!(
                "refusing to apply: the plan deletes or revokes {n} objects, more than settings.max_deletions ({max}); nothing was changed (revocations that end a rotation or remove a key keyward never delivered do not count)"
            );
        }
        Ok(())
    }

    /// Executes `plan`, telling `progress` of each change that ends. Once the shutdown fires,
    /// the change in flight for each user finishes (a minted secret is still delivered and
    /// recorded) and nothing new starts.
    async fn execute(
        &self,
        plan: &Plan,
        observed: &Observed,
        state: State,
        progress: Option<Arc<dyn crate::progress::Progress>>,
    ) -> anyhow::Result<(Report, Option<State>)> {
        let executor = Executor::with_cancel(
            Arc::clone(&self.config),
            self.providers.clone(),
            Arc::clone(&self.store),
            state,
            self.shutdown.clone(),
        )?;
        let report = executor.run_with(plan, observed, progress).await;
        // Every task of the run has ended: the executor is ours alone, and so is its state.
        let after = Arc::try_unwrap(executor).ok().map(|e| e.state.into_inner());
        Ok((report, after))
    }
}

/// Whether every one of `sinks` (a slot's) verifiably holds `key_id` (json and env file sinks
/// that name it; a slot with an exec or raw sink never does). File I/O.
fn sinks_hold(
    config: &Config,
    sinks: &[String],
    provider: &str,
    user: &str,
    slot: &str,
    key_id: &str,
) -> bool {
    !sinks.is_empty()
        && sinks.iter().all(|name| {
            config
                .sinks
                .get(name)
                .is_some_and(|sink| crate::sinks::holds(sink, provider, user, slot, key_id))
        })
}

/// Reads the sinks of every unfinished create or rotation whose key was created but whose
/// delivery was never journaled: file I/O, so the caller runs it off the async threads.
pub fn probe_sinks(unfinished: &[Unfinished], config: &Config) -> SinkProbes {
    let mut out = SinkProbes::new();
    // Declared users by (provider, name), once: an interrupted fleet apply may leave thousands
    // of operations.
    let specs = config.users_by_name();
    for op in unfinished {
        let (Some(slot), Some((key_id, _, _)), None) = (&op.slot, &op.created, &op.delivered)
        else {
            continue;
        };
        let Some(spec) = specs
            .get(&(op.provider.as_str(), op.user.as_str()))
            .and_then(|s| s.slots.get(slot))
        else {
            continue;
        };
        if sinks_hold(config, &spec.sinks, &op.provider, &op.user, slot, key_id) {
            out.insert((
                op.provider.clone(),
                op.user.clone(),
                slot.clone(),
                key_id.clone(),
            ));
        }
    }
    out
}
