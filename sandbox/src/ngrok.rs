//! The ngrok API emulator: `/service_users` (and the legacy `/bot_users`, same store), `/api_keys`,
//! `/credentials` and `/ssh_credentials`, faithful to what the official clients (Python 0.19, Go
//! v8, Rust 0.12) need; see `ngrok-api.md` §8 in the shared spec.
//!
//! Behaviour worth knowing:
//! - Auth: `Authorization: Bearer <token>` with the bootstrap admin key or any key minted by
//!   `POST /api_keys`; a key whose owning service user is inactive is refused (401
//!   `ERR_NGROK_203`) until the user is reactivated. `ngrok-version: 2` is checked first.
//! - Every field is always present (`description: ""`, `acl: []`, `token: null` outside the create
//!   response) because the Python and Rust clients fail on missing keys.
//! - Lists are newest first by time-ordered ID; `next_page_uri` is absolute, repeats `limit` (and
//!   `filter`) and is `null` on the last page, including an exactly full one.
//! - Unknown IDs answer 404 [`NOT_FOUND_CODE`](super::NOT_FOUND_CODE) (`ERR_NGROK_404`).
//! - Deleting a service user deletes every key and credential it owns.
//! - The bootstrap admin key is itself listed under `/api_keys`, owned by the account's `usr_…`
//!   user, as the real account's own key would be.
//!
//! Not emulated: plans, roles and permissions (every valid key may do everything), quotas, owner
//! emails / SCIM IDs, and most of CEL: `filter` supports `obj.<field> ==|!= "…"` joined by `&&`,
//! `||` and parentheses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Request, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use rand::rngs::StdRng;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Shared;
use super::error::ApiError;
use super::ids;

/// Longest description, in bytes (`ERR_NGROK_604`).
const MAX_DESCRIPTION: usize = 255;
/// Longest metadata, in bytes (`ERR_NGROK_605`).
const MAX_METADATA: usize = 4096;
/// Default and maximum page size.
const MAX_LIMIT: usize = 100;

/// The collections served, one per path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    ServiceUsers,
    BotUsers,
    ApiKeys,
    Credentials,
    SshCredentials,
}

const COLLS: [Coll; 5] = [
    Coll::ServiceUsers,
    Coll::BotUsers,
    Coll::ApiKeys,
    Coll::Credentials,
    Coll::SshCredentials,
];

/// The kinds of owned secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    ApiKey,
    Credential,
    SshCredential,
}

impl Coll {
    fn path(self) -> &'static str {
        match self {
            Coll::ServiceUsers => "/service_users",
            Coll::BotUsers => "/bot_users",
            Coll::ApiKeys => "/api_keys",
            Coll::Credentials => "/credentials",
            Coll::SshCredentials => "/ssh_credentials",
        }
    }

    fn list_key(self) -> &'static str {
        match self {
            Coll::ServiceUsers => "service_users",
            Coll::BotUsers => "bot_users",
            Coll::ApiKeys => "keys",
            Coll::Credentials => "credentials",
            Coll::SshCredentials => "ssh_credentials",
        }
    }

    /// `None` for the two user collections.
    fn key_kind(self) -> Option<KeyKind> {
        match self {
            Coll::ServiceUsers | Coll::BotUsers => None,
            Coll::ApiKeys => Some(KeyKind::ApiKey),
            Coll::Credentials => Some(KeyKind::Credential),
            Coll::SshCredentials => Some(KeyKind::SshCredential),
        }
    }

    fn id_prefix(self) -> &'static str {
        self.key_kind().map_or(USER_PREFIX, KeyKind::prefix)
    }

    /// Fields `filter` may name (ngrok's API filtering docs).
    fn filter_fields(self) -> &'static [&'static str] {
        match self.key_kind() {
            None => &["id", "created_at"],
            Some(_) => &["id", "created_at", "description", "metadata", "owner_id"],
        }
    }
}

/// Service users carry the `bot_` prefix of ngrok's generated examples.
const USER_PREFIX: &str = "bot_";

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            KeyKind::ApiKey => "ak_",
            KeyKind::Credential => "cr_",
            KeyKind::SshCredential => "sshcr_",
        }
    }

    fn path(self) -> &'static str {
        match self {
            KeyKind::ApiKey => "/api_keys",
            KeyKind::Credential => "/credentials",
            KeyKind::SshCredential => "/ssh_credentials",
        }
    }

    fn index(self) -> usize {
        match self {
            KeyKind::ApiKey => 0,
            KeyKind::Credential => 1,
            KeyKind::SshCredential => 2,
        }
    }
}

#[derive(Debug, Clone)]
struct User {
    id: String,
    name: String,
    active: bool,
    created_at: Timestamp,
}

/// An API key, authtoken credential or SSH credential.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    kind: KeyKind,
    description: String,
    metadata: String,
    acl: Vec<String>,
    /// SSH credentials only.
    public_key: String,
    owner_id: String,
    created_at: Timestamp,
    /// Kept only to unregister it on delete; never rendered after creation.
    token: Option<String>,
}

/// Who a request is authenticated as.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The `usr_…` or `bot_…` owning the API key used.
    pub owner_id: String,
}

