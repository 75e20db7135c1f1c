//! The HTTP plumbing every provider client shares: one reqwest client per account, a
//! client-side rate budget (governor), bounded concurrency, a shared "not before" instant after
//! a 429, and retries with exponential backoff and jitter (backon) that honour `Retry-After`
//! (or, from APIs such as Okta ASA that send none, `X-RateLimit-Retry-At` plus jitter).
//! Provider modules decide what a response means; this module decides when to send it again.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::{Method, Response, StatusCode};
use secrecy::zeroize::Zeroizing;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ErrorClass, ProviderError};
use crate::config::RateLimit;

/// Longest wait keyward accepts from a provider's `Retry-After` before trying again anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Attempts after the first for transient failures (429, 5xx, connection errors).
const MAX_RETRIES: usize = 10;

/// What a request is for, so an error can name it.
#[derive(Debug, Clone)]
pub struct Op {
    /// What keyward was doing, e.g. `list service users`.
    pub operation: String,
    /// The service user it was for, if any.
    pub user: Option<String>,
}

impl Op {
    /// Names an operation, for `user` if it is about one.
    pub fn new(operation: impl Into<String>, user: Option<&str>) -> Self {
        Op {
            operation: operation.into(),
            user: user.map(str::to_string),
        }
    }
}

/// A response the provider module has read: status, headers it cares about, and the body text.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Zeroized when dropped: a create answer holds the new key's secret.
    pub body: Zeroizing<String>,
}

/// Classifies a non-success answer into a [`ProviderError`]; supplied by each provider.
pub type ErrorDecoder = fn(provider: &str, op: &Op, answer: &Answer) -> ProviderError;

/// One provider account's HTTP client with its budget and retry policy.
pub struct HttpClient {
    provider: String,
    client: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    in_flight: Semaphore,
    not_before: Mutex<Option<Instant>>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    /// The account's budget (`rate_limit`), for [`HttpClient::budget_used`].
    rate: RateLimit,
    /// When the requests of the last budget window were sent, oldest first.
    recent: std::sync::Mutex<std::collections::VecDeque<Instant>>,
    decode_error: ErrorDecoder,
    /// The process's shutdown: once cancelled, every wait for a rate budget, a `Retry-After` or
    /// a backoff ends and nothing new is sent (a request already on the wire completes).
    shutdown: CancellationToken,
    /// Checked right before each request goes out (the state lock's lease): a leader that was
    /// paused past its lease sends nothing, not even the request it was about to send.
    fence: std::sync::OnceLock<crate::files::Fence>,
}

impl HttpClient {
    /// Sets the check made right before each request goes out (once; later calls are ignored).
    pub fn set_fence(&self, fence: crate::files::Fence) {
        let _ = self.fence.set(fence);
    }

    /// A client for the account at `base_url`. It never follows a redirect (a 3xx is an error:
    /// following one would send the credential to another host, perhaps over plain http), and
    /// never sends a request for a loopback `base_url` through a proxy (`HTTP_PROXY` would
    /// otherwise see the bearer token in clear).
    pub fn new(
        provider: &str,
        base_url: &str,
        rate: RateLimit,
        concurrency: usize,
        decode_error: ErrorDecoder,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("keyward/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none());
        if is_loopback(base_url) {
            builder = builder.no_proxy();
        }
        let client = builder.build()?;
        Ok(Arc::new(HttpClient {
            provider: provider.to_string(),
            client,
            limiter: RateLimiter::direct(quota(rate)),
            in_flight: Semaphore::new(concurrency.max(1)),
            not_before: Mutex::new(None),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            rate,
            recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
            decode_error,
            shutdown,
            fence: std::sync::OnceLock::new(),
        }))
    }

    /// How many requests this client has sent, retries included.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How many answers were 429 (rate limited).
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// The share of the account's budget (`rate_limit`: N requests per window) that the
    /// requests of the last window took: 0.0 to 1.0 (the budget never lets more through).
    pub fn budget_used(&self) -> f64 {
        let Ok(mut recent) = self.recent.lock() else {
            return 0.0;
        };
        self.forget_before_window(&mut recent);
        recent.len() as f64 / f64::from(self.rate.requests.max(1))
    }

    fn forget_before_window(&self, recent: &mut std::collections::VecDeque<Instant>) {
        let now = Instant::now();
        let window = window_of(self.rate);
        while recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            recent.pop_front();
        }
    }

