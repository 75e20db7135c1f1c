//! The Okta Advanced Server Access (ASA) emulator: service users and their API keys under
//! `/v1/teams/{team}/...`, as `asa-api.md` §6 in the shared spec describes the real service
//! (Okta Privileged Access serves the same paths and bodies).
//!
//! Behaviour worth knowing:
//! - `POST /v1/teams/{team}/service_token` takes `{"key_id","key_secret"}` and no Authorization
//!   header, and answers `{"bearer_token","expires_at","team_name"}` (team name in its canonical
//!   case; the path's team is matched case-insensitively). An unknown, deleted or expired key, a
//!   wrong secret or a key whose user is not ACTIVE answers 401. The token lives for the
//!   configured lifetime (default 10 minutes; `expires_at` is rounded up to a whole second and
//!   enforced at exactly that instant) and dies with its key: deleting or expiring the key that minted it
//!   makes every request with the token answer 401. Each call updates the key's `last_used`.
//! - Every other route needs `Authorization: Bearer <token>` whose user holds the `access_admin`
//!   role (the bootstrap admin does, users created through the API do not: 403
//!   `forbidden_error`). A token used with another team's path answers 401.
//! - Service users are ACTIVE, DISABLED or DELETED. Deleting is a PUT with status DELETED (soft:
//!   `deleted_at` is set, GET and lists still return the user, the name stays reserved and a
//!   create with it answers 409 `resource_already_exists`). A DELETED user cannot be changed
//!   again (400). Users cannot disable or delete themselves: 400 `invalid_request` (the real
//!   status is undocumented). PUT tolerates extra and null fields (`id`, `team_name`, `details`,
//!   …) as TF-PAM sends them; only `status` is applied.
//! - Keys: `POST …/keys` (no body) mints a key and answers 200 with its `secret` (88 characters of
//!   base64, 64 random bytes) shown only then, and sets `expires_at = now + grace` (default 2
//!   days) on the user's other keys that had no expiry; a key that already has an expiry keeps
//!   it. `expires_at` `0001-01-01T00:00:00Z` means never. Expired keys stay listed until
//!   deleted; `DELETE …/keys/{key_id}` answers 204 with an empty `text/plain` body.
//! - Lists are `{"list":[…]}`, ordered by name (users) or issue time (keys), `count` per page
//!   (default 100, or the configured page size), paged by `offset` = the id of the object the
//!   page starts after (with `prev=true`, ends before), with RFC 8288 `Link` headers carrying
//!   `rel="next"` / `rel="prev"`; `count` and the filters (`status`, `starts_with`, `contains`,
//!   `descending`) are propagated into the links. Links are absolute (as the real API's) unless
//!   the sandbox is told to emit relative ones (`/v1/teams/…`), so clients of both are tested.
//!   Users of every status are listed unless `status` narrows them.
//! - Rate limits (from the shared faults): every response carries `X-RateLimit-Limit`,
//!   `-Remaining` and `-Reset`; a 429 carries `X-RateLimit-Retry-At` (UNIX seconds) and no
//!   `Retry-After`. Without a configured limit the headers show a nominal 1,000,000.
//! - Error bodies are `{"error":"<identifier>","code":<status>,"message":"…"}` with the
//!   identifiers of the ASA docs; the real shape is undocumented, so clients must not rely on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use jiff::{SignedDuration, Timestamp};
use rand::Rng;
use rand::rngs::StdRng;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Shared;
use super::error::ApiError;

/// The team a sandbox serves unless told otherwise.
pub const DEFAULT_TEAM: &str = "keyward-sandbox";
/// The bootstrap admin service user's name.
pub const ADMIN_USER: &str = "keyward-admin";
/// Default bearer-token lifetime (the real one is undocumented).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(600);
/// Default time a key stays valid after a rotation of its user's keys (ASA: 2 days).
pub const DEFAULT_KEY_GRACE: Duration = Duration::from_secs(2 * 24 * 3600);
/// Default and largest page size.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// The zero time ASA renders for "no expiry".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// The role that may manage service users.
const ADMIN_ROLE: &str = "access_admin";
/// Nominal rate-limit figures shown when no limit is configured.
const NOMINAL_LIMIT: u64 = 1_000_000;

