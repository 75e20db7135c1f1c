//! Provider-neutral types shared by the planner, the providers, the executor and the state:
//! what a remote service user and a remote key look like once a provider has listed them.
//! Nothing here knows a provider's wire format.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The kind of provider account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ProviderType {
    /// ngrok (`type: ngrok`).
    #[serde(rename = "ngrok")]
    Ngrok,
    /// Okta Advanced Server Access / Privileged Access (`type: okta-asa`).
    #[serde(rename = "okta-asa")]
    OktaAsa,
}

impl ProviderType {
    /// The name the config file uses: `ngrok` or `okta-asa`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Ngrok => "ngrok",
            ProviderType::OktaAsa => "okta-asa",
        }
    }
}

impl fmt::Display for ProviderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a change, as the plan document names it (`action`) and the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Create a service user.
    CreateUser,
    /// Change a service user's `active` flag.
    UpdateUser,
    /// Put a key's drifted attributes (ngrok description, credential ACL, keyward's tag) back
    /// as declared, in place.
    UpdateKey,
    /// Mint a slot's first key.
    CreateKey,
    /// Mint a slot's next key; the current one starts retiring (it is revoked once the overlap
    /// ends).
    RotateKey,
    /// Revoke a key: a retiring key whose overlap ended, an orphan, or an unknown key
    /// (`prune.unknown_keys: revoke`).
    RevokeKey,
    /// Delete a service user keyward created that left the file (`prune.users: delete`).
    DeleteUser,
}

impl Action {
    /// The document's name for it: `create_user`, `rotate_key`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateUser => "create_user",
            Action::UpdateUser => "update_user",
            Action::UpdateKey => "update_key",
            Action::DeleteUser => "delete_user",
            Action::CreateKey => "create_key",
            Action::RotateKey => "rotate_key",
            Action::RevokeKey => "revoke_key",
        }
    }

    /// Whether this action removes something at the provider.
    pub fn is_deletion(self) -> bool {
        matches!(self, Action::DeleteUser | Action::RevokeKey)
    }
}

/// What a key slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// ngrok API key, or an ASA service-user API key.
    ApiKey,
    /// ngrok credential (agent authtoken).
    Credential,
}

impl KeyKind {
    /// The config file's name for it: `api_key` or `credential`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::ApiKey => "api_key",
            KeyKind::Credential => "credential",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service user as listed at the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteUser {
    /// The provider's id for the user.
    pub id: String,
    /// The user's name, unique per provider account.
    pub name: String,
    /// Whether the user is active (ngrok `active`, ASA status `ACTIVE`).
    pub active: bool,
    /// ASA's soft-deleted users keep their name reserved; ngrok has no such state.
    pub deleted: bool,
    /// When the provider created it, where the provider says.
    pub created_at: Option<Timestamp>,
}

/// A key (API key or credential) as listed at the provider. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteKey {
    /// The provider's id for the key: what keyward's state and the journal record.
    pub id: String,
    /// API key or credential.
    pub kind: KeyKind,
    /// The owning service user's id; `None` for keys owned by a human or the account.
    pub owner_id: Option<String>,
    /// The key's description (ngrok); empty where the provider has none (ASA).
    pub description: String,
    /// ngrok's free-form metadata string; keyward's tag lives here.
    pub metadata: String,
    /// ngrok credentials' ACL rules (`bind:…`); empty for API keys, ASA keys and an
    /// unrestricted credential.
    #[serde(default)]
    pub acl: Vec<String>,
    /// When the provider created it: the start of the key's age for `rotate_every`.
    pub created_at: Timestamp,
    /// Provider-side expiry (ASA); `None` = never.
    pub expires_at: Option<Timestamp>,
}

/// The attributes of a key that keyward keeps as declared (ngrok `PATCH` takes them); `None`
/// means "not concerned". A plan's `update_key` holds the ones that differ, before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttrs {
    /// The key's description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The key's metadata (keyward's tag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// A credential's ACL rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<Vec<String>>,
}

impl KeyAttrs {
    /// Whether it names no attribute.
    pub fn is_empty(&self) -> bool {
        self.description.is_none() && self.metadata.is_none() && self.acl.is_none()
    }
}

/// The tag keyward writes into the `metadata` of every ngrok key it creates:
/// `{"managed_by":"keyward","owner":"<settings.owner>","slot":"<slot>"}` (product contract
/// §10.2). A tag without `owner` (written before owners existed) means
/// [`KeyTag::DEFAULT_OWNER`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTag {
    /// Always [`KeyTag::MANAGED_BY`] in a tag keyward wrote.
    pub managed_by: String,
    /// The installation that created the key (`settings.owner`; absent or null: the default).
    #[serde(default = "default_owner", deserialize_with = "owner_or_default")]
    pub owner: String,
    /// The key slot the key was minted for (empty in a tag that names none, or null).
    #[serde(default, deserialize_with = "string_or_empty")]
    pub slot: String,
}

fn default_owner() -> String {
    KeyTag::DEFAULT_OWNER.to_string()
}

/// A tag's `owner`: a null one is the default owner, as an absent one is.
fn owner_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_owner))
}

