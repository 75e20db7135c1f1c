//! A plan is data: the changes keyward would make, each a typed operation carrying what the
//! executor needs (the slot's resolved policy and sinks, the user's `active`, the key to revoke,
//! whether a rotation is forced), the warnings it has, and a digest of the remote objects it
//! read. The pure planner ([`diff::plan`]) builds it; [`render`] shows it as text; [`view`] is
//! the contract's JSON document (format_version 1), written and read in one place; the
//! executor runs the operations.

pub mod diff;
pub mod render;
pub mod view;

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, SinkConfig, SlotSpec};
pub use crate::model::Action;
use crate::model::{KeyKind, Observed, ProviderType};
use crate::rotation::Due;
use crate::state::State;

pub use diff::{ForceTarget, PlanOptions, plan};

/// The plan document's format version.
pub const FORMAT_VERSION: &str = "1";

/// What keyward would do, and what it noticed, for one observation of the accounts.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// In the order they run: users in the file's order, then undeclared users; within a user
    /// create < update < keys < revoke < delete.
    pub changes: Vec<Change>,
    /// What keyward noticed and will not act on, or acts on with care.
    pub warnings: Vec<Warning>,
    /// Digest of every remote object the plan's decisions read (see [`observed_digest`]).
    pub observed: String,
    /// The `now` the plan was computed for.
    pub planned_at: Timestamp,
    /// Work that is not due yet: the next rotation of each slot, the end of each overlap.
    pub upcoming: Vec<Upcoming>,
    /// What keyward cannot do for a declared user until the file changes (an Okta ASA name
    /// held by a deleted user, say); nothing is planned for such a user, and `plan` and
    /// `apply` exit 1.
    pub errors: Vec<PlanError>,
}

/// One line naming a change (`ngrok / bot: rotate key main`), for reports and progress; names
/// are escaped.
pub fn describe_change(
    action: Action,
    provider: &str,
    user: &str,
    slot: Option<&str>,
    key_id: Option<&str>,
) -> String {
    let slot = slot.unwrap_or_default();
    let what = match action {
        Action::CreateUser => "create service user".to_string(),
        Action::UpdateUser => "update service user".to_string(),
        Action::UpdateKey => format!("update key {slot}"),
        Action::DeleteUser => "delete service user".to_string(),
        Action::CreateKey => format!("create key {slot}"),
        Action::RotateKey => format!("rotate key {slot}"),
        Action::RevokeKey => format!("revoke key {}", key_id.unwrap_or_default()),
    };
    crate::text::escape(&format!("{provider} / {user}: {what}")).into_owned()
}

/// A declared user keyward can plan nothing for until the file changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanError {
    /// The provider account's name in the config.
    pub provider: String,
    /// The declared user's name.
    pub user: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for PlanError {
    /// `provider / user: message`, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = format!("{} / {}: {}", self.provider, self.user, self.message);
        f.write_str(&crate::text::escape(&line))
    }
}

/// Something keyward will do later, without being asked (soonest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upcoming {
    /// `rotate_key` or `revoke_key`.
    pub action: Action,
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// The key slot.
    pub slot: Option<String>,
    /// The key that will be rotated or revoked.
    pub key_id: Option<String>,
    /// When it becomes due.
    pub at: Timestamp,
    /// Why, in words (`rotate_every 30d`, `overlap ends`, …).
    pub reason: String,
}

/// One change to one service user (or one of its keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// What it does.
    pub op: Op,
}

/// A key as a change refers to it: enough to revoke it and to say which one it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// The key's id at the provider.
    pub id: String,
    /// API key or credential.
    pub kind: KeyKind,
    /// When the provider created it.
    pub created_at: Timestamp,
}

/// A slot as a create or a rotation needs it: its resolved policy and the sinks (resolved, in
/// the slot's order) its secret goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotTarget {
    /// The slot with its resolved policy.
    pub spec: SlotSpec,
    /// The sinks its secret is delivered to, in the slot's order.
    pub sinks: Vec<SinkConfig>,
}

