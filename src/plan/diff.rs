//! The planner: a pure function of the desired config, the observed remote accounts, keyward's
//! state and `now`. It reads no clock and does no I/O, so it is where the product's decisions
//! are pinned by unit and property tests.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde_json::json;

use super::{Action, Change, Plan, Upcoming, Warning, observed_digest};
use crate::config::{Config, PruneKeys, PruneUsers, SlotSpec, UserSpec};
use crate::model::{AccountSnapshot, KeyTag, Observed, ProviderType, RemoteKey, RemoteUser};
use crate::rotation::{self, Due, KeyFacts};
use crate::state::State;

/// What to limit or force in a plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Restrict the plan to these users (`NAME` or `PROVIDER:NAME`); empty = everything.
    pub only: Vec<String>,
    /// Slots to rotate now whatever their age: (provider, user, slot or every slot).
    pub force: Vec<(String, String, Option<String>)>,
}

impl PlanOptions {
    fn selects(&self, provider: &str, user: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|o| match o.split_once(':') {
                Some((p, u)) => p == provider && u == user,
                None => o == user,
            })
    }

    fn forced(&self, provider: &str, user: &str, slot: &str) -> bool {
        self.force
            .iter()
            .any(|(p, u, s)| p == provider && u == user && s.as_deref().is_none_or(|s| s == slot))
    }
}

/// Abbreviates a key id for people: `ak_2abc…ghij`. The tail is kept because ids are
/// time-ordered, so keys minted close together share their first characters.
pub fn short_id(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 14 {
        return id.to_string();
    }
    let head: String = chars[..7].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Where each remote key on a managed user belongs.
#[derive(Debug, Default)]
struct KeySort<'a> {
    /// Slot → recorded current key present remotely.
    current: BTreeMap<String, &'a RemoteKey>,
    /// Slot → recorded retiring keys present remotely, with their revoke time.
    retiring: BTreeMap<String, Vec<(&'a RemoteKey, Option<Timestamp>)>>,
    /// Keys keyward tagged but never recorded as delivered, by the slot in their tag.
    orphans: Vec<(String, &'a RemoteKey)>,
    /// Keys keyward did not create.
    unknown: Vec<&'a RemoteKey>,
}

fn sort_keys<'a>(
    provider: &str,
    user: &'a RemoteUser,
    snapshot: &'a AccountSnapshot,
    state: &State,
) -> KeySort<'a> {
    let record = state.user(provider, &user.name).filter(|r| r.id == user.id);
    let mut sorted = KeySort::default();
    for key in snapshot.keys_of(&user.id) {
        let mut placed = false;
        if let Some(rec) = record {
            for (slot, srec) in &rec.slots {
                if srec.current.as_ref().is_some_and(|c| c.id == key.id) {
                    sorted.current.insert(slot.clone(), key);
                    placed = true;
                } else if let Some(r) = srec.retiring.iter().find(|r| r.id == key.id) {
                    sorted
                        .retiring
                        .entry(slot.clone())
                        .or_default()
                        .push((key, r.retire_after));
                    placed = true;
                } else if srec.orphans.contains(&key.id) {
                    sorted.orphans.push((slot.clone(), key));
                    placed = true;
                }
            }
        }
        if placed {
            continue;
        }
        match KeyTag::parse(&key.metadata) {
            Some(tag) => sorted.orphans.push((tag.slot, key)),
            None => sorted.unknown.push(key),
        }
    }
    sorted
}

/// Builds the plan. Pure: same inputs, same plan.
pub fn plan(
    config: &Config,
    observed: &Observed,
    state: &State,
    now: Timestamp,
    opts: &PlanOptions,
) -> Plan {
    let mut changes = Vec::new();
    let mut warnings = Vec::new();
    let mut upcoming = Vec::new();

    for spec in &config.users {
        if !opts.selects(&spec.provider, &spec.name) {
            continue;
        }
        // An account that was not observed (unreachable this run) gets no decisions at all.
        let Some(snapshot) = observed.get(&spec.provider) else {
            continue;
        };
        match snapshot.user_by_name(&spec.name) {
            None => plan_new_user(spec, state, &mut changes),
            Some(remote) => plan_existing_user(
                config,
                spec,
                remote,
                snapshot,
                state,
                now,
                opts,
                &mut changes,
                &mut warnings,
                &mut upcoming,
            ),
        }
    }

    plan_undeclared_users(config, observed, state, opts, &mut changes, &mut warnings);

    // The file's order first (people read the plan next to the file), then undeclared users.
    let order: std::collections::HashMap<(&str, &str), usize> = config
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| ((u.provider.as_str(), u.name.as_str()), i))
        .collect();
    let rank =
        |provider: &str, user: &str| order.get(&(provider, user)).copied().unwrap_or(usize::MAX);
    changes.sort_by(|a, b| {
        (
            rank(&a.provider, &a.user),
            &a.provider,
            &a.user,
            a.action,
            &a.slot,
            &a.key_id,
        )
            .cmp(&(
                rank(&b.provider, &b.user),
                &b.provider,
                &b.user,
                b.action,
                &b.slot,
                &b.key_id,
            ))
    });
    let wrank = |w: &Warning| {
        rank(
            w.provider.as_deref().unwrap_or(""),
            w.user.as_deref().unwrap_or(""),
        )
    };
    warnings.sort_by(|a, b| {
        (wrank(a), &a.provider, &a.user, &a.key_id, &a.kind).cmp(&(
            wrank(b),
            &b.provider,
            &b.user,
            &b.key_id,
            &b.kind,
        ))
    });
    upcoming.sort_by(|a, b| {
        (a.at, &a.provider, &a.user, &a.slot).cmp(&(b.at, &b.provider, &b.user, &b.slot))
    });
    let mut plan = Plan::new(changes, warnings, observed_digest(config, observed, state));
    plan.planned_at = now;
    plan.upcoming = upcoming;
    plan
}