/// Start-up settings of the ASA emulator.
#[derive(Debug, Clone)]
pub struct Options {
    pub team: String,
    pub token_lifetime: Duration,
    pub key_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            team: DEFAULT_TEAM.to_owned(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            key_grace: DEFAULT_KEY_GRACE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    Disabled,
    Deleted,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Disabled => "DISABLED",
            Status::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        match s.trim().to_ascii_uppercase().as_str() {
            "ACTIVE" => Some(Status::Active),
            "DISABLED" => Some(Status::Disabled),
            "DELETED" => Some(Status::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct User {
    id: String,
    name: String,
    status: Status,
    deleted_at: Option<Timestamp>,
    admin: bool,
}

#[derive(Debug, Clone)]
struct Key {
    /// Minting order: keys list oldest first, and several can share an issue second.
    seq: u64,
    id: String,
    user: String,
    secret: String,
    issued_at: Timestamp,
    expires_at: Option<Timestamp>,
    last_used: Option<Timestamp>,
}

impl Key {
    fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Debug, Clone)]
struct Token {
    key_id: String,
    expires_at: Timestamp,
}

/// The emulated ASA team.
pub struct State {
    rng: StdRng,
    team: String,
    token_lifetime: Duration,
    key_grace: Duration,
    page_size: usize,
    relative_links: bool,
    /// By name: the natural key, also for deleted users (their names stay reserved).
    users: BTreeMap<String, User>,
    /// By key id.
    keys: BTreeMap<String, Key>,
    tokens: HashMap<String, Token>,
    next_seq: u64,
    admin_key_id: String,
    admin_key_secret: String,
}

/// Who a request is authenticated as.
struct Principal {
    user: String,
    admin: bool,
}

impl State {
    /// A fresh team with its admin service user and one key for it.
    pub fn new(opts: Options, rng: StdRng) -> Self {
        let mut state = State {
            rng,
            team: opts.team,
            token_lifetime: opts.token_lifetime.max(Duration::from_secs(1)),
            key_grace: opts.key_grace,
            page_size: DEFAULT_PAGE,
            relative_links: false,
            users: BTreeMap::new(),
            keys: BTreeMap::new(),
            tokens: HashMap::new(),
            next_seq: 0,
            admin_key_id: String::new(),
            admin_key_secret: String::new(),
        };
        // The names are fresh, so neither step can fail.
        let _ = state.insert_user(ADMIN_USER, Status::Active, true);
        let key = state.insert_key(ADMIN_USER, None, None);
        state.admin_key_id = key.id;
        state.admin_key_secret = key.secret;
        state
    }

    pub fn team(&self) -> &str {
        &self.team
    }

    pub fn admin_key_id(&self) -> &str {
        &self.admin_key_id
    }

    pub fn admin_key_secret(&self) -> &str {
        &self.admin_key_secret
    }

    fn uuid(&mut self) -> String {
        let mut b: [u8; 16] = self.rng.random();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn insert_user(&mut self, name: &str, status: Status, admin: bool) -> Result<User, AsaError> {
        if name.trim().is_empty() {
            return Err(AsaError::invalid("name must not be empty"));
        }
        if self.users.contains_key(name) {
            return Err(AsaError::new(
                StatusCode::CONFLICT,
                "resource_already_exists",
                format!(
                    "a service user named {name:?} already exists in this team (deleted users keep their names)"
                ),
            ));
        }
        let user = User {
            id: self.uuid(),
            name: name.to_owned(),
            status,
            deleted_at: (status == Status::Deleted).then(now),
            admin,
        };
        self.users.insert(name.to_owned(), user.clone());
        Ok(user)
    }

    /// Mints a key for `user` (which must exist); `issued_at` backdates it (seeds).
    fn insert_key(
        &mut self,
        user: &str,
        issued_at: Option<Timestamp>,
        expires_at: Option<Timestamp>,
    ) -> Key {
        let bytes: [u8; 64] = {
            let mut b = [0u8; 64];
            self.rng.fill(&mut b[..]);
            b
        };
        self.next_seq += 1;
        let key = Key {
            seq: self.next_seq,
            id: self.uuid(),
            user: user.to_owned(),
            secret: base64(&bytes, STANDARD),
            issued_at: issued_at.unwrap_or_else(now),
            expires_at,
            last_used: None,
        };
        self.keys.insert(key.id.clone(), key.clone());
        key
    }

    fn keys_of(&self, user: &str) -> Vec<&Key> {
        let mut keys: Vec<&Key> = self.keys.values().filter(|k| k.user == user).collect();
        keys.sort_by_key(|k| (k.issued_at, k.seq));
        keys
    }

    /// The rotate operation: a new key, and the grace clock on the user's other open-ended keys.
    fn rotate(&mut self, user: &str) -> Key {
        let t = now();
        let until = t
            .checked_add(SignedDuration::try_from(self.key_grace).unwrap_or(SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX);
        for k in self.keys.values_mut().filter(|k| k.user == user) {
            if k.expires_at.is_none() {
                k.expires_at = Some(until);
            }
        }
        self.insert_key(user, Some(t), None)
    }

    /// `service_token`: checks the key pair and mints a bearer token.
    fn issue_token(&mut self, key_id: &str, secret: &str) -> Result<(String, Timestamp), AsaError> {
        let t = Timestamp::now();
        let refused = || {
            AsaError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "the key id and secret are not a valid, unexpired API key of an active service user",
            )
        };
        let key = self.keys.get(key_id).ok_or_else(refused)?;
        if key.secret != secret || key.expired(t) {
            return Err(refused());
        }
        let user = self.users.get(&key.user).ok_or_else(refused)?;
        if user.status != Status::Active {
            return Err(refused());
        }
        let user_name = user.name.clone();
        let lifetime = SignedDuration::try_from(self.token_lifetime).unwrap_or(SignedDuration::MAX);
        // Rounded up to a whole second, so a token lives at least the configured lifetime.
        let expires_at = t
            .checked_add(lifetime)
            .ok()
            .and_then(|e| Timestamp::from_second(e.as_second() + 1).ok())
            .unwrap_or(Timestamp::MAX);
        if let Some(k) = self.keys.get_mut(key_id) {
            k.last_used = Some(whole_seconds(t));
        }
        let header = base64(
            br#"{"alg":"RS256","kid":"keyward-sandbox","typ":"JWT"}"#,
            URL_SAFE,
        );
        let jti = self.uuid();
        let payload = json!({
            "exp": expires_at.as_second(),
            "iss": "scaleft.auth.token",
            "jti": jti,
            "team": self.team,
            "user": user_name,
        })
        .to_string();
        let mut sig = [0u8; 32];
        self.rng.fill(&mut sig[..]);
        let token = format!(
            "{header}.{}.{}",
            base64(payload.as_bytes(), URL_SAFE),
            base64(&sig, URL_SAFE)
        );
        // Forget tokens that can no longer be used, so a long run does not grow without bound.
        if self.tokens.len() > 10_000 {
            self.tokens.retain(|_, tk| tk.expires_at > t);
        }
        self.tokens.insert(
            token.clone(),
            Token {
                key_id: key_id.to_owned(),
                expires_at,
            },
        );
        Ok((token, expires_at))
    }

    /// Resolves a bearer token; it dies with its key and with its user's activity.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AsaError> {
        let unauthorized = |msg: &str| {
            AsaError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                msg.to_owned(),
            )
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("send a bearer token from service_token"))?;
        let t = Timestamp::now();
        let tk = self
            .tokens
            .get(token)
            .ok_or_else(|| unauthorized("the bearer token is not valid"))?;
        if tk.expires_at <= t {
            return Err(unauthorized("the bearer token has expired; get a new one"));
        }
        let key = self
            .keys
            .get(&tk.key_id)
            .filter(|k| !k.expired(t))
            .ok_or_else(|| {
                unauthorized("the API key that issued this token was deleted or has expired")
            })?;
        let user = self
            .users
            .get(&key.user)
            .filter(|u| u.status == Status::Active)
            .ok_or_else(|| unauthorized("the service user is not active"))?;
        Ok(Principal {
            user: user.name.clone(),
            admin: user.admin,
        })
    }

    /// For `/_sandbox/asa/verify`: whether this pair would mint a token (without minting one).
    pub fn verify(&self, key_id: &str, secret: &str) -> Option<Value> {
        let t = Timestamp::now();
        let key = self.keys.get(key_id)?;
        let user = self.users.get(&key.user)?;
        (key.secret == secret && !key.expired(t) && user.status == Status::Active).then(
            || json!({"team": self.team, "user": user.name, "user_id": user.id, "key_id": key.id}),
        )
    }

    /// Expires a key now, as the ASA console's "Expire Now" does.
    pub fn expire_key(&mut self, key_id: &str) -> bool {
        match self.keys.get_mut(key_id) {
            Some(k) => {
                k.expires_at = Some(whole_seconds(Timestamp::now()));
                true
            }
            None => false,
        }
    }

    /// Invalidates every bearer token (keys stay valid), so clients must re-issue on 401.
    pub fn revoke_tokens(&mut self) -> usize {
        let n = self.tokens.len();
        self.tokens.clear();
        n
    }

    /// The runtime settings, as served by `GET /_sandbox/asa/settings`.
    pub fn settings_json(&self) -> Value {
        json!({
            "team": self.team,
            "token_lifetime_ms": u64::try_from(self.token_lifetime.as_millis()).unwrap_or(u64::MAX),
            "key_grace_ms": u64::try_from(self.key_grace.as_millis()).unwrap_or(u64::MAX),
            "page_size": self.page_size,
            "relative_links": self.relative_links,
        })
    }

    /// Applies `PUT /_sandbox/asa/settings`; absent fields keep their values.
    pub fn set_settings(&mut self, map: &Map<String, Value>) -> Result<Value, String> {
        let mut next = (
            self.token_lifetime,
            self.key_grace,
            self.page_size,
            self.relative_links,
        );
        for (k, v) in map {
            match (k.as_str(), v) {
                ("token_lifetime_ms", v) => {
                    let ms = v
                        .as_u64()
                        .filter(|ms| *ms >= 1000)
                        .ok_or("token_lifetime_ms must be an integer of at least 1000")?;
                    next.0 = Duration::from_millis(ms);
                }
                ("key_grace_ms", v) => {
                    let ms = v
                        .as_u64()
                        .ok_or("key_grace_ms must be a non-negative integer")?;
                    next.1 = Duration::from_millis(ms);
                }
                ("page_size", v) => {
                    let n = v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or("page_size must be an integer from 1 to 1000")?;
                    next.2 = n;
                }
                ("relative_links", Value::Bool(b)) => next.3 = *b,
                (other, _) => {
                    return Err(format!(
                        "unknown or mistyped field {other:?} (expected token_lifetime_ms, key_grace_ms, page_size, relative_links)"
                    ));
                }
            }
        }
        (
            self.token_lifetime,
            self.key_grace,
            self.page_size,
            self.relative_links,
        ) = next;
        Ok(self.settings_json())
    }

    /// Creates the users and keys of a seed document, all or nothing.
    pub fn seed(&mut self, req: SeedRequest) -> Result<Value, AsaError> {
        let mut names = std::collections::HashSet::new();
        for u in &req.service_users {
            if u.name.trim().is_empty() {
                return Err(AsaError::invalid("a seeded user needs a name"));
            }
            if self.users.contains_key(&u.name) || !names.insert(u.name.as_str()) {
                return Err(AsaError::new(
                    StatusCode::CONFLICT,
                    "resource_already_exists",
                    format!("duplicate service user name {:?}", u.name),
                ));
            }
            if let Some(s) = &u.status
                && Status::parse(s).is_none()
            {
                return Err(AsaError::invalid(format!("unknown status {s:?}")));
            }
        }
        let mut out = Vec::with_capacity(req.service_users.len());
        for u in req.service_users {
            let status = u
                .status
                .as_deref()
                .and_then(Status::parse)
                .unwrap_or(Status::Active);
            let user = self.insert_user(&u.name, status, u.admin)?;
            let mut keys = Vec::with_capacity(u.keys.len());
            for k in u.keys {
                let key = self.insert_key(&user.name, k.issued_at, k.expires_at);
                keys.push(key_json(&key, true));
            }
            let mut doc = user_json(&user, &self.team);
            doc["keys"] = Value::Array(keys);
            out.push(doc);
        }
        Ok(json!({ "service_users": out }))
    }
}

/// The body of `POST /_sandbox/asa/seed`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    #[serde(default)]
    service_users: Vec<SeedUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedUser {
    name: String,
    #[serde(default)]
    status: Option<String>,
    /// Grants `access_admin`.
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    keys: Vec<SeedKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedKey {
    #[serde(default)]
    issued_at: Option<Timestamp>,
    #[serde(default)]
    expires_at: Option<Timestamp>,
}

fn now() -> Timestamp {
    whole_seconds(Timestamp::now())
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn render_time(t: Option<Timestamp>) -> String {
    t.map_or_else(|| ZERO_TIME.to_owned(), |t| t.to_string())
}

fn user_json(u: &User, team: &str) -> Value {
    json!({
        "team_name": team,
        "id": u.id,
        "name": u.name,
        "status": u.status.as_str(),
        "details": null,
        "user_type": "service",
        "oauth_client_application_id": null,
        "role_grants": if u.admin { json!([ADMIN_ROLE]) } else { Value::Null },
        "deleted_at": u.deleted_at.map(|t| t.to_string()),
    })
}

fn key_json(k: &Key, with_secret: bool) -> Value {
    let mut v = json!({
        "id": k.id,
        "issued_at": k.issued_at.to_string(),
        "expires_at": render_time(k.expires_at),
        "last_used": k.last_used.map(|t| t.to_string()),
    });
    if with_secret {
        v["secret"] = Value::String(k.secret.clone());
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An ASA error answer: `{"error":"<identifier>","code":<status>,"message":"…"}` (assumed shape).
#[derive(Debug, Clone)]
pub struct AsaError {
    status: StatusCode,
    error: &'static str,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl AsaError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        AsaError {
            status,
            error,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "resource_does_not_exist", what)
    }

    /// The message, for callers outside the HTTP layer.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for AsaError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": self.error,
            "code": self.status.as_u16(),
            "message": self.message,
        });
        let mut resp = (self.status, Json(body)).into_response();
        for (n, v) in self.headers {
            resp.headers_mut().insert(n, v);
        }
        resp
    }
}

/// Renders a shared-fault verdict (rate limit, injected 5xx) the way ASA answers: its error
/// shape, `X-RateLimit-Retry-At` instead of `Retry-After`.
pub fn fault_response(err: ApiError, rate: RateStatus) -> Response {
    let retry_secs = err
        .headers
        .iter()
        .find(|(n, _)| n == header::RETRY_AFTER)
        .and_then(|(_, v)| v.to_str().ok()?.parse::<i64>().ok());
    let error = match err.status.as_u16() {
        429 => "too_many_requests",
        503 => "service_offline",
        _ => "unknown_error",
    };
    let mut e = AsaError::new(err.status, error, err.msg);
    if let Some(secs) = retry_secs {
        let at = Timestamp::now().as_second() + secs;
        e.headers.push((
            HeaderName::from_static("x-ratelimit-retry-at"),
            HeaderValue::from(at),
        ));
    }
    let mut resp = e.into_response();
    add_rate_headers(&mut resp, rate);
    resp
}

/// `(limit, remaining, seconds until the window is fully replenished)` of the shared limit.
pub type RateStatus = Option<(u32, u32, Duration)>;

/// Adds `X-RateLimit-Limit`, `-Remaining` and `-Reset` (UNIX seconds of the full replenish).
pub fn add_rate_headers(resp: &mut Response, rate: RateStatus) {
    let t = Timestamp::now().as_second();
    let (limit, remaining, reset) = match rate {
        Some((limit, remaining, full_in)) => (
            u64::from(limit),
            u64::from(remaining),
            t + i64::try_from(full_in.as_millis().div_ceil(1000)).unwrap_or(0),
        ),
        None => (NOMINAL_LIMIT, NOMINAL_LIMIT, t),
    };
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

/// Whether a request path belongs to the ASA API.
pub fn is_asa_path(path: &str) -> bool {
    path.starts_with("/v1/")
}

/// The 404 for an unknown ASA path.
pub fn unknown_path() -> Response {
    AsaError::not_found("no such API path").into_response()
}

/// The 405 for a known ASA path with the wrong method.
pub fn method_not_allowed() -> Response {
    AsaError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "the HTTP method is not allowed on this resource",
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// HTTP layer

/// The ASA routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/teams/{team}/service_token", post(service_token))
        .route(
            "/v1/teams/{team}/service_users",
            get(list_users).post(create_user),
        )
        .route(
            "/v1/teams/{team}/service_users/{user}",
            get(get_user).put(update_user),
        )
        .route(
            "/v1/teams/{team}/service_users/{user}/keys",
            get(list_keys).post(rotate_keys),
        )
        .route(
            "/v1/teams/{team}/service_users/{user}/keys/{key_id}",
            delete(delete_key),
        )
}

/// `/v1/teams/{team}/…` template of an ASA path, for request accounting.
pub fn route_template(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/teams/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let t = match segs.as_slice() {
        [_, "service_token"] => "/v1/teams/{team}/service_token",
        [_, "service_users"] => "/v1/teams/{team}/service_users",
        [_, "service_users", _] => "/v1/teams/{team}/service_users/{user_name}",
        [_, "service_users", _, "keys"] => "/v1/teams/{team}/service_users/{user_name}/keys",
        [_, "service_users", _, "keys", _] => {
            "/v1/teams/{team}/service_users/{user_name}/keys/{key_id}"
        }
        _ => return None,
    };
    Some(t.to_owned())
}

fn respond(r: Result<Response, AsaError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Authenticates and checks the admin role for the service-user routes.
fn admin(state: &State, team: &str, headers: &HeaderMap) -> Result<Principal, AsaError> {
    let who = state.authenticate(headers);
    if !team.eq_ignore_ascii_case(&state.team) {
        // A token is only good for its own team.
        return Err(match who {
            Ok(_) => AsaError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                format!("the bearer token is not valid for team {team:?}"),
            ),
            Err(e) => e,
        });
    }
    let who = who?;
    if !who.admin {
        return Err(AsaError::new(
            StatusCode::FORBIDDEN,
            "forbidden_error",
            "this operation requires the access_admin role",
        ));
    }
    Ok(who)
}

fn json_object(headers: &HeaderMap, body: &Bytes) -> Result<Map<String, Value>, AsaError> {
    let unsupported = |m: String| {
        AsaError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            m,
        )
    };
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        && !ct.to_ascii_lowercase().starts_with("application/json")
    {
        return Err(unsupported(format!("unsupported content type {ct:?}")));
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(unsupported("the body must be a JSON object".into())),
        Err(e) => Err(unsupported(format!("the body is not JSON: {e}"))),
    }
}

fn str_field(map: &Map<String, Value>, field: &str) -> Result<String, AsaError> {
    match map.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(AsaError::invalid(format!(
            "{field} is required and must be a string"
        ))),
    }
}

