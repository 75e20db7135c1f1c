//! The Okta Advanced Server Access (ASA) client, also for Okta Privileged Access (same paths and
//! bodies on a team-specific host): service users under `/v1/teams/{team}/service_users` and
//! their API keys under `…/service_users/{name}/keys`.
//!
//! - Auth: the configured key id and secret buy a short-lived bearer token at `service_token`;
//!   it is cached, renewed shortly before its `expires_at`, and re-issued once when a request
//!   answers 401 (tokens may die early: deleting or expiring the key that minted them kills them).
//!   A 401/403 from `service_token` itself is a credential error that never shows the secret.
//!   The `team_name` of the token must match the configured team, case-insensitively.
//! - Lists follow RFC 8288 `Link: <…>; rel="next"`, absolute or relative (resolved against the
//!   page's URL), and never to another host. Observing lists users, then each non-deleted user's
//!   keys (ASA has no account-wide key list), with bounded concurrency.
//! - 429s wait until `X-RateLimit-Retry-At` plus jitter (in [`super::http`]). Errors are decided
//!   by status; the body is kept as trimmed text, since ASA's error shape is undocumented.
//! - Mapping: `active: false` is status DISABLED; deleting a user is a PUT with status DELETED
//!   (soft and irreversible: ASA keeps the name reserved), and such users are observed with
//!   `deleted: true`. A key's `expires_at` of `0001-01-01T00:00:00Z` means never (`None`).
//! - Keys: ASA has one endpoint that mints a key, "rotate" (`POST …/keys`), for the first key and
//!   for every later one alike; it also puts the user's other keys on a 2-day expiry clock. A key
//!   has no description or metadata at ASA, so keyward recognises its keys by id from its state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use jiff::Timestamp;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::http::{Answer, HttpClient, Op, Pace};
use super::{
    CreatedKey, Cursor, ErrorClass, Listing, NewKey, Provider, ProviderError, gone_is_done,
};
use crate::config::{ProviderAccount, ProviderAuth};
use crate::model::{KeyKind, RemoteKey, RemoteUser};

/// Longest error body kept in a message.
const MAX_BODY_IN_MESSAGE: usize = 300;
/// Most pages one listing may take before keyward suspects a loop.
const MAX_PAGES: usize = 100_000;
/// Longest early-renewal margin for a token (the Go SDK renews up to 2 minutes early).
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(120);
/// `0001-01-01T00:00:00Z`, ASA's "no expiry", in UNIX seconds.
const ZERO_TIME_SECONDS: i64 = -62_135_596_800;

/// A bearer token and when to stop using it.
struct CachedToken {
    bearer: SecretString,
    renew_at: Instant,
    generation: u64,
}

/// The client of one Okta ASA team (see the module doc for auth, paging and rate limits).
pub struct AsaProvider {
    name: String,
    base: Url,
    team: String,
    key_id: String,
    key_secret: SecretString,
    http: Arc<HttpClient>,
    concurrency: usize,
    token: Mutex<(Option<CachedToken>, u64)>,
}