fn change(action: Action, spec_provider: &str, user: &str) -> Change {
    Change {
        action,
        provider: spec_provider.to_string(),
        user: user.to_string(),
        slot: None,
        key_id: None,
        reason: String::new(),
        before: None,
        after: None,
    }
}

fn key_after(slot: &SlotSpec) -> serde_json::Value {
    json!({"kind": slot.kind, "sinks": slot.sinks})
}

fn plan_new_user(spec: &UserSpec, state: &State, changes: &mut Vec<Change>) {
    let gone = state.user(&spec.provider, &spec.name).is_some();
    changes.push(Change {
        reason: if gone {
            "recorded by keyward but no longer exists at the provider".to_string()
        } else {
            String::new()
        },
        after: Some(json!({"name": spec.name, "active": spec.active})),
        ..change(Action::CreateUser, &spec.provider, &spec.name)
    });
    for slot in spec.slots.values() {
        changes.push(Change {
            slot: Some(slot.name.clone()),
            reason: "new slot".to_string(),
            after: Some(key_after(slot)),
            ..change(Action::CreateKey, &spec.provider, &spec.name)
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_existing_user(
    config: &Config,
    spec: &UserSpec,
    remote: &RemoteUser,
    snapshot: &AccountSnapshot,
    state: &State,
    now: Timestamp,
    opts: &PlanOptions,
    changes: &mut Vec<Change>,
    warnings: &mut Vec<Warning>,
    upcoming: &mut Vec<Upcoming>,
) {
    let provider = spec.provider.as_str();
    let first_change = changes.len();
    if let Some(key_id) = own_key(config, provider, remote, snapshot) {
        warnings.push(Warning {
            kind: "own_credential".to_string(),
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key_id.to_string()),
            message: format!(
                "keyward authenticates as this service user (key {key_id}); changing it or rotating its keys would lock keyward out, so it is left alone"
            ),
        });
        return;
    }
    if remote.active != spec.active {
        changes.push(Change {
            reason: format!("active: {} -> {}", remote.active, spec.active),
            before: Some(json!({"active": remote.active})),
            after: Some(json!({"active": spec.active})),
            ..change(Action::UpdateUser, provider, &spec.name)
        });
    }
    let sorted = sort_keys(provider, remote, snapshot, state);
    let recorded = state
        .user(provider, &spec.name)
        .filter(|r| r.id == remote.id);

    for slot in spec.slots.values() {
        let current = sorted.current.get(&slot.name).copied();
        match current {
            None => {
                let lost = recorded
                    .and_then(|r| r.slots.get(&slot.name))
                    .and_then(|s| s.current.as_ref());
                changes.push(Change {
                    slot: Some(slot.name.clone()),
                    reason: match lost {
                        Some(k) => format!(
                            "current key {} no longer exists at the provider",
                            short_id(&k.id)
                        ),
                        None => "no current key".to_string(),
                    },
                    after: Some(key_after(slot)),
                    ..change(Action::CreateKey, provider, &spec.name)
                });
            }
            Some(key) => match rotation_due(provider, &spec.name, slot, key, now, opts) {
                Ok(reason) => changes.push(Change {
                    slot: Some(slot.name.clone()),
                    key_id: Some(key.id.clone()),
                    reason,
                    before: Some(json!({"key_id": key.id, "created_at": key.created_at})),
                    after: Some({
                        // Recorded in the journal: a forced rotation cut short runs again.
                        let mut after = key_after(slot);
                        if opts.forced(provider, &spec.name, &slot.name) {
                            after["forced"] = json!(true);
                        }
                        after
                    }),
                    ..change(Action::RotateKey, provider, &spec.name)
                }),
                Err(Some(due)) => upcoming.push(Upcoming {
                    action: Action::RotateKey,
                    provider: provider.to_string(),
                    user: spec.name.clone(),
                    slot: Some(slot.name.clone()),
                    key_id: Some(key.id.clone()),
                    at: due.at,
                    reason: due.describe(Some(key.created_at), due.at),
                }),
                Err(None) => {}
            },
        }
        for (key, retire_after) in sorted.retiring.get(&slot.name).into_iter().flatten() {
            if let Some(t) = retire_after.filter(|t| *t > now) {
                upcoming.push(Upcoming {
                    action: Action::RevokeKey,
                    provider: provider.to_string(),
                    user: spec.name.clone(),
                    slot: Some(slot.name.clone()),
                    key_id: Some(key.id.clone()),
                    at: t,
                    reason: "overlap ends".to_string(),
                });
            } else {
                changes.push(Change {
                    slot: Some(slot.name.clone()),
                    key_id: Some(key.id.clone()),
                    reason: match retire_after {
                        Some(t) => format!("retired {}, overlap ended", t.strftime("%Y-%m-%d")),
                        None => "retired, overlap ended".to_string(),
                    },
                    before: Some(json!({"key_id": key.id, "created_at": key.created_at})),
                    ..change(Action::RevokeKey, provider, &spec.name)
                });
            }
        }
    }

    // Keys keyward owns on slots that left the file: the slot is gone, so are its keys.
    let declared: BTreeSet<&str> = spec.slots.keys().map(String::as_str).collect();
    let current = sorted.current.iter().map(|(slot, key)| (slot, *key));
    let retiring = sorted
        .retiring
        .iter()
        .flat_map(|(slot, keys)| keys.iter().map(move |(key, _)| (slot, *key)));
    for (slot, key) in current.chain(retiring) {
        if !declared.contains(slot.as_str()) {
            changes.push(revoke(
                provider,
                &spec.name,
                slot,
                key,
                format!("slot {slot} is no longer declared"),
            ));
        }
    }
    for (slot, key) in &sorted.orphans {
        changes.push(revoke(
            provider,
            &spec.name,
            slot,
            key,
            "created by keyward but never recorded as delivered (interrupted run)".to_string(),
        ));
    }
    for key in &sorted.unknown {
        let revoke_it = config.prune.unknown_keys == PruneKeys::Revoke;
        warnings.push(Warning {
            kind: "unknown_key".to_string(),
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key.id.clone()),
            message: format!(
                "{} {} was not created by keyward (prune.unknown_keys: {})",
                key.kind,
                key.id,
                if revoke_it { "revoke" } else { "report" }
            ),
        });
        if revoke_it {
            changes.push(Change {
                key_id: Some(key.id.clone()),
                reason: "not created by keyward (prune.unknown_keys: revoke)".to_string(),
                before: Some(
                    json!({"key_id": key.id, "kind": key.kind, "created_at": key.created_at}),
                ),
                ..change(Action::RevokeKey, provider, &spec.name)
            });
        }
    }
    keep_one_key(
        provider,
        &spec.name,
        remote,
        snapshot,
        &sorted.orphans,
        (changes, first_change),
        warnings,
    );
}

/// keyward never revokes every key of a user at once (product contract §3): when this plan
/// would leave the user with no key that anyone may hold, and gives it no new one, the newest
/// key it would revoke stays, with a warning. Keys created but never delivered (orphans) do not
/// count: nobody holds them.
fn keep_one_key(
    provider: &str,
    user: &str,
    remote: &RemoteUser,
    snapshot: &AccountSnapshot,
    orphans: &[(String, &RemoteKey)],
    (all, first): (&mut Vec<Change>, usize),
    warnings: &mut Vec<Warning>,
) {
    let changes = &all[first..];
    let adds_a_key = changes
        .iter()
        .any(|c| matches!(c.action, Action::CreateKey | Action::RotateKey));
    if adds_a_key {
        return;
    }
    let orphan_ids: BTreeSet<&str> = orphans.iter().map(|(_, k)| k.id.as_str()).collect();
    let revoked: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.action == Action::RevokeKey)
        .filter_map(|c| c.key_id.as_deref())
        .collect();
    let held: Vec<&RemoteKey> = snapshot
        .keys_of(&remote.id)
        .filter(|k| !orphan_ids.contains(k.id.as_str()))
        .collect();
    if held.is_empty() || !held.iter().all(|k| revoked.contains(k.id.as_str())) {
        return;
    }
    let Some(keep) = held.iter().max_by_key(|k| (k.created_at, k.id.as_str())) else {
        return;
    };
    let kept = keep.id.clone();
    // This user's changes are the tail of the list: dropping one shifts only those.
    if let Some(i) = changes
        .iter()
        .position(|c| c.action == Action::RevokeKey && c.key_id.as_deref() == Some(kept.as_str()))
    {
        all.remove(first + i);
    }
    warnings.push(Warning {
        kind: "last_key_kept".to_string(),
        provider: Some(provider.to_string()),
        user: Some(user.to_string()),
        key_id: Some(keep.id.clone()),
        message: format!(
            "{} is the last key of this user: keyward never revokes every key of a user at once, so it stays until the user has another",
            keep.id
        ),
    });
}

/// The id of the key keyward itself authenticates with, if it belongs to `user` (Okta ASA: a
/// service user's API key). Rotating, disabling or deleting that user would cut keyward off.
fn own_key<'a>(
    config: &'a Config,
    provider: &str,
    user: &RemoteUser,
    snapshot: &AccountSnapshot,
) -> Option<&'a str> {
    let crate::config::ProviderAuth::OktaAsa { key_id, .. } = &config.providers.get(provider)?.auth
    else {
        return None;
    };
    snapshot
        .keys_of(&user.id)
        .any(|k| k.id == *key_id)
        .then_some(key_id.as_str())
}

