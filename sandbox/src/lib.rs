//! keyward-sandbox: local emulators of the provider APIs keyward manages (the "sandbox"), used by
//! the quick start, the `demo` command (built with keyward's `demo` feature) and every
//! integration test. Not part of the `keyward` product binary.
//!
//! One axum server hosts every emulated API at the root path (ngrok's official clients drop any
//! base-URL path prefix): [`ngrok`] serves `/service_users`, `/bot_users`, `/api_keys`,
//! `/credentials` and `/ssh_credentials`; [`asa`] serves Okta ASA's `/v1/teams/{team}/...`. Shared by all APIs: fault injection and request
//! accounting ([`faults`]) and the unauthenticated test-support endpoints under `/_sandbox/`
//! ([`support`]). This is not a security boundary: it listens on loopback and keeps everything in
//! memory.

pub mod asa;
pub mod cli;
pub mod error;
pub mod faults;
pub mod ids;
pub mod ngrok;
pub mod support;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use error::{ApiError, NOT_FOUND_CODE};
pub use faults::{Faults, parse_latency, parse_rate_limit};

/// How to start a [`Sandbox`].
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// Sleep before answering each API request.
    pub latency: Duration,
    /// Probability in 0..=1 that an API request is answered 500/503 without being applied.
    pub error_rate: f64,
    /// At most N API requests per rolling window for the whole account (ngrok: 120 per 60 s).
    pub rate_limit: Option<(u32, Duration)>,
    /// Seed for IDs, tokens and error injection, for reproducible runs.
    pub rng_seed: Option<u64>,
    /// JSON file in the format of `POST /_sandbox/ngrok/seed`, loaded at start-up.
    pub seed_file: Option<PathBuf>,
    /// The bootstrap ngrok admin API key; generated when absent.
    pub admin_key: Option<String>,
    /// The ASA team's name; default `keyward-sandbox`.
    pub asa_team: Option<String>,
    /// Lifetime of ASA bearer tokens; default 10 minutes.
    pub asa_token_lifetime: Option<Duration>,
    /// How long an ASA key stays valid after its user's keys were rotated; default 2 days.
    pub asa_key_grace: Option<Duration>,
}

/// State shared by every route of one running sandbox.
pub struct Shared {
    /// `http://host:port` of the listener, for URIs when a request carries no Host header.
    base_url: String,
    control: Mutex<faults::Control>,
    ngrok: Mutex<ngrok::State>,
    asa: Mutex<asa::State>,
}

impl Shared {
    /// Fault and accounting state.
    fn control(&self) -> MutexGuard<'_, faults::Control> {
        // A panic while holding the lock is a sandbox bug; surfacing it loudly is right.
        self.control.lock().expect("sandbox control mutex poisoned")
    }

    /// The ngrok account.
    fn ngrok(&self) -> MutexGuard<'_, ngrok::State> {
        self.ngrok.lock().expect("sandbox ngrok mutex poisoned")
    }

    /// The ASA team.
    fn asa(&self) -> MutexGuard<'_, asa::State> {
        self.asa.lock().expect("sandbox asa mutex poisoned")
    }

    /// `http://<Host header>` (the emulators speak plain HTTP), else the listener's URL.
    fn base_from(&self, headers: &HeaderMap) -> String {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.is_empty())
            .map_or_else(|| self.base_url.clone(), |h| format!("http://{h}"))
    }
}

