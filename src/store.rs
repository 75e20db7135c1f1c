//! The state store boundary: where keyward keeps its [`State`], its journal and its lock. The
//! engine, the executor and the daemon see only the [`Store`] and [`JournalLog`] traits (the
//! planner and recovery see no store at all: they are given a [`State`]); [`StateDir`] is the
//! default and only backend (files in `settings.state_dir`), and another one (a database shared
//! by several hosts, say) would implement the same traits without touching them.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::journal::Journal;
use crate::oplog::{Entry, Event, Unfinished};
use crate::state::{FORMAT_VERSION, State};

/// Where keyward's state, journal and lock live.
pub trait Store: Send + Sync {
    /// The state (empty when there is none yet; an error, never a reset, when unreadable).
    fn load(&self) -> anyhow::Result<State>;
    /// Records `state` durably, as it is.
    fn write(&self, state: &State) -> anyhow::Result<()>;
    /// Takes the exclusive lock (an error of type [`Locked`] when another process holds it);
    /// held until the guard is dropped.
    fn lock(&self) -> anyhow::Result<StoreLock>;
    /// The journal, opened for appending.
    fn journal(&self) -> anyhow::Result<Arc<dyn JournalLog>>;
    /// Every entry of the journal (see [`crate::journal::read`] for what is refused).
    fn journal_entries(&self) -> anyhow::Result<Vec<Entry>>;
}

/// The write-ahead log of remote writes.
pub trait JournalLog: Send + Sync {
    /// A new operation number.
    fn next_seq(&self) -> u64;
    /// Appends an entry; with `durable`, returns only once it is on stable storage.
    fn append(&self, seq: u64, event: Event, durable: bool) -> anyhow::Result<()>;
    /// Keeps only the unfinished operations `keep` accepts.
    fn compact(&self, keep: &dyn Fn(&Unfinished) -> bool) -> anyhow::Result<()>;
}

/// A held store lock; released when dropped.
pub struct StoreLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl StoreLock {
    /// Wraps whatever keeps a backend's lock held.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        StoreLock(Box::new(guard))
    }
}

/// Another keyward process holds the state lock (the daemon tries again shortly).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Locked(pub String);

/// The state directory: state file, journal and lock.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory (`settings.state_dir`).
    pub dir: PathBuf,
}

/// Holds the exclusive lock on a state directory until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateDir {
    /// The state directory at `dir`; nothing is checked or created yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    /// The state file: `state.json` in the directory.
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
        self.write_file(state)
    }

    /// Writes the state durably as it is.
    pub fn write_file(&self, state: &State) -> anyhow::Result<()> {
        self.ensure()?;
        let mut bytes = serde_json::to_vec_pretty(&State {
            format_version: FORMAT_VERSION,
            ..state.clone()
        })?;
        bytes.push(b'\n');
        crate::files::write_private_file(&self.state_path(), &bytes)
    }
}

impl Store for StateDir {
    fn load(&self) -> anyhow::Result<State> {
        StateDir::load(self)
    }

    fn write(&self, state: &State) -> anyhow::Result<()> {
        self.write_file(state)
    }

    fn lock(&self) -> anyhow::Result<StoreLock> {
        StateDir::lock(self).map(StoreLock::new)
    }

    fn journal(&self) -> anyhow::Result<Arc<dyn JournalLog>> {
        Ok(Arc::new(Journal::open(&self.dir)?))
    }

    fn journal_entries(&self) -> anyhow::Result<Vec<Entry>> {
        crate::journal::read(&self.dir)
    }
}

impl JournalLog for Journal {
    fn next_seq(&self) -> u64 {
        Journal::next_seq(self)
    }

    fn append(&self, seq: u64, event: Event, durable: bool) -> anyhow::Result<()> {
        Journal::append(self, seq, event, durable)
    }

    fn compact(&self, keep: &dyn Fn(&Unfinished) -> bool) -> anyhow::Result<()> {
        Journal::compact(self, keep)
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
