//! The state store boundary: where keyward keeps its [`State`], its journal and its lock. The
//! engine, the executor and the daemon see only the [`Store`] and [`JournalLog`] traits (the
//! planner and recovery see no store at all: they are given a [`State`]); [`StateDir`] is the
//! default backend (`settings.state_dir`), and another one (a database shared by several
//! hosts, say) implements the same traits without touching them.
//!
//! In the state directory: `state.db`, an SQLite database (WAL, `synchronous=FULL`) holding one
//! row per service user record, so that recording one change writes that user's row, whatever
//! the size of the state; `journal.jsonl`, the write-ahead log of remote writes; and `lock`.
//! A `state.json` from an earlier keyward is migrated into `state.db` on the first write, and
//! kept as `state.json.migrated`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::journal::Journal;
use crate::oplog::{Entry, Event, Unfinished};
use crate::state::{FORMAT_VERSION, State};

/// Where keyward's state, journal and lock live.
pub trait Store: Send + Sync {
    /// Where, for messages and for telling two stores apart (a directory, or a database URL
    /// with its password masked).
    fn location(&self) -> String;
    /// Whether several hosts share it (a database): a daemon that finds its lock held then
    /// waits as a standby instead of exiting.
    fn shared(&self) -> bool {
        false
    }
    /// Why the store can no longer be used, once that is so (a database connection lost, and
    /// with it the lock): its owner must start over with a new store.
    fn lost(&self) -> Option<String> {
        None
    }
    /// Whether this process may still act as the lock's holder: a shared store's lock lives in
    /// a database session the process cannot watch every instant, so before a secret goes to a
    /// sink it checks that the database answered recently enough. Ok for a local lock.
    fn check_lease(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Who holds the lock, as the holder recorded it (a shared store; `None` where unknown).
    fn leader(&self) -> Option<String> {
        None
    }
    /// Who holds the lock now, when another process does (a running apply or daemon): its
    /// unfinished operations are in flight, not interrupted. `None` when it is free or cannot
    /// be told; never takes the lock.
    fn busy(&self) -> Option<String> {
        None
    }
    /// The state (empty when there is none yet; an error, never a reset, when unreadable).
    fn load(&self) -> anyhow::Result<State>;
    /// Records `state` durably, as it is, replacing what was recorded (O(size of the state)).
    fn write(&self, state: &State) -> anyhow::Result<()>;
    /// Records durably, in one transaction, the records of the given users (`None`: the user
    /// is forgotten) and the state's `serial`: what one change costs, whatever the size of the
    /// state.
    fn record_users(&self, serial: u64, users: &[UserRow]) -> anyhow::Result<()>;
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

/// ` (pid N)`: who the lock file at `path` says holds it, escaped; empty when it says nothing.
fn holder_in(path: &Path) -> String {
    let holder = crate::files::read_bounded(path, 4096, false)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if holder.is_empty() {
        String::new()
    } else {
        format!(" ({})", crate::text::escape(&holder))
    }
}

/// The check of `store`'s lease, as a fence for writes that must stop once the lead may be
/// gone (sinks, `/metrics`; see [`Store::check_lease`]).
pub fn lease_fence(store: &Arc<dyn Store>) -> crate::files::Fence {
    let store = Arc::clone(store);
    Arc::new(move || store.check_lease())
}

/// One user's record to store: provider account, user name, and the record (`None`: forgotten).
pub type UserRow = (String, String, Option<crate::state::UserRecord>);

/// A held store lock; released when dropped.
pub struct StoreLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl std::fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreLock")
    }
}

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

/// The state directory: state database, journal and lock.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory (`settings.state_dir`).
    pub dir: PathBuf,
    /// The open state database, once something was written (shared by clones).
    db: Arc<std::sync::Mutex<Option<rusqlite::Connection>>>,
}