impl AsaProvider {
    /// A client whose waits end, and which sends nothing more, once `shutdown` is cancelled.
    pub fn with_shutdown(
        account: &ProviderAccount,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let ProviderAuth::OktaAsa {
            team,
            key_id,
            key_secret,
        } = &account.auth
        else {
            anyhow::bail!("provider {}: not an okta-asa account", account.name);
        };
        let mut base = Url::parse(&account.base_url).map_err(|e| {
            anyhow::anyhow!(
                "provider {}: base_url {:?} is not a URL: {e}",
                account.name,
                account.base_url
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.path_segments_mut().is_err() {
            anyhow::bail!(
                "provider {}: base_url {:?} must be an http(s) URL",
                account.name,
                account.base_url
            );
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(AsaProvider {
            name: account.name.clone(),
            base,
            team: team.clone(),
            key_id: key_id.clone(),
            key_secret: key_secret.clone(),
            http: HttpClient::new(
                &account.name,
                &account.base_url,
                account.rate_limit,
                concurrency,
                decode_error,
                shutdown,
            )?,
            concurrency: concurrency.max(1),
            token: Mutex::new((None, 0)),
        })
    }

    /// `{base}/v1/teams/{team}/{segments…}`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut path) = u.path_segments_mut() {
            path.pop_if_empty()
                .extend(["v1", "teams", self.team.as_str()])
                .extend(segments);
        }
        u
    }

    fn error(
        &self,
        op: &Op,
        status: Option<u16>,
        message: String,
        class: ErrorClass,
    ) -> ProviderError {
        ProviderError {
            provider: self.name.clone(),
            operation: op.operation.clone(),
            user: op.user.clone(),
            status,
            code: None,
            message,
            class,
        }
    }

    /// The cached bearer token, renewed first when it is (nearly) due.
    async fn token(&self) -> Result<(SecretString, u64), ProviderError> {
        // Holding the lock while issuing makes concurrent callers share one new token.
        let mut guard = self.token.lock().await;
        if let Some(t) = &guard.0
            && Instant::now() < t.renew_at
        {
            return Ok((t.bearer.clone(), t.generation));
        }
        let (bearer, lifetime) = self.issue_token().await?;
        guard.1 += 1;
        let generation = guard.1;
        guard.0 = Some(CachedToken {
            bearer: bearer.clone(),
            // A token claiming to live longer than a day is renewed after a day all the same.
            renew_at: {
                let lifetime = lifetime.min(Duration::from_secs(86_400));
                Instant::now() + lifetime.saturating_sub(renew_margin(lifetime))
            },
            generation,
        });
        Ok((bearer, generation))
    }

    /// Drops the token of `generation` (after a 401), unless another caller already renewed it.
    async fn invalidate(&self, generation: u64) {
        let mut guard = self.token.lock().await;
        if guard.0.as_ref().is_some_and(|t| t.generation == generation) {
            guard.0 = None;
        }
    }

    /// `POST service_token`: the key pair for a bearer token and its remaining lifetime.
    async fn issue_token(&self) -> Result<(SecretString, Duration), ProviderError> {
        let op = Op::new("get a service token", None);
        let url = self.url(&["service_token"]);
        let body = serde_json::json!({
            "key_id": self.key_id,
            "key_secret": self.key_secret.expose_secret(),
        });
        let answer = self
            .http
            .send(&op, |client| {
                client
                    .post(url.as_str())
                    .header(reqwest::header::ACCEPT, "application/json")
                    .json(&body)
            })
            .await
            .map_err(|mut e| {
                if matches!(e.status, Some(401 | 403)) {
                    e.class = ErrorClass::Credential;
                    e.message = format!(
                        "the API key in key_id / key_secret was refused for team {}: it is wrong, expired or deleted, or its service user is not active",
                        self.team
                    );
                }
                e.message = self.scrub(&e.message);
                e
            })?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            bearer_token: String,
            expires_at: Timestamp,
            #[serde(default)]
            team_name: Option<String>,
        }
        let t: TokenAnswer = serde_json::from_str(&answer.body).map_err(|e| {
            self.error(
                &op,
                Some(answer.status.as_u16()),
                format!(
                    "unexpected service_token response: {}",
                    super::http::decode_problem(&e)
                ),
                ErrorClass::Rejected,
            )
        })?;
        check_team(&self.team, t.team_name.as_deref())
            .map_err(|m| self.error(&op, None, m, ErrorClass::Credential))?;
        let lifetime = Timestamp::now()
            .until(t.expires_at)
            .ok()
            .and_then(|span| {
                span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                    .ok()
            })
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::ZERO);
        let token = SecretString::from(t.bearer_token);
        crate::redact::remember(&format!("{}.token", self.name), &token);
        Ok((token, lifetime))
    }

    /// Removes the key secret (and every other credential keyward holds) from a text, should an
    /// answer ever echo it.
    fn scrub(&self, text: &str) -> String {
        crate::redact::mask(text, Some(&self.key_secret)).into_owned()
    }