/// A running sandbox server.
pub struct Sandbox {
    addr: SocketAddr,
    url: String,
    admin_key: String,
    asa_credentials: (String, String, String),
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sandbox {
    /// Binds `listen` (port 0 picks a free one) and serves until [`Sandbox::shutdown`].
    pub async fn start(listen: SocketAddr, opts: SandboxOptions) -> anyhow::Result<Sandbox> {
        if !(0.0..=1.0).contains(&opts.error_rate) {
            anyhow::bail!("error rate {} is not between 0 and 1", opts.error_rate);
        }
        if let Some((n, window)) = opts.rate_limit {
            anyhow::ensure!(
                n > 0 && !window.is_zero(),
                "rate limit must allow at least 1 request per non-empty window"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr().context("listener has no address")?;
        let url = url_for(addr);

        // Separate streams for minting and for faults so that changing faults does not change
        // the IDs and tokens of a seeded run.
        let (mint_rng, fault_rng) = match opts.rng_seed {
            Some(seed) => (
                StdRng::seed_from_u64(seed),
                StdRng::seed_from_u64(seed ^ 0x5eed_fa17),
            ),
            None => (StdRng::from_os_rng(), StdRng::from_os_rng()),
        };
        let mut ngrok_state = ngrok::State::new(opts.admin_key.clone(), mint_rng);
        if let Some(path) = &opts.seed_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read seed file {}", path.display()))?;
            let seed: ngrok::SeedRequest = serde_json::from_str(&text)
                .with_context(|| format!("seed file {} is not valid seed JSON", path.display()))?;
            ngrok_state
                .seed(seed, &url)
                .map_err(|e| anyhow::anyhow!("seed file {}: {}", path.display(), e.msg))?;
        }
        let admin_key = ngrok_state.admin_key().to_owned();
        let asa_rng = match opts.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ 0x0a5a_0a5a),
            None => StdRng::from_os_rng(),
        };
        let asa_defaults = asa::Options::default();
        let asa_state = asa::State::new(
            asa::Options {
                team: opts.asa_team.clone().unwrap_or(asa_defaults.team),
                token_lifetime: opts
                    .asa_token_lifetime
                    .unwrap_or(asa_defaults.token_lifetime),
                key_grace: opts.asa_key_grace.unwrap_or(asa_defaults.key_grace),
            },
            asa_rng,
        );
        let asa_credentials = (
            asa_state.team().to_owned(),
            asa_state.admin_key_id().to_owned(),
            asa_state.admin_key_secret().to_owned(),
        );
        let shared = Arc::new(Shared {
            base_url: url.clone(),
            control: Mutex::new(faults::Control::new(
                Faults {
                    latency: opts.latency,
                    error_rate: opts.error_rate,
                    rate_limit: opts.rate_limit,
                    ..Faults::default()
                },
                fault_rng,
            )),
            ngrok: Mutex::new(ngrok_state),
            asa: Mutex::new(asa_state),
        });

        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // Either an explicit shutdown or the Sandbox being dropped ends the server.
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%url, "sandbox listening");
        Ok(Sandbox {
            addr,
            url,
            admin_key,
            asa_credentials,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The socket address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bootstrap ngrok admin API key.
    pub fn ngrok_admin_key(&self) -> String {
        self.admin_key.clone()
    }

    /// The ASA team name, in its canonical case.
    pub fn asa_team(&self) -> String {
        self.asa_credentials.0.clone()
    }

    /// The bootstrap ASA admin service user's API key id.
    pub fn asa_key_id(&self) -> String {
        self.asa_credentials.1.clone()
    }

    /// The bootstrap ASA admin service user's API key secret.
    pub fn asa_key_secret(&self) -> String {
        self.asa_credentials.2.clone()
    }

    /// The faults currently injected.
    pub fn faults(&self) -> Faults {
        self.shared.control().faults.clone()
    }

    /// Changes the injected faults at runtime (as `PUT /_sandbox/faults` does).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.control().set_faults(faults);
    }

    /// The request counters, in the JSON shape of `GET /_sandbox/stats`.
    pub fn stats(&self) -> serde_json::Value {
        self.shared.control().stats.to_json()
    }

    /// Stops accepting connections and waits (at most a few seconds) for open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            // Idle keep-alive connections of a pooled client should not hold shutdown hostage.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The URL clients should use for a bound address (wildcards become loopback).
fn url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// The whole server: faulted, counted API routes plus the `/_sandbox/` support routes.
fn router(shared: Arc<Shared>) -> Router {
    // `Router::layer` wraps each route (and the fallbacks) of the API router; the support routes
    // are merged afterwards so they escape accounting and faults.
    let api = ngrok::routes(shared.clone())
        .merge(asa::routes())
        .fallback(api_not_found)
        .method_not_allowed_fallback(api_method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            faults::api_faults,
        ));
    api.merge(support::routes()).with_state(shared)
}

/// The key under which a request is counted in `by_route`, e.g. `/service_users/{id}`.
fn route_template(path: &str) -> String {
    ngrok::route_template(path)
        .or_else(|| asa::route_template(path))
        .unwrap_or_else(|| "(unmatched)".to_owned())
}

async fn api_not_found(uri: axum::http::Uri) -> axum::response::Response {
    if asa::is_asa_path(uri.path()) {
        return asa::unknown_path();
    }
    ApiError::not_found("no such API path").into_response()
}

async fn api_method_not_allowed(uri: axum::http::Uri) -> axum::response::Response {
    if asa::is_asa_path(uri.path()) {
        return asa::method_not_allowed();
    }
    ApiError::ngrok(
        StatusCode::METHOD_NOT_ALLOWED,
        405,
        "The HTTP method is not allowed on this resource.",
    )
    .into_response()
}