/// Holds the exclusive lock on a state directory until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateDir {
    /// The state directory at `dir`; nothing is checked or created yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir {
            dir: dir.into(),
            db: Arc::default(),
        }
    }

    /// The state database: `state.db` in the directory.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("state.db")
    }

    /// The state file of keyward before the state database (migrated on the first write).
    pub fn legacy_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Creates the directory (0700) if needed, and refuses one that another user owns or can
    /// write in (they could plant links to files keyward would then overwrite).
    pub fn ensure(&self) -> anyhow::Result<()> {
        crate::files::create_private_dir(&self.dir, "state directory")
    }

    /// Who holds the lock, if another process does now (see [`Store::busy`]): a shared lock is
    /// tried on the lock file and let go at once.
    pub fn busy(&self) -> Option<String> {
        let path = self.dir.join("lock");
        let file = std::fs::File::open(&path).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(std::fs::TryLockError::WouldBlock) => {
                Some(format!("another keyward process{}", holder_in(&path)))
            }
            Err(std::fs::TryLockError::Error(_)) => None,
        }
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
                return Err(anyhow::Error::new(Locked(format!(
                    "the state directory {} is locked by another keyward process{}; wait for it to finish",
                    self.dir.display(),
                    holder_in(&path)
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

    /// Loads the state: from `state.db`; before the first write, from an earlier keyward's
    /// `state.json`; an empty state when there is neither. A corrupt database or record is an
    /// error, never silently replaced: it is the only record of which keys keyward created.
    pub fn load(&self) -> anyhow::Result<State> {
        if self.dir.exists() {
            self.ensure()?;
        }
        let opened = self.db.lock().map(|g| g.is_some()).unwrap_or(false);
        if opened || self.db_path().exists() {
            let legacy = self.legacy_path();
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if legacy.exists() && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                // Migration renames it away: one here now came from elsewhere (a backup
                // restored, an earlier keyward run on the same directory). Said once a process.
                tracing::warn!(
                    "{} is ignored: the state is {} (move the old file aside to silence this)",
                    legacy.display(),
                    self.db_path().display()
                );
            }
            return self.with_db(read_db);
        }
        self.load_legacy()
    }

    /// The `state.json` of an earlier keyward (empty when there is none).
    fn load_legacy(&self) -> anyhow::Result<State> {
        let path = self.legacy_path();
        match crate::files::read_bounded(&path, crate::files::MAX_STATE_BYTES, false) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes).with_context(|| {
                    format!("the state file {} is not valid; fix or move it aside (keyward will not overwrite it)", path.display())
                })?;
                check_version(state.format_version, &path)?;
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

    /// Runs `f` on the state database, opening it first if needed: created private (0600, its
    /// WAL files take the same mode), WAL with `synchronous=FULL` (a committed change survives
    /// a power cut), the schema created, and an earlier `state.json` migrated into it.
    fn with_db<R>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut guard = self
            .db
            .lock()
            .map_err(|_| anyhow::anyhow!("the state database handle is poisoned"))?;
        if guard.is_none() {
            *guard = Some(self.open_db()?);
        }
        match guard.as_mut() {
            Some(conn) => f(conn),
            None => anyhow::bail!("the state database is not open"),
        }
    }

    fn open_db(&self) -> anyhow::Result<rusqlite::Connection> {
        self.ensure()?;
        let path = self.db_path();
        let fresh = !path.exists();
        // Created here, private and never through a link, before SQLite opens it.
        crate::files::open_private(&path, false)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        let mut conn = rusqlite::Connection::open(&path)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the tables of {}", path.display()))?;
        let legacy = self.legacy_path();
        if fresh && legacy.exists() {
            let state = self.load_legacy()?;
            write_db(&mut conn, &state)?;
            let kept = self.dir.join("state.json.migrated");
            std::fs::rename(&legacy, &kept)
                .with_context(|| format!("keeping {} as {}", legacy.display(), kept.display()))?;
            tracing::info!(
                "state migrated from {} into {} (the old file is kept as {})",
                legacy.display(),
                path.display(),
                kept.display()
            );
        }
        Ok(conn)
    }

    /// Writes the state durably; bumps its serial.
    pub fn save(&self, state: &mut State) -> anyhow::Result<()> {
        state.serial += 1;
        self.write_all(state)
    }

    /// Replaces the recorded state with `state` in one transaction.
    pub fn write_all(&self, state: &State) -> anyhow::Result<()> {
        self.with_db(|conn| write_db(conn, state))
    }
}

/// The state database's tables: `meta` (format version, serial) and `users`, one row per
/// service user record (its JSON, as `state.json` held it). The PostgreSQL backend keeps the
/// same two tables.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    provider TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (provider, name)
) WITHOUT ROWID;
";