/// One emulated ngrok account.
pub struct State {
    rng: StdRng,
    account_user_id: String,
    admin_key: String,
    users: BTreeMap<String, User>,
    /// Name → ID, for per-account name uniqueness.
    names: HashMap<String, String>,
    /// Indexed by [`KeyKind::index`]; a BTreeMap keyed by time-ordered ID makes a page O(limit).
    keys: [BTreeMap<String, Key>; 3],
    /// Token → (kind, ID) for API keys and credentials.
    tokens: HashMap<String, (KeyKind, String)>,
    /// SSH public key → credential ID, for `ERR_NGROK_609`.
    public_keys: HashMap<String, String>,
}

impl State {
    /// A fresh account with its owner (`usr_…`) and bootstrap admin API key.
    pub fn new(admin_key: Option<String>, mut rng: StdRng) -> Self {
        let account_user_id = ids::mint("usr_", None, &mut rng);
        // A supplied key shaped like a real one keeps its ID; anything else gets a fresh ID.
        let (id, token) = match admin_key {
            Some(token) => {
                let id = token
                    .split_once('_')
                    .map(|(body, _)| format!("ak_{body}"))
                    .filter(|id| ids::is_well_formed(id, "ak_"))
                    .unwrap_or_else(|| ids::mint("ak_", None, &mut rng));
                (id, token)
            }
            None => {
                let id = ids::mint("ak_", None, &mut rng);
                let token = ids::token_for(&id, &mut rng);
                (id, token)
            }
        };
        let mut state = State {
            rng,
            account_user_id: account_user_id.clone(),
            admin_key: token.clone(),
            users: BTreeMap::new(),
            names: HashMap::new(),
            keys: Default::default(),
            tokens: HashMap::new(),
            public_keys: HashMap::new(),
        };
        state
            .tokens
            .insert(token.clone(), (KeyKind::ApiKey, id.clone()));
        state.keys[0].insert(
            id.clone(),
            Key {
                id,
                kind: KeyKind::ApiKey,
                description: "keyward-sandbox bootstrap admin key".into(),
                metadata: String::new(),
                acl: Vec::new(),
                public_key: String::new(),
                owner_id: account_user_id,
                created_at: now(),
                token: Some(token),
            },
        );
        state
    }

    /// The bootstrap admin API key.
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    fn keys(&self, kind: KeyKind) -> &BTreeMap<String, Key> {
        &self.keys[kind.index()]
    }

    fn keys_mut(&mut self, kind: KeyKind) -> &mut BTreeMap<String, Key> {
        &mut self.keys[kind.index()]
    }

    fn owner_exists(&self, owner_id: &str) -> bool {
        owner_id == self.account_user_id || self.users.contains_key(owner_id)
    }

    fn owner_active(&self, owner_id: &str) -> bool {
        owner_id == self.account_user_id || self.users.get(owner_id).is_some_and(|u| u.active)
    }

