//! The planner: a pure function of the desired config, the observed remote accounts, keyward's
//! state and `now`. It reads no clock and does no I/O, so it is where the product's decisions
//! are pinned by unit and property tests.

use std::collections::BTreeSet;

use jiff::Timestamp;

use super::{
    Action, Change, CreateKeyReason, CreateUserReason, KeyRef, Op, Plan, RevokeReason,
    RotateReason, SlotTarget, Upcoming, UpdateUserReason, Warning, WarningKind,
    observed_digest_indexed,
};
use crate::config::{Config, PruneKeys, PruneUsers, SlotSpec, UserSpec};
use crate::model::{AccountIndex, Observed, RemoteKey, RemoteUser};
use crate::rotation::{self, Due, KeyFacts};
use crate::state::{Delivery, State};

pub use crate::text::short_id;

/// A slot (or every slot of a user) to rotate now, whatever its age: `keyward rotate`, or a
/// forced rotation an interrupted run left for the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForceTarget {
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// `None`: every slot of the user.
    pub slot: Option<String>,
}

/// What to limit or force in a plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Restrict the plan to these users (`NAME` or `PROVIDER:NAME`); empty = everything.
    pub only: Vec<String>,
    /// Slots to rotate now whatever their age.
    pub force: Vec<ForceTarget>,
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
        self.force.iter().any(|f| {
            f.provider == provider && f.user == user && f.slot.as_deref().is_none_or(|s| s == slot)
        })
    }
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

    let mut errors = Vec::new();
    // Names held by deleted users (Okta ASA keeps them reserved forever), per account, once.
    let reserved: std::collections::HashSet<(&str, &str)> = observed
        .iter()
        .flat_map(|(p, snap)| {
            snap.users
                .iter()
                .filter(|u| u.deleted)
                .map(move |u| (p.as_str(), u.name.as_str()))
        })
        .collect();
    // Each account's users by name and keys by owner, indexed once: the planner's cost grows
    // linearly with the account.
    let index: std::collections::HashMap<&str, AccountIndex> = observed
        .iter()
        .map(|(p, snap)| (p.as_str(), snap.index()))
        .collect();
    for spec in &config.users {
        if !opts.selects(&spec.provider, &spec.name) {
            continue;
        }
        // An account that was not observed (unreachable this run) gets no decisions at all.
        let Some(account) = index.get(spec.provider.as_str()) else {
            continue;
        };
        match account.users.get(spec.name.as_str()).copied() {
            None if reserved.contains(&(spec.provider.as_str(), spec.name.as_str())) => {
                errors.push(super::PlanError {
                    provider: spec.provider.clone(),
                    user: spec.name.clone(),
                    message: format!(
                        "the name `{}` is held by a deleted Okta ASA service user, and ASA keeps deleted names reserved forever: a user of that name can never be created. Rename it in the file ({}:{})",
                        spec.name,
                        spec.file.display(),
                        spec.line
                    ),
                });
            }
            None => plan_new_user(config, spec, state, &mut changes),
            Some(remote) => plan_existing_user(
                config,
                spec,
                remote,
                account.keys_of(&remote.id),
                state,
                now,
                opts,
                &mut changes,
                &mut warnings,
                &mut upcoming,
            ),
        }
    }

    plan_undeclared_users(
        config,
        observed,
        &index,
        state,
        opts,
        &mut changes,
        &mut warnings,
    );

    // The file's order first (people read the plan next to the file), then undeclared users.
    // (Only needed when there is something to sort: a no-op plan of a fleet skips it.)
    let mut order: crate::model::FastMap<(&str, &str), usize> = crate::model::FastMap::default();
    if !changes.is_empty() || !warnings.is_empty() {
        order.extend(
            config
                .users
                .iter()
                .enumerate()
                .map(|(i, u)| ((u.provider.as_str(), u.name.as_str()), i)),
        );
    }
    let rank =
        |provider: &str, user: &str| order.get(&(provider, user)).copied().unwrap_or(usize::MAX);
    changes.sort_by(|a, b| {
        (
            rank(&a.provider, &a.user),
            &a.provider,
            &a.user,
            a.action(),
            a.slot(),
            a.key_id(),
        )
            .cmp(&(
                rank(&b.provider, &b.user),
                &b.provider,
                &b.user,
                b.action(),
                b.slot(),
                b.key_id(),
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
    Plan {
        changes,
        warnings,
        observed: observed_digest_indexed(config, observed, &index, state),
        planned_at: now,
        upcoming,
        errors,
    }
}

fn change(provider: &str, user: &str, op: Op) -> Change {
    Change {
        provider: provider.to_string(),
        user: user.to_string(),
        op,
    }
}

/// The slot with its sinks resolved (validation made sure every name is defined).
fn target(config: &Config, slot: &SlotSpec) -> SlotTarget {
    SlotTarget {
        spec: slot.clone(),
        sinks: slot
            .sinks
            .iter()
            .filter_map(|name| config.sinks.get(name).cloned())
            .collect(),
    }
}

fn key_ref(key: &RemoteKey) -> KeyRef {
    KeyRef {
        id: key.id.clone(),
        kind: key.kind,
        created_at: key.created_at,
    }
}

fn plan_new_user(config: &Config, spec: &UserSpec, state: &State, changes: &mut Vec<Change>) {
    let gone = state.user(&spec.provider, &spec.name).is_some();
    changes.push(change(
        &spec.provider,
        &spec.name,
        Op::CreateUser {
            active: spec.active,
            why: if gone {
                CreateUserReason::Vanished
            } else {
                CreateUserReason::New
            },
        },
    ));
    for slot in spec.slots.values() {
        changes.push(change(
            &spec.provider,
            &spec.name,
            Op::CreateKey {
                slot: target(config, slot),
                why: CreateKeyReason::NewSlot,
            },
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_existing_user(
    config: &Config,
    spec: &UserSpec,
    remote: &RemoteUser,
    owned: &[&RemoteKey],
    state: &State,
    now: Timestamp,
    opts: &PlanOptions,
    changes: &mut Vec<Change>,
    warnings: &mut Vec<Warning>,
    upcoming: &mut Vec<Upcoming>,
) {
    let provider = spec.provider.as_str();
    let first_change = changes.len();
    if let Some(key_id) = own_key(config, provider, owned) {
        let message = format!(
            "keyward authenticates as this service user (key {key_id}); changing it or rotating its keys would lock keyward out, so it is left alone"
        );
        warnings.push(Warning {
            kind: WarningKind::OwnCredential,
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key_id.to_string()),
            detail: message.clone(),
            message,
        });
        return;
    }
    if remote.active != spec.active {
        changes.push(change(
            provider,
            &spec.name,
            Op::UpdateUser {
                was_active: remote.active,
                active: spec.active,
                why: UpdateUserReason::Declared,
            },
        ));
    }
    let owner = config.settings.owner.as_str();
    let recorded = state
        .user(provider, &spec.name)
        .filter(|r| r.id == remote.id);
    let sorted = crate::keys::classify_recorded(recorded, owned.iter().copied(), owner);
    let delivery = |slot: &str| {
        recorded
            .and_then(|r| r.slots.get(slot))
            .and_then(|s| s.current())
            .map(|k| k.delivery)
            .unwrap_or_default()
    };

    for slot in spec.slots.values() {
        let current = sorted.current.get(&slot.name).copied();
        let slot_delivery = delivery(&slot.name);
        let rotate = |key: &RemoteKey, forced: bool, why: RotateReason| {
            change(
                provider,
                &spec.name,
                Op::RotateKey {
                    slot: target(config, slot),
                    from: key_ref(key),
                    forced,
                    adopted: slot_delivery == Delivery::Adopted,
                    why,
                },
            )
        };
        match current {
            None => {
                let lost = recorded
                    .and_then(|r| r.slots.get(&slot.name))
                    .and_then(|s| s.current());
                changes.push(change(
                    provider,
                    &spec.name,
                    Op::CreateKey {
                        slot: target(config, slot),
                        why: match lost {
                            Some(k) => CreateKeyReason::CurrentVanished {
                                key_id: k.id.clone(),
                            },
                            None => CreateKeyReason::NoCurrentKey,
                        },
                    },
                ));
            }
            Some(key) if slot_delivery == Delivery::Unconfirmed => changes.push(rotate(
                key,
                opts.forced(provider, &spec.name, &slot.name),
                RotateReason::Unconfirmed,
            )),
            Some(key) => match rotation_due(provider, &spec.name, slot, key, opts) {
                Ok(why) => changes.push(rotate(key, matches!(why, RotateReason::Forced), why)),
                Err(Some(due)) if due.at <= now => {
                    changes.push(rotate(key, false, RotateReason::Due(due)))
                }
                Err(Some(due)) => upcoming.push(Upcoming {
                    action: Action::RotateKey,
                    provider: provider.to_string(),
                    user: spec.name.clone(),
                    slot: Some(slot.name.clone()),
                    key_id: Some(key.id.clone()),
                    at: due.at,
                    reason: if slot_delivery == Delivery::Adopted {
                        format!(
                            "{}; adopted key {}: keyward never held its secret, it retires for the overlap once replaced",
                            due.describe(Some(key.created_at), due.at),
                            key.id
                        )
                    } else {
                        due.describe(Some(key.created_at), due.at)
                    },
                }),
                Err(None) => {}
            },
        }
        let interrupted = sorted.pending.iter().any(|(s, _)| *s == slot.name);
        let mut rotated = changes[first_change..]
            .iter()
            .any(|c| c.action() == Action::RotateKey && c.slot() == Some(slot.name.as_str()));
        if let (Some(key), true, false) = (current, interrupted, rotated) {
            // A delivery was cut short: some sinks may hold the pending key, the others the
            // current one. A new key for every sink ends that; both then retire.
            changes.push(rotate(key, false, RotateReason::Interrupted));
            // The pending key is not yet retiring: no upcoming revoke for it.
            upcoming.retain(|u| {
                !(u.action == Action::RotateKey
                    && u.provider == provider
                    && u.user == spec.name
                    && u.slot.as_deref() == Some(slot.name.as_str()))
            });
            rotated = true;
        }
        if let Some(key) = current.filter(|_| !rotated) {
            let kind = config.providers.get(provider).map(|a| a.kind);
            let (before, after) = drift(kind, slot, key, slot_delivery, owner);
            if !after.is_empty() {
                changes.push(change(
                    provider,
                    &spec.name,
                    Op::UpdateKey {
                        key: key_ref(key),
                        slot: slot.name.clone(),
                        before,
                        after,
                    },
                ));
            }
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
                changes.push(change(
                    provider,
                    &spec.name,
                    Op::RevokeKey {
                        key: key_ref(key),
                        slot: Some(slot.name.clone()),
                        why: RevokeReason::OverlapEnded {
                            retired_until: *retire_after,
                        },
                    },
                ));
            }
        }
    }

    // Keys keyward owns on slots that left the file: the slot is gone, so are its keys, once
    // their overlap has passed (crash recovery moves a left slot's current key into retiring,
    // until the overlap from when it noticed: a consumer may still hold it).
    let declared = |slot: &str| spec.slots.contains_key(slot);
    for (slot, keys) in &sorted.retiring {
        if declared(slot) {
            continue;
        }
        for (key, until) in keys {
            match until.filter(|t| *t > now) {
                Some(t) => upcoming.push(Upcoming {
                    action: Action::RevokeKey,
                    provider: provider.to_string(),
                    user: spec.name.clone(),
                    slot: Some(slot.clone()),
                    key_id: Some(key.id.clone()),
                    at: t,
                    reason: format!("slot {slot} is no longer declared; overlap ends"),
                }),
                None => changes.push(change(
                    provider,
                    &spec.name,
                    Op::RevokeKey {
                        key: key_ref(key),
                        slot: Some(slot.clone()),
                        why: RevokeReason::SlotUndeclared,
                    },
                )),
            }
        }
    }
    for (slot, key) in &sorted.orphans {
        changes.push(change(
            provider,
            &spec.name,
            Op::RevokeKey {
                key: key_ref(key),
                slot: Some(slot.clone()),
                why: RevokeReason::Orphan,
            },
        ));
    }
    for (tag_owner, key) in &sorted.foreign {
        warnings.push(Warning {
            kind: WarningKind::ForeignKey,
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key.id.clone()),
            message: format!(
                "{} {} is tagged by installation `{tag_owner}`, not by this one (`{owner}`): keyward never changes or revokes it, whatever prune.unknown_keys says",
                key.kind, key.id
            ),
            detail: format!("owned by installation `{tag_owner}`; never touched"),
        });
    }
    for (slot, key) in &sorted.untracked {
        let (message, detail) = if declared(slot) {
            (
                format!(
                    "{} {} carries this installation's tag for slot {slot}, but no state records it; apply adopts it if every sink of the slot holds it, and otherwise rotates the slot and lets it retire for the overlap: it is never revoked at once",
                    key.kind, key.id
                ),
                format!(
                    "tagged for slot {slot}, recorded nowhere; adopted or retired for the overlap, never revoked at once"
                ),
            )
        } else {
            (
                format!(
                    "{} {} carries this installation's tag for slot {slot}, which the file no longer declares, and no state records it: it may still be in use, so keyward leaves it; revoke it by hand once nothing uses it",
                    key.kind, key.id
                ),
                format!("tagged for undeclared slot {slot}, recorded nowhere; left alone"),
            )
        };
        warnings.push(Warning {
            kind: WarningKind::UntrackedKey,
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key.id.clone()),
            message,
            detail,
        });
    }
    // While a declared slot has no current key (a new slot, or a state that was lost), an
    // unknown key may be the one its consumers hold: the plan says how to adopt it instead.
    let slot_without_key = spec
        .slots
        .keys()
        .find(|s| !sorted.current.contains_key(s.as_str()));
    for key in &sorted.unknown {
        let revoke_it = config.prune.unknown_keys == PruneKeys::Revoke;
        let mode = if revoke_it { "revoke" } else { "report" };
        let what = match (revoke_it, slot_without_key) {
            (true, None) => "keyward revokes it".to_string(),
            (true, Some(slot)) => format!(
                "keyward revokes it; if it is the key of slot {slot}, which has no current key, `keyward import {}/{slot} {}` adopts it instead",
                spec.name, key.id
            ),
            (false, _) => format!(
                "keyward reports it and never changes or revokes it; `keyward import {}/SLOT {}` adopts it into a declared slot",
                spec.name, key.id
            ),
        };
        warnings.push(Warning {
            kind: WarningKind::UnknownKey,
            provider: Some(provider.to_string()),
            user: Some(spec.name.clone()),
            key_id: Some(key.id.clone()),
            message: format!(
                "{} {} was not created by keyward (prune.unknown_keys: {mode}): it carries no tag of this installation and no state records it; {what}",
                key.kind, key.id,
            ),
            detail: format!("not created by keyward (prune.unknown_keys: {mode})"),
        });
        if revoke_it {
            changes.push(change(
                provider,
                &spec.name,
                Op::RevokeKey {
                    key: key_ref(key),
                    slot: None,
                    why: RevokeReason::Unknown,
                },
            ));
        }
    }
    keep_one_key(
        provider,
        &spec.name,
        owned,
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
    owned: &[&RemoteKey],
    orphans: &[(String, &RemoteKey)],
    (all, first): (&mut Vec<Change>, usize),
    warnings: &mut Vec<Warning>,
) {
    let changes = &all[first..];
    let adds_a_key = changes
        .iter()
        .any(|c| matches!(c.action(), Action::CreateKey | Action::RotateKey));
    // Without a revocation every key stays: nothing to keep.
    let revokes = changes.iter().any(|c| c.action() == Action::RevokeKey);
    if adds_a_key || !revokes {
        return;
    }
    let orphan_ids: BTreeSet<&str> = orphans.iter().map(|(_, k)| k.id.as_str()).collect();
    let revoked: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.action() == Action::RevokeKey)
        .filter_map(|c| c.key_id())
        .collect();
    let held: Vec<&RemoteKey> = owned
        .iter()
        .copied()
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
        .position(|c| c.action() == Action::RevokeKey && c.key_id() == Some(kept.as_str()))
    {
        all.remove(first + i);
    }
    let message = format!(
        "{kept} is the last key of this user: keyward never revokes every key of a user at once, so it stays until the user has another"
    );
    warnings.push(Warning {
        kind: WarningKind::LastKeyKept,
        provider: Some(provider.to_string()),
        user: Some(user.to_string()),
        key_id: Some(kept),
        detail: message.clone(),
        message,
    });
}

/// The id of the key keyward itself authenticates with, if it belongs to `user` (Okta ASA: a
/// service user's API key). Rotating, disabling or deleting that user would cut keyward off.
fn own_key<'a>(config: &'a Config, provider: &str, owned: &[&RemoteKey]) -> Option<&'a str> {
    let crate::config::ProviderAuth::OktaAsa { key_id, .. } = &config.providers.get(provider)?.auth
    else {
        return None;
    };
    owned
        .iter()
        .any(|k| k.id == *key_id)
        .then_some(key_id.as_str())
}

/// The attributes of a slot's current `key` that differ from what the slot declares (ngrok
/// keys): the description when the slot declares one, a credential's ACL (compared as a set:
/// the provider may list rules in another order), and keyward's tag on a key keyward minted (an
/// adopted key keeps whatever metadata it had). Returns (as the provider has them, as
/// declared); both empty when nothing drifted.
fn drift(
    provider_type: Option<crate::model::ProviderType>,
    slot: &SlotSpec,
    key: &RemoteKey,
    delivery: Delivery,
    owner: &str,
) -> (crate::model::KeyAttrs, crate::model::KeyAttrs) {
    use crate::model::{KeyAttrs, KeyKind, KeyTag};
    let (mut before, mut after) = (KeyAttrs::default(), KeyAttrs::default());
    if provider_type != Some(crate::model::ProviderType::Ngrok) {
        return (before, after);
    }
    if let Some(d) = slot.description.as_ref().filter(|d| **d != key.description) {
        before.description = Some(key.description.clone());
        after.description = Some(d.clone());
    }
    if key.kind == KeyKind::Credential && key.acl != slot.acl {
        let set = |l: &[String]| l.iter().cloned().collect::<BTreeSet<String>>();
        if set(&key.acl) != set(&slot.acl) {
            before.acl = Some(key.acl.clone());
            after.acl = Some(slot.acl.clone());
        }
    }
    if delivery == Delivery::Delivered && !KeyTag::is_tag_of(&key.metadata, owner, &slot.name) {
        before.metadata = Some(key.metadata.clone());
        after.metadata = Some(KeyTag::new(owner, &slot.name).to_metadata());
    }
    (before, after)
}

/// Whether the current key of a slot is forced (`Ok(Forced)`), or when it will be due
/// (`Err(Some(due))`, possibly already), or never (`Err(None)`).
fn rotation_due(
    provider: &str,
    user: &str,
    slot: &SlotSpec,
    key: &RemoteKey,
    opts: &PlanOptions,
) -> Result<RotateReason, Option<Due>> {
    if opts.forced(provider, user, &slot.name) {
        return Ok(RotateReason::Forced);
    }
    let facts = KeyFacts {
        kind: key.kind,
        created_at: key.created_at,
        expires_at: key.expires_at,
    };
    Err(rotation::next_due(&slot.policy(), Some(facts)))
}

fn plan_undeclared_users(
    config: &Config,
    observed: &Observed,
    index: &std::collections::HashMap<&str, AccountIndex>,
    state: &State,
    opts: &PlanOptions,
    changes: &mut Vec<Change>,
    warnings: &mut Vec<Warning>,
) {
    // --only narrows a run to named users: nothing outside them is pruned or reported.
    if !opts.only.is_empty() {
        return;
    }
    let declared: BTreeSet<(&str, &str)> = config
        .users
        .iter()
        .map(|u| (u.provider.as_str(), u.name.as_str()))
        .collect();
    for (provider, snapshot) in observed {
        let Some(account) = config.providers.get(provider) else {
            continue;
        };
        for remote in &snapshot.users {
            if remote.deleted || declared.contains(&(provider.as_str(), remote.name.as_str())) {
                continue;
            }
            let owned = index
                .get(provider.as_str())
                .map(|a| a.keys_of(&remote.id))
                .unwrap_or(&[]);
            if own_key(config, provider, owned).is_some() {
                continue;
            }
            // An imported user existed before keyward took it over: never pruned, even if
            // keyward had created it once.
            let created_by_us = state
                .user(provider, &remote.name)
                .is_some_and(|r| r.id == remote.id && r.created_by_keyward && !r.imported);
            let warn = |kind, message: &str| Warning {
                kind,
                provider: Some(provider.clone()),
                user: Some(remote.name.clone()),
                key_id: None,
                message: message.to_string(),
                detail: message.to_string(),
            };
            if !created_by_us {
                warnings.push(warn(
                    WarningKind::UnmanagedUser,
                    "service user not in the file; keyward never changes it",
                ));
                continue;
            }
            // Keys another installation tagged are never touched (contract §10.2): deleting
            // or disabling the user they live on would revoke or suspend them, so a user that
            // holds any is kept, whatever prune.users says.
            let record = state.user(provider, &remote.name);
            let foreign: BTreeSet<String> = owned
                .iter()
                .filter_map(
                    |k| match crate::keys::class_of(record, k, &config.settings.owner) {
                        crate::keys::KeyClass::Foreign { owner } => Some(owner),
                        _ => None,
                    },
                )
                .collect();
            if config.prune.users != PruneUsers::Keep && !config.include_unmatched.is_empty() {
                let patterns: Vec<String> = config
                    .include_unmatched
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect();
                warnings.push(warn(
                    WarningKind::PrunedUserKept,
                    &format!(
                        "created by keyward and no longer in the file, but include {} matches no file (a typo, or a directory emptied for a moment?); kept until it does",
                        patterns.join(", ")
                    ),
                ));
                continue;
            }
            if config.prune.users != PruneUsers::Keep && !foreign.is_empty() {
                let owners: Vec<String> = foreign.iter().map(|o| format!("`{o}`")).collect();
                warnings.push(warn(
                    WarningKind::PrunedUserKept,
                    &format!(
                        "created by keyward and no longer in the file, but it holds keys of installation {}, which keyward never touches; kept",
                        owners.join(", ")
                    ),
                ));
                continue;
            }
            match config.prune.users {
                PruneUsers::Keep => warnings.push(warn(
                    WarningKind::PrunedUserKept,
                    "created by keyward and no longer in the file; kept (prune.users: keep)",
                )),
                PruneUsers::Disable => {
                    if remote.active {
                        changes.push(change(
                            provider,
                            &remote.name,
                            Op::UpdateUser {
                                was_active: true,
                                active: false,
                                why: UpdateUserReason::PruneDisable,
                            },
                        ));
                    }
                }
                PruneUsers::Delete => changes.push(change(
                    provider,
                    &remote.name,
                    Op::DeleteUser {
                        user_id: remote.id.clone(),
                        was_active: remote.active,
                        provider_type: account.kind,
                    },
                )),
            }
        }
    }
}
