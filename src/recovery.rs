//! Crash recovery and lost state: what to make of the operations an interrupted run left
//! unfinished in the journal, and of keys this installation tagged that no state records.
//! Pure — it takes the unfinished operations, the config, the observed accounts, the state,
//! what the sinks were found to hold (probed beforehand by the engine) and `now`, and changes
//! only the state it is given:
//! - a key whose secret reached the sinks is adopted as the slot's current key;
//! - a key the journal shows created but never delivered becomes an orphan (revoked by the
//!   next plan: nobody holds it); a forced rotation cut short is handed back to run again;
//! - a key tagged by this installation that neither the state nor the journal accounts for
//!   (the state was lost, or another installation with the same owner made it) is never an
//!   orphan: it is adopted when every sink of its slot holds it, and otherwise retires for the
//!   slot's overlap — the slot rotating first when it has no current key (product contract
//!   §10.2).

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
    /// What became of keys no state recorded, for the plan to explain (`adopted_key`,
    /// `untracked_key`).
    pub explained: Vec<crate::plan::Warning>,
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
    now: Timestamp,
) -> Recovery {
    let index: std::collections::HashMap<&str, crate::model::AccountIndex> = observed
        .iter()
        .map(|(p, snap)| (p.as_str(), snap.index()))
        .collect();
    recover_indexed(unfinished, config, &index, probes, state, now, None)
}

