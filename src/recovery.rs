//! Crash recovery: what to make of the operations an interrupted run left unfinished in the
//! journal. Pure — it takes the unfinished operations, the config, the observed accounts, the
//! state and what the sinks were found to hold (probed beforehand by the engine), and changes
//! only the state it is given: a key whose secret reached the sinks is adopted as the slot's
//! current key; a key created but never delivered becomes an orphan (revoked by the next
//! plan); a forced rotation cut short is handed back to run again.

use std::collections::BTreeSet;

use jiff::Timestamp;

use crate::config::Config;
use crate::model::{Action, KeyKind, Observed, RemoteUser};
use crate::oplog::Unfinished;
use crate::plan::ForceTarget;
use crate::state::{KeyRecord, State};

/// Which created keys every sink of their slot verifiably holds (json and env file sinks that
/// name the key id): `(provider, user, slot, key_id)`. Gathered by the caller, which reads the
/// sink files (`engine::probe_sinks`).
pub type SinkProbes = BTreeSet<(String, String, String, String)>;

/// What recovery decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Human-readable lines, for the log.
    pub notes: Vec<String>,
    /// Forced rotations that were cut short and must run again: (provider, user, slot).
    pub force: Vec<crate::plan::ForceTarget>,
    /// Whether the state changed.
    pub changed: bool,
}

/// Folds unfinished operations into the state, using the observed accounts to see what the
/// provider really holds and `probes` for what the sinks hold, and forgets retiring or orphaned
/// keys that are already gone (a revoke whose completion was never recorded). Pure: the caller
/// writes the state and compacts the journal.
pub fn recover(
    unfinished: &[Unfinished],
    config: &Config,
    observed: &Observed,
    probes: &SinkProbes,
    state: &mut State,
) -> Recovery {
    let mut r = Recovery::default();
    for (provider, account) in state.accounts.iter_mut() {
        let Some(snapshot) = observed.get(provider) else {
            continue;
        };
        for (name, rec) in account.users.iter_mut() {
            if snapshot.user_by_name(name).is_none_or(|u| u.id != rec.id) {
                continue;
            }
            let remote: std::collections::HashSet<&str> =
                snapshot.keys_of(&rec.id).map(|k| k.id.as_str()).collect();
            for (slot, srec) in rec.slots.iter_mut() {
                let gone = srec.drop_gone(|id| remote.contains(id));
                if gone > 0 {
                    r.changed = true;
                    r.notes.push(format!(
                        "{provider} / {name}: {gone} revoked key(s) of slot {slot} dropped from the state"
                    ));
                }
            }
        }
    }
    for op in unfinished {
        let Some(snapshot) = observed.get(&op.provider) else {
            continue;
        };
        let remote = snapshot.user_by_name(&op.user);
        match op.action {
            Action::CreateUser => {
                if let Some(u) = remote
                    && state
                        .user(&op.provider, &op.user)
                        .is_none_or(|rec| rec.id != u.id)
                {
                    state.record_user(&op.provider, &op.user, &u.id, true, u.created_at);
                    r.changed = true;
                    r.notes.push(format!(
                        "{} / {}: adopted service user {} created by an interrupted run",
                        op.provider, op.user, u.id
                    ));
                }
            }
            Action::CreateKey | Action::RotateKey => {
                let slot = op.slot.clone().unwrap_or_default();
                let (Some(u), Some((key_id, kind, created_at))) = (remote, &op.created) else {
                    // Created without our knowing the id, or not created at all: a tagged key
                    // (ngrok) is found and revoked by the planner. An untagged one (ASA keys
                    // carry no tag) would stay an `unknown` key for ever, so it is looked for
                    // here; the rotation is planned again either way.
                    if let Some(u) = remote
                        && op.created.is_none()
                        && let Some(key_id) = lost_key(op, u, snapshot, state)
                    {
                        mark_orphan(state, op, u, &slot, &key_id);
                        r.changed = true;
                        r.notes.push(format!(
                            "{} / {}: key {key_id} was created for slot {slot} by an interrupted run whose answer was lost; it will be revoked",
                            op.provider, op.user
                        ));
                    }
                    redo_if_forced(&mut r, op);
                    continue;
                };
                let exists = snapshot.keys_of(&u.id).any(|k| k.id == *key_id);
                let recorded = state
                    .slot(&op.provider, &op.user, &slot)
                    .is_some_and(|s| s.current().is_some_and(|c| c.id == *key_id));
                if recorded {
                    continue;
                }
                if !exists {
                    // Gone already (revoked since): nothing to adopt or revoke.
                    redo_if_forced(&mut r, op);
                    continue;
                }
                if let Some((sinks, delivered_at)) = &op.delivered {
                    // The secret reached every sink: this key is what the consumers have now.
                    adopt(
                        config,
                        observed,
                        state,
                        op,
                        u,
                        &slot,
                        (key_id, *kind, *created_at),
                        sinks.clone(),
                        *delivered_at,
                    );
                    r.changed = true;
                    r.notes.push(format!(
                        "{} / {}: adopted key {key_id} for slot {slot}: an interrupted run delivered it",
                        op.provider, op.user
                    ));
                } else if let Some(sinks) = held_by_every_sink(config, probes, op, &slot, key_id) {
                    // Killed between writing the sinks and journaling it: the sinks say they
                    // have it, so it is what the consumers have now.
                    adopt(
                        config,
                        observed,
                        state,
                        op,
                        u,
                        &slot,
                        (key_id, *kind, *created_at),
                        sinks,
                        op.started_at,
                    );
                    r.changed = true;
                    r.notes.push(format!(
                        "{} / {}: adopted key {key_id} for slot {slot}: an interrupted run delivered it",
                        op.provider, op.user
                    ));
                } else {
                    // Never delivered: nobody has its secret. Revoke it; rotate again.
                    mark_orphan(state, op, u, &slot, key_id);
                    r.changed = true;
                    r.notes.push(format!(
                        "{} / {}: key {key_id} for slot {slot} was created by an interrupted run but never delivered; it will be revoked",
                        op.provider, op.user
                    ));
                    redo_if_forced(&mut r, op);
                }
            }
            Action::UpdateUser | Action::DeleteUser | Action::RevokeKey => {
                // Idempotent: the planner sees what the provider holds and finishes the job.
            }
        }
    }
    r
}