async fn service_token(
    AxState(shared): AxState<Arc<Shared>>,
    Path(team): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond((|| {
        let map = json_object(&headers, &body)?;
        let key_id = str_field(&map, "key_id")?;
        let secret = str_field(&map, "key_secret")?;
        if secret.is_empty() || secret.len() > 512 {
            return Err(AsaError::invalid("key_secret must be 1 to 512 characters"));
        }
        let mut st = shared.asa();
        if !team.eq_ignore_ascii_case(&st.team) {
            return Err(AsaError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "the key id and secret are not valid for this team",
            ));
        }
        let (token, expires_at) = st.issue_token(&key_id, &secret)?;
        Ok(Json(json!({
            "bearer_token": token,
            "expires_at": expires_at.to_string(),
            "team_name": st.team,
        }))
        .into_response())
    })())
}

/// Parsed list parameters.
struct ListQuery {
    count: usize,
    offset: Option<String>,
    prev: bool,
    descending: bool,
    statuses: Vec<Status>,
    starts_with: Option<String>,
    contains: Option<String>,
    ids: Vec<String>,
}

fn parse_query(uri: &Uri, default_count: usize) -> Result<ListQuery, AsaError> {
    let mut q = ListQuery {
        count: default_count,
        offset: None,
        prev: false,
        descending: false,
        statuses: Vec::new(),
        starts_with: None,
        contains: None,
        ids: Vec::new(),
    };
    let bool_of = |k: &str, v: &str| match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(AsaError::invalid(format!("{k} must be true or false"))),
    };
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "count" => {
                q.count = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| AsaError::invalid("count must be an integer from 1 to 1000"))?;
            }
            "offset" if !v.is_empty() => q.offset = Some(v.into_owned()),
            "prev" => q.prev = bool_of("prev", &v)?,
            "descending" => q.descending = bool_of("descending", &v)?,
            "status" => {
                for s in v.split(',').filter(|s| !s.trim().is_empty()) {
                    q.statuses.push(Status::parse(s).ok_or_else(|| {
                        AsaError::invalid(format!(
                            "status {s:?} is not one of ACTIVE, DISABLED, DELETED"
                        ))
                    })?);
                }
            }
            "starts_with" => q.starts_with = Some(v.into_owned()),
            "contains" => q.contains = Some(v.into_owned()),
            "id" => q.ids.push(v.into_owned()),
            // include_service_users and anything else: accepted and ignored.
            _ => {}
        }
    }
    Ok(q)
}