    /// Resolves a bearer token to the API key's owner.
    pub fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        let unauthorized = |n, msg: &str| ApiError::ngrok(StatusCode::UNAUTHORIZED, n, msg);
        match self.tokens.get(token) {
            Some((KeyKind::ApiKey, id)) => {
                let owner_id = self
                    .keys(KeyKind::ApiKey)
                    .get(id)
                    .map(|k| k.owner_id.clone())
                    .ok_or_else(|| unauthorized(203, "The API key you specified is not valid."))?;
                if !self.owner_active(&owner_id) {
                    return Err(unauthorized(
                        203,
                        "The API key you specified is not valid: its owner is deactivated.",
                    ));
                }
                Ok(Principal { owner_id })
            }
            Some(_) => Err(unauthorized(
                206,
                "The credential you specified is an authtoken, not an API key. Use an API key to access the ngrok API.",
            )),
            None if self.keys(KeyKind::ApiKey).contains_key(token) => Err(unauthorized(
                208,
                "You specified an API key ID instead of the API key token, which has the form FIRSTPART_SECONDPART.",
            )),
            None => Err(unauthorized(203, "The API key you specified is not valid.")),
        }
    }

    /// For `/_sandbox/verify`: the live key or credential behind `token`, if its owner is active.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let (kind, id) = self.tokens.get(token)?;
        let key = self.keys(*kind).get(id)?;
        if !self.owner_active(&key.owner_id) {
            return None;
        }
        let kind = match kind {
            KeyKind::ApiKey => "api_key",
            KeyKind::Credential => "credential",
            KeyKind::SshCredential => "ssh_credential",
        };
        Some(json!({ "kind": kind, "id": key.id, "owner_id": key.owner_id }))
    }

    fn insert_user(
        &mut self,
        name: String,
        active: bool,
        at: Option<Timestamp>,
    ) -> Result<&User, ApiError> {
        check_user_name(&name)?;
        if self.names.contains_key(&name) {
            return Err(duplicate_name());
        }
        let (id, created_at) = self.mint(USER_PREFIX, at);
        self.names.insert(name.clone(), id.clone());
        let user = User {
            id: id.clone(),
            name,
            active,
            created_at,
        };
        Ok(self.users.entry(id).or_insert(user))
    }

    #[allow(clippy::too_many_arguments)] // one flat constructor shared by the API and the seeder
    fn insert_key(
        &mut self,
        kind: KeyKind,
        description: String,
        metadata: String,
        acl: Vec<String>,
        public_key: String,
        owner_id: String,
        at: Option<Timestamp>,
    ) -> Result<Key, ApiError> {
        check_key_fields(&description, &metadata, &acl)?;
        if !self.owner_exists(&owner_id) {
            return Err(ApiError::bad_request(
                634,
                format!(
                    "No owner could be determined: {owner_id:?} is not a user or service user of this account."
                ),
            ));
        }
        if kind == KeyKind::SshCredential {
            check_public_key(&public_key)?;
            if self.public_keys.contains_key(public_key.trim()) {
                return Err(ApiError::bad_request(
                    609,
                    "The public key already exists on your account.",
                ));
            }
        }
        let (id, created_at) = self.mint(kind.prefix(), at);
        let token = match kind {
            KeyKind::SshCredential => None,
            _ => Some(ids::token_for(&id, &mut self.rng)),
        };
        if let Some(t) = &token {
            self.tokens.insert(t.clone(), (kind, id.clone()));
        }
        if kind == KeyKind::SshCredential {
            self.public_keys
                .insert(public_key.trim().to_owned(), id.clone());
        }
        let key = Key {
            id: id.clone(),
            kind,
            description,
            metadata,
            acl,
            public_key,
            owner_id,
            created_at,
            token,
        };
        self.keys_mut(kind).insert(id, key.clone());
        Ok(key)
    }

    fn remove_key(&mut self, kind: KeyKind, id: &str) -> Option<Key> {
        let key = self.keys_mut(kind).remove(id)?;
        if let Some(t) = &key.token {
            self.tokens.remove(t);
        }
        if kind == KeyKind::SshCredential {
            self.public_keys.remove(key.public_key.trim());
        }
        Some(key)
    }

    /// Deletes a service user and, as ngrok does, everything it owns.
    fn remove_user(&mut self, id: &str) -> Option<User> {
        let user = self.users.remove(id)?;
        self.names.remove(&user.name);
        for kind in [KeyKind::ApiKey, KeyKind::Credential, KeyKind::SshCredential] {
            let owned: Vec<String> = self
                .keys(kind)
                .values()
                .filter(|k| k.owner_id == id)
                .map(|k| k.id.clone())
                .collect();
            for key_id in owned {
                self.remove_key(kind, &key_id);
            }
        }
        Some(user)
    }

    /// A new ID and its creation time (now, or the backdated `at`), at whole seconds as ngrok
    /// renders them.
    fn mint(&mut self, prefix: &str, at: Option<Timestamp>) -> (String, Timestamp) {
        let at_ms = at.map(|t| u64::try_from(t.as_millisecond()).unwrap_or(0));
        let id = ids::mint(prefix, at_ms, &mut self.rng);
        (id, whole_seconds(at.unwrap_or_else(Timestamp::now)))
    }

    /// Creates the objects of a seed document, all or nothing.
    pub fn seed(&mut self, req: SeedRequest, base: &str) -> Result<Value, ApiError> {
        // Validate everything before changing anything, so a bad document leaves no trace.
        let mut names: HashSet<&str> = self.names.keys().map(String::as_str).collect();
        for u in &req.service_users {
            check_user_name(&u.name)?;
            if !names.insert(u.name.as_str()) {
                return Err(duplicate_name());
            }
        }
        for (kind, list) in [
            (KeyKind::ApiKey, &req.api_keys),
            (KeyKind::Credential, &req.credentials),
        ] {
            for k in list {
                if kind == KeyKind::ApiKey && k.acl.is_some() {
                    return Err(ApiError::bad_request(214, "API keys have no acl."));
                }
                check_key_fields(
                    k.description.as_deref().unwrap_or(""),
                    k.metadata.as_deref().unwrap_or(""),
                    k.acl.as_deref().unwrap_or(&[]),
                )?;
                match (&k.owner_name, &k.owner_id) {
                    (Some(_), Some(_)) => {
                        return Err(ApiError::bad_request(
                            631,
                            "Give only one of owner_name and owner_id.",
                        ));
                    }
                    (Some(name), None) if !names.contains(name.as_str()) => {
                        return Err(ApiError::bad_request(
                            634,
                            format!("No service user is named {name:?}."),
                        ));
                    }
                    (None, Some(id)) if !self.owner_exists(id) => {
                        return Err(ApiError::bad_request(
                            634,
                            format!("{id:?} is not a user or service user of this account."),
                        ));
                    }
                    _ => {}
                }
            }
        }

        let mut users = Vec::with_capacity(req.service_users.len());
        for u in req.service_users {
            let user = self.insert_user(u.name, u.active.unwrap_or(true), u.created_at)?;
            users.push(user_json(user, base, Coll::ServiceUsers.path()));
        }
        let mut out = json!({ "service_users": users });
        for (kind, field, list) in [
            (KeyKind::ApiKey, "api_keys", req.api_keys),
            (KeyKind::Credential, "credentials", req.credentials),
        ] {
            let mut created = Vec::with_capacity(list.len());
            for k in list {
                let owner_id = match (k.owner_name, k.owner_id) {
                    (Some(name), _) => self.names.get(&name).cloned().unwrap_or_default(),
                    (None, Some(id)) => id,
                    (None, None) => self.account_user_id.clone(),
                };
                let key = self.insert_key(
                    kind,
                    k.description.unwrap_or_default(),
                    k.metadata.unwrap_or_default(),
                    k.acl.unwrap_or_default(),
                    String::new(),
                    owner_id,
                    k.created_at,
                )?;
                created.push(key_json(&key, base, key.token.as_deref()));
            }
            out[field] = Value::Array(created);
        }
        Ok(out)
    }
}

