//! keyward's own record of what it created, as data: for each provider account, the users it
//! created and, for each key slot, the current key and the keys retiring after a rotation —
//! ids, slots, timestamps and which sinks received the secret. Never a secret. Where it is kept
//! (files, a database) is [`crate::store`]'s business.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::KeyKind;

/// The state file's layout version.
pub const FORMAT_VERSION: u32 = 1;

/// keyward's record of what it created, across every provider account (`state.db` in the state
/// directory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Always [`FORMAT_VERSION`] in a state keyward writes.
    pub format_version: u32,
    /// Incremented on every write.
    pub serial: u64,
    /// By provider account name.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountState>,
}

/// What keyward recorded at one provider account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// By user name.
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
}

/// A service user keyward manages, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user's id at the provider (a user with another id under the same name is another user).
    pub id: String,
    /// True when keyward created the user: only such users are ever pruned.
    pub created_by_keyward: bool,
    /// True when `keyward import` recorded it: it existed before keyward, and is never pruned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
    /// When the provider created it, where the provider says.
    pub created_at: Option<Timestamp>,
    /// By slot name.
    #[serde(default)]
    /// (Boxed: a map node holds room for eleven entries, and a fleet has a map per user.)
    pub slots: BTreeMap<String, Box<SlotRecord>>,
}

/// One key slot's lifecycle: the key whose secret the sinks hold now, the keys it replaced
/// (valid until their overlap ends) and the keys keyward minted for it that nobody holds. Its
/// fields change only through its verbs, used alike by the executor and by crash recovery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The key whose secret the sinks hold now.
    current: Option<KeyRecord>,
    /// Replaced keys, valid until their `retire_after`.
    #[serde(default)]
    retiring: Vec<KeyRecord>,
    /// Keys keyward created for this slot whose secret never reached the sinks (an interrupted
    /// run): nobody holds them, so they are revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    orphans: Vec<String>,
    /// Keys whose delivery was cut short (an interrupted run): some sink may hold them, so they
    /// are kept until a later key reaches every sink, and then retire for the overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<KeyRecord>,
}

impl SlotRecord {
    /// The key whose secret the sinks hold now.
    pub fn current(&self) -> Option<&KeyRecord> {
        self.current.as_ref()
    }

    /// The keys a rotation replaced, each valid until its `retire_after`.
    pub fn retiring(&self) -> &[KeyRecord] {
        &self.retiring
    }

    /// Keys minted for this slot that were never delivered.
    pub fn orphans(&self) -> &[String] {
        &self.orphans
    }

    /// Keys whose delivery was cut short, kept until a later key reaches every sink.
    pub fn pending(&self) -> &[KeyRecord] {
        &self.pending
    }

    /// Makes `new` (delivered to every sink) the current key. The key it replaces, and any key
    /// whose delivery was cut short before, retire until `retire_after`, unless `still_there`
    /// says the provider no longer has them (then there is nothing left to retire). Returns the
    /// ids of the keys that retire.
    pub fn promote(
        &mut self,
        new: KeyRecord,
        retire_after: Timestamp,
        still_there: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut replaced = Vec::new();
        let old = self.current.take().filter(|o| o.id != new.id);
        let pending = std::mem::take(&mut self.pending);
        for mut k in old.into_iter().chain(pending) {
            if k.id != new.id && still_there(&k.id) {
                k.retire_after = Some(retire_after);
                replaced.push(k.id.clone());
                self.retiring.push(k);
            }
        }
        self.orphans.retain(|o| *o != new.id);
        self.current = Some(new);
        replaced
    }

    /// Records a key whose delivery was cut short: kept (never revoked at once) until a later
    /// key of the slot reaches every sink.
    pub fn add_pending(&mut self, key: KeyRecord) {
        if !self.pending.iter().any(|k| k.id == key.id) {
            self.orphans.retain(|o| *o != key.id);
            self.pending.push(key);
        }
    }

