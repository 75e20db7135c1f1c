//! Fault injection and request accounting shared by every emulated API (ngrok and ASA).
//!
//! The middleware here wraps the API routes only; `/_sandbox/` test-support routes are neither
//! counted nor faulted. Order per request: count it, sleep the configured latency, apply the
//! account-wide rolling-window rate limit (429 `ERR_NGROK_226` + `Retry-After`), then maybe
//! answer a 500/503 *without* running the handler, so an injected error never has side effects;
//! otherwise run the handler and sleep the configured answer latency before answering.
//! ASA paths get the same verdicts rendered the ASA way (`X-RateLimit-*` headers on every
//! response, `X-RateLimit-Retry-At` on a 429; see [`super::asa`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::Shared;
use super::error::ApiError;

/// The faults currently injected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Sleep before answering each API request.
    pub latency: Duration,
    /// Sleep after a request was applied, before its answer goes out: the window in which a
    /// client that dies has changed the account without ever hearing of it (crash tests).
    pub answer_latency: Duration,
    /// Probability in 0..=1 that a request is answered 500/503 without being applied.
    pub error_rate: f64,
    /// At most N admitted requests per rolling window, for the whole account.
    pub rate_limit: Option<(u32, Duration)>,
    /// Every API request is answered 401, as if the caller's credential had been revoked
    /// (until it is set back): a failure a client must not retry.
    pub refuse_credentials: bool,
}

impl Faults {
    /// The JSON shape served by `GET/PUT /_sandbox/faults`.
    pub fn to_json(&self) -> Value {
        json!({
            "latency_ms": u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            "answer_latency_ms": u64::try_from(self.answer_latency.as_millis()).unwrap_or(u64::MAX),
            "error_rate": self.error_rate,
            "rate_limit": self.rate_limit.map(|(n, w)| format_rate_limit(n, w)),
            "refuse_credentials": self.refuse_credentials,
        })
    }
}

/// Request counters served by `GET /_sandbox/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    requests: u64,
    rate_limited: u64,
    injected_errors: u64,
    /// Requests answered 401 by the `refuse_credentials` fault.
    refused: u64,
    /// The most requests that were being served at once (a client's concurrency cap, seen
    /// from the server).
    max_in_flight: u64,
    by_route: BTreeMap<String, u64>,
}

impl Stats {
    /// The JSON shape served by `GET /_sandbox/stats`.
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "injected_errors": self.injected_errors,
            "refused": self.refused,
            "max_in_flight": self.max_in_flight,
            "by_route": self.by_route,
        })
    }
}

/// Mutable fault and accounting state, behind one mutex in [`Shared`].
pub struct Control {
    /// Current faults.
    pub faults: Faults,
    /// Counters.
    pub stats: Stats,
    /// Instants of the requests admitted within the current rate-limit window, oldest first.
    window: VecDeque<Instant>,
    /// Requests being served now (not reset with the counters).
    in_flight: u64,
    /// Drives error injection; seeded separately from resource minting so that faults do not
    /// shift the IDs and tokens a seeded run produces.
    rng: StdRng,
}

impl Control {
    /// Fresh state with the given faults.
    pub fn new(faults: Faults, rng: StdRng) -> Self {
        Self {
            faults,
            stats: Stats::default(),
            window: VecDeque::new(),
            in_flight: 0,
            rng,
        }
    }

    /// Replaces the faults; a changed rate limit starts a fresh window.
    pub fn set_faults(&mut self, faults: Faults) {
        if faults.rate_limit != self.faults.rate_limit {
            self.window.clear();
        }
        self.faults = faults;
    }

