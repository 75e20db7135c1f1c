//! One classification of the keys on a service user, used by the planner, crash recovery and
//! `status` alike, so that they never disagree about a key: the slot's **current** key, keys
//! **retiring** after a rotation, **orphans** (minted by keyward, never delivered: nobody holds
//! them), **untracked** keys (tagged by this installation but recorded nowhere: the state was
//! lost, or another installation with the same owner made them), **foreign** keys (tagged by
//! another installation) and **unknown** keys (not keyward's). Keys on users the file does not
//! declare are **unmanaged**, and never looked at here.

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::model::{KeyTag, RemoteKey, RemoteUser};
use crate::state::State;

/// Where each remote key of one service user belongs.
#[derive(Debug, Default)]
pub struct KeyBook<'a> {
    /// Slot → its recorded current key, present at the provider.
    pub current: BTreeMap<String, &'a RemoteKey>,
    /// Slot → its recorded retiring keys present at the provider, with when each may go.
    pub retiring: BTreeMap<String, Vec<(&'a RemoteKey, Option<Timestamp>)>>,
    /// Keys keyward minted and never delivered (recorded as orphans), with their slot.
    pub orphans: Vec<(String, &'a RemoteKey)>,
    /// Keys whose delivery was cut short (some sink may hold them), with their slot.
    pub pending: Vec<(String, &'a RemoteKey)>,
    /// Keys tagged by this installation for a slot, recorded nowhere, with that slot.
    pub untracked: Vec<(String, &'a RemoteKey)>,
    /// Keys tagged by another installation, with its owner.
    pub foreign: Vec<(String, &'a RemoteKey)>,
    /// Keys keyward did not create.
    pub unknown: Vec<&'a RemoteKey>,
}

/// What one key is to keyward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClass {
    /// The slot's recorded current key.
    Current {
        /// The slot.
        slot: String,
    },
    /// A key a rotation replaced, valid until its overlap ends.
    Retiring {
        /// The slot.
        slot: String,
        /// When it may be revoked (`retire_after` in the state).
        until: Option<Timestamp>,
    },
    /// Minted by keyward for the slot and never delivered: nobody holds it.
    Orphan {
        /// The slot.
        slot: String,
    },
    /// Its delivery was cut short: some sink may hold it; kept until a later key reaches every
    /// sink of the slot.
    Pending {
        /// The slot.
        slot: String,
    },
    /// Tagged by this installation for `slot`, but neither the state nor the journal records
    /// it: it may be what the slot's consumers hold, so it is never revoked at once.
    Untracked {
        /// The slot its tag names.
        slot: String,
    },
    /// Tagged by another installation (`owner`): never touched.
    Foreign {
        /// The owner its tag names.
        owner: String,
    },
    /// Not created by keyward.
    Unknown,
}

impl KeyClass {
    /// The word `status` and the plan use for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyClass::Current { .. } => "current",
            KeyClass::Retiring { .. } => "retiring",
            KeyClass::Orphan { .. } => "orphan",
            KeyClass::Pending { .. } => "pending",
            KeyClass::Untracked { .. } => "untracked",
            KeyClass::Foreign { .. } => "foreign",
            KeyClass::Unknown => "unknown",
        }
    }
}

/// Sorts `keys` (the remote keys of `user` on account `provider`) by what keyward's state
/// records about them and by their tag, `owner` being this installation's `settings.owner`. A
/// record made for another user of the same name (its id differs) counts for nothing.
pub fn classify<'a>(
    provider: &str,
    user: &RemoteUser,
    keys: impl IntoIterator<Item = &'a RemoteKey>,
    state: &State,
    owner: &str,
) -> KeyBook<'a> {
    let record = state.user(provider, &user.name).filter(|r| r.id == user.id);
    classify_recorded(record, keys, owner)
}

/// [`classify`] with the user's record already looked up (and made for this user: its id is
/// the remote user's).
pub fn classify_recorded<'a>(
    record: Option<&crate::state::UserRecord>,
    keys: impl IntoIterator<Item = &'a RemoteKey>,
    owner: &str,
) -> KeyBook<'a> {
    let mut book = KeyBook::default();
    for key in keys {
        match class_of(record, key, owner) {
            KeyClass::Current { slot } => {
                book.current.insert(slot, key);
            }
            KeyClass::Retiring { slot, until } => {
                book.retiring.entry(slot).or_default().push((key, until))
            }
            KeyClass::Orphan { slot } => book.orphans.push((slot, key)),
            KeyClass::Pending { slot } => book.pending.push((slot, key)),
            KeyClass::Untracked { slot } => book.untracked.push((slot, key)),
            KeyClass::Foreign { owner } => book.foreign.push((owner, key)),
            KeyClass::Unknown => book.unknown.push(key),
        }
    }
    book
}

/// What `key` is, given the user's record and this installation's `owner`. What the state
/// records wins over the tag: a recorded key stays keyward's whatever its metadata now says.
pub fn class_of(
    record: Option<&crate::state::UserRecord>,
    key: &RemoteKey,
    owner: &str,
) -> KeyClass {
    if let Some(rec) = record {
        for (slot, srec) in &rec.slots {
            if srec.current().is_some_and(|c| c.id == key.id) {
                return KeyClass::Current { slot: slot.clone() };
            }
            if let Some(r) = srec.retiring().iter().find(|r| r.id == key.id) {
                return KeyClass::Retiring {
                    slot: slot.clone(),
                    until: r.retire_after,
                };
            }
            if srec.orphans().contains(&key.id) {
                return KeyClass::Orphan { slot: slot.clone() };
            }
            if srec.pending().iter().any(|p| p.id == key.id) {
                return KeyClass::Pending { slot: slot.clone() };
            }
        }
    }
    match KeyTag::parse(&key.metadata) {
        Some(tag) if tag.owner == owner => KeyClass::Untracked { slot: tag.slot },
        Some(tag) => KeyClass::Foreign { owner: tag.owner },
        None => KeyClass::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(metadata: &str) -> RemoteKey {
        RemoteKey {
            id: "ak_1".into(),
            kind: crate::model::KeyKind::ApiKey,
            owner_id: Some("u".into()),
            description: String::new(),
            metadata: metadata.into(),
            acl: Vec::new(),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: None,
        }
    }

    #[test]
    fn a_tag_names_its_owner_whatever_else_it_holds() {
        for (metadata, class) in [
            (
                r#"{"managed_by":"keyward","owner":"b","slot":"x"}"#,
                KeyClass::Foreign { owner: "b".into() },
            ),
            // No slot, fields in another order, an extra field: still another installation's.
            (
                r#"{"managed_by":"keyward","owner":"b"}"#,
                KeyClass::Foreign { owner: "b".into() },
            ),
            (
                r#"{"owner":"b","x":1,"managed_by":"keyward","slot":"s"}"#,
                KeyClass::Foreign { owner: "b".into() },
            ),
            // No owner: the default installation's.
            (
                r#"{"managed_by":"keyward","slot":"s"}"#,
                KeyClass::Untracked { slot: "s".into() },
            ),
            (
                r#"{"managed_by":"other","owner":"keyward"}"#,
                KeyClass::Unknown,
            ),
            ("", KeyClass::Unknown),
        ] {
            assert_eq!(
                class_of(None, &key(metadata), "keyward"),
                class,
                "{metadata}"
            );
        }
    }
}
