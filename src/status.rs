//! `keyward status`: every managed key with its age, expiry, next rotation and state, computed
//! purely from the config, the observed accounts, keyward's state and `now`.

use jiff::Timestamp;
use serde::Serialize;

use crate::config::Config;
use crate::duration;
use crate::model::Observed;
use crate::state::State;
use crate::text::short_id;

/// One row of `keyward status`: a key on a declared user, or a declared slot without a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// The provider account's name in the config.
    pub provider: String,
    /// The service user's name.
    pub user: String,
    /// The key slot; `None` for a key keyward did not create.
    pub slot: Option<String>,
    /// The key's id at the provider; `None` for a slot without a key.
    pub key_id: Option<String>,
    /// `current`, `retiring`, `orphan` (minted, never delivered: the next run revokes it),
    /// `untracked` (tagged by this installation, recorded nowhere), `foreign` (tagged by another
    /// installation), `unknown`, `overdue` or `missing` (declared slot without a key).
    pub state: String,
    /// For a key keyward records: `delivered` (keyward delivered it to the slot's sinks),
    /// `adopted` (existing before keyward, recorded by `keyward import`: keyward never held its
    /// secret) or `unconfirmed` (found tagged after the state was lost and not held by the
    /// sinks: rotated by the next apply).
    pub delivery: Option<&'static str>,
    /// When the provider created the key.
    pub created_at: Option<Timestamp>,
    /// The key's age at `now`, in seconds.
    pub age_seconds: Option<i64>,
    /// When the key expires at the provider (Okta ASA); `None`: never.
    pub expires_at: Option<Timestamp>,
    /// For a declared slot's current key: when it is next due for rotation (`None`: never).
    pub next_rotation: Option<Timestamp>,
    /// For a retiring key: when it will be revoked.
    pub revoke_after: Option<Timestamp>,
}

/// Every key on every declared user, plus declared slots that have no key yet. Keys are
/// classed by [`crate::keys::classify`], as the planner classes them.
pub fn entries(config: &Config, observed: &Observed, state: &State, now: Timestamp) -> Vec<Entry> {
    let mut out = Vec::new();
    let index: std::collections::HashMap<&str, crate::model::AccountIndex> = observed
        .iter()
        .map(|(p, snap)| (p.as_str(), snap.index()))
        .collect();
    for spec in &config.users {
        let Some(listing) = index.get(spec.provider.as_str()) else {
            continue;
        };
        let record = state.user(&spec.provider, &spec.name);
        let delivery = |key_id: &str| {
            record.and_then(|u| {
                u.slots.values().find_map(|s| {
                    s.current()
                        .into_iter()
                        .chain(s.retiring())
                        .find(|k| k.id == key_id)
                        .map(|k| k.delivery.as_str())
                })
            })
        };
        let entry = |slot: Option<&str>, k: Option<&crate::model::RemoteKey>, state: &str| Entry {
            provider: spec.provider.clone(),
            user: spec.name.clone(),
            slot: slot.map(str::to_string),
            key_id: k.map(|k| k.id.clone()),
            state: state.to_string(),
            created_at: k.map(|k| k.created_at),
            age_seconds: k.map(|k| now.duration_since(k.created_at).as_secs()),
            expires_at: k.and_then(|k| k.expires_at),
            next_rotation: None,
            revoke_after: None,
            delivery: k.and_then(|k| delivery(&k.id)),
        };
        let Some(remote) = listing.users.get(spec.name.as_str()).copied() else {
            for slot_name in spec.slots.keys() {
                out.push(entry(Some(slot_name), None, "missing"));
            }
            continue;
        };
        let book = crate::keys::classify(
            &spec.provider,
            remote,
            listing.keys_of(&remote.id).iter().copied(),
            state,
            &config.settings.owner,
        );
        for (slot_name, slot) in spec.slots.iter() {
            match book.current.get(slot_name) {
                Some(k) => {
                    let next = crate::rotation::next_due(
                        &slot.policy(),
                        Some(crate::rotation::KeyFacts {
                            kind: k.kind,
                            created_at: k.created_at,
                            expires_at: k.expires_at,
                        }),
                    )
                    .map(|d| d.at);
                    let overdue = next.is_some_and(|n| n <= now);
                    out.push(Entry {
                        next_rotation: next,
                        ..entry(
                            Some(slot_name),
                            Some(k),
                            if overdue { "overdue" } else { "current" },
                        )
                    });
                }
                None => out.push(entry(Some(slot_name), None, "missing")),
            }
            for (k, until) in book.retiring.get(slot_name).into_iter().flatten() {
                out.push(Entry {
                    revoke_after: *until,
                    ..entry(Some(slot_name), Some(k), "retiring")
                });
            }
        }
        // Keys of slots that left the file: still keyward's until the plan revokes them.
        for (slot_name, k) in book
            .current
            .iter()
            .filter(|(s, _)| !spec.slots.contains_key(*s))
        {
            out.push(entry(Some(slot_name), Some(k), "current"));
        }
        for (slot_name, keys) in book
            .retiring
            .iter()
            .filter(|(s, _)| !spec.slots.contains_key(*s))
        {
            for (k, until) in keys {
                out.push(Entry {
                    revoke_after: *until,
                    ..entry(Some(slot_name), Some(k), "retiring")
                });
            }
        }
        for (slot_name, k) in &book.orphans {
            out.push(entry(Some(slot_name), Some(k), "orphan"));
        }
        for (slot_name, k) in &book.pending {
            out.push(entry(Some(slot_name), Some(k), "pending"));
        }
        for (slot_name, k) in &book.untracked {
            out.push(entry(Some(slot_name), Some(k), "untracked"));
        }
        for (_, k) in &book.foreign {
            out.push(entry(None, Some(k), "foreign"));
        }
        for k in &book.unknown {
            out.push(entry(None, Some(k), "unknown"));
        }
    }
    out
}