/// The body of `POST /_sandbox/ngrok/seed` and of `keyward-sandbox --seed FILE`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    #[serde(default)]
    service_users: Vec<SeedUser>,
    #[serde(default)]
    api_keys: Vec<SeedKey>,
    #[serde(default)]
    credentials: Vec<SeedKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedUser {
    name: String,
    active: Option<bool>,
    created_at: Option<Timestamp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedKey {
    owner_name: Option<String>,
    owner_id: Option<String>,
    description: Option<String>,
    metadata: Option<String>,
    acl: Option<Vec<String>>,
    created_at: Option<Timestamp>,
}

fn now() -> Timestamp {
    whole_seconds(Timestamp::now())
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn duplicate_name() -> ApiError {
    ApiError::bad_request(4112, "Service User names must be unique within an account.")
}

fn check_user_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request(
            4109,
            "Service User name must not be empty.",
        ));
    }
    Ok(())
}

fn check_key_fields(description: &str, metadata: &str, acl: &[String]) -> Result<(), ApiError> {
    if description.len() > MAX_DESCRIPTION {
        return Err(ApiError::bad_request(
            604,
            format!(
                "The description is {} bytes long, which exceeds the maximum of {MAX_DESCRIPTION} bytes.",
                description.len()
            ),
        ));
    }
    if metadata.len() > MAX_METADATA {
        return Err(ApiError::bad_request(
            605,
            format!(
                "The metadata is {} bytes long, which exceeds the maximum of {MAX_METADATA} bytes.",
                metadata.len()
            ),
        ));
    }
    if let Some(bad) = acl
        .iter()
        .find(|rule| rule.as_str() != "*" && !rule.starts_with("bind:"))
    {
        return Err(ApiError::bad_request(
            600,
            format!("Invalid ACL rule {bad:?}: a rule must be '*' or start with 'bind:'."),
        ));
    }
    Ok(())
}

/// Accepts OpenSSH one-line public keys: `<type> <base64> [comment]`.
fn check_public_key(key: &str) -> Result<(), ApiError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(ApiError::bad_request(
            611,
            "The public key is missing or empty.",
        ));
    }
    let mut parts = key.split_whitespace();
    let kind_ok = parts.next().is_some_and(|t| {
        t.starts_with("ssh-") || t.starts_with("ecdsa-sha2-") || t.starts_with("sk-")
    });
    let blob_ok = parts.next().is_some_and(|b| {
        b.len() >= 16
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=')
    });
    if kind_ok && blob_ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            612,
            "The public key is invalid: expected an OpenSSH public key such as 'ssh-ed25519 AAAA… comment'.",
        ))
    }
}

fn user_json(u: &User, base: &str, path: &str) -> Value {
    json!({
        "id": u.id,
        "uri": format!("{base}{path}/{}", u.id),
        "name": u.name,
        "active": u.active,
        "created_at": u.created_at.to_string(),
    })
}