/// [`recover`] with the observed accounts already indexed, and the [`untracked`] keys the
/// caller found in `state` before recovery, if it looked (the engine does, to probe their
/// sinks). Those are reused when `unfinished` is empty: then recovery only forgets keys the
/// provider no longer has before settling them, which changes no listed key's class.
pub fn recover_indexed<'a>(
    unfinished: &[Unfinished],
    config: &'a Config,
    index: &std::collections::HashMap<&str, crate::model::AccountIndex<'a>>,
    probes: &SinkProbes,
    state: &mut State,
    now: Timestamp,
    found: Option<&[Untracked<'a>]>,
) -> Recovery {
    let mut r = Recovery::default();
    for (provider, account) in state.accounts.iter_mut() {
        let Some(listing) = index.get(provider.as_str()) else {
            continue;
        };
        for (name, rec) in account.users.iter_mut() {
            // Only retiring, orphaned and pending keys can be dropped: most users have none.
            let droppable = rec.slots.values().any(|s| {
                !(s.retiring().is_empty() && s.orphans().is_empty() && s.pending().is_empty())
            });
            if !droppable
                || listing
                    .users
                    .get(name.as_str())
                    .is_none_or(|u| u.id != rec.id)
            {
                continue;
            }
            let owned = listing.keys_of(&rec.id);
            let remote: std::collections::HashSet<&str> =
                owned.iter().map(|k| k.id.as_str()).collect();
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
    // Declared slots by (provider, user), once: an interrupted fleet apply may leave thousands
    // of operations (and none, nothing to index).
    let specs = if unfinished.is_empty() {
        std::collections::HashMap::new()
    } else {
        config.users_by_name()
    };
    let slot_spec = |op: &Unfinished, slot: &str| {
        specs
            .get(&(op.provider.as_str(), op.user.as_str()))
            .and_then(|u| u.slots.get(slot))
    };
    for op in unfinished {
        let Some(listing) = index.get(op.provider.as_str()) else {
            continue;
        };
        let remote = listing.users.get(op.user.as_str()).copied();
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
                    // Created without our knowing the id, or not created at all: the key it may
                    // have made (tagged for the slot at ngrok; at ASA, untagged and new) is
                    // looked for here and revoked, since nobody holds it; the rotation is
                    // planned again either way.
                    if let Some(u) = remote
                        && op.created.is_none()
                    {
                        let owned = listing.keys_of(&u.id);
                        for key_id in lost_keys(op, u, owned, state, &config.settings.owner) {
                            mark_orphan(state, op, u, &slot, &key_id);
                            r.changed = true;
                            r.notes.push(format!(
                                "{} / {}: key {key_id} was created for slot {slot} by an interrupted run whose answer was lost; it will be revoked",
                                op.provider, op.user
                            ));
                        }
                    }
                    redo_if_forced(&mut r, op);
                    continue;
                };
                let owned = listing.keys_of(&u.id);
                let exists = owned.iter().any(|k| k.id == *key_id);
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
                        slot_spec(op, &slot).map(|s| s.overlap),
                        owned,
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
                } else if let Some(sinks) = slot_spec(op, &slot)
                    .filter(|_| {
                        probes.contains(&(
                            op.provider.clone(),
                            op.user.clone(),
                            slot.clone(),
                            key_id.clone(),
                        ))
                    })
                    .map(|s| s.sinks.clone())
                {
                    // Killed between writing the sinks and journaling it: the sinks say they
                    // have it, so it is what the consumers have now.
                    adopt(
                        slot_spec(op, &slot).map(|s| s.overlap),
                        owned,
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
                } else if op.delivering {
                    // Delivery began and was cut short: some sink may hold it (a file written
                    // before the kill, an exec program still running), so it is not revoked at
                    // once. It is kept until a later key reaches every sink of the slot (the
                    // plan rotates the slot now), then retires for the overlap.
                    state
                        .slot_entry(&op.provider, u, &slot)
                        .add_pending(KeyRecord {
                            id: key_id.clone(),
                            kind: *kind,
                            created_at: *created_at,
                            delivered_at: op.started_at,
                            sinks: Vec::new(),
                            retire_after: None,
                            delivery: crate::state::Delivery::Delivered,
                        });
                    r.changed = true;
                    r.notes.push(format!(
                        "{} / {}: key {key_id} for slot {slot} was being delivered when a run was interrupted; some sink may hold it, so it is kept until a new key reaches every sink, then retires for the overlap",
                        op.provider, op.user
                    ));
                    redo_if_forced(&mut r, op);
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
            Action::UpdateUser | Action::UpdateKey | Action::DeleteUser | Action::RevokeKey => {
                // Idempotent: the planner sees what the provider holds and finishes the job.
            }
        }
    }
    let found = match found {
        Some(found) if unfinished.is_empty() => found,
        _ => &untracked(config, index, state),
    };
    settle_untracked(found, index, probes, state, now, &mut r);
    retire_left_slots(config, index, state, now, &mut r);
    r
}

/// A declared user's slot that left the file keeps its keys for `defaults.overlap` from now
/// (its consumers may still hold them), then the plan revokes them: its current and pending
/// keys move into retiring.
fn retire_left_slots(
    config: &Config,
    index: &std::collections::HashMap<&str, crate::model::AccountIndex>,
    state: &mut State,
    now: Timestamp,
    r: &mut Recovery,
) {
    let until = crate::rotation::revoke_after(now, config.default_overlap);
    for spec in &config.users {
        // Most users have no slot that left the file: the listing is looked at for those only.
        let Some(rec) = state
            .user_mut(&spec.provider, &spec.name)
            .filter(|rec| rec.slots.keys().any(|s| !spec.slots.contains_key(s)))
        else {
            continue;
        };
        let Some(user) = index
            .get(spec.provider.as_str())
            .and_then(|l| l.users.get(spec.name.as_str()))
        else {
            continue;
        };
        if rec.id != user.id {
            continue;
        }
        for (slot, srec) in rec.slots.iter_mut() {
            if spec.slots.contains_key(slot) {
                continue;
            }
            for key_id in srec.retire_all(until) {
                r.changed = true;
                let message = format!(
                    "key {key_id} of slot {slot}: the slot is no longer declared; it stays valid for the overlap (until {}) and is revoked then",
                    until.strftime("%Y-%m-%d %H:%M UTC")
                );
                r.notes
                    .push(format!("{} / {}: {message}", spec.provider, spec.name));
                r.explained.push(crate::plan::Warning {
                    kind: crate::plan::WarningKind::RetiringKey,
                    provider: Some(spec.provider.clone()),
                    user: Some(spec.name.clone()),
                    key_id: Some(key_id.clone()),
                    detail: format!(
                        "slot {slot} left the file; revoked when the overlap ends ({})",
                        until.strftime("%Y-%m-%d %H:%M UTC")
                    ),
                    message,
                });
            }
        }
    }
}

/// The keys an unfinished create/rotate made when the process died between the provider's
/// `POST` and the journal's `created` line (or the answer was lost), if they can be told apart:
/// on the same user, recorded nowhere in the state, created no earlier than the intent
/// (compared to the whole second: providers report whole seconds), and either tagged by this
/// installation for the operation's slot (every such key: a retried `POST` may have made more
/// than one) or untagged (ASA keys carry no tag: one `POST` mints at most one key, so only the
/// earliest is claimed; a key someone made by hand on a managed user in the seconds after an
/// interrupted run is the price of not leaving ASA keys behind unrevoked).
fn lost_keys(
    op: &Unfinished,
    user: &RemoteUser,
    owned: &[&crate::model::RemoteKey],
    state: &State,
    owner: &str,
) -> Vec<String> {
    use crate::keys::KeyClass;
    if op.user_id.as_deref().is_some_and(|id| id != user.id) {
        return Vec::new();
    }
    let since = Timestamp::from_second(op.started_at.as_second()).unwrap_or(op.started_at);
    let record = state
        .user(&op.provider, &op.user)
        .filter(|rec| rec.id == user.id);
    let fresh: Vec<(&crate::model::RemoteKey, KeyClass)> = owned
        .iter()
        .copied()
        .filter(|k| k.created_at >= since)
        .map(|k| (k, crate::keys::class_of(record, k, owner)))
        .collect();
    let mut out: Vec<String> = fresh
        .iter()
        .filter(|(_, c)| matches!(c, KeyClass::Untracked { slot } if op.slot.as_deref() == Some(slot.as_str())))
        .map(|(k, _)| k.id.clone())
        .collect();
    out.extend(
        fresh
            .iter()
            .filter(|(_, c)| *c == KeyClass::Unknown)
            .map(|(k, _)| *k)
            .min_by_key(|k| (k.created_at, k.id.clone()))
            .map(|k| k.id.clone()),
    );
    out
}

/// A key on a declared slot that no state records and whose sinks may hold it: tagged by this
/// installation for the slot, or (Okta ASA, whose keys carry no tag) any unknown key of a user
/// whose one slot has no current key.
#[derive(Debug, Clone)]
pub struct Untracked<'a> {
    /// The provider account's name in the config.
    pub provider: &'a str,
    /// The declared user's name.
    pub user: &'a str,
    /// The declared slot.
    pub slot: &'a str,
    /// The declared slot's spec (its sinks and overlap).
    pub spec: &'a crate::config::SlotSpec,
    /// The key.
    pub key: &'a crate::model::RemoteKey,
    /// Whether it carries this installation's tag (else: an untagged ASA key).
    pub tagged: bool,
}