    /// Sends a request built by `build` (called afresh for each attempt) and returns the answer
    /// once it is a success; transient failures are retried, others returned at once.
    pub async fn send<F>(&self, op: &Op, build: F) -> Result<Answer, ProviderError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let attempt = || async { self.attempt(op, &build).await };
        let sleep_shutdown = self.shutdown.clone();
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(MAX_RETRIES)
                    .with_jitter(),
            )
            // Waits end early on shutdown: a SIGTERM must not sit out a long Retry-After.
            .sleep(move |d: Duration| {
                let shutdown = sleep_shutdown.clone();
                async move {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            })
            .when(|e: &Failure| {
                e.error.class == ErrorClass::Transient && !self.shutdown.is_cancelled()
            })
            .adjust(|e: &Failure, backoff| match (e.retry_after, backoff) {
                // Out of attempts: stop, whatever the provider asked.
                (_, None) => None,
                (Some(wait), Some(_)) => Some(wait.min(MAX_RETRY_AFTER)),
                (None, b) => b,
            })
            .notify(|e: &Failure, wait| {
                // Said at once: a run that waits minutes on an unreachable host must not look hung.
                tracing::warn!(
                    provider = %self.provider,
                    operation = %op.operation,
                    "retrying in {:.1}s after: {}",
                    wait.as_secs_f64(),
                    e.error
                );
            })
            .await
            .map_err(|f| f.error)
    }

    async fn attempt<F>(&self, op: &Op, build: &F) -> Result<Answer, Failure>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let _permit = self.in_flight.acquire().await.map_err(|_| Failure {
            error: self.local_error(op, "client is shutting down"),
            retry_after: None,
        })?;
        let waits = async {
            self.pause_if_told().await;
            self.limiter
                .until_ready_with_jitter(governor::Jitter::up_to(Duration::from_millis(50)))
                .await;
            // A 429 that came in while this request waited for the budget pauses it too.
            self.pause_if_told().await;
        };
        tokio::select! {
            _ = waits => {}
            _ = self.shutdown.cancelled() => {
                // Nothing was sent: abandoning is safe.
                return Err(Failure {
                    error: self.local_error(op, "not sent: keyward is shutting down"),
                    retry_after: None,
                });
            }
        }
        if let Some(fence) = self.fence.get()
            && let Err(e) = fence()
        {
            // Nothing was sent: the next leader does what is still to do.
            return Err(Failure {
                error: self.local_error(op, &format!("not sent: {e:#}")),
                retry_after: None,
            });
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut recent) = self.recent.lock() {
            self.forget_before_window(&mut recent);
            recent.push_back(Instant::now());
        }
        let response = match build(&self.client).send().await {
            Ok(r) => r,
            // A request that cannot even be built (a credential that is no valid header
            // value, say) fails the same way every time.
            Err(e) if e.is_builder() => {
                return Err(Failure {
                    error: self.local_error(op, &describe_transport_error(&e)),
                    retry_after: None,
                });
            }
            Err(e) => {
                return Err(Failure {
                    error: self.transport_error(op, describe_transport_error(&e)),
                    retry_after: None,
                });
            }
        };
        let answer = read(response).await.map_err(|e| Failure {
            error: self.transport_error(
                op,
                format!(
                    "reading the response failed: {}",
                    describe_transport_error(&e)
                ),
            ),
            retry_after: None,
        })?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        if answer.status.is_redirection() {
            return Err(Failure {
                error: ProviderError {
                    status: Some(answer.status.as_u16()),
                    ..self.local_error(op, &redirect_refused(&answer))
                },
                retry_after: None,
            });
        }
        let retry_after = wait_hint(&answer.headers);
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            // Every caller of this account waits, not just this one: the budget is shared.
            let wait = retry_after
                .unwrap_or(Duration::from_secs(1))
                .min(MAX_RETRY_AFTER);
            let mut nb = self.not_before.lock().await;
            let until = Instant::now() + wait;
            if nb.is_none_or(|t| t < until) {
                *nb = Some(until);
            }
        }
        let mut error = (self.decode_error)(&self.provider, op, &answer);
        if answer.status == StatusCode::TOO_MANY_REQUESTS || answer.status.is_server_error() {
            error.class = ErrorClass::Transient;
        }
        Err(Failure { error, retry_after })
    }

    /// Waits out the "not before" instant a 429's `Retry-After` set for the whole account.
    async fn pause_if_told(&self) {
        let until = *self.not_before.lock().await;
        if let Some(t) = until {
            tokio::time::sleep_until(t).await;
        }
    }

    /// A failure below HTTP (connect, timeout, a cut-off body): worth retrying.
    fn transport_error(&self, op: &Op, message: String) -> ProviderError {
        ProviderError {
            class: ErrorClass::Transient,
            ..self.local_error(op, &message)
        }
    }

    fn local_error(&self, op: &Op, message: &str) -> ProviderError {
        ProviderError {
            provider: self.provider.clone(),
            operation: op.operation.clone(),
            user: op.user.clone(),
            status: None,
            code: None,
            message: message.to_string(),
            class: ErrorClass::Rejected,
        }
    }

    /// The generic request builder with a method and an absolute URL.
    pub fn request(client: &reqwest::Client, method: Method, url: &str) -> reqwest::RequestBuilder {
        client.request(method, url)
    }
}