fn check_version(version: u32, at: &std::path::Path) -> anyhow::Result<()> {
    if version > FORMAT_VERSION {
        anyhow::bail!(
            "the state in {} has format version {version}, newer than this keyward understands ({FORMAT_VERSION})",
            at.display()
        );
    }
    Ok(())
}

/// The whole state from the database.
fn read_db(conn: &mut rusqlite::Connection) -> anyhow::Result<State> {
    let tx = conn.transaction()?;
    let meta = |key: &str| -> anyhow::Result<Option<String>> {
        use rusqlite::OptionalExtension as _;
        Ok(tx
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    };
    let mut state = state_from_meta(
        meta("format_version")?,
        meta("serial")?,
        std::path::Path::new("the state database"),
    )?;
    {
        let mut rows = tx.prepare("SELECT provider, name, record FROM users")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            add_user_row(
                &mut state,
                row.get(0)?,
                row.get(1)?,
                &row.get::<_, String>(2)?,
            )?;
        }
    }
    tx.commit()?;
    Ok(state)
}

/// An empty state with the stored `format_version` and `serial` (absent: this keyward's
/// version, serial 0); a version newer than this keyward's, or a value that is no number, is
/// an error (the database backends share this).
pub(crate) fn state_from_meta(
    version: Option<String>,
    serial: Option<String>,
    at: &std::path::Path,
) -> anyhow::Result<State> {
    let version: u32 = version
        .map(|v| v.parse())
        .transpose()
        .context("the state database's format_version is not a number")?
        .unwrap_or(FORMAT_VERSION);
    check_version(version, at)?;
    let serial: u64 = serial
        .map(|v| v.parse())
        .transpose()
        .context("the state database's serial is not a number")?
        .unwrap_or(0);
    Ok(State {
        format_version: FORMAT_VERSION,
        serial,
        ..State::default()
    })
}

/// Adds one stored user row (a record's JSON) to `state`; a record that does not parse is an
/// error naming the user, never skipped (the database backends share this).
pub(crate) fn add_user_row(
    state: &mut State,
    provider: String,
    name: String,
    record: &str,
) -> anyhow::Result<()> {
    let rec = serde_json::from_str(record).with_context(|| {
        format!(
            "the state database's record of {} / {} is not valid; keyward will not overwrite it",
            crate::text::escape(&provider),
            crate::text::escape(&name)
        )
    })?;
    state
        .accounts
        .entry(provider)
        .or_default()
        .users
        .insert(name, rec);
    Ok(())
}

/// Replaces every row with `state`'s, in one transaction.
fn write_db(conn: &mut rusqlite::Connection, state: &State) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM users", [])?;
    {
        let mut insert =
            tx.prepare("INSERT INTO users (provider, name, record) VALUES (?1, ?2, ?3)")?;
        for (provider, account) in &state.accounts {
            for (name, rec) in &account.users {
                insert.execute(rusqlite::params![
                    provider,
                    name,
                    serde_json::to_string(rec)?
                ])?;
            }
        }
    }
    set_meta(&tx, state.serial)?;
    tx.commit()?;
    Ok(())
}

