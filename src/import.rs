//! `keyward import`: taking over service users and keys that existed before keyward (product
//! contract §10.1). From one observation of the accounts it writes the config document for the
//! remote users the file does not declare (version-1 YAML, block style, ready to paste or
//! include), and records their keys in the state as the slots' current keys, marked
//! **adopted** (keyward never held their secrets), so that once the document is in the config
//! the plan leaves them as they are until their policy rotates them. Imported users are
//! recorded as imported, never as created: `prune.users` never touches them. The single-key
//! form adopts one existing key as the current key of a declared slot that has none. Nothing
//! remote changes. The choices are pure functions here; the engine observes and stores.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;

use crate::config::Config;
use crate::model::{KeyKind, KeyTag, Observed, ProviderType, RemoteKey, RemoteUser};
use crate::state::{Delivery, KeyRecord, SlotRecord, State};

/// Which undeclared users to import: every one when both lists are empty.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--provider`: only these accounts.
    pub providers: Vec<String>,
    /// `--user`: only users of these names.
    pub users: Vec<String>,
}

/// One remote user to import, with the slot each of its keys becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedUser {
    /// The provider account's name in the config.
    pub provider: String,
    /// The provider's type (what the slot fields may say).
    pub provider_type: ProviderType,
    /// The user as listed.
    pub user: RemoteUser,
    /// Slot name → the key adopted as its current key, in slot-name order.
    pub slots: BTreeMap<String, RemoteKey>,
}

/// Whether `name` makes a slot name keyward will take as it is from a key's description: 1 to
/// 63 ASCII letters, digits, `-`, `_` or `.`, starting with a letter or digit (so that it fits
/// every sink path template and needs no quoting in YAML).
pub fn valid_slot_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The remote users to import: live users of the selected accounts that the config does not
/// declare, excepting the user keyward itself authenticates as (Okta ASA). For each, the slots
/// its keys become: ngrok, one slot per key except keys another installation tagged (those stay
/// `foreign`, never touched), named by keyward's tag (a key this installation tagged), else by
/// the description when that makes a valid slot name not yet taken, else
/// `key-1`, `key-2`, … in the order the keys were created; Okta ASA, one slot `main` holding
/// the newest key (ASA rotates all keys of a user at once: the others expire on ASA's clock).
/// Errors name a selected provider or user that does not exist.
pub fn select(
    config: &Config,
    observed: &Observed,
    selection: &Selection,
) -> anyhow::Result<Vec<ImportedUser>> {
    for p in &selection.providers {
        if !config.providers.contains_key(p) {
            anyhow::bail!("import: no provider {p} in the config; nothing was imported");
        }
    }
    let declared: BTreeSet<(&str, &str)> = config
        .users
        .iter()
        .map(|u| (u.provider.as_str(), u.name.as_str()))
        .collect();
    let mut out = Vec::new();
    let mut seen_names = BTreeSet::new();
    for (provider, snapshot) in observed {
        if !selection.providers.is_empty() && !selection.providers.contains(provider) {
            continue;
        }
        let Some(account) = config.providers.get(provider) else {
            continue;
        };
        let own_key = match &account.auth {
            crate::config::ProviderAuth::OktaAsa { key_id, .. } => Some(key_id.as_str()),
            crate::config::ProviderAuth::Ngrok { .. } => None,
        };
        let index = snapshot.index();
        let mut users: Vec<&RemoteUser> = index.users.values().copied().collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        for user in users {
            if !selection.users.is_empty() && !selection.users.contains(&user.name) {
                continue;
            }
            seen_names.insert(user.name.clone());
            if declared.contains(&(provider.as_str(), user.name.as_str())) {
                if selection.users.contains(&user.name) {
                    tracing::warn!(
                        "import: {provider} / {} is declared in the config already; nothing to import for it",
                        crate::text::escape(&user.name)
                    );
                }
                continue;
            }
            if let Some(why) = undeclarable(config, &user.name) {
                tracing::warn!(
                    "import: {provider} / {}: skipped, {why}; rename it at the provider to manage it",
                    crate::text::escape(&user.name)
                );
                continue;
            }
            let keys = index.keys_of(&user.id);
            if own_key.is_some_and(|own| keys.iter().any(|k| k.id == own)) {
                tracing::warn!(
                    "import: {provider} / {}: skipped, keyward authenticates as this service user",
                    crate::text::escape(&user.name)
                );
                continue;
            }
            if account.kind == ProviderType::OktaAsa && keys.len() > 1 {
                tracing::warn!(
                    "import: {provider} / {}: {} older key(s) besides the newest stay unknown to keyward: reported, left to ASA (which expires them 2 days after keyward's first rotation), and revoked at once under prune.unknown_keys: revoke",
                    crate::text::escape(&user.name),
                    keys.len() - 1
                );
            }
            out.push(ImportedUser {
                provider: provider.clone(),
                provider_type: account.kind,
                user: user.clone(),
                slots: slots_for(account.kind, keys, &config.settings.owner),
            });
        }
    }
    for u in &selection.users {
        if !seen_names.contains(u) {
            anyhow::bail!(
                "import: no service user {u} at the selected provider accounts; nothing was imported"
            );
        }
    }
    Ok(out)
}