/// Renders a key; `token` is `Some` only in the create response.
fn key_json(k: &Key, base: &str, token: Option<&str>) -> Value {
    let uri = format!("{base}{}/{}", k.kind.path(), k.id);
    let created_at = k.created_at.to_string();
    match k.kind {
        KeyKind::ApiKey => json!({
            "id": k.id, "uri": uri, "description": k.description, "metadata": k.metadata,
            "created_at": created_at, "token": token, "owner_id": k.owner_id,
        }),
        KeyKind::Credential => json!({
            "id": k.id, "uri": uri, "created_at": created_at, "description": k.description,
            "metadata": k.metadata, "token": token, "acl": k.acl, "owner_id": k.owner_id,
        }),
        KeyKind::SshCredential => json!({
            "id": k.id, "uri": uri, "created_at": created_at, "description": k.description,
            "metadata": k.metadata, "public_key": k.public_key, "acl": k.acl,
            "owner_id": k.owner_id,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP layer

/// The ngrok routes, behind the version and authentication gate.
pub fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let mut router = Router::new();
    for coll in COLLS {
        router =
            router
                .route(
                    coll.path(),
                    get(
                        move |ctx: Ctx, body: Bytes| async move { respond(list(ctx, coll, &body)) },
                    )
                    .post(move |ctx: Ctx, body: Bytes| async move {
                        respond(create(ctx, coll, &body))
                    }),
                )
                .route(
                    &format!("{}/{{id}}", coll.path()),
                    get(
                        move |ctx: Ctx, Path(id): Path<String>, body: Bytes| async move {
                            respond(get_one(ctx, coll, &id, &body))
                        },
                    )
                    .patch(
                        move |ctx: Ctx, Path(id): Path<String>, body: Bytes| async move {
                            respond(update(ctx, coll, &id, &body))
                        },
                    )
                    .delete(
                        move |ctx: Ctx, Path(id): Path<String>, body: Bytes| async move {
                            respond(delete(ctx, coll, &id, &body))
                        },
                    ),
                );
    }
    // `route_layer` so that unknown paths still answer 404 rather than 401.
    router.route_layer(axum::middleware::from_fn_with_state(shared, gate))
}

/// `/service_users/{id}`-style template of an ngrok path, for request accounting.
pub fn route_template(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let (first, id) = match rest.split_once('/') {
        Some((first, id)) => (first, Some(id)),
        None => (rest, None),
    };
    let coll = COLLS.into_iter().find(|c| &c.path()[1..] == first)?;
    match id {
        None | Some("") => Some(coll.path().to_owned()),
        Some(id) if !id.contains('/') => Some(format!("{}/{{id}}", coll.path())),
        Some(_) => None,
    }
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Checks `ngrok-version` (any header case; axum's header map is case-insensitive) and then the
/// bearer token, and hands the [`Principal`] to the handler.
async fn gate(AxState(shared): AxState<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let principal = (|| {
        let headers = req.headers();
        match headers
            .get("ngrok-version")
            .map(|v| v.to_str().map(str::trim))
        {
            None => {
                return Err(ApiError::bad_request(
                    218,
                    "Your request has not specified an API version. Set the 'Ngrok-Version' header to '2'.",
                ));
            }
            Some(Ok("2")) => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    217,
                    "Your request specified an unsupported API version. The supported version is '2'.",
                ));
            }
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::ngrok(
                    StatusCode::UNAUTHORIZED,
                    200,
                    "Your request did not provide any API credentials. Send your API key as 'Authorization: Bearer <key>'.",
                )
            })?;
        shared.ngrok().authenticate(token)
    })();
    match principal {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// What every ngrok handler needs from the request head.
struct Ctx {
    shared: Arc<Shared>,
    principal: Principal,
    method: Method,
    /// `http://host:port`, for absolute URIs.
    base: String,
    query: Option<String>,
    content_type: Option<String>,
}

impl FromRequestParts<Arc<Shared>> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::ngrok(StatusCode::UNAUTHORIZED, 200, "No API credentials."))?;
        Ok(Ctx {
            shared: state.clone(),
            principal,
            method: parts.method.clone(),
            base: state.base_from(&parts.headers),
            query: parts.uri.query().map(str::to_owned),
            content_type: content_type(&parts.headers),
        })
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
}

/// GET and DELETE take no body (`ERR_NGROK_211`).
fn no_body(ctx: &Ctx, body: &Bytes) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            211,
            format!("{} requests must not have a body.", ctx.method),
        ))
    }
}

/// The JSON object body of a POST or PATCH. An empty body counts as `{}` (Go's create structs
/// marshal to `{}` at best; nothing is lost by being lenient about the completely empty case).
fn json_body(ctx: &Ctx, body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    if let Some(ct) = &ctx.content_type
        && !ct.starts_with("application/json")
    {
        return Err(ApiError::bad_request(
            210,
            format!("Unsupported content type {ct:?}: send application/json."),
        ));
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            213,
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::bad_request(
            213,
            format!("The request body could not be parsed as JSON: {e}"),
        )),
    }
}

/// Rejects fields outside `allowed` (`ERR_NGROK_214`); `immutable` ones get a pointed message.
fn check_fields(
    map: &Map<String, Value>,
    allowed: &[&str],
    immutable: &[&str],
) -> Result<(), ApiError> {
    for k in map.keys() {
        if immutable.contains(&k.as_str()) {
            return Err(ApiError::bad_request(
                214,
                format!("The request parameter '{k}' cannot be changed after creation."),
            ));
        }
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(
                214,
                format!("The request parameter '{k}' is unknown."),
            ));
        }
    }
    Ok(())
}

fn invalid_value(field: &str, expected: &str) -> ApiError {
    ApiError::bad_request(
        215,
        format!("The value of '{field}' is invalid: expected {expected}."),
    )
}

/// A string field; absent and JSON `null` both mean "not given" (the Rust client sends nulls).
fn opt_str(map: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid_value(field, "a string")),
    }
}

fn opt_bool(map: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid_value(field, "true or false")),
    }
}

fn opt_str_list(map: &Map<String, Value>, field: &str) -> Result<Option<Vec<String>>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid_value(field, "a list of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(invalid_value(field, "a list of strings")),
    }
}