/// The key an unfinished create/rotate made when the process died between the provider's
/// `POST` and the journal's `created` line, if it can be told apart: on the same user, carrying
/// no keyward tag (tagged keys are the planner's), recorded nowhere in the state, and created no
/// earlier than the intent (compared to the whole second: providers report whole seconds). One
/// `POST` mints at most one key, so only the earliest such key is claimed; a key someone made by
/// hand on a managed user in the seconds after an interrupted run is the price of not leaving
/// ASA keys (which carry no tag) behind unrevoked.
fn lost_key(
    op: &Unfinished,
    user: &RemoteUser,
    snapshot: &crate::model::AccountSnapshot,
    state: &State,
) -> Option<String> {
    if op.user_id.as_deref().is_some_and(|id| id != user.id) {
        return None;
    }
    let since = Timestamp::from_second(op.started_at.as_second()).unwrap_or(op.started_at);
    let record = state
        .user(&op.provider, &op.user)
        .filter(|rec| rec.id == user.id);
    // An unknown key by the one classification the planner and `status` use: untagged and
    // recorded nowhere.
    snapshot
        .keys_of(&user.id)
        .filter(|k| k.created_at >= since)
        .filter(|k| crate::keys::class_of(record, k) == crate::keys::KeyClass::Unknown)
        .min_by_key(|k| (k.created_at, k.id.clone()))
        .map(|k| k.id.clone())
}

/// The slot's sinks, if every one of them verifiably holds `key_id` (as probed).
fn held_by_every_sink(
    config: &Config,
    probes: &SinkProbes,
    op: &Unfinished,
    slot: &str,
    key_id: &str,
) -> Option<Vec<String>> {
    let spec = config
        .users
        .iter()
        .find(|s| s.provider == op.provider && s.name == op.user)?
        .slots
        .get(slot)?;
    probes
        .contains(&(
            op.provider.clone(),
            op.user.clone(),
            slot.to_string(),
            key_id.to_string(),
        ))
        .then(|| spec.sinks.clone())
}

/// A forced rotation cut short runs again on the next apply.
fn redo_if_forced(r: &mut Recovery, op: &Unfinished) {
    if op.forced {
        r.force.push(ForceTarget {
            provider: op.provider.clone(),
            user: op.user.clone(),
            slot: op.slot.clone(),
        });
    }
}

