//! The daemon's Prometheus metrics (prometheus-client, OpenMetrics text) and the tiny HTTP
//! server (axum) that exposes them at `/metrics`, with `/healthz` for probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::status::Entry;

/// Labels of the per-key series: provider account, service user, slot and key id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// The key slot.
    pub slot: String,
    /// The key's id at the provider.
    pub key_id: String,
}

/// The label of `keyward_reconcile`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The run's outcome: `ok`, `changed`, `partial`, `refused` or `failed`.
    pub outcome: String,
}

/// The label of `keyward_leader_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaderLabels {
    /// The leader's identity (`host pid N, term T`), as it wrote it into the state database.
    pub leader: String,
}

/// The label of the per-provider-account series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// The provider account's name in the config.
    pub provider: String,
}

/// The labels of `keyward_keys`: provider account and the key's state (`current`, `retiring`,
/// `overdue`, `missing`, `unknown`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The provider account's name in the config.
    pub provider: String,
    /// The key's state, as `keyward status` shows it.
    pub state: String,
}

type TimeGauge = Gauge<f64, AtomicU64>;

/// Buckets of `keyward_key_seconds_until_rotation`: an hour, six hours, a day, a week, 30, 90
/// and 365 days (a fleet's due times, spread or not, read at a glance).
const UNTIL_ROTATION_BUCKETS: [f64; 7] = [
    3_600.0,
    21_600.0,
    86_400.0,
    604_800.0,
    2_592_000.0,
    7_776_000.0,
    31_536_000.0,
];

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    key_created: Family<KeyLabels, TimeGauge>,
    key_expiry: Family<KeyLabels, TimeGauge>,
    key_next_rotation: Family<KeyLabels, TimeGauge>,
    keys: Family<StateLabels, Gauge>,
    earliest_expiry: Family<ProviderLabels, TimeGauge>,
    earliest_rotation: Family<ProviderLabels, TimeGauge>,
    until_rotation: Family<ProviderLabels, Histogram>,
    reconcile: Family<OutcomeLabels, Counter>,
    last_success: TimeGauge,
    pending_changes: Gauge,
    config_valid: Gauge,
    leader: Gauge,
    leader_info: Family<LeaderLabels, Gauge>,
    /// While this daemon leads: its lease's check, so that `keyward_leader` turns 0 as soon as
    /// the lease lapses, even while the daemon's loop waits on the silent database.
    lease: std::sync::Mutex<Option<crate::files::Fence>>,
    provider_requests: Family<ProviderLabels, Counter>,
    provider_rate_limited: Family<ProviderLabels, Counter>,
    provider_up: Family<ProviderLabels, Gauge>,
    budget_used: Family<ProviderLabels, TimeGauge>,
    listing_pages: Family<ProviderLabels, Counter>,
    listing_underway: Family<ProviderLabels, Gauge>,
    resync_share: TimeGauge,
    next_wakeup: TimeGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, with no series yet.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            key_created: Family::default(),
            key_expiry: Family::default(),
            key_next_rotation: Family::default(),
            keys: Family::default(),
            earliest_expiry: Family::default(),
            earliest_rotation: Family::default(),
            until_rotation: Family::new_with_constructor(|| Histogram::new(UNTIL_ROTATION_BUCKETS)),
            reconcile: Family::default(),
            last_success: TimeGauge::default(),
            pending_changes: Gauge::default(),
            config_valid: Gauge::default(),
            leader: Gauge::default(),
            leader_info: Family::default(),
            lease: std::sync::Mutex::new(None),
            provider_requests: Family::default(),
            provider_rate_limited: Family::default(),
            provider_up: Family::default(),
            budget_used: Family::default(),
            listing_pages: Family::default(),
            listing_underway: Family::default(),
            resync_share: TimeGauge::default(),
            next_wakeup: TimeGauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "keyward_key_created_timestamp_seconds",
            "When each managed key was created (Unix time)",
            m.key_created.clone(),
        );
        registry.register(
            "keyward_key_expiry_timestamp_seconds",
            "When each managed key expires at the provider (Unix time); absent if it never does",
            m.key_expiry.clone(),
        );
        registry.register(
            "keyward_key_next_rotation_timestamp_seconds",
            "When each current key is next due for rotation (Unix time)",
            m.key_next_rotation.clone(),
        );
        registry.register(
            "keyward_keys",
            "Managed keys (and declared slots without one) by provider account and state",
            m.keys.clone(),
        );
        registry.register(
            "keyward_earliest_expiry_timestamp_seconds",
            "The earliest provider expiry of any managed key, per provider account (Unix time)",
            m.earliest_expiry.clone(),
        );
        registry.register(
            "keyward_earliest_rotation_timestamp_seconds",
            "The earliest next rotation of any slot, per provider account (Unix time)",
            m.earliest_rotation.clone(),
        );
        registry.register(
            "keyward_key_seconds_until_rotation",
            "Seconds from the last reconcile until each current key's next rotation, per provider account",
            m.until_rotation.clone(),
        );
        registry.register(
            "keyward_reconcile",
            "Reconcile runs by outcome (ok, changed, partial, refused, failed)",
            m.reconcile.clone(),
        );
        registry.register(
            "keyward_last_success_timestamp_seconds",
            "When the last fully successful reconcile finished (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "keyward_pending_changes",
            "Changes the last plan found (in observe mode: changes waiting to be applied)",
            m.pending_changes.clone(),
        );
        registry.register(
            "keyward_config_valid",
            "1 while the config file on disk validates, 0 after an invalid edit",
            m.config_valid.clone(),
        );
        registry.register(
            "keyward_leader",
            "1 while this daemon holds the state lock and reconciles, 0 while it waits as a standby",
            m.leader.clone(),
        );
        registry.register(
            "keyward_leader_info",
            "The leader of the daemons sharing the state database, as last seen (always 1)",
            m.leader_info.clone(),
        );
        registry.register(
            "keyward_provider_requests",
            "HTTP requests sent to each provider account",
            m.provider_requests.clone(),
        );
        registry.register(
            "keyward_provider_rate_limited",
            "Requests each provider account answered with 429",
            m.provider_rate_limited.clone(),
        );
        registry.register(
            "keyward_provider_up",
            "1 if the provider account answered the last observation",
            m.provider_up.clone(),
        );
        registry.register(
            "keyward_provider_budget_used_ratio",
            "The share of each provider account's rate_limit its requests of the last window took (0 to 1)",
            m.budget_used.clone(),
        );
        registry.register(
            "keyward_listing_pages",
            "Pages the daemon's full listings read from each provider account",
            m.listing_pages.clone(),
        );
        registry.register(
            "keyward_listing_underway",
            "1 while a full listing of the provider account is under way or cut short and waiting to go on",
            m.listing_underway.clone(),
        );
        registry.register(
            "keyward_resync_share_ratio",
            "The share of each account's rate_limit the full listing at every interval may use (settings.resync_share)",
            m.resync_share.clone(),
        );
        registry.register(
            "keyward_next_wakeup_timestamp_seconds",
            "When the daemon will next reconcile unless something wakes it earlier (Unix time)",
            m.next_wakeup.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Replaces the key series with `entries` as seen at `now` (rotated and revoked keys
    /// disappear): the aggregates always, and with `per_key` (`settings.metrics_per_key`) one
    /// series per key as well. O(entries).
    pub fn set_keys(&self, entries: &[Entry], per_key: bool, now: jiff::Timestamp) {
        self.key_created.clear();
        self.key_expiry.clear();
        self.key_next_rotation.clear();
        self.keys.clear();
        self.earliest_expiry.clear();
        self.earliest_rotation.clear();
        self.until_rotation.clear();
        let mut counts: std::collections::HashMap<(&str, &str), i64> =
            std::collections::HashMap::new();
        let mut earliest: std::collections::HashMap<&str, (Option<f64>, Option<f64>)> =
            std::collections::HashMap::new();
        for e in entries {
            *counts.entry((&e.provider, &e.state)).or_default() += 1;
            let first = earliest.entry(&e.provider).or_default();
            let min = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.min(b)));
            if let Some(x) = e.expires_at {
                first.0 = min(first.0, seconds(x));
            }
            if let Some(n) = e.next_rotation {
                first.1 = min(first.1, seconds(n));
                let provider = ProviderLabels {
                    provider: e.provider.clone(),
                };
                self.until_rotation
                    .get_or_create(&provider)
                    .observe((seconds(n) - seconds(now)).max(0.0));
            }
        }
        for ((provider, state), n) in counts {
            self.keys
                .get_or_create(&StateLabels {
                    provider: provider.to_string(),
                    state: state.to_string(),
                })
                .set(n);
        }
        for (provider, (expiry, rotation)) in earliest {
            let labels = ProviderLabels {
                provider: provider.to_string(),
            };
            if let Some(x) = expiry {
                self.earliest_expiry.get_or_create(&labels).set(x);
            }
            if let Some(r) = rotation {
                self.earliest_rotation.get_or_create(&labels).set(r);
            }
        }
        if !per_key {
            return;
        }
        for e in entries {
            let Some(key_id) = &e.key_id else { continue };
            let labels = KeyLabels {
                provider: e.provider.clone(),
                user: e.user.clone(),
                slot: e.slot.clone().unwrap_or_default(),
                key_id: key_id.clone(),
            };
            if let Some(c) = e.created_at {
                self.key_created.get_or_create(&labels).set(seconds(c));
            }
            if let Some(x) = e.expires_at {
                self.key_expiry.get_or_create(&labels).set(seconds(x));
            }
            if let Some(n) = e.next_rotation {
                self.key_next_rotation
                    .get_or_create(&labels)
                    .set(seconds(n));
            }
        }
    }

    /// Counts one reconcile run with its `outcome` (`keyward_reconcile`).
    pub fn reconciled(&self, outcome: &str) {
        self.reconcile
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Records a fully successful reconcile that finished at `at`
    /// (`keyward_last_success_timestamp_seconds`).
    pub fn succeeded_at(&self, at: jiff::Timestamp) {
        self.last_success.set(seconds(at));
    }

    /// Sets how many changes the last plan found (`keyward_pending_changes`).
    pub fn set_pending(&self, n: usize) {
        self.pending_changes.set(n as i64);
    }

    /// Sets whether the config file on disk validates (`keyward_config_valid`).
    pub fn set_config_valid(&self, valid: bool) {
        self.config_valid.set(i64::from(valid));
    }

    /// While this daemon leads, how to check its lease (see [`Self::encode`]); `None` when
    /// there is none to check.
    pub fn set_lease(&self, lease: Option<crate::files::Fence>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    }

    /// Sets whether this daemon leads (`keyward_leader`) and who does, if known
    /// (`keyward_leader_info{leader}`).
    pub fn set_leader(&self, leading: bool, leader: Option<&str>) {
        if !leading {
            self.set_lease(None);
        }
        self.leader.set(i64::from(leading));
        self.leader_info.clear();
        if let Some(l) = leader {
            self.leader_info
                .get_or_create(&LeaderLabels {
                    leader: l.to_string(),
                })
                .set(1);
        }
    }

    /// Sets when the daemon next wakes up unless something wakes it earlier
    /// (`keyward_next_wakeup_timestamp_seconds`).
    pub fn set_next_wakeup(&self, at: jiff::Timestamp) {
        self.next_wakeup.set(seconds(at));
    }

    /// Brings the per-provider counters up to the clients' running totals.
    pub fn provider_totals(
        &self,
        provider: &str,
        requests: u64,
        rate_limited: u64,
        up: Option<bool>,
    ) {
        let labels = ProviderLabels {
            provider: provider.to_string(),
        };
        let c = self.provider_requests.get_or_create(&labels);
        c.inc_by(requests.saturating_sub(c.get()));
        let r = self.provider_rate_limited.get_or_create(&labels);
        r.inc_by(rate_limited.saturating_sub(r.get()));
        if let Some(up) = up {
            self.provider_up.get_or_create(&labels).set(i64::from(up));
        }
    }

    /// Sets the share of each account's budget the resync may use (`settings.resync_share`).
    pub fn set_resync_share(&self, percent: u8) {
        self.resync_share.set(f64::from(percent) / 100.0);
    }

    /// Records where an account's full listing stands: `pages` read since the last call, and
    /// whether one is under way (or cut short, waiting to go on).
    pub fn listing(&self, provider: &str, pages: u64, underway: bool) {
        let labels = ProviderLabels {
            provider: provider.to_string(),
        };
        self.listing_pages.get_or_create(&labels).inc_by(pages);
        self.listing_underway
            .get_or_create(&labels)
            .set(i64::from(underway));
    }

    /// Sets the share of an account's budget its last window of requests took.
    pub fn budget_used(&self, provider: &str, ratio: f64) {
        let labels = ProviderLabels {
            provider: provider.to_string(),
        };
        self.budget_used.get_or_create(&labels).set(ratio);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if self.leader.get() == 1 && lease.is_some_and(|check| check().is_err()) {
            // The lease lapsed: whatever the daemon's loop last said, this one may not lead.
            self.leader.set(0);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn seconds(t: jiff::Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// Binds the `/metrics` listener at `addr` (the daemon does this before it says it is ready: a
/// port in use is an error at start, not monitoring silently gone).
pub async fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics listener {addr}: {e}"))
}

/// Serves `/metrics` (and `/healthz`) on `listener` until `stop`.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use axum::routing::get;
    tracing::info!("metrics at http://{}/metrics", listener.local_addr()?);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_whose_lease_lapsed_says_keyward_leader_0_whatever_its_loop_last_said() {
        let m = Metrics::new();
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let check = std::sync::Arc::clone(&ok);
        m.set_leader(true, Some("db1 pid 1, term 3"));
        m.set_lease(Some(std::sync::Arc::new(move || {
            if check.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("no word from the state database for 6s"))
            }
        })));
        assert!(m.encode().lines().any(|l| l == "keyward_leader 1"));
        ok.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(m.encode().lines().any(|l| l == "keyward_leader 0"));
        // Standing down clears the check; leading again is said by the loop.
        m.set_leader(false, None);
        m.set_leader(true, None);
        assert!(m.encode().lines().any(|l| l == "keyward_leader 1"));
    }

    #[test]
    fn exports_contract_names_and_drops_rotated_keys() {
        let m = Metrics::new();
        let entry = |key: &str| Entry {
            provider: "ng".into(),
            user: "ci".into(),
            slot: Some("deploy".into()),
            key_id: Some(key.into()),
            state: "current".into(),
            created_at: Some("2026-11-01T00:00:00Z".parse().unwrap()),
            age_seconds: Some(1),
            expires_at: None,
            next_rotation: Some("2026-12-01T00:00:00Z".parse().unwrap()),
            revoke_after: None,
            delivery: Some("delivered"),
        };
        let now: jiff::Timestamp = "2026-11-15T00:00:00Z".parse().unwrap();
        m.set_keys(&[entry("ak_old")], true, now);
        m.set_keys(&[entry("ak_new")], true, now);
        m.reconciled("ok");
        m.set_config_valid(true);
        m.provider_totals("ng", 7, 1, Some(true));
        m.provider_totals("ng", 9, 1, Some(true));
        let text = m.encode();
        assert!(text.contains("keyward_key_created_timestamp_seconds{provider=\"ng\",user=\"ci\",slot=\"deploy\",key_id=\"ak_new\"} 1793491200.0"), "{text}");
        assert!(!text.contains("ak_old"), "{text}");
        assert!(
            text.contains("keyward_key_next_rotation_timestamp_seconds{"),
            "{text}"
        );
        assert!(
            text.contains("keyward_reconcile_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("keyward_config_valid 1"), "{text}");
        assert!(
            text.contains("keyward_provider_requests_total{provider=\"ng\"} 9"),
            "{text}"
        );
        assert!(
            text.contains("keyward_last_success_timestamp_seconds"),
            "{text}"
        );
        assert!(text.contains("keyward_pending_changes"), "{text}");
    }
}