    /// One authenticated request; a 401 re-issues the token once and sends it again.
    async fn call(
        &self,
        op: &Op,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ProviderError> {
        let (token, generation) = self.token().await?;
        match self.send(op, &method, url, body, &token).await {
            Err(e) if e.status == Some(401) => {
                tracing::debug!(provider = %self.name, operation = %op.operation, "401: re-issuing the service token once");
                self.invalidate(generation).await;
                let (token, _) = self.token().await?;
                self.send(op, &method, url, body, &token).await
            }
            other => other,
        }
    }

    async fn send(
        &self,
        op: &Op,
        method: &Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        token: &SecretString,
    ) -> Result<Answer, ProviderError> {
        self.http
            .send(op, |client| {
                let mut rb = client
                    .request(method.clone(), url.as_str())
                    .bearer_auth(token.expose_secret())
                    .header(reqwest::header::ACCEPT, "application/json");
                if let Some(b) = body {
                    rb = rb.json(b);
                }
                rb
            })
            .await
    }

    fn decode<T: DeserializeOwned>(&self, op: &Op, answer: &Answer) -> Result<T, ProviderError> {
        serde_json::from_str(&answer.body).map_err(|e| {
            self.error(
                op,
                Some(answer.status.as_u16()),
                super::http::decode_problem(&e),
                ErrorClass::Rejected,
            )
        })
    }

    /// Every item of a list endpoint, following `Link rel="next"` to the end.
    async fn list_all<T: DeserializeOwned>(
        &self,
        op: &Op,
        first: Url,
    ) -> Result<Vec<T>, ProviderError> {
        let (mut cursor, mut items, pages) = (None, Vec::new(), AtomicU64::new(0));
        self.list_from(op, first, &mut cursor, None, &pages, &mut items, |t| t)
            .await?;
        Ok(items)
    }

    /// Reads the list that begins at `first` on from `cursor` (`None`: from `first`) to its
    /// end, following `Link rel="next"` and waiting on `pace` before each page: each page's
    /// items go into `items` (through `convert`) and `cursor` moves past it, so that after an
    /// error both say how far the list got.
    #[allow(clippy::too_many_arguments)]
    async fn list_from<T: DeserializeOwned, U>(
        &self,
        op: &Op,
        first: Url,
        cursor: &mut Option<Cursor>,
        pace: Option<&Pace>,
        pages: &AtomicU64,
        items: &mut Vec<U>,
        convert: impl Fn(T) -> U,
    ) -> Result<(), ProviderError> {
        #[derive(Deserialize)]
        struct Page<T> {
            #[serde(default = "Vec::new")]
            list: Vec<T>,
        }
        let mut url = match cursor {
            Some(Cursor::Done) => return Ok(()),
            Some(Cursor::Page(next)) => Url::parse(next).map_err(|e| {
                self.error(
                    op,
                    None,
                    format!("unusable next-page link: {e}"),
                    ErrorClass::Rejected,
                )
            })?,
            None | Some(Cursor::User(_) | Cursor::Stretches(_)) => first,
        };
        for _ in 0..MAX_PAGES {
            if let Some(p) = pace {
                p.wait().await;
            }
            let answer = self.call(op, Method::GET, &url, None).await?;
            let page: Page<T> = self.decode(op, &answer)?;
            let empty = page.list.is_empty();
            let links = answer
                .headers
                .get_all(reqwest::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok());
            let next = match next_link(links) {
                // An empty page ends the listing even if a next page is announced.
                Some(next) if !empty => Some(next),
                _ => None,
            };
            let next = match next {
                None => None,
                Some(next) => {
                    let next = url.join(&next).map_err(|e| {
                        self.error(
                            op,
                            None,
                            format!("the API answered an unusable next-page link: {e}"),
                            ErrorClass::Rejected,
                        )
                    })?;
                    check_same_origin(&self.base, &next)
                        .map_err(|m| self.error(op, None, m, ErrorClass::Rejected))?;
                    if next == url {
                        return Err(self.error(
                            op,
                            None,
                            "the API's next-page link points at the page itself".into(),
                            ErrorClass::Rejected,
                        ));
                    }
                    Some(next)
                }
            };
            items.extend(page.list.into_iter().map(&convert));
            pages.fetch_add(1, Ordering::Relaxed);
            match next {
                Some(next) => {
                    *cursor = Some(Cursor::Page(next.to_string()));
                    url = next;
                }
                None => {
                    *cursor = Some(Cursor::Done);
                    return Ok(());
                }
            }
        }
        Err(self.error(
            op,
            None,
            format!("more than {MAX_PAGES} pages; giving up"),
            ErrorClass::Rejected,
        ))
    }

    async fn list_keys(&self, user: &RemoteUser) -> Result<Vec<RemoteKey>, ProviderError> {
        let op = Op::new("list API keys", Some(&user.name));
        let wire: Vec<WireKey> = self
            .list_all(&op, self.url(&["service_users", &user.name, "keys"]))
            .await?;
        wire.into_iter()
            .map(|k| {
                k.into_remote(&user.id)
                    .map(|(k, _)| k)
                    .map_err(|m| self.error(&op, None, m, ErrorClass::Rejected))
            })
            .collect()
    }

    async fn put_status(
        &self,
        op: &Op,
        name: &str,
        status: &str,
    ) -> Result<RemoteUser, ProviderError> {
        let body = serde_json::json!({"name": name, "status": status});
        let answer = self
            .call(
                op,
                Method::PUT,
                &self.url(&["service_users", name]),
                Some(&body),
            )
            .await?;
        let user: WireUser = self.decode(op, &answer)?;
        Ok(user.into())
    }
}

/// How long before a token's expiry to renew it: a fifth of its lifetime, at most 2 minutes,
/// shortened at random by up to half so that many clients do not renew in step.
fn renew_margin(lifetime: Duration) -> Duration {
    let margin = (lifetime / 5).min(MAX_RENEW_MARGIN);
    margin.mul_f64(rand::Rng::random_range(&mut rand::rng(), 0.5..=1.0))
}

/// The token's team must be the configured one, in any case; a missing `team_name` is accepted.
fn check_team(want: &str, got: Option<&str>) -> Result<(), String> {
    match got {
        Some(got) if !got.eq_ignore_ascii_case(want) => Err(format!(
            "service_token answered a token for team {got:?}, not the configured team {want:?}"
        )),
        _ => Ok(()),
    }
}

/// The bearer token goes only to the configured host: a next page elsewhere is refused.
fn check_same_origin(base: &Url, next: &Url) -> Result<(), String> {
    if next.origin() == base.origin() {
        Ok(())
    } else {
        Err(format!(
            "the API answered a next page on another host ({}); refusing to send the token there",
            next.host_str().unwrap_or("no host")
        ))
    }
}

/// The target of the first `rel="next"` link in RFC 8288 `Link` header values, as written
/// (absolute or relative). Tolerates several values, several links per value, unquoted and
/// multi-token `rel`, and commas inside `<…>`.
pub fn next_link<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    for value in values {
        let mut rest = value;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let mut params = &after[close + 1..];
            // Parameters run to the next comma that is outside quotes.
            let mut in_quotes = false;
            let mut end = params.len();
            for (i, c) in params.char_indices() {
                match c {
                    '"' => in_quotes = !in_quotes,
                    ',' if !in_quotes => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            rest = &params[end..];
            params = &params[..end];
            let is_next = params.split(';').any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim()
                            .trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                })
            });
            if is_next {
                return Some(target.trim().to_string());
            }
        }
    }
    None
}