/// Why a service user of this name cannot be declared in the config as it is (so `validate`
/// would refuse the document): a control character, or a name that cannot stand in for
/// `{user}` in a default sink's template. `None` when it can.
fn undeclarable(config: &Config, name: &str) -> Option<String> {
    if name.trim().is_empty() {
        return Some("its name is empty".to_string());
    }
    if crate::text::has_control(name) {
        return Some("its name holds a control character, which a config cannot declare".into());
    }
    if crate::text::fits_placeholder(name) {
        return None;
    }
    config
        .default_sinks
        .iter()
        .filter_map(|s| config.sinks.get(s))
        .find(|sink| sink.uses("{user}"))
        .map(|sink| {
            format!(
                "its name cannot stand in for {{user}} in sink `{}` (it is `.` or `..` or holds `/`)",
                sink.name
            )
        })
}

/// The slot each key of one user becomes (see [`select`]).
fn slots_for(kind: ProviderType, keys: &[&RemoteKey], owner: &str) -> BTreeMap<String, RemoteKey> {
    let mut sorted: Vec<&RemoteKey> = keys.to_vec();
    sorted.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let mut slots = BTreeMap::new();
    if kind == ProviderType::OktaAsa {
        if let Some(newest) = sorted.last() {
            slots.insert("main".to_string(), (*newest).clone());
        }
        return slots;
    }
    let mut unnamed = Vec::new();
    // Names from tags first, then from descriptions, then numbers: a tag names the slot the
    // key was minted for, so it wins a clash.
    for key in &sorted {
        let tag = KeyTag::parse(&key.metadata);
        if tag.as_ref().is_some_and(|t| t.owner != owner) {
            continue;
        }
        match tag.map(|t| t.slot).filter(|s| valid_slot_name(s)) {
            Some(slot) if !slots.contains_key(&slot) => {
                slots.insert(slot, (*key).clone());
            }
            _ => unnamed.push(*key),
        }
    }
    let mut numbered = Vec::new();
    for key in unnamed {
        let name = key.description.trim();
        if valid_slot_name(name) && !slots.contains_key(name) {
            slots.insert(name.to_string(), key.clone());
        } else {
            numbered.push(key);
        }
    }
    let mut n = 0;
    for key in numbered {
        let name = loop {
            n += 1;
            let candidate = format!("key-{n}");
            if !slots.contains_key(&candidate) {
                break candidate;
            }
        };
        slots.insert(name, key.clone());
    }
    slots
}

