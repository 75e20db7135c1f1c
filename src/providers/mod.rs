//! The `Provider` trait: the six operations keyward needs from a SaaS account (observe, create /
//! update / delete a service user, create / revoke a key), and the provider-neutral error that
//! names provider, operation, user and the provider's own error code. Each API's pagination,
//! auth, retries and rate limits stay behind this trait.

// A provider error carries the context a user needs (provider, operation, user, code, message);
// it is built only on the cold failure path, so its size is not worth boxing away.
#![allow(clippy::result_large_err)]

pub mod asa;
pub mod http;
pub mod marks;
pub mod ngrok;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::config::ProviderAccount;
use crate::model::{AccountSnapshot, KeyAttrs, KeyKind, RemoteKey, RemoteUser};

/// What to create a key with.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// API key or credential.
    pub kind: KeyKind,
    /// The key slot it is minted for.
    pub slot: String,
    /// The key's description (ngrok; ASA keys have none).
    pub description: String,
    /// The metadata tag (ngrok).
    pub metadata: String,
    /// ACL rules (ngrok credentials only), e.g. `bind:*.example.com`.
    pub acl: Vec<String>,
}

/// A key just created: the one moment its secret is known.
pub struct CreatedKey {
    /// The key as the provider describes it.
    pub key: RemoteKey,
    /// Its secret, which must reach the slot's sinks before anything else happens.
    pub secret: SecretString,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &self.key)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// Where one of an account's lists stands in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// The next page to read, as the provider gave it (a URL).
    Page(String),
    /// The next user whose keys to read, by position in the listing's users (Okta ASA lists
    /// keys user by user).
    User(usize),
    /// Stretches of the list read side by side, each from a page an earlier listing marked
    /// (ngrok; see [`marks`]).
    Stretches(Vec<Stretch>),
    /// Read to the end.
    Done,
}

/// One stretch of a list, read page after page on its own while the list's other stretches
/// are read beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stretch {
    /// The next page to read (a URL as the provider gave it); `None` once the stretch is read.
    pub next: Option<String>,
    /// The id of the stretch's last item: the item before the next stretch's first page, as an
    /// earlier listing saw it. `None` for the list's last stretch, which runs to the end.
    pub stop: Option<String>,
    /// The id of the first item the stretch read.
    pub first: Option<String>,
    /// The marks of the pages the stretch began, in order, numbered from its own first page (0).
    pub marks: Vec<marks::Mark>,
    /// Pages the stretch has read.
    pub pages: u64,
    /// The last page it read (a URL).
    pub last: Option<String>,
    /// Whether every next-page link the provider gave it was the plain one for the page's last
    /// item (`before_id=ID&limit=100`): then marks may be put back in line with whole pages.
    pub canonical: bool,
}

/// A full listing of one account, in progress: what it has read so far and where each of the
/// account's lists goes on. A listing cut short (an error, a shutdown, a budget) keeps its pages
/// and goes on from its cursors when listed again, never from the start. Pages are appended
/// whole: a page is in it or not.
#[derive(Debug, Default)]
pub struct Listing {
    /// The service users read so far.
    pub users: Vec<RemoteUser>,
    /// The keys read so far.
    pub keys: Vec<RemoteKey>,
    /// Per list (the provider's collection name), where it goes on; absent = not begun.
    pub cursors: BTreeMap<&'static str, Cursor>,
    /// Pages read so far, over every resumption.
    pub pages: u64,
    /// Per list read to the end, where its pages began (for the next listing; see [`marks`]).
    pub marks: BTreeMap<&'static str, marks::ListMarks>,
    /// Whether some list was read in stretches, which may overlap where the account changed
    /// since the marks were taken: the items are then made unique once every list is read.
    pub stretched: bool,
}

impl Stretch {
    /// A stretch not begun: from page `next` (`None`: nothing to read) up to `stop`.
    pub fn from_page(next: Option<String>, stop: Option<String>) -> Stretch {
        Stretch {
            next,
            stop,
            first: None,
            marks: Vec::new(),
            pages: 0,
            last: None,
            canonical: true,
        }
    }
}

