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
    pub at: Timestamp,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// About to make a remote write.
    Intent {
        action: Action,
        provider: String,
        user: String,
        user_id: Option<String>,
        slot: Option<String>,
        key_id: Option<String>,
        #[serde(default)]
        forced: bool,
    },
    /// The provider created this key (its secret is in memory only).
    Created {
        key_id: String,
        kind: KeyKind,
        created_at: Timestamp,
    },
    /// Every sink of the slot has the secret.
    Delivered { sinks: Vec<String> },
    /// Finished (successfully or not); nothing to recover.
    Done,
}

/// An operation the journal shows was started and not finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    pub seq: u64,
    pub started_at: Timestamp,
    pub action: Action,
    pub provider: String,
    pub user: String,
    pub user_id: Option<String>,
    pub slot: Option<String>,
    pub forced: bool,
    pub created: Option<(String, KeyKind, Timestamp)>,
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