    /// Zeroes the counters.
    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
    }

    /// `(limit, remaining, time until the window is fully replenished)` of the rate limit.
    fn rate_status(&self, now: Instant) -> super::asa::RateStatus {
        let (max, window) = self.faults.rate_limit?;
        let live: Vec<&Instant> = self
            .window
            .iter()
            .filter(|&&t| now.duration_since(t) < window)
            .collect();
        let used = u32::try_from(live.len()).unwrap_or(u32::MAX);
        let full_in = live.last().map_or(Duration::ZERO, |&&t| {
            window.saturating_sub(now.duration_since(t))
        });
        Some((max, max.saturating_sub(used), full_in))
    }

    /// Decides whether the request at `now` is rate limited or gets an injected error.
    fn verdict(&mut self, now: Instant) -> Option<ApiError> {
        if self.faults.refuse_credentials {
            self.stats.refused += 1;
            return Some(ApiError::ngrok(
                StatusCode::UNAUTHORIZED,
                203,
                "The API key is not valid (refused by keyward-sandbox's refuse_credentials fault).",
            ));
        }
        if let Some((max, window)) = self.faults.rate_limit {
            while self
                .window
                .front()
                .is_some_and(|&t| now.duration_since(t) >= window)
            {
                self.window.pop_front();
            }
            if self.window.len() >= max as usize {
                self.stats.rate_limited += 1;
                // A slot frees when the oldest admitted request leaves the window.
                let frees_in = self
                    .window
                    .front()
                    .map_or(window, |&t| window.saturating_sub(now.duration_since(t)));
                let secs = frees_in.as_millis().div_ceil(1000).max(1);
                return Some(
                    ApiError::ngrok(
                        StatusCode::TOO_MANY_REQUESTS,
                        226,
                        format!(
                            "Your account is rate limited to {max} API requests per {}.",
                            describe_window(window)
                        ),
                    )
                    .header(header::RETRY_AFTER, HeaderValue::from(secs as u64)),
                );
            }
            self.window.push_back(now);
        }
        if self.faults.error_rate > 0.0 && self.rng.random::<f64>() < self.faults.error_rate {
            self.stats.injected_errors += 1;
            return Some(if self.rng.random::<bool>() {
                ApiError::ngrok(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    500,
                    "An internal server error occurred (injected by keyward-sandbox).",
                )
            } else {
                ApiError::ngrok(
                    StatusCode::SERVICE_UNAVAILABLE,
                    503,
                    "The service is temporarily unavailable (injected by keyward-sandbox).",
                )
            });
        }
        None
    }
}

/// `N/WINDOW` in the syntax [`parse_rate_limit`] accepts, e.g. `120/60s`.
fn format_rate_limit(n: u32, w: Duration) -> String {
    let ms = w.as_millis();
    if ms.is_multiple_of(1_000) {
        format!("{n}/{}s", ms / 1_000)
    } else {
        format!("{n}/{ms}ms")
    }
}

/// "minute" for 60 s, "second", "hour", else "N seconds" / "N ms".
fn describe_window(w: Duration) -> String {
    match w.as_millis() {
        1_000 => "second".into(),
        60_000 => "minute".into(),
        3_600_000 => "hour".into(),
        ms if ms.is_multiple_of(1_000) => format!("{} seconds", ms / 1_000),
        ms => format!("{ms} milliseconds"),
    }
}

/// One request being served; counts itself out when dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut control = self.0.control();
        control.in_flight = control.in_flight.saturating_sub(1);
    }
}

/// Axum middleware for the API routes: accounting, latency, rate limit, error injection.
pub async fn api_faults(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = format!(
        "{} {}",
        req.method(),
        super::route_template(req.uri().path())
    );
    let (latency, answer_latency) = {
        let mut control = shared.control();
        control.stats.requests += 1;
        *control.stats.by_route.entry(route).or_default() += 1;
        control.in_flight += 1;
        control.stats.max_in_flight = control.stats.max_in_flight.max(control.in_flight);
        (control.faults.latency, control.faults.answer_latency)
    };
    // Counted out when the answer is done, or the client went away.
    let _served = InFlight(Arc::clone(&shared));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let asa = super::asa::is_asa_path(req.uri().path());
    let (verdict, rate) = {
        let mut control = shared.control();
        let now = Instant::now();
        let verdict = control.verdict(now);
        (verdict, control.rate_status(now))
    };
    match verdict {
        Some(err) if asa => super::asa::fault_response(err, rate),
        Some(err) => err.into_response(),
        None => {
            let mut resp = next.run(req).await;
            if !answer_latency.is_zero() {
                tokio::time::sleep(answer_latency).await;
            }
            if asa {
                super::asa::add_rate_headers(&mut resp, rate);
            }
            resp
        }
    }
}