impl Listing {
    /// Keeps one of each service user and key (by id): stretches may have read an item twice
    /// where the account changed since their marks were taken.
    pub fn make_unique(&mut self) {
        fn keep_first<T>(items: &mut Vec<T>, id: impl Fn(&T) -> &str) {
            let keep: Vec<bool> = {
                let mut seen = foldhash::HashSet::with_capacity_and_hasher(
                    items.len(),
                    foldhash::fast::RandomState::default(),
                );
                items.iter().map(|i| seen.insert(id(i))).collect()
            };
            let mut keep = keep.into_iter();
            items.retain(|_| keep.next().unwrap_or(true));
        }
        keep_first(&mut self.users, |u| u.id.as_str());
        keep_first(&mut self.keys, |k| k.id.as_str());
    }

    /// Whether the listing has begun (some page was read).
    pub fn begun(&self) -> bool {
        !self.cursors.is_empty()
    }

    /// The account as listed (the listing must be complete).
    pub fn into_snapshot(self) -> AccountSnapshot {
        AccountSnapshot {
            users: self.users,
            keys: self.keys,
        }
    }
}

/// A provider account keyward can observe and change.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The account's name in the config.
    fn name(&self) -> &str;
    /// Whether [`Provider::observe`] reads its `managed` argument (it lists keys user by user):
    /// the engine then loads the state before listing, to name the users keyward manages;
    /// otherwise the state loads while the account is listed.
    fn scoped_listing(&self) -> bool {
        true
    }
    /// Lists every service user, and the keys of the users in `managed` (all users when
    /// `None`), using list endpoints only. Providers with an account-wide key list may return
    /// more keys; a provider that must list keys user by user (Okta ASA) lists only these.
    async fn observe(
        &self,
        managed: Option<&BTreeSet<String>>,
    ) -> Result<AccountSnapshot, ProviderError> {
        let mut listing = Listing::default();
        self.list(managed, &mut listing, None).await?;
        Ok(listing.into_snapshot())
    }
    /// [`Provider::observe`], resumable and paced: goes on with `listing` from where it stands
    /// (a fresh one begins at the start), waiting on `pace` before each page. On an error the
    /// pages read so far stay in `listing`, and a later call goes on from there. Ok when every
    /// list has been read to the end.
    async fn list(
        &self,
        managed: Option<&BTreeSet<String>>,
        listing: &mut Listing,
        pace: Option<&http::Pace>,
    ) -> Result<(), ProviderError>;
    /// Reads only the given service users (name, id at the provider) and the keys they own:
    /// what a daemon run for the keys that came due needs, at a cost in requests that follows
    /// the number of users, not the size of the account. A user the provider no longer has is
    /// absent from the snapshot. By default, [`Provider::observe`] scoped to those names.
    async fn observe_users(
        &self,
        users: &[(String, String)],
    ) -> Result<AccountSnapshot, ProviderError> {
        let names: BTreeSet<String> = users.iter().map(|(n, _)| n.clone()).collect();
        self.observe(Some(&names)).await
    }
    /// Creates the service user `name`, deactivated right after when `active` is false (ASA creates
    /// users active).
    async fn create_user(&self, name: &str, active: bool) -> Result<RemoteUser, ProviderError>;
    /// Sets the user's `active` (ngrok `active`, ASA status `ACTIVE` / `DISABLED`); returns the
    /// user as it now is.
    async fn update_user(
        &self,
        user: &RemoteUser,
        active: bool,
    ) -> Result<RemoteUser, ProviderError>;
    /// Deletes the user (ngrok: revokes every key it owns; ASA: soft delete with status DELETED,
    /// irreversible, the name stays reserved). A user already gone (404) is success.
    async fn delete_user(&self, user: &RemoteUser) -> Result<(), ProviderError>;
    /// Mints a key for `user` and returns it with its secret. At ASA this is "rotate", which also
    /// puts the user's other keys on a 2-day expiry clock.
    async fn create_key(
        &self,
        user: &RemoteUser,
        key: &NewKey,
    ) -> Result<CreatedKey, ProviderError>;
    /// Changes `key`'s description, metadata or ACL in place (ngrok `PATCH /api_keys/{id}`,
    /// `PATCH /credentials/{id}`) and returns the key as it now is. Okta ASA keys have no such
    /// attributes: keyward never plans this for them, and the ASA client refuses it.
    async fn update_key(
        &self,
        user: &str,
        key: &RemoteKey,
        patch: &KeyAttrs,
    ) -> Result<RemoteKey, ProviderError>;
    /// Revokes `key` of the user named `user`. A key already gone (404) is success.
    async fn revoke_key(&self, user: &str, key: &RemoteKey) -> Result<(), ProviderError>;
    /// Sets the check made right before each request goes out (the state lock's lease); a
    /// client that sends nothing over HTTP ignores it.
    fn fence_requests(&self, fence: crate::files::Fence) {
        let _ = fence;
    }
    /// How many HTTP requests this client has sent (retries included).
    fn requests_sent(&self) -> u64;
    /// How many of them the provider answered 429 (rate limited).
    fn rate_limited(&self) -> u64;
    /// The share of the account's `rate_limit` the requests of its last window took (0.0–1.0).
    fn budget_used(&self) -> f64 {
        0.0
    }
}

