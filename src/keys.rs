//! One classification of the keys on a service user, used by the planner and `status` alike, so
//! that they never disagree about a key: the slot's **current** key, keys
//! **retiring** after a rotation, **orphans** (minted by keyward, never delivered: nobody holds
//! them) and **unknown** keys (not keyward's). Keys on users the file does not declare are
//! **unmanaged**, and never looked at here.

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
    /// Keys keyward minted and never recorded as delivered, with their slot (recorded as an
    /// orphan, or named by the key's tag).
    pub orphans: Vec<(String, &'a RemoteKey)>,
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
            KeyClass::Unknown => "unknown",
        }
    }
}

/// Sorts `keys` (the remote keys of `user` on account `provider`) by what keyward's state
/// records about them. A record made for another user of the same name (its id differs) counts
/// for nothing.
pub fn classify<'a>(
    provider: &str,
    user: &RemoteUser,
    keys: impl Iterator<Item = &'a RemoteKey>,
    state: &State,
) -> KeyBook<'a> {
    let record = state.user(provider, &user.name).filter(|r| r.id == user.id);
    let mut book = KeyBook::default();
    for key in keys {
        match class_of(record, key) {
            KeyClass::Current { slot } => {
                book.current.insert(slot, key);
            }
            KeyClass::Retiring { slot, until } => {
                book.retiring.entry(slot).or_default().push((key, until))
            }
            KeyClass::Orphan { slot } => book.orphans.push((slot, key)),
            KeyClass::Unknown => book.unknown.push(key),
        }
    }
    book
}

/// What `key` is, given the user's record.
pub fn class_of(record: Option<&crate::state::UserRecord>, key: &RemoteKey) -> KeyClass {
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
        }
    }
    match KeyTag::parse(&key.metadata) {
        Some(tag) => KeyClass::Orphan { slot: tag.slot },
        None => KeyClass::Unknown,
    }
}