/// Parses a rate limit `N/WINDOW`, e.g. `120/60s`, `5/1s`, `1000/1m`, `120/minute`.
pub fn parse_rate_limit(s: &str) -> Result<(u32, Duration), String> {
    let (n, window) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("rate limit {s:?} must look like N/WINDOW, e.g. 120/60s"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("rate limit {s:?}: {n:?} is not a positive integer"))?;
    if n == 0 {
        return Err(format!(
            "rate limit {s:?}: the request count must be at least 1"
        ));
    }
    let window = match window.trim() {
        "s" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_latency(other).map_err(|e| format!("rate limit {s:?}: {e}"))?,
    };
    if window.is_zero() {
        return Err(format!(
            "rate limit {s:?}: the window must be longer than 0"
        ));
    }
    Ok((n, window))
}

/// Parses a duration such as `0`, `20ms`, `1s`, `2m` (an integer and a unit: ms, s, m, h).
pub fn parse_latency(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} must be an integer and a unit, e.g. 20ms or 1s"))?;
    let per_unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    per_unit
        .checked_mul(u32::try_from(n).map_err(|_| format!("duration {s:?} is too large"))?)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rate_limits_parse() {
        assert_eq!(
            parse_rate_limit("120/60s"),
            Ok((120, Duration::from_secs(60)))
        );
        assert_eq!(parse_rate_limit("5/1s"), Ok((5, Duration::from_secs(1))));
        assert_eq!(
            parse_rate_limit("10/500ms"),
            Ok((10, Duration::from_millis(500)))
        );
        assert_eq!(
            parse_rate_limit("120/minute"),
            Ok((120, Duration::from_secs(60)))
        );
        assert!(parse_rate_limit("0/60s").is_err());
        assert!(parse_rate_limit("120").is_err());
        assert!(parse_rate_limit("120/0s").is_err());
        assert!(parse_rate_limit("x/60s").is_err());
    }

    #[test]
    fn latencies_parse() {
        assert_eq!(parse_latency("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_latency("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_latency("0"), Ok(Duration::ZERO));
        assert!(parse_latency("20").is_err());
        assert!(parse_latency("fast").is_err());
    }

    #[test]
    fn rolling_window_admits_n_then_answers_429_with_retry_after() {
        let mut c = Control::new(
            Faults {
                rate_limit: Some((2, Duration::from_secs(60))),
                ..Faults::default()
            },
            StdRng::seed_from_u64(1),
        );
        let t0 = Instant::now();
        assert!(c.verdict(t0).is_none());
        assert!(c.verdict(t0 + Duration::from_secs(10)).is_none());
        let err = c
            .verdict(t0 + Duration::from_secs(20))
            .expect("third request is limited");
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code, "ERR_NGROK_226");
        assert!(err.msg.contains("120") || err.msg.contains("2 API requests per minute"));
        let retry = err
            .headers
            .iter()
            .find(|(n, _)| n == header::RETRY_AFTER)
            .map(|(_, v)| v.clone());
        assert_eq!(retry, Some(HeaderValue::from(40u64)));
        // Once the first request leaves the window, one slot frees.
        assert!(c.verdict(t0 + Duration::from_secs(60)).is_none());
        assert_eq!(c.stats.rate_limited, 1);
    }

    #[test]
    fn error_rate_one_always_injects() {
        let mut c = Control::new(
            Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
            StdRng::seed_from_u64(1),
        );
        for _ in 0..10 {
            let err = c.verdict(Instant::now()).expect("injected");
            assert!(err.status.is_server_error());
        }
        assert_eq!(c.stats.injected_errors, 10);
    }
}
