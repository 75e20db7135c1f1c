//! `keyward status`: every managed key with its age, expiry, next rotation and state, computed
//! purely from the config, the observed accounts, keyward's state and `now`.

use jiff::Timestamp;
use serde::Serialize;

use crate::config::Config;
use crate::duration;
use crate::model::{KeyTag, Observed};
use crate::plan::diff::short_id;
use crate::state::State;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub provider: String,
    pub user: String,
    pub slot: Option<String>,
    pub key_id: Option<String>,
    /// `current`, `retiring`, `unknown`, `overdue` or `missing` (declared slot without a key).
    pub state: String,
    pub created_at: Option<Timestamp>,
    pub age_seconds: Option<i64>,
    pub expires_at: Option<Timestamp>,
    pub next_rotation: Option<Timestamp>,
    /// For a retiring key: when it will be revoked.
    pub revoke_after: Option<Timestamp>,
}

/// Every key on every declared user, plus declared slots that have no key yet.
pub fn entries(config: &Config, observed: &Observed, state: &State, now: Timestamp) -> Vec<Entry> {
    let mut out = Vec::new();
    for spec in &config.users {
        let Some(snapshot) = observed.get(&spec.provider) else {
            continue;
        };
        let remote = snapshot.user_by_name(&spec.name);
        let record = remote.and_then(|r| {
            state
                .user(&spec.provider, &spec.name)
                .filter(|rec| rec.id == r.id)
        });
        let keys: Vec<_> = remote
            .map(|r| snapshot.keys_of(&r.id).collect())
            .unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for (slot_name, slot) in &spec.slots {
            let srec = record.and_then(|r| r.slots.get(slot_name));
            let current = srec
                .and_then(|s| s.current.as_ref())
                .and_then(|c| keys.iter().find(|k| k.id == c.id));
            match current {
                Some(k) => {
                    seen.insert(k.id.clone());
                    let next = crate::rotation::next_due(
                        slot,
                        Some(crate::rotation::KeyFacts {
                            kind: k.kind,
                            created_at: k.created_at,
                            expires_at: k.expires_at,
                        }),
                    )
                    .map(|d| d.at);
                    let overdue = next.is_some_and(|n| n <= now);
                    out.push(Entry {
                        provider: spec.provider.clone(),
                        user: spec.name.clone(),
                        slot: Some(slot_name.clone()),
                        key_id: Some(k.id.clone()),
                        state: if overdue { "overdue" } else { "current" }.to_string(),
                        created_at: Some(k.created_at),
                        age_seconds: Some(now.duration_since(k.created_at).as_secs()),
                        expires_at: k.expires_at,
                        next_rotation: next,
                        revoke_after: None,
                    });
                }
                None => out.push(Entry {
                    provider: spec.provider.clone(),
                    user: spec.name.clone(),
                    slot: Some(slot_name.clone()),
                    key_id: None,
                    state: "missing".to_string(),
                    created_at: None,
                    age_seconds: None,
                    expires_at: None,
                    next_rotation: None,
                    revoke_after: None,
                }),
            }
            for r in srec.map(|s| s.retiring.as_slice()).unwrap_or_default() {
                if let Some(k) = keys.iter().find(|k| k.id == r.id) {
                    seen.insert(k.id.clone());
                    out.push(Entry {
                        provider: spec.provider.clone(),
                        user: spec.name.clone(),
                        slot: Some(slot_name.clone()),
                        key_id: Some(k.id.clone()),
                        state: "retiring".to_string(),
                        created_at: Some(k.created_at),
                        age_seconds: Some(now.duration_since(k.created_at).as_secs()),
                        expires_at: k.expires_at,
                        next_rotation: None,
                        revoke_after: r.retire_after,
                    });
                }
            }
        }
        for k in keys.iter().filter(|k| !seen.contains(&k.id)) {
            out.push(Entry {
                provider: spec.provider.clone(),
                user: spec.name.clone(),
                slot: KeyTag::parse(&k.metadata).map(|t| t.slot),
                key_id: Some(k.id.clone()),
                state: "unknown".to_string(),
                created_at: Some(k.created_at),
                age_seconds: Some(now.duration_since(k.created_at).as_secs()),
                expires_at: k.expires_at,
                next_rotation: None,
                revoke_after: None,
            });
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
    ];
    let fmt_ts = |t: Option<Timestamp>| t.map(|t| t.strftime("%Y-%m-%d %H:%M").to_string());
    let rows: Vec<[String; 9]> = entries
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