/// Cuts one page out of `items` (already filtered and ordered) and builds its `Link` header.
fn page<T>(
    items: Vec<(String, T)>,
    q: &ListQuery,
    link_base: &str,
    extra: &[(&str, String)],
) -> Result<(Vec<T>, Option<String>), AsaError> {
    let n = items.len();
    let (start, end) = match &q.offset {
        None => (0, q.count.min(n)),
        Some(off) => {
            let at = items
                .iter()
                .position(|(id, _)| id == off)
                .ok_or_else(|| AsaError::invalid(format!("offset {off:?} is not in this list")))?;
            if q.prev {
                (at.saturating_sub(q.count), at)
            } else {
                (at + 1, (at + 1 + q.count).min(n))
            }
        }
    };
    let link = |offset: &str, prev: bool| {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        ser.append_pair("offset", offset);
        ser.append_pair("count", &q.count.to_string());
        if prev {
            ser.append_pair("prev", "true");
        }
        for (k, v) in extra {
            ser.append_pair(k, v);
        }
        format!("{link_base}?{}", ser.finish())
    };
    let mut links = Vec::new();
    if end < n && end > 0 {
        links.push(format!(
            "<{}>; rel=\"next\"",
            link(&items[end - 1].0, false)
        ));
    }
    if start > 0 && start < n {
        links.push(format!("<{}>; rel=\"prev\"", link(&items[start].0, true)));
    }
    let page = items
        .into_iter()
        .skip(start)
        .take(end.saturating_sub(start))
        .map(|(_, t)| t)
        .collect();
    Ok((page, (!links.is_empty()).then(|| links.join(", "))))
}