    /// Moves the current and pending keys into retiring, until `retire_after` (the slot left
    /// the file: its consumers get the overlap to stop using them). Returns their ids.
    pub fn retire_all(&mut self, retire_after: Timestamp) -> Vec<String> {
        let mut moved = Vec::new();
        let current = self.current.take();
        let pending = std::mem::take(&mut self.pending);
        for mut k in current.into_iter().chain(pending) {
            k.retire_after = Some(retire_after);
            moved.push(k.id.clone());
            self.retiring.push(k);
        }
        moved
    }

    /// Forgets a key that was revoked (or is gone), whatever its role.
    pub fn forget(&mut self, key_id: &str) {
        self.retiring.retain(|k| k.id != key_id);
        self.orphans.retain(|o| o != key_id);
        self.pending.retain(|k| k.id != key_id);
        if self.current.as_ref().is_some_and(|c| c.id == key_id) {
            self.current = None;
        }
    }

    /// Records a key minted for this slot that nobody holds, so the planner revokes it.
    pub fn add_orphan(&mut self, key_id: &str) {
        if !self.orphans.iter().any(|o| o == key_id) {
            self.orphans.push(key_id.to_string());
        }
    }

    /// Keeps only the retiring and orphaned keys `exists` says the provider still has; returns
    /// how many were dropped (revoked by a run whose completion was never recorded).
    pub fn drop_gone(&mut self, exists: impl Fn(&str) -> bool) -> usize {
        let before = self.retiring.len() + self.orphans.len() + self.pending.len();
        self.retiring.retain(|k| exists(&k.id));
        self.orphans.retain(|k| exists(k));
        self.pending.retain(|k| exists(&k.id));
        before - self.retiring.len() - self.orphans.len() - self.pending.len()
    }

    /// A slot holding `current` (tests and imports build records this way).
    pub fn with_current(current: KeyRecord) -> SlotRecord {
        SlotRecord {
            current: Some(current),
            ..SlotRecord::default()
        }
    }

    /// Adds a retiring key as it is (tests and imports).
    pub fn push_retiring(&mut self, key: KeyRecord) {
        self.retiring.push(key);
    }
}

/// A key keyward minted and delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's id at the provider.
    pub id: String,
    /// API key or credential.
    pub kind: KeyKind,
    /// When the provider created it.
    pub created_at: Timestamp,
    /// When every sink of the slot had the secret.
    pub delivered_at: Timestamp,
    /// The sinks that received it.
    pub sinks: Vec<String>,
    /// For a retiring key: when it may be revoked.
    #[serde(default)]
    pub retire_after: Option<Timestamp>,
    /// How the slot's consumers came to hold the key's secret.
    #[serde(default, skip_serializing_if = "Delivery::is_delivered")]
    pub delivery: Delivery,
}

/// How the consumers of a slot came to hold its key (`status`'s `delivery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// keyward minted it and delivered it to every sink of the slot.
    #[default]
    Delivered,
    /// Existing before keyward (`keyward import`): keyward never held its secret. It rotates
    /// when its policy says so, and then retires for the slot's overlap.
    Adopted,
    /// Tagged by this installation but recorded nowhere (the state was lost, or another
    /// installation with the same owner made it), and the slot's sinks do not verifiably hold
    /// it: keyward cannot tell who holds it, so the slot rotates now and it retires for the
    /// slot's overlap.
    Unconfirmed,
}

impl Delivery {
    /// `delivered`, `adopted` or `unconfirmed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Adopted => "adopted",
            Delivery::Unconfirmed => "unconfirmed",
        }
    }

    fn is_delivered(&self) -> bool {
        *self == Delivery::Delivered
    }
}

impl State {
    /// The record of the user `name` at the provider account `provider`.
    pub fn user(&self, provider: &str, name: &str) -> Option<&UserRecord> {
        self.accounts.get(provider)?.users.get(name)
    }

    /// [`State::user`], to change.
    pub fn user_mut(&mut self, provider: &str, name: &str) -> Option<&mut UserRecord> {
        self.accounts.get_mut(provider)?.users.get_mut(name)
    }

    /// The record of `slot` on `user` at the provider account `provider`.
    pub fn slot(&self, provider: &str, user: &str, slot: &str) -> Option<&SlotRecord> {
        self.user(provider, user)?.slots.get(slot).map(|s| &**s)
    }