/// A string as a YAML double-quoted scalar: JSON's string syntax is valid YAML (control
/// characters come out as `\uXXXX` escapes), so names and descriptions round-trip whatever
/// they hold.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The config document for `users`: `users:` in block style, version-1 syntax, every name
/// quoted; an empty list when there is nothing to import.
pub fn document(users: &[ImportedUser]) -> String {
    if users.is_empty() {
        return "users: []\n".to_string();
    }
    let mut out = String::from("users:\n");
    for u in users {
        out.push_str(&format!("  - provider: {}\n", quoted(&u.provider)));
        out.push_str(&format!("    name: {}\n", quoted(&u.user.name)));
        if !u.user.active {
            out.push_str("    active: false\n");
        }
        if u.slots.is_empty() {
            continue;
        }
        out.push_str("    keys:\n");
        for (slot, key) in &u.slots {
            // Quoted: a slot named `null`, `true` or `1e3` is a string, not a YAML scalar.
            out.push_str(&format!("      {}:\n", quoted(slot)));
            out.push_str(&format!("        kind: {}\n", key.kind));
            if u.provider_type == ProviderType::Ngrok {
                out.push_str(&format!(
                    "        description: {}\n",
                    quoted(&key.description)
                ));
                if key.kind == KeyKind::Credential {
                    let rules: Vec<String> = key.acl.iter().map(|r| quoted(r)).collect();
                    out.push_str(&format!("        acl: [{}]\n", rules.join(", ")));
                }
            }
        }
    }
    out
}

/// A key adopted at `now`: keyward never held its secret and delivered it nowhere.
fn adopted(key: &RemoteKey, now: Timestamp) -> KeyRecord {
    KeyRecord {
        id: key.id.clone(),
        kind: key.kind,
        created_at: key.created_at,
        delivered_at: now,
        sinks: Vec::new(),
        retire_after: None,
        delivery: Delivery::Adopted,
    }
}

/// Records `users` in `state`: each user as imported (never pruned), each slot's key as its
/// current, adopted key. A key the state already records (delivered by keyward, say) keeps its
/// record. Returns how many keys were newly recorded.
pub fn record(state: &mut State, users: &[ImportedUser], now: Timestamp) -> usize {
    let mut recorded = 0;
    for u in users {
        let known: BTreeSet<String> = state
            .key_ids(&u.provider, &u.user.name)
            .map(|(_, id)| id.to_string())
            .collect();
        state.record_user(
            &u.provider,
            &u.user.name,
            &u.user.id,
            false,
            u.user.created_at,
        );
        if let Some(rec) = state.user_mut(&u.provider, &u.user.name) {
            rec.imported = true;
            for (slot, key) in &u.slots {
                if known.contains(&key.id) {
                    continue;
                }
                rec.slots.insert(
                    slot.clone(),
                    Box::new(SlotRecord::with_current(adopted(key, now))),
                );
                recorded += 1;
            }
        }
    }
    recorded
}