/// Every [`Untracked`] key of the declared users, by the classification the planner uses; one
/// pass over each account's (indexed) listing.
pub fn untracked<'a>(
    config: &'a Config,
    index: &std::collections::HashMap<&str, crate::model::AccountIndex<'a>>,
    state: &State,
) -> Vec<Untracked<'a>> {
    let mut out = Vec::new();
    for spec in &config.users {
        let Some(listing) = index.get(spec.provider.as_str()) else {
            continue;
        };
        let Some(user) = listing.users.get(spec.name.as_str()) else {
            continue;
        };
        let book = crate::keys::classify(
            &spec.provider,
            user,
            listing.keys_of(&user.id).iter().copied(),
            state,
            &config.settings.owner,
        );
        for (slot, key) in &book.untracked {
            if let Some((name, slot_spec)) = spec.slots.get_key_value(slot) {
                out.push(Untracked {
                    provider: &spec.provider,
                    user: &spec.name,
                    slot: name,
                    spec: slot_spec,
                    key,
                    tagged: true,
                });
            }
        }
        let asa = config
            .providers
            .get(&spec.provider)
            .is_some_and(|a| a.kind == crate::model::ProviderType::OktaAsa);
        if asa
            && let Some((name, slot_spec)) = spec.slots.iter().next()
            && !book.current.contains_key(name)
        {
            for key in &book.unknown {
                out.push(Untracked {
                    provider: &spec.provider,
                    user: &spec.name,
                    slot: name,
                    spec: slot_spec,
                    key,
                    tagged: false,
                });
            }
        }
    }
    out
}

