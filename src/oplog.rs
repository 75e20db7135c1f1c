//! What the journal records, as data: one [`Entry`] per step of a remote write (intent,
//! created, delivered, done), and the fold that finds the operations a crash left unfinished.
//! Pure: the journal module writes and reads these lines; recovery decides what they mean.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{Action, KeyKind};

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Which operation the line belongs to.
    pub seq: u64,
    /// When the line was written.
    pub at: Timestamp,
    /// The step it records.
    #[serde(flatten)]
    pub event: Event,
}

/// The step of a remote write a journal line records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// About to make a remote write.
    Intent {
        /// What keyward is about to do.
        action: Action,
        /// The provider account's name in the config.
        provider: String,
        /// The service user's name.
        user: String,
        /// The service user's id at the provider, when it exists already.
        user_id: Option<String>,
        /// The key slot, for a key change.
        slot: Option<String>,
        /// The key the write is about: the one a rotation replaces, or the one revoked.
        key_id: Option<String>,
        /// A rotation forced by `keyward rotate` (a forced rotation cut short runs again).
        #[serde(default)]
        forced: bool,
    },
    /// The provider created this key (its secret is in memory only).
    Created {
        /// The new key's id at the provider.
        key_id: String,
        /// API key or credential.
        kind: KeyKind,
        /// When the provider created it.
        created_at: Timestamp,
    },
    /// Delivery to the slot's sinks begins: from here on a sink may hold the secret, so the key
    /// is never revoked at once (durable before the first sink is written).
    Delivering,
    /// Every sink of the slot has the secret.
    Delivered {
        /// The slot's sink names.
        sinks: Vec<String>,
    },
    /// Finished (successfully or not); nothing to recover.
    Done,
}

/// An operation the journal shows was started and not finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    /// The journal sequence number of its lines.
    pub seq: u64,
    /// When its intent was recorded.
    pub started_at: Timestamp,
    /// What it was to do.
    pub action: Action,
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// The service user's id at the provider, if it existed when the write began.
    pub user_id: Option<String>,
    /// The key slot, for a key change.
    pub slot: Option<String>,
    /// A forced rotation.
    pub forced: bool,
    /// The key the provider created, if it got that far: id, kind, creation time.
    pub created: Option<(String, KeyKind, Timestamp)>,
    /// Whether delivery to the sinks began (some sink may hold the secret).
    pub delivering: bool,
    /// The sinks that received the secret and when, if it got that far.
    pub delivered: Option<(Vec<String>, Timestamp)>,
}

/// The operations started and not finished, in order.
pub fn unfinished(entries: &[Entry]) -> Vec<Unfinished> {
    let mut open: std::collections::BTreeMap<u64, Unfinished> = std::collections::BTreeMap::new();
    for e in entries {
        match &e.event {
            Event::Intent {
                action,
                provider,
                user,
                user_id,
                slot,
                forced,
                ..
            } => {
                open.insert(
                    e.seq,
                    Unfinished {
                        seq: e.seq,
                        started_at: e.at,
                        action: *action,
                        provider: provider.clone(),
                        user: user.clone(),
                        user_id: user_id.clone(),
                        slot: slot.clone(),
                        forced: *forced,
                        created: None,
                        delivering: false,
                        delivered: None,
                    },
                );
            }
            Event::Created {
                key_id,
                kind,
                created_at,
            } => {
                if let Some(u) = open.get_mut(&e.seq) {
                    u.created = Some((key_id.clone(), *kind, *created_at));
                }
            }
            Event::Delivering => {
                if let Some(u) = open.get_mut(&e.seq) {
                    u.delivering = true;
                }
            }
            Event::Delivered { sinks } => {
                if let Some(u) = open.get_mut(&e.seq) {
                    u.delivered = Some((sinks.clone(), e.at));
                }
            }
            Event::Done => {
                open.remove(&e.seq);
            }
        }
    }
    open.into_values().collect()
}