/// What a change does, with what its step needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create the service user (then its keys).
    CreateUser {
        /// The declared `active`.
        active: bool,
        /// Why the user is created.
        why: CreateUserReason,
    },
    /// Set the user's `active`.
    UpdateUser {
        /// Whether the user is active at the provider now.
        was_active: bool,
        /// Whether it will be.
        active: bool,
        /// Why it changes.
        why: UpdateUserReason,
    },
    /// Delete the user (ngrok: revokes every key it owns; ASA: soft delete, irreversible).
    DeleteUser {
        /// The user's id at the provider.
        user_id: String,
        /// Whether the user was active (shown in the document's `before`).
        was_active: bool,
        /// Which provider: the consequences of a delete differ.
        provider_type: ProviderType,
    },
    /// Put a key's drifted attributes back as declared, in place (ngrok `PATCH`).
    UpdateKey {
        /// The key.
        key: KeyRef,
        /// Its slot.
        slot: String,
        /// The attributes that differ, as the provider has them.
        before: crate::model::KeyAttrs,
        /// The same attributes, as declared.
        after: crate::model::KeyAttrs,
    },
    /// Mint the first key of a slot and deliver it.
    CreateKey {
        /// The slot and where its secret goes.
        slot: SlotTarget,
        /// Why the slot has no key.
        why: CreateKeyReason,
    },
    /// Mint a new key for a slot, deliver it, retire `from` for the slot's overlap.
    RotateKey {
        /// The slot and where its secret goes.
        slot: SlotTarget,
        /// The current key, which retires.
        from: KeyRef,
        /// Forced by `keyward rotate` (journaled: a forced rotation cut short runs again).
        forced: bool,
        /// The current key was adopted (`keyward import`): keyward never held its secret.
        adopted: bool,
        /// Why now.
        why: RotateReason,
    },
    /// Revoke a key.
    RevokeKey {
        /// The key to revoke.
        key: KeyRef,
        /// The slot it belonged to, when it belonged to one.
        slot: Option<String>,
        /// Why it goes.
        why: RevokeReason,
    },
}

/// Why a user is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateUserReason {
    /// Declared and not there.
    New,
    /// keyward recorded it, but the provider no longer has it.
    Vanished,
}

/// Why a user's `active` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateUserReason {
    /// The file says otherwise.
    Declared,
    /// keyward created it and it left the file (`prune.users: disable`).
    PruneDisable,
}

/// Why a slot gets its first key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateKeyReason {
    /// The user is new.
    NewSlot,
    /// The slot has no current key.
    NoCurrentKey,
    /// The key keyward recorded as current is gone at the provider.
    CurrentVanished {
        /// The recorded key's id.
        key_id: String,
    },
}

/// Why a slot is rotated now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateReason {
    /// `keyward rotate`.
    Forced,
    /// Its policy says so.
    Due(Due),
    /// The current key carries this installation's tag but no state recorded it and the sinks
    /// do not verifiably hold it: nobody can say who holds it, so a new key is delivered and it
    /// retires for the slot's overlap.
    Unconfirmed,
    /// A delivery to the slot's sinks was cut short (an interrupted run): some sinks may hold
    /// the key being delivered, the others the current one; a new key for every sink ends that.
    Interrupted,
}

/// Why a key is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeReason {
    /// Replaced, and its overlap has ended.
    OverlapEnded {
        /// The end of its overlap (`retire_after` in the state), when recorded.
        retired_until: Option<Timestamp>,
    },
    /// Its slot left the file.
    SlotUndeclared,
    /// keyward created it but never delivered it (an interrupted run): nobody holds it.
    Orphan,
    /// keyward did not create it (`prune.unknown_keys: revoke`).
    Unknown,
}

impl Op {
    /// The document's action for this operation.
    pub fn action(&self) -> Action {
        match self {
            Op::CreateUser { .. } => Action::CreateUser,
            Op::UpdateUser { .. } => Action::UpdateUser,
            Op::UpdateKey { .. } => Action::UpdateKey,
            Op::DeleteUser { .. } => Action::DeleteUser,
            Op::CreateKey { .. } => Action::CreateKey,
            Op::RotateKey { .. } => Action::RotateKey,
            Op::RevokeKey { .. } => Action::RevokeKey,
        }
    }
}

impl Change {
    /// The document's action for this change.
    pub fn action(&self) -> Action {
        self.op.action()
    }