/// Fields accepted on create / update, per kind.
fn key_fields(kind: KeyKind, create: bool) -> &'static [&'static str] {
    match (kind, create) {
        (KeyKind::ApiKey, true) => &["description", "metadata", "owner_id"],
        (KeyKind::ApiKey, false) => &["id", "description", "metadata"],
        (KeyKind::Credential, true) => &["description", "metadata", "acl", "owner_id"],
        (KeyKind::SshCredential, true) => {
            &["description", "metadata", "acl", "owner_id", "public_key"]
        }
        (KeyKind::Credential | KeyKind::SshCredential, false) => {
            &["id", "description", "metadata", "acl"]
        }
    }
}

fn not_found(coll: Coll, id: &str) -> ApiError {
    ApiError::not_found(&format!("{}/{id}", coll.path()))
}

struct ListQuery {
    limit: usize,
    before_id: Option<String>,
    filter: Option<(String, Filter)>,
}

fn parse_list_query(coll: Coll, query: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut out = ListQuery {
        limit: MAX_LIMIT,
        before_id: None,
        filter: None,
    };
    let mut seen = HashSet::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !seen.insert(k.clone()) {
            return Err(ApiError::bad_request(
                232,
                format!("The query parameter '{k}' was given more than once."),
            ));
        }
        match k.as_ref() {
            "limit" => {
                out.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            233,
                            format!("The page size limit must be between 1 and {MAX_LIMIT}."),
                        )
                    })?;
            }
            "before_id" => {
                // Any well-formed ID of this collection is a valid cursor, even a deleted one:
                // an item vanishing between two pages must not break a client's iteration.
                if !ids::is_well_formed(&v, coll.id_prefix()) {
                    return Err(ApiError::bad_request(
                        223,
                        format!("{v:?} is not a valid resource reference identifier."),
                    ));
                }
                out.before_id = Some(v.into_owned());
            }
            "filter" => {
                let f = parse_filter(&v, coll.filter_fields())
                    .map_err(|e| ApiError::bad_request(250, format!("Invalid CEL query: {e}")))?;
                out.filter = Some((v.into_owned(), f));
            }
            other => {
                return Err(ApiError::bad_request(
                    231,
                    format!("The query parameter '{other}' is unknown."),
                ));
            }
        }
    }
    Ok(out)
}

/// Up to `limit` values strictly before `before` (newest first) that pass `keep`, and whether
/// any further value would pass. Costs O(limit) when nothing is filtered out.
fn page<'a, T>(
    map: &'a BTreeMap<String, T>,
    before: Option<&str>,
    limit: usize,
    keep: impl Fn(&T) -> bool,
) -> (Vec<&'a T>, bool) {
    let upper = before.map_or(Bound::Unbounded, Bound::Excluded);
    let mut it = map
        .range::<str, _>((Bound::Unbounded, upper))
        .rev()
        .map(|(_, v)| v)
        .filter(|v| keep(v));
    let items: Vec<&T> = it.by_ref().take(limit).collect();
    let more = items.len() == limit && it.next().is_some();
    (items, more)
}

fn list(ctx: Ctx, coll: Coll, body: &Bytes) -> Result<Response, ApiError> {
    no_body(&ctx, body)?;
    let q = parse_list_query(coll, ctx.query.as_deref())?;
    let filter = q.filter.as_ref().map(|(_, f)| f);
    let st = ctx.shared.ngrok();
    let (items, last_id): (Vec<Value>, Option<String>) = match coll.key_kind() {
        None => {
            let (users, more) = page(&st.users, q.before_id.as_deref(), q.limit, |u| {
                filter.is_none_or(|f| f.eval(&|field| user_field(u, field)))
            });
            let last = more.then(|| users.last().map(|u| u.id.clone())).flatten();
            let values = users
                .into_iter()
                .map(|u| user_json(u, &ctx.base, coll.path()))
                .collect();
            (values, last)
        }
        Some(kind) => {
            let (keys, more) = page(st.keys(kind), q.before_id.as_deref(), q.limit, |k| {
                filter.is_none_or(|f| f.eval(&|field| key_field(k, field)))
            });
            let last = more.then(|| keys.last().map(|k| k.id.clone())).flatten();
            let values = keys
                .into_iter()
                .map(|k| key_json(k, &ctx.base, None))
                .collect();
            (values, last)
        }
    };
    drop(st);
    let uri = format!("{}{}", ctx.base, coll.path());
    let next_page_uri = last_id.map(|last| {
        let mut qs = url::form_urlencoded::Serializer::new(String::new());
        qs.append_pair("before_id", &last);
        qs.append_pair("limit", &q.limit.to_string());
        if let Some((raw, _)) = &q.filter {
            qs.append_pair("filter", raw);
        }
        format!("{uri}?{}", qs.finish())
    });
    let mut out = Map::new();
    out.insert(coll.list_key().to_owned(), Value::Array(items));
    out.insert("uri".into(), Value::String(uri));
    out.insert("next_page_uri".into(), json!(next_page_uri));
    Ok(Json(Value::Object(out)).into_response())
}