fn revoke(provider: &str, user: &str, slot: &str, key: &RemoteKey, reason: String) -> Change {
    Change {
        slot: Some(slot.to_string()),
        key_id: Some(key.id.clone()),
        reason,
        before: Some(json!({"key_id": key.id, "created_at": key.created_at})),
        ..change(Action::RevokeKey, provider, user)
    }
}

/// Whether the current key of a slot must be rotated now (`Ok(reason)`), or when it will be
/// (`Err(Some(due))`), or never (`Err(None)`).
fn rotation_due(
    provider: &str,
    user: &str,
    slot: &SlotSpec,
    key: &RemoteKey,
    now: Timestamp,
    opts: &PlanOptions,
) -> Result<String, Option<Due>> {
    if opts.forced(provider, user, &slot.name) {
        return Ok(format!("{} rotation forced", short_id(&key.id)));
    }
    let facts = KeyFacts {
        kind: key.kind,
        created_at: key.created_at,
        expires_at: key.expires_at,
    };
    match rotation::next_due(slot, Some(facts)) {
        Some(due) if due.at <= now => Ok(format!(
            "{} {}",
            short_id(&key.id),
            due.describe(Some(key.created_at), now)
        )),
        other => Err(other),
    }
}

fn plan_undeclared_users(
    config: &Config,
    observed: &Observed,
    state: &State,
    opts: &PlanOptions,
    changes: &mut Vec<Change>,
    warnings: &mut Vec<Warning>,
) {
    // --only narrows a run to named users: nothing outside them is pruned or reported.
    if !opts.only.is_empty() {
        return;
    }
    for (provider, snapshot) in observed {
        let Some(account) = config.providers.get(provider) else {
            continue;
        };
        for remote in &snapshot.users {
            if remote.deleted
                || config
                    .users
                    .iter()
                    .any(|u| u.provider == *provider && u.name == remote.name)
            {
                continue;
            }
            if own_key(config, provider, remote, snapshot).is_some() {
                continue;
            }
            let created_by_us = state
                .user(provider, &remote.name)
                .is_some_and(|r| r.id == remote.id && r.created_by_keyward);
            if !created_by_us {
                warnings.push(Warning {
                    kind: "unmanaged_user".to_string(),
                    provider: Some(provider.clone()),
                    user: Some(remote.name.clone()),
                    key_id: None,
                    message: "service user not in the file; keyward never changes it".to_string(),
                });
                continue;
            }
            match config.prune.users {
                PruneUsers::Keep => warnings.push(Warning {
                    kind: "pruned_user_kept".to_string(),
                    provider: Some(provider.clone()),
                    user: Some(remote.name.clone()),
                    key_id: None,
                    message: "created by keyward and no longer in the file; kept (prune.users: keep)".to_string(),
                }),
                PruneUsers::Disable => {
                    if remote.active {
                        changes.push(Change {
                            reason: "no longer in the file (prune.users: disable)".to_string(),
                            before: Some(json!({"active": true})),
                            after: Some(json!({"active": false})),
                            ..change(Action::UpdateUser, provider, &remote.name)
                        });
                    }
                }
                PruneUsers::Delete => changes.push(Change {
                    reason: match account.kind {
                        ProviderType::OktaAsa => {
                            "no longer in the file (prune.users: delete); irreversible: ASA keeps the name reserved".to_string()
                        }
                        ProviderType::Ngrok => {
                            "no longer in the file (prune.users: delete); revokes every key it owns".to_string()
                        }
                    },
                    before: Some(json!({"id": remote.id, "active": remote.active})),
                    ..change(Action::DeleteUser, provider, &remote.name)
                }),
            }
        }
    }
}