    /// Whether it deletes or revokes something that `settings.max_deletions` guards: a service
    /// user, a key whose slot left the file, a key keyward did not create. Not the revocations
    /// that end keyward's own rotations (a retiring key whose replacement was delivered and
    /// whose overlap ended) or that remove a key keyward minted and never delivered (an
    /// orphan: nobody holds it). Those follow from keys already replaced, not from what the
    /// file says; counting them let a burst of rotations (a fleet's, or a cluster's after
    /// failovers) refuse every apply, and with it every rotation, until the limit was raised.
    pub fn guarded_deletion(&self) -> bool {
        match &self.op {
            Op::DeleteUser { .. } => true,
            Op::RevokeKey { why, .. } => {
                matches!(why, RevokeReason::SlotUndeclared | RevokeReason::Unknown)
            }
            _ => false,
        }
    }

    /// The slot the change is about, if any.
    pub fn slot(&self) -> Option<&str> {
        match &self.op {
            Op::CreateKey { slot, .. } | Op::RotateKey { slot, .. } => Some(&slot.spec.name),
            Op::RevokeKey { slot, .. } => slot.as_deref(),
            Op::UpdateKey { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// The key the change is about, if any (the key a rotation replaces).
    pub fn key_id(&self) -> Option<&str> {
        match &self.op {
            Op::RotateKey { from, .. } => Some(&from.id),
            Op::RevokeKey { key, .. } | Op::UpdateKey { key, .. } => Some(&key.id),
            _ => None,
        }
    }

    /// Whether a rotation was forced.
    pub fn forced(&self) -> bool {
        matches!(self.op, Op::RotateKey { forced: true, .. })
    }

    /// The reason in words, for people and for the document's `reason`; `now` is the plan's.
    pub fn reason(&self, now: Timestamp) -> String {
        use crate::text::short_id;
        match &self.op {
            Op::CreateUser { why, .. } => match why {
                CreateUserReason::New => String::new(),
                CreateUserReason::Vanished => {
                    "recorded by keyward but no longer exists at the provider".to_string()
                }
            },
            Op::UpdateUser {
                was_active,
                active,
                why,
            } => match why {
                UpdateUserReason::Declared => format!("active: {was_active} -> {active}"),
                UpdateUserReason::PruneDisable => {
                    "no longer in the file (prune.users: disable)".to_string()
                }
            },
            Op::DeleteUser { provider_type, .. } => match provider_type {
                ProviderType::OktaAsa => "no longer in the file (prune.users: delete); irreversible: ASA keeps the name reserved".to_string(),
                ProviderType::Ngrok => "no longer in the file (prune.users: delete); revokes every key it owns".to_string(),
            },
            Op::CreateKey { why, .. } => match why {
                CreateKeyReason::NewSlot => "new slot".to_string(),
                CreateKeyReason::NoCurrentKey => "no current key".to_string(),
                CreateKeyReason::CurrentVanished { key_id } => format!(
                    "current key {} no longer exists at the provider",
                    short_id(key_id)
                ),
            },
            Op::UpdateKey { before, after, .. } => attrs_change(before, after),
            Op::RotateKey {
                from, why, adopted, ..
            } => {
                let reason = rotate_reason(from, why, now);
                if *adopted && *why != RotateReason::Unconfirmed {
                    format!(
                        "{reason}; adopted key: it retires for the overlap once the new key is delivered"
                    )
                } else {
                    reason
                }
            }
            Op::RevokeKey { why, slot, .. } => match why {
                RevokeReason::OverlapEnded {
                    retired_until: Some(t),
                } => format!("retired {}, overlap ended", t.strftime("%Y-%m-%d")),
                RevokeReason::OverlapEnded {
                    retired_until: None,
                } => "retired, overlap ended".to_string(),
                RevokeReason::SlotUndeclared => format!(
                    "slot {} is no longer declared",
                    slot.as_deref().unwrap_or_default()
                ),
                RevokeReason::Orphan => {
                    "created by keyward but never recorded as delivered (interrupted run)"
                        .to_string()
                }
                RevokeReason::Unknown => {
                    "not created by keyward (prune.unknown_keys: revoke)".to_string()
                }
            },
        }
    }
}

/// Why `from` is rotated, in words.
fn rotate_reason(from: &KeyRef, why: &RotateReason, now: Timestamp) -> String {
    use crate::text::short_id;
    match why {
        RotateReason::Forced => format!("{} rotation forced", short_id(&from.id)),
        RotateReason::Unconfirmed => format!(
            "{} carries this installation's tag but no state records it and the sinks do not verifiably hold it; it retires for the slot's overlap",
            short_id(&from.id)
        ),
        RotateReason::Due(due) => format!(
            "{} {}",
            short_id(&from.id),
            due.describe(Some(from.created_at), now)
        ),
        RotateReason::Interrupted => format!(
            "{}: a delivery to this slot's sinks was cut short; a new key for every sink, then the keys they hold retire for the overlap",
            short_id(&from.id)
        ),
    }
}

/// `acl: [a] -> [b]; description: "x" -> "y"`: each attribute that differs, provider side
/// first.
pub fn attrs_change(before: &crate::model::KeyAttrs, after: &crate::model::KeyAttrs) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let list = |l: &[String]| {
        format!(
            "[{}]",
            l.iter().map(|r| quote(r)).collect::<Vec<_>>().join(", ")
        )
    };
    let mut parts = Vec::new();
    if let (Some(b), Some(a)) = (&before.acl, &after.acl) {
        parts.push(format!("acl: {} -> {}", list(b), list(a)));
    }
    if let (Some(b), Some(a)) = (&before.description, &after.description) {
        parts.push(format!("description: {} -> {}", quote(b), quote(a)));
    }
    if let (Some(b), Some(a)) = (&before.metadata, &after.metadata) {
        parts.push(format!("metadata: {} -> {}", quote(b), quote(a)));
    }
    parts.join("; ")
}

/// What a warning is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    // In the order of their names: warnings on the same key sort by kind, as they always have.
    /// A key of this installation that no state recorded and the sinks hold: adopted as the
    /// slot's current key.
    AdoptedKey,
    /// A warning about the config file (an inline secret, say).
    Config,
    /// A key tagged by another installation (another `settings.owner`): never touched.
    ForeignKey,
    /// The last key of a user, kept although the plan would revoke it.
    LastKeyKept,
    /// The service user keyward authenticates as (left alone).
    OwnCredential,
    /// A user keyward created that left the file, kept (`prune.users: keep`).
    PrunedUserKept,
    /// A key whose slot left the file: valid for the overlap, then revoked.
    RetiringKey,
    /// A key of this installation that no state recorded and the sinks do not verifiably hold
    /// (rotated, retiring for the overlap), or that names a slot the file no longer declares
    /// (left alone).
    UntrackedKey,
    /// A key on a managed user that keyward did not create.
    UnknownKey,
    /// A remote user the file does not declare.
    UnmanagedUser,
}

impl WarningKind {
    /// The document's name for it: `unknown_key`, …
    pub fn as_str(self) -> &'static str {
        match self {
            WarningKind::UnknownKey => "unknown_key",
            WarningKind::ForeignKey => "foreign_key",
            WarningKind::AdoptedKey => "adopted_key",
            WarningKind::UntrackedKey => "untracked_key",
            WarningKind::RetiringKey => "retiring_key",
            WarningKind::UnmanagedUser => "unmanaged_user",
            WarningKind::PrunedUserKept => "pruned_user_kept",
            WarningKind::OwnCredential => "own_credential",
            WarningKind::LastKeyKept => "last_key_kept",
            WarningKind::Config => "config",
        }
    }
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for WarningKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Something keyward noticed and will not act on (or acts on with care).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// What it is about.
    pub kind: WarningKind,
    /// The provider account, when it is about one.
    pub provider: Option<String>,
    /// The service user, when it is about one.
    pub user: Option<String>,
    /// The key, when it is about one.
    pub key_id: Option<String>,
    /// The whole sentence (the document's `message`).
    pub message: String,
    /// The short form the human plan prints after the warning's title.
    #[serde(skip)]
    pub detail: String,
}