/// A tag's `slot`: a null one names no slot, as an absent one does.
fn string_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl KeyTag {
    /// The `managed_by` value that marks a key as keyward's.
    pub const MANAGED_BY: &'static str = "keyward";
    /// The owner of a tag that names none, and `settings.owner`'s default.
    pub const DEFAULT_OWNER: &'static str = "keyward";

    /// The tag for a key minted by installation `owner` for `slot`.
    pub fn new(owner: &str, slot: &str) -> Self {
        KeyTag {
            managed_by: Self::MANAGED_BY.to_string(),
            owner: owner.to_string(),
            slot: slot.to_string(),
        }
    }

    /// Whether `owner` may name an installation: 1 to 64 ASCII letters, digits, `.`, `_`, `-`.
    pub fn valid_owner(owner: &str) -> bool {
        (1..=64).contains(&owner.len())
            && owner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// The metadata string: `{"managed_by":"keyward","owner":"<owner>","slot":"<slot>"}`.
    pub fn to_metadata(&self) -> String {
        serde_json::json!({"managed_by": self.managed_by, "owner": self.owner, "slot": self.slot})
            .to_string()
    }

    /// The tag in a key's metadata, if keyward wrote it.
    pub fn parse(metadata: &str) -> Option<KeyTag> {
        let tag: KeyTag = serde_json::from_str(metadata).ok()?;
        (tag.managed_by == Self::MANAGED_BY).then_some(tag)
    }

    /// Whether `metadata` holds the tag of installation `owner` for `slot`: what
    /// `parse(metadata) == Some(KeyTag::new(owner, slot))` says, read in place (the planner
    /// asks it of every current key).
    pub fn is_tag_of(metadata: &str, owner: &str, slot: &str) -> bool {
        /// A tag read in place: the fields of [`KeyTag`], borrowed where the JSON allows.
        #[derive(Deserialize)]
        struct View<'a> {
            #[serde(borrow)]
            managed_by: std::borrow::Cow<'a, str>,
            #[serde(default, borrow)]
            owner: Option<std::borrow::Cow<'a, str>>,
            #[serde(default, borrow)]
            slot: Option<std::borrow::Cow<'a, str>>,
        }
        let Ok(tag) = serde_json::from_str::<View>(metadata) else {
            return false;
        };
        tag.managed_by == Self::MANAGED_BY
            && tag.owner.as_deref().unwrap_or(Self::DEFAULT_OWNER) == owner
            && tag.slot.as_deref().unwrap_or("") == slot
    }
}

/// Everything observed at one provider account: its service users and the keys they own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSnapshot {
    /// Every service user listed, soft-deleted ones included.
    pub users: Vec<RemoteUser>,
    /// Every key listed, whoever owns it.
    pub keys: Vec<RemoteKey>,
}

impl AccountSnapshot {
    /// Replaces what is known of some users with newer word of them: every user named in
    /// `names` or whose id is in `ids` goes, with every key it owns, and `users` and `keys`
    /// (the newer word, owned by those users) come in. A user absent from `users` is gone. One
    /// pass over the account. What a targeted read, an apply's answers and a listing's overlay
    /// all do to what the daemon knows.
    pub fn replace_users(
        &mut self,
        names: &std::collections::HashSet<&str>,
        ids: impl IntoIterator<Item = String>,
        users: Vec<RemoteUser>,
        keys: Vec<RemoteKey>,
    ) {
        let mut ids: std::collections::HashSet<String> = ids.into_iter().collect();
        ids.extend(
            self.users
                .iter()
                .filter(|u| names.contains(u.name.as_str()))
                .map(|u| u.id.clone()),
        );
        ids.extend(users.iter().map(|u| u.id.clone()));
        self.users
            .retain(|u| !names.contains(u.name.as_str()) && !ids.contains(&u.id));
        self.keys
            .retain(|k| k.owner_id.as_ref().is_none_or(|o| !ids.contains(o)));
        self.users.extend(users);
        self.keys.extend(keys);
    }

    /// The user named `name` that is not (soft-)deleted.
    pub fn user_by_name(&self, name: &str) -> Option<&RemoteUser> {
        self.users.iter().find(|u| u.name == name && !u.deleted)
    }

    /// Every key with an owner, by owner id: one pass over the account's keys, so that looking
    /// up the keys of many users costs no more than listing them.
    pub fn keys_by_owner(&self) -> FastMap<&str, Vec<&RemoteKey>> {
        let mut out: FastMap<&str, Vec<&RemoteKey>> = FastMap::default();
        // Most owners are listed users: room for them all at once, no rehashing on the way.
        out.reserve(self.users.len());
        for k in &self.keys {
            if let Some(owner) = k.owner_id.as_deref() {
                out.entry(owner).or_default().push(k);
            }
        }
        out
    }

    /// The listing indexed once: live users by name, keys by owner id.
    pub fn index(&self) -> AccountIndex<'_> {
        let mut users = FastMap::default();
        users.reserve(self.users.len());
        for u in self.users.iter().filter(|u| !u.deleted) {
            users.entry(u.name.as_str()).or_insert(u);
        }
        AccountIndex {
            users,
            keys: self.keys_by_owner(),
        }
    }

    /// The keys owned by the user with id `user_id`.
    pub fn keys_of<'a>(&'a self, user_id: &'a str) -> impl Iterator<Item = &'a RemoteKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.owner_id.as_deref() == Some(user_id))
    }
}

/// One account's listing indexed for lookups that cost O(1): what the planner, recovery and
/// `status` use so that their cost grows linearly with the account.
#[derive(Debug)]
pub struct AccountIndex<'a> {
    /// Users that are not (soft-)deleted, by name.
    pub users: FastMap<&'a str, &'a RemoteUser>,
    /// Keys by owner id.
    pub keys: FastMap<&'a str, Vec<&'a RemoteKey>>,
}

impl<'a> AccountIndex<'a> {
    /// The keys of the user with id `user_id`.
    pub fn keys_of(&self, user_id: &str) -> &[&'a RemoteKey] {
        self.keys.get(user_id).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A hash map with a fast, seeded hasher (foldhash): the fleet-sized indexes of a run hash
/// hundreds of thousands of names and ids, where SipHash cost more than the lookups' work.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// [`FastMap`]'s set.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The remote world across every provider account in the config, by account name.
pub type Observed = BTreeMap<String, AccountSnapshot>;