/// Records a key keyward created for `slot` that nobody holds, so the planner revokes it.
fn mark_orphan(state: &mut State, op: &Unfinished, user: &RemoteUser, slot: &str, key_id: &str) {
    state
        .slot_entry(&op.provider, user, slot)
        .add_orphan(key_id);
}

/// Records a delivered key as the slot's current one; the previous current key retires for the
/// slot's overlap (unless the provider no longer has it).
#[allow(clippy::too_many_arguments)]
fn adopt(
    config: &Config,
    observed: &Observed,
    state: &mut State,
    op: &Unfinished,
    user: &RemoteUser,
    slot: &str,
    key: (&String, KeyKind, Timestamp),
    sinks: Vec<String>,
    delivered_at: Timestamp,
) {
    let overlap = config
        .users
        .iter()
        .find(|s| s.provider == op.provider && s.name == op.user)
        .and_then(|s| s.slots.get(slot))
        .map(|s| s.overlap)
        .unwrap_or_default();
    let remote: BTreeSet<&str> = observed
        .get(&op.provider)
        .map(|snap| snap.keys_of(&user.id).map(|k| k.id.as_str()).collect())
        .unwrap_or_default();
    state.slot_entry(&op.provider, user, slot).promote(
        KeyRecord {
            id: key.0.clone(),
            kind: key.1,
            created_at: key.2,
            delivered_at,
            sinks,
            retire_after: None,
        },
        crate::rotation::revoke_after(delivered_at, overlap),
        |id| remote.contains(id),
    );
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_whose_creation_was_never_journaled_is_found_by_time_and_absence_of_tag() {
        use crate::model::{AccountSnapshot, KeyTag, RemoteKey, RemoteUser};
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let key = |id: &str, at: &str, tagged: bool| RemoteKey {
            id: id.into(),
            kind: KeyKind::ApiKey,
            owner_id: Some("u1".into()),
            description: String::new(),
            metadata: if tagged {
                KeyTag::new("main").to_metadata()
            } else {
                String::new()
            },
            created_at: ts(at),
            expires_at: None,
        };
        let user = RemoteUser {
            id: "u1".into(),
            name: "bot".into(),
            active: true,
            deleted: false,
            created_at: None,
        };
        let snapshot = AccountSnapshot {
            users: vec![user.clone()],
            keys: vec![
                key("before", "2026-11-01T09:59:59Z", false),
                key("current", "2026-11-01T10:00:00Z", false),
                key("tagged", "2026-11-01T10:00:00Z", true),
                // Whole seconds: created in the intent's second, before its instant.
                key("lost", "2026-11-01T10:00:00Z", false),
                key("later", "2026-11-01T10:00:03Z", false),
            ],
        };
        let mut state = State::default();
        state.record_user("asa", "bot", "u1", true, None);
        state.user_mut("asa", "bot").unwrap().slots.insert(
            "main".into(),
            crate::state::SlotRecord::with_current(KeyRecord {
                id: "current".into(),
                kind: KeyKind::ApiKey,
                created_at: ts("2026-11-01T10:00:00Z"),
                delivered_at: ts("2026-11-01T10:00:00Z"),
                sinks: vec!["local".into()],
                retire_after: None,
            }),
        );
        let op = Unfinished {
            seq: 1,
            started_at: ts("2026-11-01T10:00:00.5Z"),
            action: Action::RotateKey,
            provider: "asa".into(),
            user: "bot".into(),
            user_id: Some("u1".into()),
            slot: Some("main".into()),
            forced: true,
            created: None,
            delivered: None,
        };
        assert_eq!(
            lost_key(&op, &user, &snapshot, &state).as_deref(),
            Some("lost"),
            "the earliest untagged, unrecorded key from the intent's second on"
        );
        // Claimed once: recorded as an orphan, the next candidate is the later key.
        state
            .user_mut("asa", "bot")
            .unwrap()
            .slots
            .get_mut("main")
            .unwrap()
            .add_orphan("lost");
        assert_eq!(
            lost_key(&op, &user, &snapshot, &state).as_deref(),
            Some("later")
        );
        // Another user id (the user was re-created since): nothing.
        let other = Unfinished {
            user_id: Some("u0".into()),
            ..op
        };
        assert_eq!(lost_key(&other, &user, &snapshot, &state), None);
    }
}