fn create(ctx: Ctx, coll: Coll, body: &Bytes) -> Result<Response, ApiError> {
    let map = json_body(&ctx, body)?;
    let mut st = ctx.shared.ngrok();
    let value = match coll.key_kind() {
        None => {
            check_fields(&map, &["name", "active", "roles"], &[])?;
            // Roles (newest docs only) are accepted and ignored: every key may do everything.
            opt_str_list(&map, "roles")?;
            let name = opt_str(&map, "name")?.unwrap_or_default();
            let active = opt_bool(&map, "active")?.unwrap_or(true);
            let user = st.insert_user(name, active, None)?;
            user_json(user, &ctx.base, coll.path())
        }
        Some(kind) => {
            check_fields(&map, key_fields(kind, true), &[])?;
            let description = opt_str(&map, "description")?.unwrap_or_default();
            let metadata = opt_str(&map, "metadata")?.unwrap_or_default();
            let acl = opt_str_list(&map, "acl")?.unwrap_or_default();
            let public_key = opt_str(&map, "public_key")?.unwrap_or_default();
            let owner_id =
                opt_str(&map, "owner_id")?.unwrap_or_else(|| ctx.principal.owner_id.clone());
            let key =
                st.insert_key(kind, description, metadata, acl, public_key, owner_id, None)?;
            key_json(&key, &ctx.base, key.token.as_deref())
        }
    };
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

fn get_one(ctx: Ctx, coll: Coll, id: &str, body: &Bytes) -> Result<Response, ApiError> {
    no_body(&ctx, body)?;
    let st = ctx.shared.ngrok();
    let value = match coll.key_kind() {
        None => st
            .users
            .get(id)
            .map(|u| user_json(u, &ctx.base, coll.path())),
        Some(kind) => st.keys(kind).get(id).map(|k| key_json(k, &ctx.base, None)),
    };
    value
        .map(|v| Json(v).into_response())
        .ok_or_else(|| not_found(coll, id))
}

fn update(ctx: Ctx, coll: Coll, id: &str, body: &Bytes) -> Result<Response, ApiError> {
    let map = json_body(&ctx, body)?;
    let mut st = ctx.shared.ngrok();
    let value = match coll.key_kind() {
        None => {
            // "id" is tolerated because the Rust client puts it in every PATCH body.
            check_fields(&map, &["id", "name", "active", "roles"], &[])?;
            opt_str_list(&map, "roles")?;
            let name = opt_str(&map, "name")?;
            let active = opt_bool(&map, "active")?;
            let current = st.users.get(id).ok_or_else(|| not_found(coll, id))?;
            if let Some(name) = &name {
                check_user_name(name)?;
                if *name != current.name && st.names.contains_key(name) {
                    return Err(duplicate_name());
                }
            }
            let user = st.users.get_mut(id).ok_or_else(|| not_found(coll, id))?;
            let old_name = match name {
                Some(name) if name != user.name => Some(std::mem::replace(&mut user.name, name)),
                _ => None,
            };
            if let Some(active) = active {
                user.active = active;
            }
            let (new_name, value) = (user.name.clone(), user_json(user, &ctx.base, coll.path()));
            if let Some(old) = old_name {
                st.names.remove(&old);
                st.names.insert(new_name, id.to_owned());
            }
            value
        }
        Some(kind) => {
            check_fields(&map, key_fields(kind, false), &["owner_id", "public_key"])?;
            let description = opt_str(&map, "description")?;
            let metadata = opt_str(&map, "metadata")?;
            let acl = opt_str_list(&map, "acl")?;
            let key = st
                .keys_mut(kind)
                .get_mut(id)
                .ok_or_else(|| not_found(coll, id))?;
            check_key_fields(
                description.as_deref().unwrap_or(&key.description),
                metadata.as_deref().unwrap_or(&key.metadata),
                acl.as_deref().unwrap_or(&key.acl),
            )?;
            if let Some(d) = description {
                key.description = d;
            }
            if let Some(m) = metadata {
                key.metadata = m;
            }
            if let Some(a) = acl {
                key.acl = a;
            }
            key_json(key, &ctx.base, None)
        }
    };
    Ok(Json(value).into_response())
}

fn delete(ctx: Ctx, coll: Coll, id: &str, body: &Bytes) -> Result<Response, ApiError> {
    no_body(&ctx, body)?;
    let mut st = ctx.shared.ngrok();
    let found = match coll.key_kind() {
        None => st.remove_user(id).is_some(),
        Some(kind) => st.remove_key(kind, id).is_some(),
    };
    if found {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(coll, id))
    }
}

fn user_field(u: &User, field: &str) -> Option<String> {
    match field {
        "id" => Some(u.id.clone()),
        "created_at" => Some(u.created_at.to_string()),
        _ => None,
    }
}