/// An ASA time that may be ASA's zero time (`0001-01-01T00:00:00Z`, "never"): `None` for the
/// zero time, null or an empty string; RFC 3339 with `Z` or an offset otherwise.
pub fn parse_expiry(value: Option<&str>) -> Result<Option<Timestamp>, String> {
    let Some(s) = value.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let t: Timestamp = s
        .parse()
        .map_err(|e| format!("expires_at {s:?} is not an RFC 3339 time: {e}"))?;
    Ok((t.as_second() > ZERO_TIME_SECONDS).then_some(t))
}

#[derive(Debug, Deserialize)]
struct WireUser {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    deleted_at: Option<String>,
}

impl From<WireUser> for RemoteUser {
    fn from(w: WireUser) -> Self {
        let status = w.status.unwrap_or_default();
        let deleted = status.eq_ignore_ascii_case("DELETED")
            || w.deleted_at
                .as_deref()
                .is_some_and(|d| !d.trim().is_empty());
        RemoteUser {
            id: w.id,
            name: w.name,
            active: status.eq_ignore_ascii_case("ACTIVE") && !deleted,
            deleted,
            created_at: None,
        }
    }
}

#[derive(Deserialize)]
struct WireKey {
    id: String,
    issued_at: Timestamp,
    #[serde(default)]
    expires_at: Option<String>,
    /// Only in the rotate response.
    #[serde(default)]
    secret: Option<String>,
}

impl WireKey {
    fn into_remote(self, owner_id: &str) -> Result<(RemoteKey, Option<SecretString>), String> {
        let expires_at = parse_expiry(self.expires_at.as_deref())?;
        let key = RemoteKey {
            id: self.id,
            kind: KeyKind::ApiKey,
            owner_id: Some(owner_id.to_string()),
            description: String::new(),
            metadata: String::new(),
            acl: Vec::new(),
            created_at: self.issued_at,
            expires_at,
        };
        Ok((key, self.secret.map(SecretString::from)))
    }
}

