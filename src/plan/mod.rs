//! A plan is data: the changes keyward would make, the warnings it has, and a digest of the
//! remote objects it read. The pure planner ([`diff::plan`]) builds it; [`render`] shows it as
//! text or JSON; the executor runs it; a saved plan file is this document serialized.

pub mod diff;
pub mod render;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::model::Observed;
use crate::state::State;

pub use diff::{PlanOptions, plan};

/// The plan document's format version.
pub const FORMAT_VERSION: &str = "1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: String,
    pub changes: Vec<Change>,
    pub warnings: Vec<Warning>,
    pub summary: Summary,
    /// Digest of every remote object the plan's decisions read.
    pub observed: String,
    /// The `now` the plan was computed for.
    pub planned_at: Timestamp,
    /// Work that is not due yet: the next rotation of each slot, the end of each overlap.
    #[serde(default)]
    pub upcoming: Vec<Upcoming>,
}

/// Something keyward will do later, without being asked (soonest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upcoming {
    /// `rotate_key` or `revoke_key`.
    pub action: Action,
    pub provider: String,
    pub user: String,
    pub slot: Option<String>,
    pub key_id: Option<String>,
    pub at: Timestamp,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    CreateUser,
    UpdateUser,
    CreateKey,
    RotateKey,
    RevokeKey,
    DeleteUser,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateUser => "create_user",
            Action::UpdateUser => "update_user",
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub provider: String,
    pub user: String,
    pub slot: Option<String>,
    pub key_id: Option<String>,
    pub reason: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub kind: String,
    pub provider: Option<String>,
    pub user: Option<String>,
    pub key_id: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub rotate: usize,
    pub revoke: usize,
    pub delete: usize,
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
            match c.action {
                Action::CreateUser | Action::CreateKey => summary.create += 1,
                Action::UpdateUser => summary.update += 1,
                Action::RotateKey => summary.rotate += 1,
                Action::RevokeKey => summary.revoke += 1,
                Action::DeleteUser => summary.delete += 1,
            }
        }
        summary
    }
}

impl Plan {
    pub fn new(changes: Vec<Change>, warnings: Vec<Warning>, observed: String) -> Self {
        let summary = Summary::of(&changes, warnings.len());
        Plan {
            format_version: FORMAT_VERSION.to_string(),
            changes,
            warnings,
            summary,
            observed,
            planned_at: Timestamp::UNIX_EPOCH,
            upcoming: Vec::new(),
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    pub fn deletions(&self) -> usize {
        self.changes
            .iter()
            .filter(|c| c.action.is_deletion())
            .count()
    }
}

/// The digest of the remote objects a plan reads: every remote user that is declared or that
/// keyward recorded, and every key on those users, across the config's providers. Any change
/// there (a flag, a key added or removed) changes the digest.
pub fn observed_digest(config: &Config, observed: &Observed, state: &State) -> String {
    let mut hasher = Sha256::new();
    for (provider, snapshot) in observed {
        let relevant = |name: &str| {
            config
                .users
                .iter()
                .any(|u| u.provider == *provider && u.name == name)
                || state.user(provider, name).is_some()
        };
        let mut users: Vec<_> = snapshot
            .users
            .iter()
            .filter(|u| relevant(&u.name))
            .collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        for u in users {
            hasher.update(format!(
                "{provider}\0user\0{}\0{}\0{}\0{}\n",
                u.id, u.name, u.active, u.deleted
            ));
            let mut keys: Vec<_> = snapshot.keys_of(&u.id).collect();
            keys.sort_by(|a, b| a.id.cmp(&b.id));
            for k in keys {
                hasher.update(format!(
                    "{provider}\0key\0{}\0{}\0{}\0{}\0{:?}\0{}\n",
                    u.id, k.id, k.kind, k.created_at, k.expires_at, k.metadata
                ));
            }
        }
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}
