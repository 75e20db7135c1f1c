//! The plan document (product contract §5, `format_version` 1): the JSON `plan --json` prints
//! and `plan --out` saves. It is a view of the typed [`Plan`], written and read here only: a
//! saved plan is read back as this document and held against a recomputed plan's document,
//! never executed from its own words.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Action, Change, FORMAT_VERSION, Op, Plan, Summary, Upcoming, Warning};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanDocument {
    /// Always [`FORMAT_VERSION`] (`"1"`) in a document keyward writes.
    pub format_version: String,
    /// The changes, in the order they run.
    pub changes: Vec<ChangeView>,
    /// What keyward noticed and will not act on.
    pub warnings: Vec<Warning>,
    /// How many changes of each kind.
    pub summary: Summary,
    /// Digest of the remote objects the plan read.
    pub observed: String,
    /// The `now` the plan was computed for.
    pub planned_at: Timestamp,
    /// Rotations and overlap ends to come (absent in older documents).
    #[serde(default)]
    pub upcoming: Vec<Upcoming>,
    /// Declared users nothing can be planned for (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<super::PlanError>,
}

/// One change as the document shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeView {
    /// What the change does.
    pub action: Action,
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// The key slot, for a key change.
    pub slot: Option<String>,
    /// The key a rotation replaces or a revocation removes.
    pub key_id: Option<String>,
    /// Why, in words (may hold ages, so it is not compared).
    pub reason: String,
    /// The object's attributes before the change (`None` for a create).
    pub before: Option<Value>,
    /// Its attributes after the change (`None` for a revoke or delete).
    pub after: Option<Value>,
}

impl ChangeView {
    /// What identifies the decision a view describes: action, target and attributes (not the
    /// reason, which holds ages). A saved plan's changes are matched to the computed plan's by it.
    pub fn decision(&self) -> (Action, &str, &str, Option<&str>, Option<&str>, String) {
        (
            self.action,
            &self.provider,
            &self.user,
            self.slot.as_deref(),
            self.key_id.as_deref(),
            self.after
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        )
    }

    /// One line naming the change, as reports name changes.
    pub fn describe(&self) -> String {
        super::describe_change(
            self.action,
            &self.provider,
            &self.user,
            self.slot.as_deref(),
            self.key_id.as_deref(),
        )
    }
}

fn key_after(slot: &super::SlotTarget) -> Value {
    json!({"kind": slot.spec.kind, "sinks": slot.spec.sinks})
}

impl ChangeView {
    /// The document's view of `c` in a plan made at `now`.
    pub fn of(c: &Change, now: Timestamp) -> ChangeView {
        let (before, after) = match &c.op {
            Op::CreateUser { active, .. } => {
                (None, Some(json!({"name": c.user, "active": active})))
            }
            Op::UpdateUser {
                was_active, active, ..
            } => (
                Some(json!({"active": was_active})),
                Some(json!({"active": active})),
            ),
            Op::DeleteUser {
                user_id,
                was_active,
                ..
            } => (Some(json!({"id": user_id, "active": was_active})), None),
            Op::UpdateKey {
                key, before, after, ..
            } => {
                let mut b = json!(before);
                b["key_id"] = json!(key.id);
                (Some(b), Some(json!(after)))
            }
            Op::CreateKey { slot, .. } => (None, Some(key_after(slot))),
            Op::RotateKey {
                slot, from, forced, ..
            } => {
                let mut after = key_after(slot);
                if *forced {
                    after["forced"] = json!(true);
                }
                (
                    Some(json!({"key_id": from.id, "created_at": from.created_at})),
                    Some(after),
                )
            }
            Op::RevokeKey { key, slot, .. } => (
                Some(if slot.is_some() {
                    json!({"key_id": key.id, "created_at": key.created_at})
                } else {
                    json!({"key_id": key.id, "kind": key.kind, "created_at": key.created_at})
                }),
                None,
            ),
        };
        ChangeView {
            action: c.action(),
            provider: c.provider.clone(),
            user: c.user.clone(),
            slot: c.slot().map(str::to_string),
            key_id: c.key_id().map(str::to_string),
            reason: c.reason(now),
            before,
            after,
        }
    }
}

impl From<&Plan> for PlanDocument {
    fn from(plan: &Plan) -> Self {
        PlanDocument {
            format_version: FORMAT_VERSION.to_string(),
            changes: plan
                .changes
                .iter()
                .map(|c| ChangeView::of(c, plan.planned_at))
                .collect(),
            warnings: plan.warnings.clone(),
            summary: plan.summary(),
            observed: plan.observed.clone(),
            planned_at: plan.planned_at,
            upcoming: plan.upcoming.clone(),
            errors: plan.errors.clone(),
        }
    }
}

/// The JSON form: exactly one document, pretty-printed, with a final newline.
pub fn json(plan: &Plan) -> String {
    let mut s = serde_json::to_string_pretty(&PlanDocument::from(plan))
        .unwrap_or_else(|_| "{}".to_string());
    s.push('\n');
    s
}

/// Reads a saved plan document.
pub fn parse(bytes: &[u8]) -> serde_json::Result<PlanDocument> {
    serde_json::from_slice(bytes)
}
