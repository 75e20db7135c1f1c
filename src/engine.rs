//! One reconcile pipeline shared by the commands and the daemon: a loaded config with its
//! provider clients and state directory, and the steps observe (with journal recovery) →
//! plan → check → execute. The CLI runs it once; the daemon runs it again on every trigger.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::apply::{Executor, Report};
use crate::config::{Config, Diagnostic, Loaded};
use crate::journal;
use crate::model::Observed;
use crate::plan::{self, Plan, PlanOptions, Warning};
use crate::providers::{self, Provider, ProviderError};
use crate::recovery::{self, Recovery};
use crate::state::{State, StateDir, StateLock};

/// What one observation found.
pub struct Observation {
    /// The accounts that answered.
    pub observed: Observed,
    /// keyward's state with any unfinished journal operations folded in.
    pub state: State,
    pub recovery: Recovery,
    /// The accounts that did not answer, and why.
    pub failures: Vec<ProviderError>,
}

/// A loaded config, ready to reconcile.
pub struct Engine {
    pub config: Arc<Config>,
    pub warnings: Vec<Diagnostic>,
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    pub state_dir: StateDir,
}

impl Engine {
    pub fn new(loaded: Loaded) -> anyhow::Result<Engine> {
        let config = Arc::new(loaded.config);
        let mut clients = BTreeMap::new();
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
                providers::connect(account, config.settings.concurrency)?,
            );
        }
        Ok(Engine {
            state_dir: StateDir::new(config.settings.state_dir.clone()),
            config,
            warnings: loaded.warnings,
            providers: clients,
        })
    }

    pub fn lock(&self) -> anyhow::Result<StateLock> {
        self.state_dir.lock()
    }

    /// Lists every provider account concurrently and loads the state, with whatever an
    /// interrupted earlier run left in the journal folded in. With `persist` (the caller holds
    /// the state lock) the recovered state is written and the journal compacted: only
    /// operations of accounts that did not answer stay in it, for a later run to finish.
    pub async fn observe(&self, persist: bool) -> anyhow::Result<Observation> {
        self.observe_where(persist, |_| true).await
    }

    /// [`Engine::observe`] limited to the accounts `include` names (the daemon skips accounts
    /// that are backing off after failures).
    pub async fn observe_where(
        &self,
        persist: bool,
        include: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Observation> {
        let mut state = self.state_dir.load()?;
        // The users whose keys matter: declared ones, and those keyward recorded (prune).
        let mut managed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for u in &self.config.users {
            managed
                .entry(&u.provider)
                .or_default()
                .insert(u.name.clone());
        }
        for (provider, account) in &state.accounts {
            managed
                .entry(provider)
                .or_default()
                .extend(account.users.keys().cloned());
        }
        let empty = BTreeSet::new();
        let lists =
            futures::future::join_all(self.providers.iter().filter(|(name, _)| include(name)).map(
                |(name, p)| {
                    let scope = managed.get(name.as_str()).unwrap_or(&empty);
                    async move { (name.clone(), p.observe(Some(scope)).await) }
                },
            ))
            .await;
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
        let entries = journal::read(&self.state_dir.dir)?;
        let unfinished = journal::unfinished(&entries);
        // What the sinks hold is read here, off the async threads; recovery itself is pure.
        let probes = {
            let (ops, config) = (unfinished.clone(), Arc::clone(&self.config));
            tokio::task::spawn_blocking(move || recovery::probe_sinks(&ops, &config)).await?
        };
        let recovery = recovery::recover(&unfinished, &self.config, &observed, &probes, &mut state);
        for note in &recovery.notes {
            tracing::warn!("recovery: {note}");
        }
        if persist && !entries.is_empty() {
            if recovery.changed {
                self.state_dir.save(&mut state)?;
            }
            journal::Journal::open(&self.state_dir.dir)?
                .compact(|op| !observed.contains_key(&op.provider))?;
        }
        Ok(Observation {
            observed,
            state,
            recovery,
            failures,
        })
    }

    /// The plan for `observation`, with the config's warnings (an inline secret, say) in it:
    /// scripts read them there.
    pub fn plan(&self, obs: &Observation, opts: &PlanOptions, now: Timestamp) -> Plan {
        let mut plan = plan::plan(&self.config, &obs.observed, &obs.state, now, opts);
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
    pub fn check_deletions(&self, plan: &Plan) -> anyhow::Result<()> {
        let n = plan.deletions();
        let max = self.config.settings.max_deletions;
        if n > max {
            anyhow::bail!(
                "refusing to apply: the plan deletes or revokes {n} objects, more than settings.max_deletions ({max}); nothing was changed"
            );
        }
        Ok(())
    }

    /// Executes `plan`. Once `cancel` fires, the change in flight for each user finishes (a
    /// minted secret is still delivered and recorded) and nothing new starts.
    pub async fn execute(
        &self,
        plan: &Plan,
        observed: &Observed,
        state: State,
        cancel: CancellationToken,
    ) -> anyhow::Result<Report> {
        let executor = Executor::with_cancel(
            Arc::clone(&self.config),
            self.providers.clone(),
            self.state_dir.clone(),
            state,
            cancel,
        )?;
        Ok(executor.run(plan, observed).await)
    }
}