/// The table for people.
pub fn table(entries: &[Entry], now: Timestamp) -> String {
    let header = [
        "PROVIDER",
        "USER",
        "SLOT",
        "KEY",
        "CREATED",
        "AGE",
        "EXPIRES",
        "NEXT ROTATION",
        "STATE",
        "DELIVERY",
    ];
    let fmt_ts = |t: Option<Timestamp>| t.map(|t| t.strftime("%Y-%m-%d %H:%M").to_string());
    let rows: Vec<[String; 10]> = entries
        .iter()
        .map(|e| {
            [
                e.provider.clone(),
                e.user.clone(),
                e.slot.clone().unwrap_or_else(|| "-".into()),
                e.key_id
                    .as_deref()
                    .map(short_id)
                    .unwrap_or_else(|| "-".into()),
                fmt_ts(e.created_at).unwrap_or_else(|| "-".into()),
                e.age_seconds
                    .map(|s| duration::humanize(jiff::SignedDuration::from_secs(s)))
                    .unwrap_or_else(|| "-".into()),
                fmt_ts(e.expires_at).unwrap_or_else(|| "never".into()),
                match (e.next_rotation, e.revoke_after) {
                    (Some(n), _) if n > now => {
                        format!("in {}", duration::humanize(n.duration_since(now)))
                    }
                    (Some(_), _) => "now (overdue)".into(),
                    (None, Some(r)) => format!("revoke {}", fmt_ts(Some(r)).unwrap_or_default()),
                    (None, None) => "-".into(),
                },
                e.state.clone(),
                e.delivery.unwrap_or("-").to_string(),
            ]
            // Names, slots and ids come from the config and the provider: one row each.
            .map(|cell| crate::text::escape(&cell).into_owned())
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let line: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i] - c.chars().count())))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    };
    push(header.to_vec());
    for r in &rows {
        push(r.iter().map(String::as_str).collect());
    }
    out
}