/// Maps an ASA error answer to a [`ProviderError`] by status; the body (loosely read: its
/// `message`, else the text itself) becomes the message, its `error` identifier the code.
fn decode_error(provider: &str, op: &Op, answer: &Answer) -> ProviderError {
    let status = answer.status.as_u16();
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(&answer.body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let code = field("error");
    let text = field("message").unwrap_or_else(|| answer.body.trim().to_string());
    let mut message = if text.is_empty() {
        answer
            .status
            .canonical_reason()
            .unwrap_or("unexpected status")
            .to_string()
    } else if text.chars().count() > MAX_BODY_IN_MESSAGE {
        let cut: String = text.chars().take(MAX_BODY_IN_MESSAGE).collect();
        format!("{cut}…")
    } else {
        text
    };
    if status == 409 {
        message.push_str(" (ASA keeps the names of deleted service users reserved)");
    }
    let class = match status {
        401 | 403 => ErrorClass::Credential,
        429 | 500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Rejected,
    };
    ProviderError {
        provider: provider.to_string(),
        operation: op.operation.clone(),
        user: op.user.clone(),
        status: Some(status),
        code,
        message,
        class,
    }
}

#[async_trait]
impl Provider for AsaProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list(
        &self,
        managed: Option<&std::collections::BTreeSet<String>>,
        listing: &mut Listing,
        pace: Option<&Pace>,
    ) -> Result<(), ProviderError> {
        const USERS: &str = "service_users";
        const KEYS: &str = "keys";
        let op = Op::new("list service users", None);
        let mut at = listing.cursors.get(USERS).cloned();
        let (mut users, pages) = (Vec::new(), AtomicU64::new(0));
        let read = self
            .list_from::<WireUser, _>(
                &op,
                self.url(&["service_users"]),
                &mut at,
                pace,
                &pages,
                &mut users,
                RemoteUser::from,
            )
            .await;
        listing.users.append(&mut users);
        listing.pages += pages.into_inner();
        if let Some(c) = at {
            listing.cursors.insert(USERS, c);
        }
        read?;
        // A deleted user's keys can no longer be used; its name is all that remains. Keys are
        // listed one user at a time, so only for the users keyward manages, in the listing's
        // order, from the user where an earlier call stopped.
        let first = match listing.cursors.get(KEYS) {
            Some(Cursor::Done) => return Ok(()),
            Some(Cursor::User(i)) => *i,
            _ => 0,
        };
        let (users, keys) = (&listing.users, &mut listing.keys);
        let mut listings = Vec::new();
        for (i, u) in users.iter().enumerate().skip(first) {
            // A name that cannot stand as a URL path segment (`.`, `..`, a control
            // character: URL parsing resolves or strips them) cannot be addressed; its keys
            // are not listed, and a config cannot declare it.
            let addressable =
                !matches!(u.name.as_str(), "." | "..") && !crate::text::has_control(&u.name);
            if !addressable {
                tracing::warn!(
                    "provider {}: service user {} cannot be addressed in a URL; its keys are not listed",
                    self.name,
                    crate::text::escape(&u.name)
                );
            }
            if addressable && !u.deleted && managed.is_none_or(|m| m.contains(&u.name)) {
                listings.push(async move {
                    if let Some(p) = pace {
                        p.wait().await;
                    }
                    (i, self.list_keys(u).await)
                });
            }
        }
        let mut per_user = futures::stream::iter(listings).buffered(self.concurrency);
        let (mut next, mut read_users, mut failed) = (first, 0, None);
        // In order: the cursor moves past a user only once its keys (and every user's before
        // it) are in.
        while let Some((i, read)) = per_user.next().await {
            match read {
                Ok(mut k) => {
                    keys.append(&mut k);
                    next = i + 1;
                    read_users += 1;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(per_user);
        // About one page a user: ASA teams rarely give a service user more than a few keys.
        listing.pages += read_users;
        match failed {
            Some(e) => {
                listing.cursors.insert(KEYS, Cursor::User(next));
                Err(e)
            }
            None => {
                listing.cursors.insert(KEYS, Cursor::Done);
                Ok(())
            }
        }
    }

    async fn create_user(&self, name: &str, active: bool) -> Result<RemoteUser, ProviderError> {
        let op = Op::new("create service user", Some(name));
        let body = serde_json::json!({"name": name});
        let answer = self
            .call(
                &op,
                Method::POST,
                &self.url(&["service_users"]),
                Some(&body),
            )
            .await?;
        let user: RemoteUser = self.decode::<WireUser>(&op, &answer)?.into();
        if active || !user.active {
            return Ok(user);
        }
        // ASA creates users ACTIVE; an inactive one is disabled right after.
        let op = Op::new("disable new service user", Some(name));
        self.put_status(&op, name, "DISABLED").await
    }

    async fn update_user(
        &self,
        user: &RemoteUser,
        active: bool,
    ) -> Result<RemoteUser, ProviderError> {
        let op = Op::new("update service user", Some(&user.name));
        self.put_status(&op, &user.name, if active { "ACTIVE" } else { "DISABLED" })
            .await
    }

    async fn delete_user(&self, user: &RemoteUser) -> Result<(), ProviderError> {
        let op = Op::new("delete service user (soft, irreversible)", Some(&user.name));
        gone_is_done(self.put_status(&op, &user.name, "DELETED").await)
    }

    async fn create_key(
        &self,
        user: &RemoteUser,
        key: &NewKey,
    ) -> Result<CreatedKey, ProviderError> {
        let op = Op::new(
            format!("create {} for slot {}", key.kind, key.slot),
            Some(&user.name),
        );
        if key.kind != KeyKind::ApiKey {
            return Err(self.error(
                &op,
                None,
                format!("ASA service users have API keys only, not {}", key.kind),
                ErrorClass::Rejected,
            ));
        }
        // ASA's "rotate" is its only way to mint a key; no body, 200 with the secret.
        let answer = self
            .call(
                &op,
                Method::POST,
                &self.url(&["service_users", &user.name, "keys"]),
                None,
            )
            .await?;
        let wire: WireKey = self.decode(&op, &answer)?;
        let (remote, secret) = wire
            .into_remote(&user.id)
            .map_err(|m| self.error(&op, Some(answer.status.as_u16()), m, ErrorClass::Rejected))?;
        let secret = secret.ok_or_else(|| {
            self.error(
                &op,
                Some(answer.status.as_u16()),
                format!(
                    "the rotate response for key {} carried no secret",
                    remote.id
                ),
                ErrorClass::Rejected,
            )
        })?;
        Ok(CreatedKey {
            key: remote,
            secret,
        })
    }

    async fn update_key(
        &self,
        user: &str,
        key: &RemoteKey,
        _patch: &crate::model::KeyAttrs,
    ) -> Result<RemoteKey, ProviderError> {
        // ASA service-user keys have an id, issued_at and expires_at and nothing to edit
        // (asa-api.md, "Service user API keys").
        Err(ProviderError {
            provider: self.name.clone(),
            operation: format!("update API key {}", key.id),
            user: Some(user.to_string()),
            status: None,
            code: None,
            message: "Okta ASA keys have no attributes to update".to_string(),
            class: ErrorClass::Rejected,
        })
    }

    async fn revoke_key(&self, user: &str, key: &RemoteKey) -> Result<(), ProviderError> {
        let op = Op::new(format!("revoke API key {}", key.id), Some(user));
        let url = self.url(&["service_users", user, "keys", &key.id]);
        gone_is_done(self.call(&op, Method::DELETE, &url, None).await)
    }

    fn fence_requests(&self, fence: crate::files::Fence) {
        self.http.set_fence(fence);
    }

    fn requests_sent(&self) -> u64 {
        self.http.requests_sent()
    }

    fn rate_limited(&self) -> u64 {
        self.http.rate_limited()
    }

    fn budget_used(&self) -> f64 {
        self.http.budget_used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_absolute_relative_and_odd_shapes() {
        let abs =
            r#"<https://app.scaleft.com/v1/teams/t/service_users?offset=a&count=2>; rel="next""#;
        assert_eq!(
            next_link([abs]).as_deref(),
            Some("https://app.scaleft.com/v1/teams/t/service_users?offset=a&count=2")
        );
        let both = r#"</v1/teams/t/service_users?offset=b&prev=true>; rel="prev", </v1/teams/t/service_users?offset=c>; rel="next""#;
        assert_eq!(
            next_link([both]).as_deref(),
            Some("/v1/teams/t/service_users?offset=c")
        );
        // Separate header values, unquoted and multi-token rel, a comma inside the target.
        assert_eq!(
            next_link([
                "<a?x=1,2>; rel=prev",
                "<b>; title=\"x, y\"; rel=\"last next\""
            ])
            .as_deref(),
            Some("b")
        );
        assert_eq!(next_link(["<a>; rel=\"prev\""]), None);
        assert_eq!(next_link(Vec::<&str>::new()), None);
        assert_eq!(next_link(["garbage"]), None);
    }

    #[test]
    fn relative_links_resolve_against_the_page_and_other_hosts_are_refused() {
        let base = Url::parse("https://acme.pam.okta.com").unwrap();
        let page = Url::parse("https://acme.pam.okta.com/v1/teams/t/service_users").unwrap();
        let next = page.join("/v1/teams/t/service_users?offset=x").unwrap();
        assert_eq!(
            next.as_str(),
            "https://acme.pam.okta.com/v1/teams/t/service_users?offset=x"
        );
        assert!(check_same_origin(&base, &next).is_ok());
        let path_relative = page.join("service_users?offset=y").unwrap();
        assert_eq!(path_relative.path(), "/v1/teams/t/service_users");
        let evil = page
            .join("https://evil.example/v1/teams/t/service_users")
            .unwrap();
        let err = check_same_origin(&base, &evil).unwrap_err();
        assert!(err.contains("evil.example"), "{err}");
        let http = page.join("http://acme.pam.okta.com/x").unwrap();
        assert!(check_same_origin(&base, &http).is_err());
    }

    #[test]
    fn zero_time_means_never() {
        assert_eq!(parse_expiry(Some("0001-01-01T00:00:00Z")), Ok(None));
        assert_eq!(parse_expiry(None), Ok(None));
        assert_eq!(parse_expiry(Some("")), Ok(None));
        let t = parse_expiry(Some("2020-04-09T00:00:00Z")).unwrap().unwrap();
        assert_eq!(t.as_second(), 1_586_390_400);
        let offset = parse_expiry(Some("2020-04-09T02:00:00+02:00"))
            .unwrap()
            .unwrap();
        assert_eq!(offset, t);
        assert!(parse_expiry(Some("tomorrow")).is_err());
    }

    #[test]
    fn team_is_checked_case_insensitively() {
        assert!(check_team("acme", Some("ACME")).is_ok());
        assert!(check_team("acme", None).is_ok());
        assert!(check_team("acme", Some("other")).is_err());
    }

    #[test]
    fn renewal_margin_scales_with_lifetime() {
        for _ in 0..100 {
            let m = renew_margin(Duration::from_secs(2));
            assert!(
                m >= Duration::from_millis(200) && m <= Duration::from_millis(400),
                "{m:?}"
            );
            let m = renew_margin(Duration::from_secs(3600));
            assert!(
                m >= Duration::from_secs(60) && m <= MAX_RENEW_MARGIN,
                "{m:?}"
            );
        }
        assert_eq!(renew_margin(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn users_map_status_to_active_and_deleted() {
        let u = |status: &str| -> RemoteUser {
            serde_json::from_value::<WireUser>(serde_json::json!({
                "id": "1", "name": "n", "status": status, "deleted_at": null, "details": null
            }))
            .unwrap()
            .into()
        };
        assert!(u("ACTIVE").active && !u("ACTIVE").deleted);
        assert!(!u("DISABLED").active && !u("DISABLED").deleted);
        assert!(!u("DELETED").active && u("DELETED").deleted);
    }

    #[test]
    fn error_bodies_become_trimmed_messages() {
        let answer = |status: u16, body: &str| Answer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: body.to_string().into(),
        };
        let op = Op::new("create service user", Some("bot"));
        let e = decode_error(
            "asa",
            &op,
            &answer(
                409,
                r#"{"error":"resource_already_exists","code":409,"message":"taken"}"#,
            ),
        );
        assert_eq!(e.code.as_deref(), Some("resource_already_exists"));
        assert!(e.message.starts_with("taken"), "{}", e.message);
        assert_eq!(e.class, ErrorClass::Rejected);
        let e = decode_error("asa", &op, &answer(403, "  nope \n"));
        assert_eq!(
            (e.message.as_str(), e.class),
            ("nope", ErrorClass::Credential)
        );
        let e = decode_error("asa", &op, &answer(503, ""));
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.message, "Service Unavailable");
        let e = decode_error("asa", &op, &answer(500, &"x".repeat(1000)));
        assert!(e.message.chars().count() <= MAX_BODY_IN_MESSAGE + 1);
    }
}

/// The client against the in-process sandbox (the `keyward-sandbox` dev-dependency): tokens,
/// renewal, 401 re-issue, paging, mapping.
#[cfg(test)]
mod sandbox_tests {
    use super::*;
    use crate::config::RateLimit;
    use keyward_sandbox::{Sandbox, SandboxOptions};
    use serde_json::{Value, json};

    async fn start(token_lifetime: Duration) -> Sandbox {
        Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxOptions {
                asa_token_lifetime: Some(token_lifetime),
                ..SandboxOptions::default()
            },
        )
        .await
        .unwrap()
    }

    fn client(sb: &Sandbox, team: &str, secret: &str) -> AsaProvider {
        AsaProvider::with_shutdown(
            &ProviderAccount {
                name: "asa".into(),
                kind: crate::model::ProviderType::OktaAsa,
                base_url: sb.url(),
                rate_limit: RateLimit {
                    requests: 100_000,
                    per: jiff::SignedDuration::from_secs(1),
                },
                auth: ProviderAuth::OktaAsa {
                    team: team.into(),
                    key_id: sb.asa_key_id(),
                    key_secret: SecretString::from(secret.to_string()),
                },
            },
            4,
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap()
    }

    async fn support(sb: &Sandbox, method: Method, path: &str, body: Value) -> Value {
        reqwest::Client::new()
            .request(method, format!("{}{path}", sb.url()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn token_calls(sb: &Sandbox) -> u64 {
        sb.stats()["by_route"]["POST /v1/teams/{team}/service_token"]
            .as_u64()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn token_is_cached_renewed_before_expiry_and_reissued_on_401() {
        let sb = start(Duration::from_secs(2)).await;
        // The team in another case is the same team.
        let asa = client(&sb, &sb.asa_team().to_uppercase(), &sb.asa_key_secret());
        asa.observe(None).await.unwrap();
        asa.observe(None).await.unwrap();
        assert_eq!(token_calls(&sb), 1, "cached");
        // Lifetime 2 s, rounded up to a whole second: 2–3 s.
        tokio::time::sleep(Duration::from_millis(3100)).await;
        asa.observe(None).await.unwrap();
        assert_eq!(token_calls(&sb), 2, "renewed after expiry");
        support(&sb, Method::POST, "/_sandbox/asa/revoke_tokens", json!({})).await;
        let snap = asa.observe(None).await.unwrap();
        assert_eq!(token_calls(&sb), 3, "re-issued once after the 401");
        assert!(snap.users.iter().any(|u| u.name == "keyward-admin"));
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn a_refused_key_is_a_credential_error_without_the_secret() {
        let sb = start(Duration::from_secs(600)).await;
        let secret = "definitely-not-the-secret-0123456789";
        let asa = client(&sb, &sb.asa_team(), secret);
        let e = asa.observe(None).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Credential);
        assert_eq!(e.status, Some(401));
        let shown = e.to_string();
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains(&sb.asa_key_id()), "{shown}");
        assert!(shown.contains("provider asa"), "{shown}");
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn users_keys_rotation_disable_and_soft_delete_through_relative_pages() {
        let sb = start(Duration::from_secs(600)).await;
        support(
            &sb,
            Method::PUT,
            "/_sandbox/asa/settings",
            json!({"page_size": 2, "relative_links": true}),
        )
        .await;
        let asa = client(&sb, &sb.asa_team(), &sb.asa_key_secret());
        let mut names = Vec::new();
        for i in 0..5 {
            let name = format!("bot {i}/x");
            let u = asa.create_user(&name, i % 2 == 0).await.unwrap();
            assert_eq!(u.active, i % 2 == 0);
            names.push(name);
        }
        let bot = asa.create_user("rotating.bot", true).await.unwrap();
        let nk = NewKey {
            kind: KeyKind::ApiKey,
            slot: "main".into(),
            description: String::new(),
            metadata: String::new(),
            acl: Vec::new(),
        };
        let first = asa.create_key(&bot, &nk).await.unwrap();
        assert_eq!(first.key.expires_at, None);
        assert_eq!(first.secret.expose_secret().len(), 88);
        let mut created = vec![first.key.id.clone()];
        for _ in 0..3 {
            created.push(asa.create_key(&bot, &nk).await.unwrap().key.id);
        }
        let snap = asa.observe(None).await.unwrap();
        assert_eq!(snap.users.len(), 7, "admin + 6 across pages of 2");
        let keys: Vec<&RemoteKey> = snap.keys_of(&bot.id).collect();
        assert_eq!(
            keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
            created
        );
        // Rotation put the older keys on the 2-day clock; the newest never expires.
        let two_days = jiff::SignedDuration::from_hours(48);
        for k in &keys[..3] {
            let left = Timestamp::now().duration_until(k.expires_at.unwrap());
            assert!(left > two_days - jiff::SignedDuration::from_secs(5) && left <= two_days);
        }
        assert_eq!(keys[3].expires_at, None);
        // Revoke, twice (the second is a 404, which is fine).
        asa.revoke_key(&bot.name, keys[0]).await.unwrap();
        asa.revoke_key(&bot.name, keys[0]).await.unwrap();
        // Disable, enable, delete (soft): still listed, with deleted set, name reserved.
        let u = asa.update_user(&bot, false).await.unwrap();
        assert!(!u.active);
        let u = asa.update_user(&bot, true).await.unwrap();
        assert!(u.active);
        asa.delete_user(&u).await.unwrap();
        let snap = asa.observe(None).await.unwrap();
        let gone = snap
            .users
            .iter()
            .find(|u| u.name == "rotating.bot")
            .unwrap();
        assert!(gone.deleted && !gone.active);
        assert!(snap.user_by_name("rotating.bot").is_none());
        assert_eq!(
            snap.keys_of(&bot.id).count(),
            0,
            "a deleted user's keys are not listed"
        );
        let e = asa.create_user("rotating.bot", true).await.unwrap_err();
        assert_eq!(e.status, Some(409));
        assert!(e.message.contains("reserved"), "{}", e.message);
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn rate_limit_429_waits_for_retry_at_and_converges() {
        let sb = start(Duration::from_secs(600)).await;
        sb.set_faults(keyward_sandbox::Faults {
            rate_limit: Some((3, Duration::from_secs(1))),
            ..Default::default()
        });
        let asa = client(&sb, &sb.asa_team(), &sb.asa_key_secret());
        for i in 0..4 {
            asa.create_user(&format!("r{i}"), true).await.unwrap();
        }
        let snap = asa.observe(None).await.unwrap();
        assert_eq!(snap.users.len(), 5);
        assert!(sb.stats()["rate_limited"].as_u64().unwrap() > 0);
        sb.shutdown().await;
    }
}