    /// Records a user (created or adopted); keeps existing slot records if the id is unchanged.
    pub fn record_user(
        &mut self,
        provider: &str,
        name: &str,
        id: &str,
        created_by_keyward: bool,
        created_at: Option<Timestamp>,
    ) {
        let users = &mut self.accounts.entry(provider.to_string()).or_default().users;
        match users.get_mut(name) {
            Some(rec) if rec.id == id => {
                rec.created_by_keyward |= created_by_keyward;
            }
            _ => {
                users.insert(
                    name.to_string(),
                    UserRecord {
                        id: id.to_string(),
                        created_by_keyward,
                        imported: false,
                        created_at,
                        slots: BTreeMap::new(),
                    },
                );
            }
        }
    }

    /// Forgets the user `name` at `provider` with all its slots (once it is deleted).
    pub fn forget_user(&mut self, provider: &str, name: &str) {
        if let Some(acc) = self.accounts.get_mut(provider) {
            acc.users.remove(name);
        }
    }

    /// The slot record of `slot` on `user` (recorded with `user_id` if it is not yet), created
    /// empty if needed.
    pub fn slot_entry(
        &mut self,
        provider: &str,
        user: &crate::model::RemoteUser,
        slot: &str,
    ) -> &mut SlotRecord {
        self.record_user(provider, &user.name, &user.id, false, user.created_at);
        let users = &mut self.accounts.entry(provider.to_string()).or_default().users;
        // record_user just made sure it is there with this id.
        let rec = users
            .entry(user.name.clone())
            .or_insert_with(|| UserRecord {
                id: user.id.clone(),
                created_by_keyward: false,
                imported: false,
                created_at: user.created_at,
                slots: BTreeMap::new(),
            });
        rec.slots.entry(slot.to_string()).or_default()
    }

    /// Forgets a revoked key of `user`, in whichever slot and role it was recorded.
    pub fn forget_key(&mut self, provider: &str, user: &str, key_id: &str) {
        if let Some(u) = self.user_mut(provider, user) {
            for slot in u.slots.values_mut() {
                slot.forget(key_id);
            }
        }
    }

    /// Every key id keyward recorded for a user: current, retiring and pending.
    pub fn key_ids<'a>(
        &'a self,
        provider: &str,
        user: &str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.user(provider, user)
            .into_iter()
            .flat_map(|u| u.slots.iter())
            .flat_map(|(slot, rec)| {
                rec.current
                    .iter()
                    .chain(rec.retiring.iter())
                    .chain(rec.pending.iter())
                    .map(move |k| (slot.as_str(), k.id.as_str()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_retires_the_previous_key_and_forget_drops_any_role() {
        let key = |id: &str| KeyRecord {
            id: id.into(),
            kind: KeyKind::ApiKey,
            created_at: Timestamp::UNIX_EPOCH,
            delivered_at: Timestamp::UNIX_EPOCH,
            sinks: vec!["local".into()],
            retire_after: None,
            delivery: Delivery::Delivered,
        };
        let until = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let mut slot = SlotRecord::default();
        assert!(slot.promote(key("a"), until, |_| true).is_empty());
        slot.add_orphan("b");
        // Promoting the orphan itself (recovered as delivered) clears it from the orphans.
        assert_eq!(slot.promote(key("b"), until, |_| true), ["a"]);
        assert!(slot.orphans().is_empty());
        assert_eq!(slot.retiring()[0].retire_after, Some(until));
        // A replaced key the provider no longer has does not retire.
        assert!(slot.promote(key("c"), until, |id| id != "b").is_empty());
        assert_eq!(slot.retiring().len(), 1);
        slot.forget("a");
        slot.forget("c");
        assert!(slot.current().is_none() && slot.retiring().is_empty());
        assert!(slot.orphans().is_empty());
        // A key whose delivery was cut short is kept, then retires with the next promotion.
        slot.add_pending(key("p"));
        assert_eq!(slot.pending().len(), 1);
        assert_eq!(slot.promote(key("d"), until, |_| true), ["p"]);
        assert!(slot.pending().is_empty());
        assert_eq!(slot.retiring()[0].id, "p");
    }
}