fn list_response(list: Vec<Value>, link: Option<String>) -> Response {
    let mut resp = Json(json!({ "list": list })).into_response();
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    resp
}

/// Where links point: absolute at the request's host, or an absolute-path reference.
fn link_base(shared: &Shared, st: &State, headers: &HeaderMap, path: &str) -> String {
    if st.relative_links {
        path.to_owned()
    } else {
        format!("{}{path}", shared.base_from(headers))
    }
}

async fn list_users(
    AxState(shared): AxState<Arc<Shared>>,
    Path(team): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    respond((|| {
        let st = shared.asa();
        admin(&st, &team, &headers)?;
        let q = parse_query(&uri, st.page_size)?;
        let mut items: Vec<(String, Value)> = st
            .users
            .values()
            .filter(|u| q.statuses.is_empty() || q.statuses.contains(&u.status))
            .filter(|u| {
                q.starts_with
                    .as_ref()
                    .is_none_or(|p| u.name.starts_with(p.as_str()))
            })
            .filter(|u| {
                q.contains
                    .as_ref()
                    .is_none_or(|p| u.name.contains(p.as_str()))
            })
            .filter(|u| q.ids.is_empty() || q.ids.contains(&u.id))
            .map(|u| (u.id.clone(), user_json(u, &st.team)))
            .collect();
        if q.descending {
            items.reverse();
        }
        let mut extra: Vec<(&str, String)> = Vec::new();
        if !q.statuses.is_empty() {
            let s: Vec<&str> = q.statuses.iter().map(|s| s.as_str()).collect();
            extra.push(("status", s.join(",")));
        }
        if let Some(p) = &q.starts_with {
            extra.push(("starts_with", p.clone()));
        }
        if let Some(p) = &q.contains {
            extra.push(("contains", p.clone()));
        }
        if q.descending {
            extra.push(("descending", "true".into()));
        }
        let base = link_base(&shared, &st, &headers, uri.path());
        let (list, link) = page(items, &q, &base, &extra)?;
        Ok(list_response(list, link))
    })())
}