fn key_field(k: &Key, field: &str) -> Option<String> {
    match field {
        "id" => Some(k.id.clone()),
        "created_at" => Some(k.created_at.to_string()),
        "description" => Some(k.description.clone()),
        "metadata" => Some(k.metadata.clone()),
        "owner_id" => Some(k.owner_id.clone()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal CEL subset for `filter`

/// `obj.<field> ==|!= "…"`, combined with `&&`, `||` and parentheses.
#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Cmp {
        field: String,
        equal: bool,
        value: String,
    },
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
}

impl Filter {
    fn eval(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Filter::Cmp {
                field,
                equal,
                value,
            } => (get(field).as_deref() == Some(value.as_str())) == *equal,
            Filter::And(a, b) => a.eval(get) && b.eval(get),
            Filter::Or(a, b) => a.eval(get) || b.eval(get),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Eq,
    Ne,
    And,
    Or,
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' => {
                chars.next();
                out.push(if c == '(' { Tok::Open } else { Tok::Close });
            }
            '=' | '!' | '&' | '|' => {
                chars.next();
                let second = chars.next();
                out.push(match (c, second) {
                    ('=', Some('=')) => Tok::Eq,
                    ('!', Some('=')) => Tok::Ne,
                    ('&', Some('&')) => Tok::And,
                    ('|', Some('|')) => Tok::Or,
                    _ => return Err(format!("unsupported operator near {c:?}")),
                });
            }
            '"' | '\'' => {
                chars.next();
                let mut lit = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string literal".into()),
                        Some('\\') => lit.push(chars.next().ok_or("unterminated escape")?),
                        Some(q) if q == c => break,
                        Some(other) => lit.push(other),
                    }
                }
                out.push(Tok::Str(lit));
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' => {
                let mut ident = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                        ident.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(ident));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

fn parse_filter(s: &str, fields: &[&str]) -> Result<Filter, String> {
    let toks = tokenize(s)?;
    let mut pos = 0;
    let f = parse_or(&toks, &mut pos, fields)?;
    if pos != toks.len() {
        return Err(format!("unexpected {:?}", toks[pos]));
    }
    Ok(f)
}

fn parse_or(t: &[Tok], pos: &mut usize, fields: &[&str]) -> Result<Filter, String> {
    let mut left = parse_and(t, pos, fields)?;
    while t.get(*pos) == Some(&Tok::Or) {
        *pos += 1;
        left = Filter::Or(Box::new(left), Box::new(parse_and(t, pos, fields)?));
    }
    Ok(left)
}

fn parse_and(t: &[Tok], pos: &mut usize, fields: &[&str]) -> Result<Filter, String> {
    let mut left = parse_atom(t, pos, fields)?;
    while t.get(*pos) == Some(&Tok::And) {
        *pos += 1;
        left = Filter::And(Box::new(left), Box::new(parse_atom(t, pos, fields)?));
    }
    Ok(left)
}

fn parse_atom(t: &[Tok], pos: &mut usize, fields: &[&str]) -> Result<Filter, String> {
    match t.get(*pos) {
        Some(Tok::Open) => {
            *pos += 1;
            let inner = parse_or(t, pos, fields)?;
            if t.get(*pos) != Some(&Tok::Close) {
                return Err("missing ')'".into());
            }
            *pos += 1;
            Ok(inner)
        }
        Some(Tok::Ident(path)) => {
            let field = path
                .strip_prefix("obj.")
                .filter(|f| fields.contains(f))
                .ok_or_else(|| {
                    format!(
                        "{path:?} is not a filterable field (use obj.<field> with one of {fields:?})"
                    )
                })?
                .to_owned();
            let equal = match t.get(*pos + 1) {
                Some(Tok::Eq) => true,
                Some(Tok::Ne) => false,
                _ => return Err(format!("expected == or != after {path}")),
            };
            let value = match t.get(*pos + 2) {
                Some(Tok::Str(v)) => v.clone(),
                _ => return Err(format!("expected a string literal after {path}")),
            };
            *pos += 3;
            Ok(Filter::Cmp {
                field,
                equal,
                value,
            })
        }
        other => Err(format!("unexpected {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_parses_owner_equality_with_and_or() {
        let f = parse_filter(
            r#"obj.owner_id == "bot_1" && (obj.metadata != "" || obj.description == 'x')"#,
            Coll::ApiKeys.filter_fields(),
        )
        .expect("parses");
        let get = |field: &str| match field {
            "owner_id" => Some("bot_1".to_owned()),
            "metadata" => Some(String::new()),
            "description" => Some("x".to_owned()),
            _ => None,
        };
        assert!(f.eval(&get));
        assert!(parse_filter(r#"obj.owner_id == "a" &&"#, &["owner_id"]).is_err());
        assert!(parse_filter(r#"obj.name == "a""#, Coll::ServiceUsers.filter_fields()).is_err());
        assert!(parse_filter(r#"obj.id.startsWith("a")"#, &["id"]).is_err());
    }

    #[test]
    fn route_templates_replace_the_id_segment() {
        assert_eq!(
            route_template("/service_users").as_deref(),
            Some("/service_users")
        );
        assert_eq!(
            route_template("/api_keys/ak_123").as_deref(),
            Some("/api_keys/{id}")
        );
        assert_eq!(route_template("/nope"), None);
        assert_eq!(route_template("/api_keys/a/b"), None);
    }

    #[test]
    fn public_keys_are_checked() {
        assert!(check_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample x").is_ok());
        assert_eq!(
            check_public_key(" ").map_err(|e| e.code),
            Err("ERR_NGROK_611".to_owned())
        );
        assert_eq!(
            check_public_key("hello").map_err(|e| e.code),
            Err("ERR_NGROK_612".to_owned())
        );
    }
}
