//! The ngrok API client: service users (`/service_users`), API keys (`/api_keys`) and
//! credentials, i.e. agent authtokens (`/credentials`). Lists follow `next_page_uri` verbatim
//! with `limit=100`; responses are decoded tolerantly (missing fields default, unknown fields are
//! ignored); errors carry the `ERR_NGROK_*` code. Observing uses list endpoints only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::http::{Answer, HttpClient, Op, Pace};
use super::{
    CreatedKey, Cursor, ErrorClass, Listing, NewKey, Provider, ProviderError, gone_is_done,
};
use crate::config::{ProviderAccount, ProviderAuth};
use crate::model::{AccountSnapshot, KeyKind, RemoteKey, RemoteUser};

/// One page of a list: its items (under `keys`, `credentials` or `service_users`, by list)
/// and the next page's URI (absent, null or not a string: none).
#[derive(Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
struct Page<T> {
    #[serde(default, deserialize_with = "string_or_none")]
    next_page_uri: Option<String>,
    #[serde(
        default = "Vec::new",
        rename = "service_users",
        alias = "keys",
        alias = "credentials"
    )]
    items: Vec<T>,
}

/// A string, or `None` for anything else (a tolerant reading of `next_page_uri`).
fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// Page size: the API's maximum, so a listing costs as few requests as possible.
const PAGE_LIMIT: u32 = 100;

/// The client of one ngrok account (see the module doc for paging and errors).
pub struct NgrokProvider {
    name: String,
    base_url: String,
    api_key: SecretString,
    http: Arc<HttpClient>,
    /// Requests in flight at most (`settings.concurrency`).
    concurrency: usize,
}

impl NgrokProvider {
    /// A client whose waits end, and which sends nothing more, once `shutdown` is cancelled.
    pub fn with_shutdown(
        account: &ProviderAccount,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let ProviderAuth::Ngrok { api_key } = &account.auth else {
            anyhow::bail!("provider {}: not an ngrok account", account.name);
        };
        Ok(NgrokProvider {
            name: account.name.clone(),
            base_url: account.base_url.trim_end_matches('/').to_string(),
            api_key: api_key.clone(),
            http: HttpClient::new(
                &account.name,
                &account.base_url,
                account.rate_limit,
                concurrency,
                decode_error,
                shutdown,
            )?,
            concurrency,
        })
    }