/// Adopts `key_id` as the current key of the declared slot `slot` of `user` at `provider`
/// (`keyward import USER/SLOT KEY_ID`). Refused, with the reason, when the user does not exist
/// at the provider, the key is not that user's, is of another kind than the slot, is already
/// recorded, or the slot already has a current key the provider still has.
pub fn adopt_one(
    config: &Config,
    observed: &Observed,
    state: &mut State,
    (provider, user, slot): (&str, &str, &str),
    key_id: &str,
    now: Timestamp,
) -> anyhow::Result<()> {
    let what = format!("import {provider}:{user}/{slot} {key_id}");
    let spec = config
        .users
        .iter()
        .find(|u| u.provider == provider && u.name == user)
        .and_then(|u| u.slots.get(slot))
        .ok_or_else(|| anyhow::anyhow!("{what}: no such declared slot; nothing was imported"))?;
    let snapshot = observed
        .get(provider)
        .ok_or_else(|| anyhow::anyhow!("{what}: provider {provider} was not observed"))?;
    let remote = snapshot.user_by_name(user).ok_or_else(|| {
        anyhow::anyhow!(
            "{what}: service user {user} does not exist at {provider}; nothing was imported"
        )
    })?;
    let key = snapshot
        .keys_of(&remote.id)
        .find(|k| k.id == key_id)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{what}: {user} owns no key {key_id} at {provider}; nothing was imported"
            )
        })?;
    if key.kind != spec.kind {
        anyhow::bail!(
            "{what}: {key_id} is of kind {}, slot {slot} holds kind {}; nothing was imported",
            key.kind,
            spec.kind
        );
    }
    if let Some((other, _)) = state
        .key_ids(provider, user)
        .find(|(_, id)| *id == key_id)
        .filter(|_| {
            state
                .user(provider, user)
                .is_some_and(|r| r.id == remote.id)
        })
    {
        anyhow::bail!(
            "{what}: keyward already records {key_id} (slot {other}); nothing was imported"
        );
    }
    let listed: BTreeSet<&str> = snapshot
        .keys_of(&remote.id)
        .map(|k| k.id.as_str())
        .collect();
    if let Some(current) = state
        .user(provider, user)
        .filter(|r| r.id == remote.id)
        .and_then(|r| r.slots.get(slot))
        .and_then(|s| s.current())
        .filter(|c| listed.contains(c.id.as_str()))
    {
        anyhow::bail!(
            "{what}: slot {slot} already has a current key, {}; nothing was imported",
            current.id
        );
    }
    let srec = state.slot_entry(provider, remote, slot);
    srec.promote(adopted(key, now), now, |_| false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, kind: KeyKind, description: &str, metadata: &str, secs: i64) -> RemoteKey {
        RemoteKey {
            id: id.into(),
            kind,
            owner_id: Some("u".into()),
            description: description.into(),
            metadata: metadata.into(),
            acl: if kind == KeyKind::Credential {
                vec!["bind:*.example.com".into()]
            } else {
                Vec::new()
            },
            created_at: Timestamp::from_second(secs).unwrap(),
            expires_at: None,
        }
    }

    #[test]
    fn slots_are_named_by_tag_then_description_then_number() {
        let tag = KeyTag::new("keyward", "deploy").to_metadata();
        let foreign = KeyTag::new("other", "x").to_metadata();
        let keys = [
            key("k1", KeyKind::ApiKey, "ci", "", 1),
            key("k2", KeyKind::ApiKey, "ci", "", 2),
            key("k3", KeyKind::ApiKey, "has space", "", 3),
            key("k4", KeyKind::Credential, "deploy", "", 4),
            key("k5", KeyKind::ApiKey, "whatever", &tag, 5),
            key("k6", KeyKind::ApiKey, "key-1", &foreign, 6),
        ];
        let refs: Vec<&RemoteKey> = keys.iter().collect();
        let slots = slots_for(ProviderType::Ngrok, &refs, "keyward");
        let named: BTreeMap<&str, &str> = slots
            .iter()
            .map(|(s, k)| (s.as_str(), k.id.as_str()))
            .collect();
        // k6 is another installation's: left out.
        assert_eq!(
            named,
            BTreeMap::from([
                ("ci", "k1"),
                ("deploy", "k5"),
                ("key-1", "k2"),
                ("key-2", "k3"),
                ("key-3", "k4"),
            ])
        );
        // Okta ASA: the newest key, in slot main.
        let asa = slots_for(ProviderType::OktaAsa, &refs, "keyward");
        assert_eq!(asa.len(), 1);
        assert_eq!(asa["main"].id, "k6");
    }

    #[test]
    fn the_document_quotes_what_it_cannot_trust() {
        let users = [ImportedUser {
            provider: "ng".into(),
            provider_type: ProviderType::Ngrok,
            user: RemoteUser {
                id: "bot_1".into(),
                name: "we\"ird: name\n- x".into(),
                active: false,
                deleted: false,
                created_at: None,
            },
            slots: BTreeMap::from([(
                "tunnel".to_string(),
                key("cr_1", KeyKind::Credential, "a: b", "", 1),
            )]),
        }];
        let doc = document(&users);
        assert_eq!(
            doc,
            "users:\n  - provider: \"ng\"\n    name: \"we\\\"ird: name\\n- x\"\n    active: false\n    keys:\n      \"tunnel\":\n        kind: credential\n        description: \"a: b\"\n        acl: [\"bind:*.example.com\"]\n"
        );
        assert_eq!(document(&[]), "users: []\n");
    }

    #[test]
    fn valid_slot_names() {
        for ok in ["main", "key-1", "CI_deploy.v2", "a"] {
            assert!(valid_slot_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "has space",
            "a/b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(!valid_slot_name(bad), "{bad}");
        }
    }
}