/// Settles the untracked keys of declared slots (see the module comment): adopted when every
/// sink of the slot holds one (the newest such), otherwise retiring for the slot's overlap from
/// `now`; a slot left without a current key makes its newest tagged key current as
/// `unconfirmed`, so the plan rotates it at once and it then retires for the overlap. Untagged
/// ASA keys are only ever adopted: one the sinks do not hold may be anybody's.
fn settle_untracked(
    found: &[Untracked],
    index: &std::collections::HashMap<&str, crate::model::AccountIndex>,
    probes: &SinkProbes,
    state: &mut State,
    now: Timestamp,
    r: &mut Recovery,
) {
    use crate::plan::{Warning, WarningKind};
    use crate::state::Delivery;
    // By slot, in the config's order.
    type SlotAt<'a> = (&'a str, &'a str, &'a str);
    let mut by_slot: Vec<(SlotAt, Vec<&Untracked>)> = Vec::new();
    for u in found {
        let at = (u.provider, u.user, u.slot);
        match by_slot.last_mut() {
            Some((k, v)) if *k == at => v.push(u),
            _ => by_slot.push((at, vec![u])),
        }
    }
    let mut decided = Vec::new();
    for ((provider, user_name, slot), keys) in by_slot {
        let spec = keys[0].spec;
        let Some(listing) = index.get(provider) else {
            continue;
        };
        let Some(user) = listing.users.get(user_name).copied() else {
            continue;
        };
        let remote: BTreeSet<&str> = listing
            .keys_of(&user.id)
            .iter()
            .map(|k| k.id.as_str())
            .collect();
        let retire_after = crate::rotation::revoke_after(now, spec.overlap);
        let held = |k: &crate::model::RemoteKey| {
            probes.contains(&(
                provider.to_string(),
                user_name.to_string(),
                slot.to_string(),
                k.id.clone(),
            ))
        };
        let newest = |pick: &dyn Fn(&Untracked) -> bool| {
            keys.iter()
                .filter(|u| pick(u))
                .max_by_key(|u| (u.key.created_at, u.key.id.as_str()))
                .map(|u| u.key)
        };
        let record = |k: &crate::model::RemoteKey, delivery: Delivery| KeyRecord {
            id: k.id.clone(),
            kind: k.kind,
            created_at: k.created_at,
            delivered_at: now,
            sinks: if delivery == Delivery::Delivered {
                spec.sinks.clone()
            } else {
                Vec::new()
            },
            retire_after: None,
            delivery,
        };
        let has_current = state
            .slot(provider, user_name, slot)
            .and_then(|s| s.current())
            .is_some_and(|c| remote.contains(c.id.as_str()));
        let adopted = newest(&|u| held(u.key));
        let current = adopted.or_else(|| {
            if has_current {
                None
            } else {
                newest(&|u| u.tagged)
            }
        });
        let srec = state.slot_entry(provider, user, slot);
        if let Some(k) = current {
            let delivery = if adopted.is_some() {
                Delivery::Delivered
            } else {
                Delivery::Unconfirmed
            };
            srec.promote(record(k, delivery), retire_after, |id| remote.contains(id));
            let why = if adopted.is_some() {
                "every sink of the slot holds it, so it is adopted as the slot's current key"
            } else {
                "the slot's sinks do not verifiably hold it, so the slot rotates now and it retires for the overlap"
            };
            decided.push((
                if adopted.is_some() {
                    WarningKind::AdoptedKey
                } else {
                    WarningKind::UntrackedKey
                },
                provider,
                user_name,
                slot,
                k,
                why.to_string(),
            ));
        }
        for u in keys.iter().filter(|u| Some(u.key) != current) {
            if !u.tagged {
                // An untagged ASA key the sinks do not hold stays what it is: unknown.
                continue;
            }
            let mut rec = record(u.key, Delivery::Unconfirmed);
            rec.retire_after = Some(retire_after);
            srec.push_retiring(rec);
            decided.push((
                WarningKind::UntrackedKey,
                provider,
                user_name,
                slot,
                u.key,
                format!(
                    "another key is the slot's current one, so it retires for the overlap (until {})",
                    retire_after.strftime("%Y-%m-%d %H:%M UTC")
                ),
            ));
        }
    }
    for (kind, provider, user, slot, key, why) in decided {
        r.changed = true;
        let origin = if key.metadata.is_empty() {
            "no state records it (the state was lost)".to_string()
        } else {
            "it carries this installation's tag but no state records it (the state was lost, or another installation with the same owner made it)".to_string()
        };
        let message = format!("{} {} of slot {slot}: {origin}; {why}", key.kind, key.id);
        r.notes.push(format!("{provider} / {user}: {message}"));
        r.explained.push(Warning {
            kind,
            provider: Some(provider.to_string()),
            user: Some(user.to_string()),
            key_id: Some(key.id.clone()),
            detail: format!("slot {slot}: {why}"),
            message,
        });
    }
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
    overlap: Option<jiff::SignedDuration>,
    owned: &[&crate::model::RemoteKey],
    state: &mut State,
    op: &Unfinished,
    user: &RemoteUser,
    slot: &str,
    key: (&String, KeyKind, Timestamp),
    sinks: Vec<String>,
    delivered_at: Timestamp,
) {
    let overlap = overlap.unwrap_or_default();
    let remote: BTreeSet<&str> = owned.iter().map(|k| k.id.as_str()).collect();
    state.slot_entry(&op.provider, user, slot).promote(
        KeyRecord {
            id: key.0.clone(),
            kind: key.1,
            created_at: key.2,
            delivered_at,
            sinks,
            retire_after: None,
            delivery: crate::state::Delivery::Delivered,
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
        use crate::model::AccountSnapshot;
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let key = |id: &str, at: &str, tagged: bool| test_key(id, at, tagged.then_some("keyward"));
        let user = bot();
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
        let owned: Vec<&crate::model::RemoteKey> = snapshot.keys.iter().collect();
        let mut state = State::default();
        state.record_user("asa", "bot", "u1", true, None);
        state.user_mut("asa", "bot").unwrap().slots.insert(
            "main".into(),
            Box::new(crate::state::SlotRecord::with_current(KeyRecord {
                id: "current".into(),
                kind: KeyKind::ApiKey,
                created_at: ts("2026-11-01T10:00:00Z"),
                delivered_at: ts("2026-11-01T10:00:00Z"),
                sinks: vec!["local".into()],
                retire_after: None,
                delivery: crate::state::Delivery::Delivered,
            })),
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
            delivering: false,
            delivered: None,
        };
        assert_eq!(
            lost_keys(&op, &user, &owned, &state, "keyward"),
            ["tagged", "lost"],
            "every key tagged for the slot, and the earliest untagged, unrecorded key, from the intent's second on"
        );
        // Another owner's tag is not this installation's key: only the untagged one.
        assert_eq!(lost_keys(&op, &user, &owned, &state, "other"), ["lost"]);
        // Claimed once: recorded as orphans, the next candidate is the later key.
        let slot = state
            .user_mut("asa", "bot")
            .unwrap()
            .slots
            .get_mut("main")
            .unwrap();
        slot.add_orphan("lost");
        slot.add_orphan("tagged");
        assert_eq!(lost_keys(&op, &user, &owned, &state, "keyward"), ["later"]);
        // Another user id (the user was re-created since): nothing.
        let other = Unfinished {
            user_id: Some("u0".into()),
            ..op
        };
        assert!(lost_keys(&other, &user, &owned, &state, "keyward").is_empty());
    }

    /// An API key of user `u1` created at `at`, tagged for slot `main` by `owner` (untagged
    /// without one).
    fn test_key(id: &str, at: &str, owner: Option<&str>) -> crate::model::RemoteKey {
        crate::model::RemoteKey {
            id: id.into(),
            kind: KeyKind::ApiKey,
            owner_id: Some("u1".into()),
            description: String::new(),
            metadata: owner
                .map(|o| crate::model::KeyTag::new(o, "main").to_metadata())
                .unwrap_or_default(),
            acl: Vec::new(),
            created_at: at.parse().unwrap(),
            expires_at: None,
        }
    }

    /// The service user `bot`, id `u1`.
    fn bot() -> RemoteUser {
        RemoteUser {
            id: "u1".into(),
            name: "bot".into(),
            active: true,
            deleted: false,
            created_at: None,
        }
    }

    /// A config with one ngrok user `bot`, slot `main` (json file sink, overlap 1h), and
    /// `owner: keyward`.
    fn one_slot_config(dir: &std::path::Path) -> Config {
        let path = dir.join("keyward.yaml");
        std::fs::write(
            &path,
            "version: 1\nsettings:\n  state_dir: state\nproviders:\n  ng:\n    type: ngrok\n    api_key: x\n    base_url: http://127.0.0.1:1\nsinks:\n  local: {type: file, path: \"out/{user}.json\", format: json}\ndefaults:\n  sink: local\n  overlap: 1h\nusers:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
        )
        .unwrap();
        crate::config::load_with_env(&path, &|_| None)
            .map(|l| l.config)
            .expect("config loads")
    }

    #[test]
    fn a_lost_state_adopts_what_the_sinks_hold_and_retires_the_rest_never_orphans() {
        use crate::model::{AccountSnapshot, RemoteKey};
        use crate::state::Delivery;
        let tmp = tempfile::tempdir().unwrap();
        let config = one_slot_config(tmp.path());
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let now = ts("2026-11-30T12:00:00Z");
        let key = test_key;
        let user = bot();
        let observed = |keys: Vec<RemoteKey>| -> Observed {
            [(
                "ng".to_string(),
                AccountSnapshot {
                    users: vec![user.clone()],
                    keys,
                },
            )]
            .into()
        };
        let keys = vec![
            key("old", "2026-11-01T00:00:00Z", Some("keyward")),
            key("new", "2026-11-20T00:00:00Z", Some("keyward")),
            key("theirs", "2026-11-25T00:00:00Z", Some("elsewhere")),
            key("manual", "2026-11-26T00:00:00Z", None),
        ];
        let probe = |id: &str| -> SinkProbes {
            [("ng".into(), "bot".into(), "main".into(), id.to_string())].into()
        };
        let slot_of = |state: &State| state.slot("ng", "bot", "main").cloned().unwrap();

        // The sinks hold `new`: adopted as current; `old` retires for the overlap.
        let mut state = State::default();
        let r = recover(
            &[],
            &config,
            &observed(keys.clone()),
            &probe("new"),
            &mut state,
            now,
        );
        let slot = slot_of(&state);
        assert_eq!(slot.current().map(|c| c.id.as_str()), Some("new"));
        assert_eq!(
            slot.current().map(|c| c.delivery),
            Some(Delivery::Delivered)
        );
        assert_eq!(slot.retiring().len(), 1);
        assert_eq!(slot.retiring()[0].id, "old");
        assert_eq!(
            slot.retiring()[0].retire_after,
            Some(ts("2026-11-30T13:00:00Z"))
        );
        assert!(slot.orphans().is_empty(), "nothing untracked is an orphan");
        assert!(r.changed);
        let kinds: Vec<_> = r
            .explained
            .iter()
            .map(|w| (w.kind, w.key_id.clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    crate::plan::WarningKind::AdoptedKey,
                    Some("new".to_string())
                ),
                (
                    crate::plan::WarningKind::UntrackedKey,
                    Some("old".to_string())
                ),
            ]
        );

        // The sinks hold nothing: the newest becomes the current key, `unconfirmed` (the plan
        // rotates it), the other retires; another owner's key and an untagged key stay out.
        let mut state = State::default();
        recover(
            &[],
            &config,
            &observed(keys.clone()),
            &SinkProbes::new(),
            &mut state,
            now,
        );
        let slot = slot_of(&state);
        assert_eq!(slot.current().map(|c| c.id.as_str()), Some("new"));
        assert_eq!(
            slot.current().map(|c| c.delivery),
            Some(Delivery::Unconfirmed)
        );
        assert_eq!(
            slot.retiring()
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>(),
            ["old"]
        );
        let plan = crate::plan::plan(
            &config,
            &observed(keys.clone()),
            &state,
            now,
            &Default::default(),
        );
        let actions: Vec<_> = plan
            .changes
            .iter()
            .map(|c| (c.action(), c.key_id().map(str::to_string)))
            .collect();
        assert_eq!(
            actions,
            [(Action::RotateKey, Some("new".to_string()))],
            "rotated, nothing revoked: {plan:#?}"
        );

        // The state records a current key the provider has: every untracked key retires.
        let mut state = State::default();
        state.slot_entry("ng", &user, "main");
        let mut with_current = keys.clone();
        with_current.push(key("recorded", "2026-11-27T00:00:00Z", Some("keyward")));
        state.user_mut("ng", "bot").unwrap().slots.insert(
            "main".into(),
            Box::new(crate::state::SlotRecord::with_current(KeyRecord {
                id: "recorded".into(),
                kind: KeyKind::ApiKey,
                created_at: ts("2026-11-27T00:00:00Z"),
                delivered_at: ts("2026-11-27T00:00:00Z"),
                sinks: vec!["local".into()],
                retire_after: None,
                delivery: Delivery::Delivered,
            })),
        );
        recover(
            &[],
            &config,
            &observed(with_current),
            &SinkProbes::new(),
            &mut state,
            now,
        );
        let slot = slot_of(&state);
        assert_eq!(slot.current().map(|c| c.id.as_str()), Some("recorded"));
        let mut retiring: Vec<_> = slot.retiring().iter().map(|k| k.id.as_str()).collect();
        retiring.sort();
        assert_eq!(retiring, ["new", "old"]);
    }
}