/// How many changes of each kind, and how many warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Users and keys created (`create_user`, `create_key`).
    pub create: usize,
    /// Users whose `active` changes, and keys whose attributes are put back.
    pub update: usize,
    /// Keys rotated.
    pub rotate: usize,
    /// Keys revoked.
    pub revoke: usize,
    /// Users deleted.
    pub delete: usize,
    /// Warnings.
    pub warnings: usize,
}

impl Summary {
    /// The counts of `changes`, with `warnings` warnings.
    pub fn of(changes: &[Change], warnings: usize) -> Summary {
        let mut summary = Summary {
            warnings,
            ..Summary::default()
        };
        for c in changes {
            match c.action() {
                Action::CreateUser | Action::CreateKey => summary.create += 1,
                Action::UpdateUser | Action::UpdateKey => summary.update += 1,
                Action::RotateKey => summary.rotate += 1,
                Action::RevokeKey => summary.revoke += 1,
                Action::DeleteUser => summary.delete += 1,
            }
        }
        summary
    }
}

impl Plan {
    /// Whether applying it would change anything.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// How many objects it deletes or revokes that count against `settings.max_deletions`
    /// (see [`Change::guarded_deletion`]).
    pub fn deletions(&self) -> usize {
        self.changes.iter().filter(|c| c.guarded_deletion()).count()
    }

