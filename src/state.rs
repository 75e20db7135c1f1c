//! keyward's own record of what it created: for each provider account, the users it created and,
//! for each key slot, the current key and the keys retiring after a rotation — ids, slots,
//! timestamps and which sinks received the secret. Never a secret. Written atomically and
//! durably (temp file, fsync, rename, fsync of the directory), mode 0600, under an exclusive
//! lock so two keyward processes never write at once.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::KeyKind;

/// The state file's layout version.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format_version: u32,
    /// Incremented on every write.
    pub serial: u64,
    /// By provider account name.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountState>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// By user name.
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub id: String,
    /// True when keyward created the user: only such users are ever pruned.
    pub created_by_keyward: bool,
    pub created_at: Option<Timestamp>,
    /// By slot name.
    #[serde(default)]
    pub slots: BTreeMap<String, SlotRecord>,
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

    /// Whether `key_id` is recorded here in any role.
    pub fn holds(&self, key_id: &str) -> bool {
        self.current.as_ref().is_some_and(|c| c.id == key_id)
            || self.retiring.iter().any(|k| k.id == key_id)
            || self.orphans.iter().any(|o| o == key_id)
    }

    /// Makes `new` (delivered to every sink) the current key. The key it replaces retires until
    /// `retire_after`, unless `still_there` says the provider no longer has it (then there is
    /// nothing left to retire). Returns the id of the key that retires.
    pub fn promote(
        &mut self,
        new: KeyRecord,
        retire_after: Timestamp,
        still_there: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let mut replaced = None;
        if let Some(mut old) = self.current.take().filter(|o| o.id != new.id)
            && still_there(&old.id)
        {
            old.retire_after = Some(retire_after);
            replaced = Some(old.id.clone());
            self.retiring.push(old);
        }
        self.orphans.retain(|o| *o != new.id);
        self.current = Some(new);
        replaced
    }

    /// Forgets a key that was revoked (or is gone), whatever its role.
    pub fn forget(&mut self, key_id: &str) {
        self.retiring.retain(|k| k.id != key_id);
        self.orphans.retain(|o| o != key_id);
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
        let before = self.retiring.len() + self.orphans.len();
        self.retiring.retain(|k| exists(&k.id));
        self.orphans.retain(|k| exists(k));
        before - self.retiring.len() - self.orphans.len()
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub kind: KeyKind,
    pub created_at: Timestamp,
    /// When every sink of the slot had the secret.
    pub delivered_at: Timestamp,
    /// The sinks that received it.
    pub sinks: Vec<String>,
    /// For a retiring key: when it may be revoked.
    #[serde(default)]
    pub retire_after: Option<Timestamp>,
}

impl State {
    pub fn user(&self, provider: &str, name: &str) -> Option<&UserRecord> {
        self.accounts.get(provider)?.users.get(name)
    }

    pub fn user_mut(&mut self, provider: &str, name: &str) -> Option<&mut UserRecord> {
        self.accounts.get_mut(provider)?.users.get_mut(name)
    }

    pub fn slot(&self, provider: &str, user: &str, slot: &str) -> Option<&SlotRecord> {
        self.user(provider, user)?.slots.get(slot)
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
                        created_at,
                        slots: BTreeMap::new(),
                    },
                );
            }
        }
    }

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

    /// Every key id keyward recorded for a user, current and retiring.
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
                    .map(move |k| (slot.as_str(), k.id.as_str()))
            })
    }
}

/// Another keyward process holds the state lock (the daemon tries again shortly).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Locked(pub String);

/// The state directory: state file, journal and lock.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// Holds the exclusive lock on a state directory until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Creates the directory (0700) if needed, and refuses one that another user owns or can
    /// write in (they could plant links to files keyward would then overwrite).
    pub fn ensure(&self) -> anyhow::Result<()> {
        crate::files::create_private_dir(&self.dir, "state directory")
    }

    /// Takes the exclusive lock, failing at once (with who to blame) if another process holds it.
    pub fn lock(&self) -> anyhow::Result<StateLock> {
        self.ensure()?;
        let path = self.dir.join("lock");
        let mut file = crate::files::open_private(&path, false)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = crate::files::read_bounded(&path, 4096, false)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                return Err(anyhow::Error::new(Locked(format!(
                    "the state directory {} is locked by another keyward process{}; wait for it to finish",
                    self.dir.display(),
                    if holder.trim().is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", crate::text::escape(holder.trim()))
                    }
                ))));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(StateLock { _file: file })
    }

    /// Loads the state; a missing file is an empty state, a corrupt one an error (never
    /// silently replaced: it is the only record of which keys keyward created).
    pub fn load(&self) -> anyhow::Result<State> {
        let path = self.state_path();
        if self.dir.exists() {
            self.ensure()?;
        }
        match crate::files::read_bounded(&path, crate::files::MAX_STATE_BYTES, false) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes).with_context(|| {
                    format!("the state file {} is not valid; fix or move it aside (keyward will not overwrite it)", path.display())
                })?;
                if state.format_version > FORMAT_VERSION {
                    anyhow::bail!(
                        "the state file {} has format version {}, newer than this keyward understands ({})",
                        path.display(),
                        state.format_version,
                        FORMAT_VERSION
                    );
                }
                Ok(state)
            }
            Err(e) if e.is_not_found() => Ok(State {
                format_version: FORMAT_VERSION,
                ..State::default()
            }),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read the state file {}: {e}",
                path.display()
            )),
        }
    }

    /// Writes the state durably; bumps its serial.
    pub fn save(&self, state: &mut State) -> anyhow::Result<()> {
        state.serial += 1;
        self.write(state)
    }

    /// Writes the state durably as it is.
    pub fn write(&self, state: &State) -> anyhow::Result<()> {
        self.ensure()?;
        let mut bytes = serde_json::to_vec_pretty(&State {
            format_version: FORMAT_VERSION,
            ..state.clone()
        })?;
        bytes.push(b'\n');
        crate::files::write_private_file(&self.state_path(), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_then_load_round_trips_with_private_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("nested/state"));
        let mut st = dir.load().unwrap();
        assert_eq!(st.serial, 0);
        st.record_user("ngrok", "ci", "bot_1", true, None);
        dir.save(&mut st).unwrap();
        let back = dir.load().unwrap();
        assert_eq!(back, st);
        assert_eq!(back.serial, 1);
        let mode = std::fs::metadata(dir.state_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(&dir.dir).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        std::fs::write(dir.state_path(), b"{not json").unwrap();
        let err = dir.load().unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
    }

    #[test]
    fn second_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let _held = dir.lock().unwrap();
        let err = dir.lock().unwrap_err().to_string();
        assert!(err.contains("locked by another keyward process"), "{err}");
    }
}