fn set_meta(tx: &rusqlite::Transaction<'_>, serial: u64) -> anyhow::Result<()> {
    let mut put = tx.prepare(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?;
    put.execute(["format_version", &FORMAT_VERSION.to_string()])?;
    put.execute(["serial", &serial.to_string()])?;
    Ok(())
}

impl Store for StateDir {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn busy(&self) -> Option<String> {
        StateDir::busy(self)
    }

    fn load(&self) -> anyhow::Result<State> {
        StateDir::load(self)
    }

    fn write(&self, state: &State) -> anyhow::Result<()> {
        self.write_all(state)
    }

    fn record_users(&self, serial: u64, users: &[UserRow]) -> anyhow::Result<()> {
        self.with_db(|conn| {
            let tx = conn.transaction()?;
            {
                let mut put = tx.prepare(
                    "INSERT INTO users (provider, name, record) VALUES (?1, ?2, ?3) ON CONFLICT (provider, name) DO UPDATE SET record = excluded.record",
                )?;
                let mut forget = tx.prepare("DELETE FROM users WHERE provider = ?1 AND name = ?2")?;
                for (provider, name, rec) in users {
                    match rec {
                        Some(rec) => {
                            put.execute(rusqlite::params![
                                provider,
                                name,
                                serde_json::to_string(rec)?
                            ])?;
                        }
                        None => {
                            forget.execute(rusqlite::params![provider, name])?;
                        }
                    }
                }
            }
            set_meta(&tx, serial)?;
            tx.commit()?;
            Ok(())
        })
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
        let mode = std::fs::metadata(dir.db_path())
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
        std::fs::write(dir.legacy_path(), b"{not json").unwrap();
        let err = dir.load().unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        // A database that is not one is an error too, and stays as it is.
        let dir = StateDir::new(tmp.path().join("db"));
        dir.ensure().unwrap();
        std::fs::write(dir.db_path(), b"this is not an SQLite database, not at all").unwrap();
        assert!(dir.load().is_err());
        assert!(
            std::fs::read(dir.db_path())
                .unwrap()
                .starts_with(b"this is not")
        );
    }

    #[test]
    fn a_json_state_migrates_on_the_first_write_and_one_user_is_recorded_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        dir.ensure().unwrap();
        let mut old = State {
            format_version: FORMAT_VERSION,
            serial: 7,
            ..State::default()
        };
        old.record_user("ng", "a", "bot_a", true, None);
        old.record_user("ng", "b", "bot_b", false, None);
        std::fs::write(dir.legacy_path(), serde_json::to_vec(&old).unwrap()).unwrap();
        // Read before any write: from the JSON file, and nothing is created.
        assert_eq!(dir.load().unwrap(), old);
        assert!(!dir.db_path().exists());
        // The first write migrates, then records only what it names.
        let mut c = old.user("ng", "b").cloned().unwrap();
        c.id = "bot_c".into();
        dir.record_users(
            8,
            &[
                ("ng".into(), "c".into(), Some(c)),
                ("ng".into(), "a".into(), None),
            ],
        )
        .unwrap();
        let now = StateDir::new(tmp.path()).load().unwrap();
        assert_eq!(now.serial, 8);
        assert!(now.user("ng", "a").is_none());
        assert_eq!(now.user("ng", "b"), old.user("ng", "b"));
        assert_eq!(now.user("ng", "c").map(|u| u.id.as_str()), Some("bot_c"));
        assert!(!dir.legacy_path().exists());
        assert!(tmp.path().join("state.json.migrated").exists());
    }

    #[test]
    fn second_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let _held = dir.lock().unwrap();
        let err = dir.lock().unwrap_err().to_string();
        assert!(err.contains("locked by another keyward process"), "{err}");
    }

    #[test]
    fn busy_names_the_holder_without_taking_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        assert_eq!(dir.busy(), None, "no lock file yet");
        let held = dir.lock().unwrap();
        let busy = dir.busy().expect("held");
        assert!(
            busy.contains(&format!("pid {}", std::process::id())),
            "{busy}"
        );
        drop(held);
        assert_eq!(dir.busy(), None);
        // Asking took nothing: the lock can be taken.
        let _again = dir.lock().unwrap();
    }
}