/// Builds the client for one provider account; once `shutdown` is cancelled it waits for
/// nothing and sends nothing new. `marks`, where given, are where the pages of earlier
/// listings began (an ngrok listing reads its lists in stretches from them, and keeps its own).
pub fn connect(
    account: &ProviderAccount,
    concurrency: usize,
    shutdown: tokio_util::sync::CancellationToken,
    marks: Option<Arc<marks::PageMarks>>,
) -> anyhow::Result<Arc<dyn Provider>> {
    match account.kind {
        crate::model::ProviderType::Ngrok => Ok(Arc::new(
            ngrok::NgrokProvider::with_shutdown(account, concurrency, shutdown)?.with_marks(marks),
        )),
        crate::model::ProviderType::OktaAsa => Ok(Arc::new(asa::AsaProvider::with_shutdown(
            account,
            concurrency,
            shutdown,
        )?)),
    }
}

/// The result of a delete: a 404 means it is already gone, which is what was wanted.
pub fn gone_is_done<T>(result: Result<T, ProviderError>) -> Result<(), ProviderError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.status == Some(404) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a provider call failed, in terms a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad or missing credential, missing permission or plan: fix the config, retrying won't help.
    Credential,
    /// 429, 5xx, connection problems: retried with backoff before being reported.
    Transient,
    /// Anything else the provider refused (validation, conflict, not found).
    Rejected,
}

/// A failed provider call. Never carries a secret: messages are built from the provider's error
/// body, which echoes no credential.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ProviderError {
    /// The provider account's name in the config.
    pub provider: String,
    /// What keyward was doing, e.g. `create service user`.
    pub operation: String,
    /// The service user it was for, if any.
    pub user: Option<String>,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The provider's own code, e.g. `ERR_NGROK_4112`.
    pub code: Option<String>,
    /// What went wrong: the provider's own message, trimmed.
    pub message: String,
    /// What the user can do about it.
    pub class: ErrorClass,
}

impl fmt::Display for ProviderError {
    /// One line: names from the config and text from the provider are escaped (no forged
    /// lines), and any credential keyward holds is masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::text::escape;
        write!(f, "provider {}: {}", escape(&self.provider), self.operation)?;
        if let Some(user) = &self.user {
            write!(f, " for user {}", escape(user))?;
        }
        write!(f, " failed")?;
        match (&self.status, &self.code) {
            (Some(s), Some(c)) => write!(f, " (HTTP {s}, {})", escape(c))?,
            (Some(s), None) => write!(f, " (HTTP {s})")?,
            (None, Some(c)) => write!(f, " ({})", escape(c))?,
            (None, None) => {}
        }
        write!(f, ": {}", escape(&crate::redact::mask(&self.message, None)))?;
        if self.class == ErrorClass::Credential {
            write!(f, " (check the provider's credential and its permissions)")?;
        }
        Ok(())
    }
}