struct Failure {
    error: ProviderError,
    retry_after: Option<Duration>,
}

async fn read(response: Response) -> Result<Answer, reqwest::Error> {
    let status = response.status();
    let headers = response.headers().clone();
    let body = Zeroizing::new(response.text().await?);
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A JSON decoding error in words that quote nothing of the body (serde_json's own message can
/// quote a fragment of it, and a create answer's body holds the new secret): the kind of
/// problem and where.
pub fn decode_problem(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "could not be read",
        serde_json::error::Category::Syntax => "is not valid JSON",
        serde_json::error::Category::Data => "does not have the expected fields or types",
        serde_json::error::Category::Eof => "ends early",
    };
    format!(
        "the response body {kind} (line {}, column {})",
        e.line(),
        e.column()
    )
}

/// Whether a base URL's host is a loopback address (or `localhost`).
pub fn is_loopback(base_url: &str) -> bool {
    match url::Url::parse(base_url)
        .ok()
        .as_ref()
        .and_then(url::Url::host)
    {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The message for a 3xx answer: where it pointed (scheme, host and port only), and why
/// keyward does not go there.
fn redirect_refused(answer: &Answer) -> String {
    let target = answer
        .headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| url::Url::parse(l).ok())
        .map(|u| crate::text::escape(&u.origin().ascii_serialization()).into_owned());
    format!(
        "the provider answered with a redirect{}; keyward never follows redirects (the credential would be sent to another address). Set base_url to the address that serves the API",
        target.map(|t| format!(" to {t}")).unwrap_or_default()
    )
}

/// How long the provider asked keyward to wait: `Retry-After` when present, else Okta ASA's
/// `X-RateLimit-Retry-At`.
pub fn wait_hint(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    retry_after(headers).or_else(|| retry_at(headers))
}

/// `Retry-After` as delta-seconds or an HTTP-date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `X-RateLimit-Retry-At` (UNIX seconds, Okta ASA) as a wait from now, plus 100–1500 ms of
/// jitter: requests told the same instant should not all come back at once.
pub fn retry_at(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let at: i64 = headers
        .get("x-ratelimit-retry-at")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let wait_ms = u64::try_from(at.saturating_mul(1000).saturating_sub(now_ms)).unwrap_or(0);
    let jitter_ms = rand::Rng::random_range(&mut rand::rng(), 100..=1500);
    Some(Duration::from_millis(wait_ms + jitter_ms))
}

/// The pace of a long listing that must leave most of the account's budget to other work: at
/// most `percent`% of the account's `rate_limit` in any window of its length, as [`quota`]
/// counts it.
/// While `urgent` is set (a listing someone waits for: the daemon's start, a config edit,
/// SIGHUP) it does not wait; the account's own budget still holds every request.
pub struct Pace {
    limiter: DefaultDirectRateLimiter,
    urgent: Arc<AtomicBool>,
    /// Pages begun under this pace (for the listing's live metrics).
    pages: Arc<AtomicU64>,
}

impl Pace {
    /// A pace of `percent` (1–100) of `rate`, skipped while `urgent` is set; every page it lets
    /// through is counted in `pages`.
    pub fn new(
        rate: RateLimit,
        percent: u8,
        urgent: Arc<AtomicBool>,
        pages: Arc<AtomicU64>,
    ) -> Pace {
        let share = (u64::from(rate.requests) * u64::from(percent.clamp(1, 100)) / 100).max(1);
        let share = RateLimit {
            requests: u32::try_from(share).unwrap_or(u32::MAX),
            per: rate.per,
        };
        Pace {
            limiter: RateLimiter::direct(quota(share)),
            urgent,
            pages,
        }
    }

    /// Waits until the next page may be read.
    pub async fn wait(&self) {
        if !self.urgent.load(Ordering::Relaxed) {
            self.limiter.until_ready().await;
        }
        self.pages.fetch_add(1, Ordering::Relaxed);
    }
}

/// The window of `rate` (N requests per window), at least a millisecond.
fn window_of(rate: RateLimit) -> Duration {
    Duration::from_millis(u64::try_from(rate.per.as_millis()).unwrap_or(0).max(1))
}

/// The governor quota for `rate` (N requests per window W) that never lets more than N
/// requests through in any window of length W, as providers count them (a rolling window):
/// a small burst `b` (2% of N, at least 1) and one request every `T = W' / (N - b + 1)`, so
/// that any window holds at most `b + (N - b + 1) - 1 = N` requests. `W'` is W plus 1%: the
/// provider counts a request when it arrives, and answer times that vary must not squeeze one
/// request too many into its window. The sustained rate is about 97–99% of N per W. (A bucket
/// of N that refills at N per W lets almost 2N through in one window.)
fn quota(rate: RateLimit) -> Quota {
    let n = rate.requests.max(1);
    let burst = (n / 50).max(1);
    let window = window_of(rate).mul_f64(1.01);
    let period = window / (n - burst + 1);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

/// A transport error in words, without the URL's query (which could one day carry a token).
fn describe_transport_error(e: &reqwest::Error) -> String {
    let text = if e.is_timeout() {
        "request timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    crate::text::with_sources(text, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[tokio::test]
    async fn a_fence_that_fails_sends_nothing() {
        // A listener that counts connections: none may arrive.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let decode: ErrorDecoder = |provider, op, _| ProviderError {
            provider: provider.to_string(),
            operation: op.operation.clone(),
            user: None,
            status: None,
            code: None,
            message: String::new(),
            class: ErrorClass::Rejected,
        };
        let rate = RateLimit {
            requests: 100,
            per: jiff::SignedDuration::from_secs(60),
        };
        let client =
            HttpClient::new("ng", &url, rate, 2, decode, CancellationToken::new()).unwrap();
        client.set_fence(Arc::new(|| {
            anyhow::bail!("no word from the state database")
        }));
        let op = Op::new("create key", Some("edge-1"));
        let e = client
            .send(&op, |c| c.post(format!("{url}/api_keys")))
            .await
            .expect_err("fenced");
        assert!(
            e.message.contains("not sent") && e.message.contains("no word"),
            "{e}"
        );
        assert_eq!(client.requests_sent(), 0);
        assert!(listener.accept().is_err(), "a connection was made");
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn retry_at_waits_until_the_instant_plus_jitter() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_at(&h), None);
        let at = jiff::Timestamp::now().as_second() + 3;
        h.insert("x-ratelimit-retry-at", HeaderValue::from(at));
        let d = retry_at(&h).unwrap();
        assert!(
            d >= Duration::from_millis(2100) && d <= Duration::from_millis(4500),
            "{d:?}"
        );
        // An instant in the past means "now", still with jitter.
        h.insert("x-ratelimit-retry-at", HeaderValue::from(1_000_000_000i64));
        let d = retry_at(&h).unwrap();
        assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(1500));
        // Only X-RateLimit-Retry-At: it decides the wait.
        h.insert(
            "x-ratelimit-retry-at",
            HeaderValue::from(jiff::Timestamp::now().as_second() + 60),
        );
        let d = wait_hint(&h).unwrap();
        assert!(d > Duration::from_secs(55), "{d:?}");
        // Retry-After, when present, wins over it.
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(wait_hint(&h), Some(Duration::from_secs(7)));
    }

    /// Takes every request the quota for `n` per `per_ms` allows, as fast as it allows them,
    /// over `windows` windows (a fake clock stepping 1 ms); returns the most requests seen in
    /// any window of length `per_ms` (as a provider counts: a request leaves the window
    /// `per_ms` after it came) and the total.
    fn greedy(n: u32, per_ms: u64, windows: u64) -> (usize, usize) {
        use governor::clock::FakeRelativeClock;
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(
            quota(RateLimit {
                requests: n,
                per: jiff::SignedDuration::from_millis(per_ms as i64),
            }),
            clock.clone(),
        );
        let mut sent: Vec<u64> = Vec::new();
        for ms in 0..per_ms * windows {
            while limiter.check().is_ok() {
                sent.push(ms);
            }
            clock.advance(Duration::from_millis(1));
        }
        let mut most = 0;
        let mut start = 0;
        for (i, &t) in sent.iter().enumerate() {
            while sent[start] + per_ms <= t {
                start += 1;
            }
            most = most.max(i + 1 - start);
        }
        (most, sent.len())
    }

    #[test]
    fn the_budget_holds_over_every_rolling_window_and_is_nearly_all_used() {
        for (n, per_ms) in [
            (1, 1_000),
            (5, 1_000),
            (20, 1_000),
            (100, 60_000),
            (120, 60_000),
        ] {
            let windows = 20;
            let (most, total) = greedy(n, per_ms, windows);
            assert!(
                most <= n as usize,
                "{n}/{per_ms}ms: {most} requests in one window"
            );
            // Sustained use: at least 95% of the budget (the burst and the 1% margin aside).
            let per_window = total as f64 / windows as f64;
            assert!(
                per_window >= 0.95 * n as f64 || n < 20,
                "{n}/{per_ms}ms: only {per_window:.1} a window"
            );
        }
    }
}