    async fn call(
        &self,
        op: &Op,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ProviderError> {
        self.http
            .send(op, |client| {
                let mut rb = client
                    .request(method.clone(), url)
                    .bearer_auth(self.api_key.expose_secret())
                    .header("ngrok-version", "2");
                if let Some(b) = body {
                    rb = rb.json(b);
                }
                rb
            })
            .await
    }

    fn decode<T: DeserializeOwned>(&self, op: &Op, answer: &Answer) -> Result<T, ProviderError> {
        serde_json::from_str(&answer.body).map_err(|e| ProviderError {
            provider: self.name.clone(),
            operation: op.operation.clone(),
            user: op.user.clone(),
            status: Some(answer.status.as_u16()),
            code: None,
            message: super::http::decode_problem(&e),
            class: ErrorClass::Rejected,
        })
    }

    /// Every item of a list, optionally narrowed by a `filter` (ngrok's CEL subset, e.g.
    /// `obj.owner_id == "bot_…"`; ngrok-api.md §0.2), following `next_page_uri`.
    async fn list_filtered<T: DeserializeOwned>(
        &self,
        path: &str,
        list_key: &str,
        filter: Option<&str>,
    ) -> Result<Vec<T>, ProviderError> {
        let (mut cursor, mut items, pages) = (None, Vec::new(), AtomicU64::new(0));
        self.list_from(
            path,
            list_key,
            filter,
            &mut cursor,
            None,
            &pages,
            &mut items,
            |t| t,
        )
        .await?;
        Ok(items)
    }

    /// Reads the list at `path` on from `cursor` (`None`: from the start) to its end, page by
    /// page, waiting on `pace` before each: each page's items go into `items` (through `convert`)
    /// and `cursor` moves past it, so that after an error both say how far the list got.
    #[allow(clippy::too_many_arguments)]
    async fn list_from<T: DeserializeOwned, U>(
        &self,
        path: &str,
        list_key: &str,
        filter: Option<&str>,
        cursor: &mut Option<Cursor>,
        pace: Option<&Pace>,
        pages: &AtomicU64,
        items: &mut Vec<U>,
        convert: impl Fn(T) -> U,
    ) -> Result<(), ProviderError> {
        let op = Op::new(format!("list {path}"), None);
        let mut url = match cursor {
            Some(Cursor::Done) => return Ok(()),
            Some(Cursor::Page(next)) => next.clone(),
            None | Some(Cursor::User(_)) => {
                let mut url = format!("{}{path}?limit={PAGE_LIMIT}", self.base_url);
                if let Some(f) = filter {
                    url.push_str("&filter=");
                    url.push_str(
                        &url::form_urlencoded::byte_serialize(f.as_bytes()).collect::<String>(),
                    );
                }
                url
            }
        };
        loop {
            if let Some(p) = pace {
                p.wait().await;
            }
            let answer = self.call(&op, Method::GET, &url, None).await?;
            // Decoded straight into the items, not through a tree of JSON values: a fleet's
            // listing is thousands of pages.
            let page: Page<T> = serde_json::from_str(&answer.body).map_err(|e| ProviderError {
                provider: self.name.clone(),
                operation: op.operation.clone(),
                user: None,
                status: Some(answer.status.as_u16()),
                code: None,
                message: format!(
                    "unexpected list response (items under `{list_key}`): {}",
                    super::http::decode_problem(&e)
                ),
                class: ErrorClass::Rejected,
            })?;
            let (next, batch) = (page.next_page_uri, page.items);
            let empty = batch.is_empty();
            let next = match next {
                // An empty page ends the listing even if a next page is announced.
                Some(next) if !empty => {
                    self.check_same_origin(&op, &next)?;
                    Some(next)
                }
                _ => None,
            };
            items.extend(batch.into_iter().map(&convert));
            pages.fetch_add(1, Ordering::Relaxed);
            match next {
                Some(next) => {
                    *cursor = Some(Cursor::Page(next.clone()));
                    url = next;
                }
                None => {
                    *cursor = Some(Cursor::Done);
                    return Ok(());
                }
            }
        }
    }

    /// One service user by id and the keys it owns (`None` when the provider no longer has it).
    async fn read_user(
        &self,
        name: String,
        id: String,
    ) -> Result<(Option<RemoteUser>, Vec<RemoteKey>), ProviderError> {
        let op = Op::new("read service user", Some(&name));
        let url = format!("{}/service_users/{id}", self.base_url);
        let user = match self.call(&op, Method::GET, &url, None).await {
            Ok(answer) => RemoteUser::from(self.decode::<WireUser>(&op, &answer)?),
            Err(e) if e.status == Some(404) => return Ok((None, Vec::new())),
            Err(e) => return Err(e),
        };
        let filter = format!("obj.owner_id == \"{}\"", user.id);
        let (api_keys, credentials) = tokio::try_join!(
            self.list_filtered::<WireKey>("/api_keys", "keys", Some(&filter)),
            self.list_filtered::<WireKey>("/credentials", "credentials", Some(&filter)),
        )?;
        let mut keys: Vec<RemoteKey> = api_keys
            .into_iter()
            .map(|k| k.into_remote(KeyKind::ApiKey).0)
            .collect();
        keys.extend(
            credentials
                .into_iter()
                .map(|k| k.into_remote(KeyKind::Credential).0),
        );
        Ok((Some(user), keys))
    }

    /// The API key goes only to the configured host: a `next_page_uri` elsewhere is refused.
    fn check_same_origin(&self, op: &Op, next: &str) -> Result<(), ProviderError> {
        let origin = |u: &str| {
            url::Url::parse(u).ok().map(|u| {
                (
                    u.scheme().to_string(),
                    u.host_str().map(str::to_string),
                    u.port_or_known_default(),
                )
            })
        };
        if origin(next).is_some() && origin(next) == origin(&self.base_url) {
            Ok(())
        } else {
            Err(ProviderError {
                provider: self.name.clone(),
                operation: op.operation.clone(),
                user: None,
                status: None,
                code: None,
                message: format!(
                    "the API answered a next page on another host ({}); refusing to send the API key there",
                    url::Url::parse(next)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_string))
                        .unwrap_or_else(|| "unparsable URL".into())
                ),
                class: ErrorClass::Rejected,
            })
        }
    }

    fn key_path(kind: KeyKind) -> &'static str {
        match kind {
            KeyKind::ApiKey => "/api_keys",
            KeyKind::Credential => "/credentials",
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireUser {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    created_at: Option<Timestamp>,
}

fn yes() -> bool {
    true
}

impl From<WireUser> for RemoteUser {
    fn from(w: WireUser) -> Self {
        RemoteUser {
            id: w.id,
            name: w.name,
            active: w.active,
            deleted: false,
            created_at: w.created_at,
        }
    }
}

#[derive(Deserialize)]
struct WireKey {
    id: String,
    #[serde(default)]
    owner_id: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    metadata: Option<String>,
    created_at: Timestamp,
    /// Credentials only; `[]` (or absent, or null) when unrestricted.
    #[serde(default)]
    acl: Option<Vec<String>>,
    /// Only in a create response.
    #[serde(default)]
    token: Option<String>,
}

impl WireKey {
    fn into_remote(self, kind: KeyKind) -> (RemoteKey, Option<SecretString>) {
        let key = RemoteKey {
            id: self.id,
            kind,
            owner_id: self.owner_id.filter(|o| !o.is_empty()),
            description: self.description.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default(),
            acl: self.acl.unwrap_or_default(),
            created_at: self.created_at,
            expires_at: None,
        };
        (key, self.token.map(SecretString::from))
    }
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    msg: Option<String>,
}

/// Maps an ngrok error answer to a [`ProviderError`], keeping the `ERR_NGROK_*` code.
fn decode_error(provider: &str, op: &Op, answer: &Answer) -> ProviderError {
    let parsed: Option<WireError> = serde_json::from_str(&answer.body).ok();
    let code = parsed.as_ref().and_then(|e| e.error_code.clone());
    let message = parsed
        .and_then(|e| e.msg)
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            answer
                .status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_string()
        });
    let status = answer.status.as_u16();
    // Credential, permission and plan problems: a retry cannot fix them.
    let config_codes = [
        "ERR_NGROK_4119",
        "ERR_NGROK_4111",
        "ERR_NGROK_630",
        "ERR_NGROK_200",
        "ERR_NGROK_203",
    ];
    let class = if status == 401
        || status == 403
        || code.as_deref().is_some_and(|c| config_codes.contains(&c))
    {
        ErrorClass::Credential
    } else if status == 429 || status >= 500 {
        ErrorClass::Transient
    } else {
        ErrorClass::Rejected
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
impl Provider for NgrokProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// The key lists are account-wide: a listing reads everything whoever is managed.
    fn scoped_listing(&self) -> bool {
        false
    }

    async fn list(
        &self,
        _managed: Option<&std::collections::BTreeSet<String>>,
        listing: &mut Listing,
        pace: Option<&Pace>,
    ) -> Result<(), ProviderError> {
        // The key lists are account-wide: listing them whole costs the same few pages. The
        // three lists are independent: they are read concurrently, each from where it stands.
        const USERS: &str = "service_users";
        const API_KEYS: &str = "api_keys";
        const CREDENTIALS: &str = "credentials";
        let mut at = [USERS, API_KEYS, CREDENTIALS].map(|l| listing.cursors.get(l).cloned());
        let [users_at, api_keys_at, credentials_at] = &mut at;
        let (mut users, mut api_keys, mut credentials) = (Vec::new(), Vec::new(), Vec::new());
        let pages = AtomicU64::new(0);
        // List responses carry no token; anything else would be dropped here regardless. Each
        // list runs to its end or its own failure: a page on the wire when another list fails
        // is kept, not read again.
        let (users_read, api_keys_read, credentials_read) = tokio::join!(
            self.list_from::<WireUser, _>(
                "/service_users",
                "service_users",
                None,
                users_at,
                pace,
                &pages,
                &mut users,
                RemoteUser::from,
            ),
            self.list_from::<WireKey, _>(
                "/api_keys",
                "keys",
                None,
                api_keys_at,
                pace,
                &pages,
                &mut api_keys,
                |k| k.into_remote(KeyKind::ApiKey).0,
            ),
            self.list_from::<WireKey, _>(
                "/credentials",
                "credentials",
                None,
                credentials_at,
                pace,
                &pages,
                &mut credentials,
                |k| k.into_remote(KeyKind::Credential).0,
            ),
        );
        // What was read stays, also when a list failed: the next call goes on from here.
        listing.users.append(&mut users);
        listing.keys.append(&mut api_keys);
        listing.keys.append(&mut credentials);
        listing.pages += pages.into_inner();
        for (list, cursor) in [USERS, API_KEYS, CREDENTIALS].into_iter().zip(at) {
            if let Some(c) = cursor {
                listing.cursors.insert(list, c);
            }
        }
        users_read.and(api_keys_read).and(credentials_read)
    }

    async fn observe_users(
        &self,
        users: &[(String, String)],
    ) -> Result<AccountSnapshot, ProviderError> {
        use futures::StreamExt as _;
        // Three reads per user: the user by id, and its API keys and credentials through
        // `filter=obj.owner_id == "…"` — what comes due costs requests in proportion to it, not
        // to the account.
        let reads: Vec<_> = users
            .iter()
            .map(|(name, id)| self.read_user(name.clone(), id.clone()))
            .collect();
        let reads = futures::stream::iter(reads).buffer_unordered(self.concurrency.max(1));
        let mut snapshot = AccountSnapshot::default();
        let results: Vec<Result<_, ProviderError>> = reads.collect().await;
        for r in results {
            let (user, keys) = r?;
            snapshot.users.extend(user);
            snapshot.keys.extend(keys);
        }
        Ok(snapshot)
    }

    async fn create_user(&self, name: &str, active: bool) -> Result<RemoteUser, ProviderError> {
        let op = Op::new("create service user", Some(name));
        let body = serde_json::json!({"name": name, "active": active});
        let url = format!("{}/service_users", self.base_url);
        let answer = self.call(&op, Method::POST, &url, Some(&body)).await?;
        let user: WireUser = self.decode(&op, &answer)?;
        Ok(user.into())
    }

    async fn update_user(
        &self,
        user: &RemoteUser,
        active: bool,
    ) -> Result<RemoteUser, ProviderError> {
        let op = Op::new("update service user", Some(&user.name));
        let body = serde_json::json!({"active": active});
        let url = format!("{}/service_users/{}", self.base_url, user.id);
        let answer = self.call(&op, Method::PATCH, &url, Some(&body)).await?;
        let user: WireUser = self.decode(&op, &answer)?;
        Ok(user.into())
    }

    async fn delete_user(&self, user: &RemoteUser) -> Result<(), ProviderError> {
        let op = Op::new("delete service user", Some(&user.name));
        let url = format!("{}/service_users/{}", self.base_url, user.id);
        gone_is_done(self.call(&op, Method::DELETE, &url, None).await)
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
        let mut body = serde_json::json!({
            "description": key.description,
            "metadata": key.metadata,
            "owner_id": user.id,
        });
        if key.kind == KeyKind::Credential {
            body["acl"] = serde_json::json!(key.acl);
        }
        let url = format!("{}{}", self.base_url, Self::key_path(key.kind));
        let answer = self.call(&op, Method::POST, &url, Some(&body)).await?;
        let wire: WireKey = self.decode(&op, &answer)?;
        let (remote, secret) = wire.into_remote(key.kind);
        let secret = secret.ok_or_else(|| ProviderError {
            provider: self.name.clone(),
            operation: op.operation.clone(),
            user: op.user.clone(),
            status: Some(answer.status.as_u16()),
            code: None,
            message: format!("the create response for {} carried no token", remote.id),
            class: ErrorClass::Rejected,
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
        patch: &crate::model::KeyAttrs,
    ) -> Result<RemoteKey, ProviderError> {
        let op = Op::new(format!("update {} {}", key.kind, key.id), Some(user));
        // PATCH /api_keys/{id} takes description and metadata; PATCH /credentials/{id} also
        // acl (ngrok-api.md, "API keys" and "Credentials"); owner_id cannot change.
        let mut body = serde_json::Map::new();
        if let Some(d) = &patch.description {
            body.insert("description".into(), serde_json::json!(d));
        }
        if let Some(m) = &patch.metadata {
            body.insert("metadata".into(), serde_json::json!(m));
        }
        if let Some(acl) = &patch.acl
            && key.kind == KeyKind::Credential
        {
            body.insert("acl".into(), serde_json::json!(acl));
        }
        let url = format!("{}{}/{}", self.base_url, Self::key_path(key.kind), key.id);
        let answer = self
            .call(
                &op,
                Method::PATCH,
                &url,
                Some(&serde_json::Value::Object(body)),
            )
            .await?;
        let wire: WireKey = self.decode(&op, &answer)?;
        Ok(wire.into_remote(key.kind).0)
    }

    async fn revoke_key(&self, user: &str, key: &RemoteKey) -> Result<(), ProviderError> {
        let op = Op::new(format!("revoke {} {}", key.kind, key.id), Some(user));
        let url = format!("{}{}/{}", self.base_url, Self::key_path(key.kind), key.id);
        gone_is_done(self.call(&op, Method::DELETE, &url, None).await)
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