    /// The counts, always computed from the changes themselves.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.changes, self.warnings.len())
    }
}

/// The digest of the remote objects a plan reads: every remote user that is declared or that
/// keyward recorded, and every key on those users, across the config's providers. Any change
/// there (a flag, a key added or removed) changes the digest.
pub fn observed_digest(config: &Config, observed: &Observed, state: &State) -> String {
    let index = observed
        .iter()
        .map(|(p, snap)| (p.as_str(), snap.index()))
        .collect();
    observed_digest_indexed(config, observed, &index, state)
}

/// [`observed_digest`] with the accounts already indexed (the planner's index).
pub(crate) fn observed_digest_indexed(
    config: &Config,
    observed: &Observed,
    index: &std::collections::HashMap<&str, crate::model::AccountIndex>,
    state: &State,
) -> String {
    let mut declared: crate::model::FastSet<(&str, &str)> = crate::model::FastSet::default();
    declared.extend(
        config
            .users
            .iter()
            .map(|u| (u.provider.as_str(), u.name.as_str())),
    );
    // Each value is fed with its length ahead of it, so that no two different sequences of
    // values feed the same bytes; nothing is formatted. The bytes gather in a buffer that is
    // hashed a block of pages at a time.
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let field = |h: &mut Vec<u8>, bytes: &[u8]| {
        h.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        h.extend_from_slice(bytes);
    };
    for (provider, snapshot) in observed {
        let relevant = |name: &str| {
            declared.contains(&(provider.as_str(), name)) || state.user(provider, name).is_some()
        };
        let mut users: Vec<_> = snapshot
            .users
            .iter()
            .filter(|u| relevant(&u.name))
            .collect();
        // (Listings usually come in id order already: checked in one pass.)
        if !users.is_sorted_by(|a, b| a.id <= b.id) {
            users.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let listing = index.get(provider.as_str());
        let mut keys: Vec<&crate::model::RemoteKey> = Vec::new();
        for u in users {
            field(&mut buf, b"user");
            field(&mut buf, provider.as_bytes());
            field(&mut buf, u.id.as_bytes());
            field(&mut buf, u.name.as_bytes());
            field(&mut buf, &[u8::from(u.active), u8::from(u.deleted)]);
            keys.clear();
            keys.extend(listing.map(|l| l.keys_of(&u.id)).unwrap_or(&[]));
            keys.sort_by(|a, b| a.id.cmp(&b.id));
            for k in keys.iter() {
                // Every attribute a decision reads: the tag (ownership, drift), the
                // description and the ACL (drift), the times (rotation).
                field(&mut buf, b"key");
                field(&mut buf, k.id.as_bytes());
                field(&mut buf, k.kind.as_str().as_bytes());
                field(&mut buf, &k.created_at.as_nanosecond().to_le_bytes());
                match k.expires_at {
                    Some(t) => field(&mut buf, &t.as_nanosecond().to_le_bytes()),
                    None => field(&mut buf, b""),
                }
                field(&mut buf, k.metadata.as_bytes());
                field(&mut buf, k.description.as_bytes());
                field(&mut buf, &(k.acl.len() as u64).to_le_bytes());
                for rule in &k.acl {
                    field(&mut buf, rule.as_bytes());
                }
            }
            if buf.len() >= 1 << 15 {
                hasher.update(&buf);
                buf.clear();
            }
        }
    }
    hasher.update(&buf);
    format!("sha256:{}", hex::encode(hasher.finalize()))
}