async fn create_user(
    AxState(shared): AxState<Arc<Shared>>,
    Path(team): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond((|| {
        let mut st = shared.asa();
        admin(&st, &team, &headers)?;
        let map = json_object(&headers, &body)?;
        let name = str_field(&map, "name")?;
        let user = st.insert_user(&name, Status::Active, false)?;
        Ok((StatusCode::CREATED, Json(user_json(&user, &st.team))).into_response())
    })())
}

fn user_or_404<'a>(st: &'a State, name: &str) -> Result<&'a User, AsaError> {
    st.users
        .get(name)
        .ok_or_else(|| AsaError::not_found(format!("service user {name:?}")))
}

async fn get_user(
    AxState(shared): AxState<Arc<Shared>>,
    Path((team, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    respond((|| {
        let st = shared.asa();
        admin(&st, &team, &headers)?;
        let user = user_or_404(&st, &name)?;
        Ok(Json(user_json(user, &st.team)).into_response())
    })())
}

async fn update_user(
    AxState(shared): AxState<Arc<Shared>>,
    Path((team, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond((|| {
        let mut st = shared.asa();
        let who = admin(&st, &team, &headers)?;
        let map = json_object(&headers, &body)?;
        let status = str_field(&map, "status")?;
        let status = Status::parse(&status).ok_or_else(|| {
            AsaError::invalid(format!(
                "status {status:?} is not one of ACTIVE, DISABLED, DELETED"
            ))
        })?;
        if let Some(Value::String(n)) = map.get("name")
            && *n != name
        {
            return Err(AsaError::invalid("a service user's name cannot be changed"));
        }
        let current = user_or_404(&st, &name)?.status;
        if current == Status::Deleted && status != Status::Deleted {
            return Err(AsaError::invalid(
                "a deleted service user cannot be changed",
            ));
        }
        if who.user == name && status != Status::Active {
            return Err(AsaError::invalid(
                "users can't disable or delete their own account",
            ));
        }
        let team_name = st.team.clone();
        let user = st
            .users
            .get_mut(&name)
            .ok_or_else(|| AsaError::not_found(format!("service user {name:?}")))?;
        if user.status != status {
            user.status = status;
            if status == Status::Deleted {
                user.deleted_at = Some(now());
            }
        }
        Ok(Json(user_json(user, &team_name)).into_response())
    })())
}

async fn list_keys(
    AxState(shared): AxState<Arc<Shared>>,
    Path((team, name)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    respond((|| {
        let st = shared.asa();
        admin(&st, &team, &headers)?;
        user_or_404(&st, &name)?;
        let q = parse_query(&uri, st.page_size)?;
        let mut items: Vec<(String, Value)> = st
            .keys_of(&name)
            .into_iter()
            .map(|k| (k.id.clone(), key_json(k, false)))
            .collect();
        let mut extra = Vec::new();
        if q.descending {
            items.reverse();
            extra.push(("descending", "true".to_owned()));
        }
        let base = link_base(&shared, &st, &headers, uri.path());
        let (list, link) = page(items, &q, &base, &extra)?;
        Ok(list_response(list, link))
    })())
}

async fn rotate_keys(
    AxState(shared): AxState<Arc<Shared>>,
    Path((team, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    respond((|| {
        let mut st = shared.asa();
        admin(&st, &team, &headers)?;
        if user_or_404(&st, &name)?.status == Status::Deleted {
            return Err(AsaError::invalid("a deleted service user cannot get keys"));
        }
        let key = st.rotate(&name);
        Ok(Json(key_json(&key, true)).into_response())
    })())
}

async fn delete_key(
    AxState(shared): AxState<Arc<Shared>>,
    Path((team, name, key_id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    respond((|| {
        let mut st = shared.asa();
        admin(&st, &team, &headers)?;
        user_or_404(&st, &name)?;
        if st.keys.get(&key_id).is_none_or(|k| k.user != name) {
            return Err(AsaError::not_found(format!("API key {key_id:?}")));
        }
        st.keys.remove(&key_id);
        st.tokens.retain(|_, t| t.key_id != key_id);
        Ok((
            StatusCode::NO_CONTENT,
            [(header::CONTENT_TYPE, "text/plain")],
        )
            .into_response())
    })())
}

// ---------------------------------------------------------------------------------------------
// Base64 (the sandbox only encodes; keyward itself never needs it)

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes with `alphabet`; the standard alphabet pads with `=`, the URL-safe one does not (JWT).
fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let pad = alphabet[62] == b'+';
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes(), STANDARD), want);
        }
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8");
        assert_eq!(base64(&[0u8; 64], STANDARD).len(), 88);
    }

    #[test]
    fn route_templates_name_the_parameters() {
        assert_eq!(
            route_template("/v1/teams/acme/service_users/bot/keys/abc").as_deref(),
            Some("/v1/teams/{team}/service_users/{user_name}/keys/{key_id}")
        );
        assert_eq!(
            route_template("/v1/teams/acme/service_token").as_deref(),
            Some("/v1/teams/{team}/service_token")
        );
        assert_eq!(route_template("/v1/teams/acme/projects"), None);
        assert_eq!(route_template("/api_keys"), None);
    }
}

/// HTTP-level checks of the emulator, in process.
#[cfg(test)]
mod http_tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::{Faults, Sandbox, SandboxOptions};

    struct Api {
        sb: Sandbox,
        http: reqwest::Client,
        base: String,
    }

    impl Api {
        async fn start() -> Api {
            let sb = Sandbox::start(
                "127.0.0.1:0".parse().expect("addr"),
                SandboxOptions::default(),
            )
            .await
            .expect("start");
            let base = format!("{}/v1/teams/{}", sb.url(), sb.asa_team());
            Api {
                sb,
                http: reqwest::Client::new(),
                base,
            }
        }

        async fn token(&self, key_id: &str, secret: &str) -> (u16, Value) {
            let r = self
                .http
                .post(format!("{}/service_token", self.base))
                .json(&json!({"key_id": key_id, "key_secret": secret}))
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        }

        async fn admin_token(&self) -> String {
            let (s, b) = self
                .token(&self.sb.asa_key_id(), &self.sb.asa_key_secret())
                .await;
            assert_eq!(s, 200, "{b}");
            b["bearer_token"].as_str().expect("token").to_owned()
        }

        async fn call(
            &self,
            token: &str,
            method: reqwest::Method,
            path: &str,
            body: Option<Value>,
        ) -> reqwest::Response {
            let url = if path.starts_with("http") {
                path.to_owned()
            } else {
                format!("{}{path}", self.base)
            };
            let mut rb = self.http.request(method, url).bearer_auth(token);
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            rb.send().await.expect("send")
        }
    }

    /// The `rel="next"` target of the answer's `Link` header, in the one shape the emulator
    /// writes: `<URL>; rel="next"` and `<URL>; rel="prev"` joined by `, ` (keyward's own parser, which reads every
    /// shape RFC 8288 allows, is tested against these pages from the keyward side).
    fn next_of(resp: &reqwest::Response) -> Option<String> {
        let link = resp.headers().get("link")?.to_str().ok()?;
        link.split(", ").find_map(|part| {
            let (target, params) = part.split_once(';')?;
            (params.trim() == "rel=\"next\"").then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
        })
    }

    #[tokio::test]
    async fn tokens_die_with_their_key_and_expired_keys_mint_nothing() {
        let api = Api::start().await;
        let admin = api.admin_token().await;
        use reqwest::Method;
        let r = api
            .call(
                &admin,
                Method::POST,
                "/service_users",
                Some(json!({"name": "bot"})),
            )
            .await;
        assert_eq!(r.status().as_u16(), 201);
        let key: Value = api
            .call(&admin, Method::POST, "/service_users/bot/keys", None)
            .await
            .json()
            .await
            .expect("key");
        let (id, secret) = (
            key["id"].as_str().expect("id"),
            key["secret"].as_str().expect("s"),
        );
        let (s, tok) = api.token(id, secret).await;
        assert_eq!(s, 200);
        assert_eq!(tok["team_name"], "keyward-sandbox");
        // last_used is set by service_token.
        let keys: Value = api
            .call(&admin, Method::GET, "/service_users/bot/keys", None)
            .await
            .json()
            .await
            .expect("keys");
        assert!(keys["list"][0]["last_used"].is_string());
        // A non-admin token may not manage users.
        let bot = tok["bearer_token"].as_str().expect("t").to_owned();
        assert_eq!(
            api.call(&bot, Method::GET, "/service_users", None)
                .await
                .status()
                .as_u16(),
            403
        );
        // Deleting the key kills its token (401) and the pair (401).
        let r = api
            .call(
                &admin,
                Method::DELETE,
                &format!("/service_users/bot/keys/{id}"),
                None,
            )
            .await;
        assert_eq!(r.status().as_u16(), 204);
        assert!(r.text().await.expect("body").is_empty());
        assert_eq!(
            api.call(&bot, Method::GET, "/service_users", None)
                .await
                .status()
                .as_u16(),
            401
        );
        assert_eq!(api.token(id, secret).await.0, 401);
        // An expired key mints nothing.
        let key: Value = api
            .call(&admin, Method::POST, "/service_users/bot/keys", None)
            .await
            .json()
            .await
            .expect("key");
        let id = key["id"].as_str().expect("id");
        assert!(api.sb.shared.asa().expire_key(id));
        assert_eq!(
            api.token(id, key["secret"].as_str().expect("s")).await.0,
            401
        );
        // Self-disable is refused; a wrong secret is 401.
        let r = api
            .call(
                &admin,
                Method::PUT,
                "/service_users/keyward-admin",
                Some(json!({"name": "keyward-admin", "status": "DISABLED"})),
            )
            .await;
        assert_eq!(r.status().as_u16(), 400);
        assert_eq!(api.token(&api.sb.asa_key_id(), "nope").await.0, 401);
        api.sb.shutdown().await;
    }

    #[tokio::test]
    async fn pages_link_both_ways_and_rate_limits_use_retry_at() {
        let api = Api::start().await;
        let admin = api.admin_token().await;
        use reqwest::Method;
        for i in 0..4 {
            api.call(
                &admin,
                Method::POST,
                "/service_users",
                Some(json!({"name": format!("u{i}")})),
            )
            .await;
        }
        // 5 users in pages of 2: next links carry count; the second page links back.
        let first = api
            .call(&admin, Method::GET, "/service_users?count=2", None)
            .await;
        let next = next_of(&first).expect("next");
        assert!(
            next.starts_with("http://") && next.contains("count=2"),
            "{next}"
        );
        let second = api.call(&admin, Method::GET, &next, None).await;
        let link = second.headers()["link"].to_str().expect("link").to_owned();
        assert!(
            link.contains("rel=\"prev\"") && link.contains("rel=\"next\""),
            "{link}"
        );
        let third = api
            .call(&admin, Method::GET, &next_of(&second).expect("next"), None)
            .await;
        assert!(next_of(&third).is_none());
        let body: Value = third.json().await.expect("json");
        assert_eq!(body["list"].as_array().map(Vec::len), Some(1));
        // Rate limit: headers on every answer, Retry-At (and no Retry-After) on a 429.
        api.sb.set_faults(Faults {
            rate_limit: Some((2, Duration::from_secs(60))),
            ..Faults::default()
        });
        let ok = api.call(&admin, Method::GET, "/service_users", None).await;
        assert_eq!(ok.headers()["x-ratelimit-limit"], "2");
        assert_eq!(ok.headers()["x-ratelimit-remaining"], "1");
        api.call(&admin, Method::GET, "/service_users", None).await;
        let limited = api.call(&admin, Method::GET, "/service_users", None).await;
        assert_eq!(limited.status().as_u16(), 429);
        assert!(limited.headers().get("retry-after").is_none());
        let at: i64 = limited.headers()["x-ratelimit-retry-at"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("unix seconds");
        let now = jiff::Timestamp::now().as_second();
        assert!(at > now && at <= now + 61, "{at} vs {now}");
        let body: Value = limited.json().await.expect("json");
        assert_eq!(body["error"], "too_many_requests");
        api.sb.shutdown().await;
    }
}
