//! The ngrok API client: service users (`/service_users`), API keys (`/api_keys`) and
//! credentials, i.e. agent authtokens (`/credentials`). Lists follow `next_page_uri` verbatim
//! with `limit=100`; responses are decoded tolerantly (missing fields default, unknown fields are
//! ignored); errors carry the `ERR_NGROK_*` code. Observing uses list endpoints only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::http::{Answer, HttpClient, Op, Pace};
use super::marks::{ListMarks, Mark, PageMarks};
use super::{
    CreatedKey, Cursor, ErrorClass, Listing, NewKey, Provider, ProviderError, Stretch, gone_is_done,
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
    /// Where the pages of earlier listings began, if kept.
    marks: Option<Arc<PageMarks>>,
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
            marks: None,
        })
    }

    /// Lists in stretches from the pages `marks` remembers, and keeps the marks of each
    /// complete listing there.
    pub fn with_marks(mut self, marks: Option<Arc<PageMarks>>) -> Self {
        self.marks = marks;
        self
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
            _ => self.first_page(path, filter),
        };
        loop {
            if let Some(p) = pace {
                p.wait().await;
            }
            let (batch, next) = self.read_page::<T>(&op, list_key, &url).await?;
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

    /// The URL of a list's first page.
    fn first_page(&self, path: &str, filter: Option<&str>) -> String {
        let mut url = format!("{}{path}?limit={PAGE_LIMIT}", self.base_url);
        if let Some(f) = filter {
            url.push_str("&filter=");
            url.push_str(&url::form_urlencoded::byte_serialize(f.as_bytes()).collect::<String>());
        }
        url
    }

    /// One page of a list: its items and the next page's URL (`None` at the end; an empty page
    /// ends the list even if a next page is announced).
    async fn read_page<T: DeserializeOwned>(
        &self,
        op: &Op,
        list_key: &str,
        url: &str,
    ) -> Result<(Vec<T>, Option<String>), ProviderError> {
        let answer = self.call(op, Method::GET, url, None).await?;
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
        let next = match page.next_page_uri {
            Some(next) if !page.items.is_empty() => {
                self.check_same_origin(op, &next)?;
                Some(next)
            }
            _ => None,
        };
        Ok((page.items, next))
    }

    /// Reads a whole unfiltered list (`path`, items under `list_key`) on from `cursor`: at a
    /// fresh start in `stretches` stretches from `earlier`'s marks, side by side (see
    /// [`super::marks`]); each page's items go into `items` through `convert`. Returns the
    /// marks of the list once it is read to the end; after an error `cursor` says where each
    /// stretch goes on.
    #[allow(clippy::too_many_arguments)]
    async fn read_list<T: DeserializeOwned, U>(
        &self,
        path: &str,
        list_key: &str,
        cursor: &mut Option<Cursor>,
        earlier: Option<&ListMarks>,
        stretches: usize,
        pace: Option<&Pace>,
        pages: &AtomicU64,
        items: &mut Vec<U>,
        convert: impl Fn(T) -> U + Copy,
        id_of: fn(&U) -> &str,
    ) -> Result<Option<ListMarks>, ProviderError> {
        let fresh = !matches!(cursor, Some(Cursor::Stretches(_) | Cursor::Page(_)));
        let mut parts = match cursor.take() {
            Some(Cursor::Done) => {
                *cursor = Some(Cursor::Done);
                return Ok(None);
            }
            Some(Cursor::Stretches(parts)) => parts,
            Some(Cursor::Page(next)) => vec![Stretch::from_page(Some(next), None)],
            None | Some(Cursor::User(_)) => {
                // Only marks that fit this list as the provider itself would link it.
                let fitting = earlier.map(|e| {
                    let mut marks: Vec<Mark> = e
                        .marks
                        .iter()
                        .filter(|m| self.mark_fits(path, m))
                        .cloned()
                        .collect();
                    marks.sort_by_key(|m| m.page);
                    marks.dedup_by_key(|m| m.page);
                    ListMarks {
                        pages: e.pages,
                        marks,
                    }
                });
                let starts = fitting
                    .as_ref()
                    .map(|e| e.starts(stretches))
                    .unwrap_or_default();
                let mut parts = vec![Stretch::from_page(
                    Some(self.first_page(path, None)),
                    starts.first().map(|m| m.after.clone()),
                )];
                for (k, start) in starts.iter().enumerate() {
                    let mut part = Stretch::from_page(
                        Some(start.uri.clone()),
                        starts.get(k + 1).map(|m| m.after.clone()),
                    );
                    part.marks.push(Mark {
                        page: 0,
                        ..(*start).clone()
                    });
                    parts.push(part);
                }
                parts
            }
        };
        let op = Op::new(format!("list {path}"), None);
        // Whether a refused stretch was left to the one before it (items then come out of order).
        let mut merged = false;
        let failed = loop {
            let firsts: Vec<OnceLock<String>> = parts
                .iter()
                .map(|p| p.first.clone().map(OnceLock::from).unwrap_or_default())
                .collect();
            let mut read: Vec<Vec<U>> = parts.iter().map(|_| Vec::new()).collect();
            let results =
                futures::future::join_all(parts.iter_mut().zip(read.iter_mut()).enumerate().map(
                    |(index, (part, out))| {
                        self.read_stretch(
                            &op, path, list_key, index, part, &firsts, pace, pages, out, convert,
                            id_of,
                        )
                    },
                ))
                .await;
            items.extend(read.into_iter().flatten());
            let (mut failed, mut refused) = (None, Vec::new());
            for (index, result) in results.into_iter().enumerate() {
                match result {
                    Ok(true) => refused.push(index),
                    Ok(false) => {}
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            // A stretch whose remembered first page the provider refused is left to the one
            // before it, which reads on through it (from its own last page again if it had
            // stopped: what it reads twice is made unique with the rest).
            for &index in refused.iter().rev() {
                merged = true;
                let gone = parts.remove(index);
                if let Some(before) = index.checked_sub(1).and_then(|i| parts.get_mut(i)) {
                    before.stop = gone.stop;
                    if before.next.is_none() {
                        before.next = before.last.clone();
                    }
                }
            }
            if refused.is_empty() || failed.is_some() {
                break failed;
            }
        };
        if parts.iter().any(|p| p.next.is_some()) {
            *cursor = Some(Cursor::Stretches(parts));
            return Err(failed.unwrap_or_else(|| ProviderError {
                provider: self.name.clone(),
                operation: op.operation.clone(),
                user: None,
                status: None,
                code: None,
                message: "the listing stopped before the list's end".into(),
                class: ErrorClass::Transient,
            }));
        }
        *cursor = Some(Cursor::Done);
        if fresh && !merged && parts.len() > 1 && parts.iter().all(|p| p.canonical) {
            // Read whole in this call, and every link the provider gave was the plain one for
            // its last item: the marks are put back in line with pages of 100 from the start,
            // so that the next listing's stretches end on whole pages.
            return Ok(Some(self.aligned_marks(path, items, id_of)));
        }
        // The pages are numbered across the stretches in list order.
        let (mut base, mut marks) = (0, Vec::new());
        for part in parts {
            marks.extend(part.marks.into_iter().map(|m| Mark {
                page: base + m.page,
                ..m
            }));
            base += part.pages;
        }
        Ok(Some(ListMarks::thinned(base, marks)))
    }

    /// Whether `mark` is a page of the list at `path` as the provider links it: this account's
    /// API (scheme, host and port; no user info), the list's own path, and only `before_id`
    /// (the mark's own `after` item) and `limit=100`. A mark from a corrupted or tampered file
    /// therefore never sends the API key elsewhere, never reads another list or a filtered one,
    /// and never starts a stretch anywhere but right after the item the stretch before it
    /// ends at.
    fn mark_fits(&self, path: &str, mark: &Mark) -> bool {
        let (Ok(u), Ok(base)) = (url::Url::parse(&mark.uri), url::Url::parse(&self.base_url))
        else {
            return false;
        };
        let same_api = u.scheme() == base.scheme()
            && u.host_str() == base.host_str()
            && u.port_or_known_default() == base.port_or_known_default()
            && u.username().is_empty()
            && u.password().is_none()
            && u.fragment().is_none()
            && u.path() == format!("{}{path}", base.path().trim_end_matches('/'));
        let (mut before, mut limit, mut other) = (None, None, false);
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "before_id" if before.is_none() => before = Some(v.into_owned()),
                "limit" if limit.is_none() => limit = Some(v.into_owned()),
                _ => other = true,
            }
        }
        same_api
            && !other
            && !mark.after.is_empty()
            && before.as_deref() == Some(mark.after.as_str())
            && limit.as_deref() == Some(PAGE_LIMIT.to_string().as_str())
    }

    /// The link to the page after the item `after` of the list at `path`, as ngrok writes it.
    fn page_after(&self, path: &str, after: &str) -> String {
        let mut url = format!("{}{path}?", self.base_url);
        url.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .append_pair("before_id", after)
                .append_pair("limit", &PAGE_LIMIT.to_string())
                .finish(),
        );
        url
    }

    /// Marks at every 100th item of a list read whole (`items` in list order; an item read
    /// twice counts once), linked as the provider links them.
    fn aligned_marks<U>(&self, path: &str, items: &[U], id_of: fn(&U) -> &str) -> ListMarks {
        let mut seen = foldhash::HashSet::with_capacity_and_hasher(
            items.len(),
            foldhash::fast::RandomState::default(),
        );
        let ids: Vec<&str> = items
            .iter()
            .map(id_of)
            .filter(|id| seen.insert(*id))
            .collect();
        let per = PAGE_LIMIT as usize;
        let marks = ids
            .chunks(per)
            .enumerate()
            .filter(|(_, page)| page.len() == per)
            .filter_map(|(i, page)| {
                let after = page.last()?;
                Some(Mark {
                    page: i as u64 + 1,
                    uri: self.page_after(path, after),
                    after: (*after).to_string(),
                })
            })
            .collect();
        ListMarks::thinned(ids.len().div_ceil(per).max(1) as u64, marks)
    }

    /// Reads stretch `index` of a list on: up to its `stop` item, or up to the first item a
    /// later stretch read (`firsts`: when the account changed since the marks were taken), or
    /// to the list's end. True when the stretch's remembered first page was refused (it then
    /// read nothing, and the stretch before it must read on through it).
    #[allow(clippy::too_many_arguments)]
    async fn read_stretch<T: DeserializeOwned, U>(
        &self,
        op: &Op,
        path: &str,
        list_key: &str,
        index: usize,
        part: &mut Stretch,
        firsts: &[OnceLock<String>],
        pace: Option<&Pace>,
        pages: &AtomicU64,
        items: &mut Vec<U>,
        convert: impl Fn(T) -> U,
        id_of: fn(&U) -> &str,
    ) -> Result<bool, ProviderError> {
        while let Some(url) = part.next.clone() {
            if let Some(p) = pace {
                p.wait().await;
            }
            let (batch, next) = match self.read_page::<T>(op, list_key, &url).await {
                Ok(page) => page,
                Err(e) if index > 0 && part.pages == 0 && e.class == ErrorClass::Rejected => {
                    tracing::debug!("a remembered page was refused; read from before it: {e}");
                    part.next = None;
                    part.marks.clear();
                    return Ok(true);
                }
                Err(e) => return Err(e),
            };
            part.last = Some(url);
            let mut batch: Vec<U> = batch.into_iter().map(&convert).collect();
            pages.fetch_add(1, Ordering::Relaxed);
            part.pages += 1;
            if part.first.is_none()
                && let Some(first) = batch.first()
            {
                part.first = Some(id_of(first).to_string());
                let _ = firsts[index].set(id_of(first).to_string());
            }
            let later = firsts.get(index + 1..).unwrap_or_default();
            let cut = batch.iter().enumerate().find_map(|(i, item)| {
                let id = id_of(item);
                if part.stop.as_deref() == Some(id) {
                    Some(i + 1)
                } else if later.iter().any(|f| f.get().is_some_and(|f| f == id)) {
                    Some(i)
                } else {
                    None
                }
            });
            match cut {
                Some(at) => {
                    batch.truncate(at);
                    part.next = None;
                }
                None => {
                    if let (Some(next), Some(last)) = (&next, batch.last()) {
                        part.canonical &= *next == self.page_after(path, id_of(last));
                        part.marks.push(Mark {
                            page: part.pages,
                            uri: next.clone(),
                            after: id_of(last).to_string(),
                        });
                    }
                    part.next = next;
                }
            }
            items.extend(batch);
        }
        Ok(false)
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
        // three lists are independent: they are read concurrently, each from where it stands,
        // and at a fresh start each in stretches from the pages the last complete listing
        // marked, so that the longest list is not read one page after the other.
        const USERS: &str = "service_users";
        const API_KEYS: &str = "api_keys";
        const CREDENTIALS: &str = "credentials";
        const LISTS: [&str; 3] = [USERS, API_KEYS, CREDENTIALS];
        let earlier = match (&self.marks, listing.begun()) {
            (Some(marks), false) => marks.get(&self.name, &self.base_url),
            _ => BTreeMap::new(),
        };
        // As many stretches as requests may be in flight, shared out by the lists' lengths.
        let pages_of = |list: &str| earlier.get(list).map_or(1, |m| m.pages.max(1));
        let total: u64 = LISTS.iter().map(|l| pages_of(l)).sum();
        let stretch = total.div_ceil(self.concurrency.max(1) as u64).max(1);
        let [users_parts, api_key_parts, credential_parts] =
            LISTS.map(|l| usize::try_from(pages_of(l).div_ceil(stretch)).unwrap_or(1));
        listing.stretched |= users_parts.max(api_key_parts).max(credential_parts) > 1;
        let mut at = LISTS.map(|l| listing.cursors.get(l).cloned());
        let [users_at, api_keys_at, credentials_at] = &mut at;
        let (mut users, mut api_keys, mut credentials) = (Vec::new(), Vec::new(), Vec::new());
        let pages = AtomicU64::new(0);
        // List responses carry no token; anything else would be dropped here regardless. Each
        // list runs to its end or its own failure: a page on the wire when another list fails
        // is kept, not read again.
        let (users_read, api_keys_read, credentials_read) = tokio::join!(
            self.read_list::<WireUser, _>(
                "/service_users",
                "service_users",
                users_at,
                earlier.get(USERS),
                users_parts,
                pace,
                &pages,
                &mut users,
                RemoteUser::from,
                |u: &RemoteUser| u.id.as_str(),
            ),
            self.read_list::<WireKey, _>(
                "/api_keys",
                "keys",
                api_keys_at,
                earlier.get(API_KEYS),
                api_key_parts,
                pace,
                &pages,
                &mut api_keys,
                |k| k.into_remote(KeyKind::ApiKey).0,
                |k: &RemoteKey| k.id.as_str(),
            ),
            self.read_list::<WireKey, _>(
                "/credentials",
                "credentials",
                credentials_at,
                earlier.get(CREDENTIALS),
                credential_parts,
                pace,
                &pages,
                &mut credentials,
                |k| k.into_remote(KeyKind::Credential).0,
                |k: &RemoteKey| k.id.as_str(),
            ),
        );
        // What was read stays, also when a list failed: the next call goes on from here.
        listing.users.append(&mut users);
        listing.keys.append(&mut api_keys);
        listing.keys.append(&mut credentials);
        listing.pages += pages.into_inner();
        for (list, cursor) in LISTS.into_iter().zip(at) {
            if let Some(c) = cursor {
                listing.cursors.insert(list, c);
            }
        }
        let mut failed = None;
        for (list, read) in LISTS
            .into_iter()
            .zip([users_read, api_keys_read, credentials_read])
        {
            match read {
                Ok(Some(marks)) => {
                    listing.marks.insert(list, marks);
                }
                Ok(None) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if listing.stretched {
            listing.make_unique();
        }
        if let Some(keep) = &self.marks {
            let lists = listing
                .marks
                .iter()
                .map(|(list, marks)| (list.to_string(), marks.clone()))
                .collect();
            let (keep, name, base) = (Arc::clone(keep), self.name.clone(), self.base_url.clone());
            // A small file, written off the async threads; losing it costs only speed.
            let _ = tokio::task::spawn_blocking(move || keep.put(&name, &base, lists)).await;
        }
        Ok(())
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
