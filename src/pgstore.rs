//! The PostgreSQL state backend (`settings.state_url: postgres://…`, product.md §10.5): the
//! state, the journal and the lock in one database that several keyward hosts share, so that
//! rotations go on when a host dies and nothing keyward knows is lost with a host's disk.
//!
//! - **Tables**, created on first use (under a transaction-scoped advisory lock, so that two
//!   instances starting at once do not race): `keyward_meta` (schema and format version, the
//!   state's serial, the current term and who holds it), `keyward_users` (one row per service
//!   user record: its JSON, as SQLite's `users` table holds it, and the term that wrote it),
//!   `keyward_journal` (one row per journal entry, in append order, with its term) and
//!   `keyward_terms` (one row per term: who held it, when it began, how many writes it made and
//!   when its last write was).
//! - **One leader.** [`Store::lock`] takes a PostgreSQL *session* advisory lock: one session in
//!   the database holds it, and it is released when that session ends however it ends (the
//!   process killed, the host gone, the connection cut, the backend terminated). Taking it
//!   begins a new **term**.
//! - **Fencing.** Every write runs in a transaction that first reads the current term
//!   `FOR SHARE` and is refused ([`Superseded`]) unless it is the term this process began: a
//!   superseded leader completes no write. Beginning a term updates that row, so it waits for
//!   the writes in flight of the term before and every later write of that term sees the new
//!   one: the new leader's recovery reads everything the old one wrote.
//! - **Sessions end when their process stops answering.** The session sets
//!   `idle_session_timeout` and `idle_in_transaction_session_timeout` to
//!   [`SESSION_TIMEOUT`], and the connection `tcp_user_timeout`; a worker pings every
//!   [`PING_EVERY`]. A leader that stops (SIGSTOP, a long pause) or loses its network loses its
//!   session, and with it the lock, within the timeout; a standby then takes over.
//! - **Never reconnected behind the caller's back.** A lost connection is lost for good: every
//!   later call fails with [`Lost`], and the owner (the daemon) starts over with a new store,
//!   waiting for the lock like any standby.
//! - **Driver:** the `postgres` crate (rust-postgres: the synchronous face of `tokio-postgres`,
//!   the maintained pure-Rust driver; TLS through `tokio-postgres-rustls`, the rustls keyward
//!   already uses for HTTPS), run on a thread of its own: the [`Store`] interface is
//!   synchronous, as SQLite's is, and a blocking client must not run on the async threads.
//! - **TLS** as the URL's `sslmode` says: `disable` (plain), `prefer` (the default: TLS when
//!   the server offers it), `require`, `verify-ca`, `verify-full` (TLS only). Whenever TLS is
//!   used the server's certificate is verified against the system's roots (or the URL's
//!   `sslrootcert` file) and its name: stricter than libpq's `require`, which checks nothing.
//! - **The password** (in the URL, from `${VAR}` or `settings.state_url_file`) is held as a
//!   secret, and every message shows the URL with it masked.

use std::str::FromStr as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};

use crate::oplog::{Entry, Event, Unfinished};
use crate::state::{FORMAT_VERSION, State};
use crate::store::{JournalLog, Locked, Store, StoreLock, UserRow};

/// How long a session may go without a word before the server ends it, releasing its lock.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle connection is pinged (well inside [`SESSION_TIMEOUT`]).
pub const PING_EVERY: Duration = Duration::from_secs(2);

/// How long after its last word from the database the leader still trusts that it leads:
/// half the session timeout, so that it stops before the server can have ended its session
/// (by its own clock, which runs on while the process is stopped).
pub const LEASE: Duration = Duration::from_secs(5);

/// The longest a call waits for the database's answer before the connection counts as lost
/// (a database that accepts connections and never answers must not hang keyward).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a caller waiting for an answer looks whether its lead is lost meanwhile.
const ANSWER_STEP: Duration = Duration::from_millis(250);

/// The advisory lock key of the leader's lock (`pg_try_advisory_lock`): one keyward
/// installation per database.
pub const LEADER_LOCK: i64 = 0x6b65_7977_6172_6401;

/// The advisory lock key that serializes creating and migrating the tables.
const SCHEMA_LOCK: i64 = 0x6b65_7977_6172_6402;

/// The version of the tables this keyward creates and understands.
const SCHEMA_VERSION: i64 = 1;

/// The tables (see the module doc).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keyward_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keyward_users (
    provider TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    term BIGINT NOT NULL,
    PRIMARY KEY (provider, name)
);
CREATE TABLE IF NOT EXISTS keyward_journal (
    id BIGSERIAL PRIMARY KEY,
    seq BIGINT NOT NULL,
    term BIGINT NOT NULL,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keyward_terms (
    term BIGINT PRIMARY KEY,
    holder TEXT NOT NULL,
    began TIMESTAMPTZ NOT NULL,
    writes BIGINT NOT NULL DEFAULT 0,
    last_write TIMESTAMPTZ
);
INSERT INTO keyward_meta (key, value) VALUES ('term', '0') ON CONFLICT (key) DO NOTHING;
";

/// A write refused because another keyward process has taken the lock since this one did.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state database {at}: this process's term {term} is over (term {current} began); it writes nothing more"
)]
pub struct Superseded {
    /// The database, password masked.
    pub at: String,
    /// The term this process held.
    pub term: i64,
    /// The term in force.
    pub current: i64,
}

/// The connection to the state database was lost; with it went the lock, if it was held.
#[derive(Debug, thiserror::Error)]
#[error("the connection to the state database {at} was lost ({why}); any lock it held is gone")]
pub struct Lost {
    /// The database, password masked.
    pub at: String,
    /// What ended it.
    pub why: String,
}

/// A job for the connection's thread.
type Job = Box<dyn FnOnce(&mut postgres::Client) + Send>;

/// What the store and its lock guard and journal share.
struct Inner {
    /// The connection string, password included.
    url: SecretString,
    /// The URL with its password masked, for messages.
    shown: String,
    /// Who this process is, for the lock holder's row (`host pid N`).
    identity: String,
    /// The connection's thread, once connected.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The term this process holds (0: none).
    term: AtomicI64,
    /// Why the connection was lost, once it was.
    lost: Arc<Mutex<Option<String>>>,
    /// When the database last answered.
    heard: Arc<Mutex<Boot>>,
    /// A state directory whose state is copied in when the database holds none yet.
    migrate_from: Mutex<Option<std::path::PathBuf>>,
}

/// The PostgreSQL backend of the [`Store`] (see the module doc). Connects on first use.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("at", &self.inner.shown)
            .finish()
    }
}

/// `url` with any password replaced by `***`.
pub fn masked(url: &str) -> String {
    // First by the text's own shape: a password that ends its part early (a `/` in it) would
    // otherwise parse as a host, a port and a path, and show whole.
    let url = crate::text::hide_url_password(url);
    match url::Url::parse(&url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // A password may also come as a query parameter.
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(a state_url that is not a URL)".to_string(),
    }
}

/// The password `url` carries (in its user part or as `password=`), to be masked wherever
/// keyward quotes text.
pub fn password_of(url: &SecretString) -> Option<SecretString> {
    let u = url::Url::parse(url.expose_secret()).ok()?;
    let password = match u.password() {
        Some(p) => percent_decode(p),
        None => u
            .query_pairs()
            .find(|(k, _)| k == "password")
            .map(|(_, v)| v.into_owned())?,
    };
    Some(SecretString::from(password))
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Checks that `url` is a PostgreSQL URL keyward can use; the error never quotes it.
pub fn check_url(url: &str) -> Result<(), String> {
    let (config, _) = parse(url)?;
    if config.get_hosts().is_empty() {
        return Err("state_url names no host".into());
    }
    Ok(())
}

/// A hint for a URL whose user name or password holds a character that ends that part early
/// (`#`, `?` or `/` before the URL's last `@`): the usual cause of a URL that will not parse,
/// or parses into another host.
fn encoding_hint(url: &str) -> &'static str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.rfind('@') {
        Some(at) if rest[..at].contains(['#', '?', '/']) => {
            "; a `#`, `?` or `/` in the user name or password must be percent-encoded (%23, %3F, %2F)"
        }
        _ => "",
    }
}

/// What to do about a server certificate keyward could not verify (it checks issuer and host
/// name whenever TLS is used, `prefer` and `require` included).
fn certificate_hint(why: &str) -> &'static str {
    if why.contains("UnknownIssuer") || why.contains("invalid peer certificate") {
        " (keyward verifies the server's certificate and host name whenever TLS is used: add sslrootcert=FILE to state_url naming the CA that signed it, connect by the name the certificate holds, or use sslmode=disable on a network you trust)"
    } else {
        ""
    }
}

/// How to secure the connection (`sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Disable,
    Prefer,
    Require,
}

/// The driver's config from `url` (its `sslmode` and `sslrootcert` taken out and returned as
/// what TLS to use and with which roots).
fn parse(url: &str) -> Result<(postgres::Config, (Tls, Option<String>)), String> {
    // Said when the URL fails to parse: the usual cause.
    let hint = encoding_hint(url);
    let mut u = url::Url::parse(url).map_err(|e| format!("state_url is not a URL: {e}{hint}"))?;
    if u.path().contains('@') {
        // `postgres://kw:5432/pa@db/k` parses as the host `kw`: a `/` in the password.
        return Err(format!(
            "state_url's database name holds `@`, which would be a `/` in the user name or password{}",
            "; a `#`, `?` or `/` in the user name or password must be percent-encoded (%23, %3F, %2F), and an `@` in a database name as %40"
        ));
    }
    if u.fragment().is_some() {
        return Err(
            "state_url has a `#` part, which a connection URL never has; a `#`, `?` or `/` in the user name or password must be percent-encoded (%23, %3F, %2F)".to_string(),
        );
    }
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "state_url must be a postgres:// URL (got the scheme {:?})",
            u.scheme()
        ));
    }
    let mut tls = Tls::Prefer;
    let mut root = None;
    let mut rest = Vec::new();
    for (k, v) in u.query_pairs() {
        match k.as_ref() {
            "sslmode" => {
                tls = match v.as_ref() {
                    "disable" => Tls::Disable,
                    "allow" | "prefer" => Tls::Prefer,
                    "require" | "verify-ca" | "verify-full" => Tls::Require,
                    other => return Err(format!("state_url: unknown sslmode {other:?}")),
                }
            }
            "sslrootcert" => root = Some(v.into_owned()),
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    u.set_query(None);
    if !rest.is_empty() {
        u.query_pairs_mut().extend_pairs(rest);
    }
    let mut config = postgres::Config::from_str(u.as_str()).map_err(|e| {
        if hint.is_empty() {
            format!("state_url is not a PostgreSQL connection URL: {e}")
        } else {
            // The driver quotes the option it did not know: a piece of the password.
            format!("state_url is not a PostgreSQL connection URL{hint}")
        }
    })?;
    config.ssl_mode(match tls {
        Tls::Disable => postgres::config::SslMode::Disable,
        Tls::Prefer => postgres::config::SslMode::Prefer,
        Tls::Require => postgres::config::SslMode::Require,
    });
    Ok((config, (tls, root)))
}

/// The TLS connector: rustls, verifying the server against the system's roots or `root`.
fn tls_connector(root: Option<&str>) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            let pem = std::fs::read(path).with_context(|| format!("reading sslrootcert {path}"))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.with_context(|| format!("reading sslrootcert {path}"))?)?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The `application_name` of keyward's sessions: `keyward HOST pid N` (PostgreSQL keeps 63
/// bytes of it), so an operator sees whose session is whose, and a process refused the lock
/// can name the holder.
fn application_name(identity: &str) -> String {
    let mut name = format!("keyward {identity}");
    if name.len() > 63 {
        let cut = (0..=63)
            .rev()
            .find(|i| name.is_char_boundary(*i))
            .unwrap_or(0);
        name.truncate(cut);
    }
    name
}

/// The `application_name` of another session holding the leader's advisory lock in this
/// database: a row when one holds it, its name `NULL` where this role may not see it (a bigint
/// key is held as class id = its high 32 bits, object id = its low 32 bits, `objsubid` 1;
/// `pg_locks` lists every database's).
const HOLDER_SESSION: &str = "SELECT a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.pid <> pg_backend_pid() \
     AND l.classid = (($1::bigint >> 32) & 4294967295)::oid AND l.objid = ($1::bigint & 4294967295)::oid \
     LIMIT 1";

/// Who holds the lock, in words (see [`holder_of`]), given the holding session's name: the
/// recorded leader is read here.
fn name_holder(
    client: &mut postgres::Client,
    session: Option<String>,
) -> anyhow::Result<Option<String>> {
    let recorded: Option<String> = client
        .query_opt("SELECT value FROM keyward_meta WHERE key = 'leader'", &[])?
        .map(|r| r.get(0));
    Ok(holder_of(recorded, session))
}

/// Who holds the lock, in words: the recorded leader (`HOST pid N, term T`) when the holding
/// session is that process, else the holding session's process (it is taking the lead).
fn holder_of(recorded: Option<String>, session: Option<String>) -> Option<String> {
    let Some(session) = session.filter(|s| s.starts_with("keyward ")) else {
        return recorded;
    };
    let holds = |r: &str| {
        r.rsplit_once(", term ")
            .is_some_and(|(identity, _)| application_name(identity) == session)
    };
    match recorded {
        Some(r) if holds(&r) => Some(r),
        _ => Some(format!("{}, taking the lead", &session["keyward ".len()..])),
    }
}

impl PgStore {
    /// The store at `url` (a `postgres://` URL; nothing is connected yet).
    pub fn new(url: SecretString) -> PgStore {
        let shown = masked(url.expose_secret());
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        PgStore {
            inner: Arc::new(Inner {
                url,
                shown,
                identity: format!("{host} pid {}", std::process::id()),
                jobs: Mutex::new(None),
                term: AtomicI64::new(0),
                lost: Arc::default(),
                heard: Arc::new(Mutex::new(Boot::now())),
                migrate_from: Mutex::new(None),
            }),
        }
    }

    /// Copies the state and journal of the state directory `dir` (an installation that ran on
    /// one host until now) into the database the first time this process takes the lock of a
    /// database that holds no state yet.
    pub fn migrating_from(self, dir: impl Into<std::path::PathBuf>) -> PgStore {
        *self
            .inner
            .migrate_from
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(dir.into());
        self
    }

    /// See [`PgStore::migrating_from`]; under the lock, with this process's term.
    fn migrate(&self) -> anyhow::Result<()> {
        let Some(dir) = self
            .inner
            .migrate_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let done = || {
            // Asked once a process, and again after a failure only.
            *self
                .inner
                .migrate_from
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        };
        let local = crate::store::StateDir::new(&dir);
        let journal_file = crate::journal::Journal::path_in(&dir);
        if !(local.db_path().exists() || local.legacy_path().exists() || journal_file.exists()) {
            done();
            return Ok(());
        }
        let holds_state: bool = self.inner.run(|client| {
            Ok(client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM keyward_users) OR EXISTS (SELECT 1 FROM keyward_journal) OR EXISTS (SELECT 1 FROM keyward_meta WHERE key = 'serial')",
                    &[],
                )?
                .get(0))
        })?;
        if holds_state {
            done();
            return Ok(());
        }
        let state = local.load()?;
        let entries = local.journal_entries()?;
        if state.accounts.is_empty() && entries.is_empty() {
            done();
            return Ok(());
        }
        self.write(&state)?;
        let term = self.inner.fenced()?;
        let rows: Vec<(i64, String)> = entries
            .iter()
            .map(|e| Ok((i64::try_from(e.seq)?, serde_json::to_string(e)?)))
            .collect::<anyhow::Result<_>>()?;
        let shown = self.inner.shown.clone();
        self.inner.run_bulk(move |client| {
            let mut tx = client.transaction()?;
            check_term(&mut tx, term, &shown)?;
            for (seq, entry) in &rows {
                tx.execute(
                    "INSERT INTO keyward_journal (seq, term, entry) VALUES ($1, $2, $3)",
                    &[seq, &term, entry],
                )?;
            }
            tx.commit()?;
            Ok(())
        })?;
        done();
        let users: usize = state.accounts.values().map(|a| a.users.len()).sum();
        tracing::info!(
            "the state of {} ({users} user record(s), {} journal entr(ies)) was copied into the state database {}; that directory's state is no longer read (keep it as a backup)",
            dir.display(),
            entries.len(),
            self.inner.shown
        );
        Ok(())
    }

    /// The term this process holds (0: none).
    pub fn term(&self) -> i64 {
        self.inner.term.load(Ordering::SeqCst)
    }
}

/// A reading of the clock that keeps counting while the host is suspended (`CLOCK_BOOTTIME`),
/// as the database server's clock does: [`Instant`] stops during a suspend (and some VM
/// pauses), and a lease measured by it would still look fresh to a host just resumed.
#[derive(Debug, Clone, Copy)]
struct Boot(Duration);

impl Boot {
    fn now() -> Boot {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Boot(Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        ))
    }

    fn elapsed(self) -> Duration {
        Boot::now().0.saturating_sub(self.0)
    }
}

impl Inner {
    /// Why the connection can no longer be used, if it cannot: the server or the network
    /// ended it, or (holding the lock) nothing was heard from it for a whole session timeout,
    /// after which the server counts the session over: this process leads no more, whatever
    /// its connection says.
    fn lost_reason(&self) -> Option<String> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(why);
        }
        let quiet = self.quiet();
        (self.term.load(Ordering::SeqCst) != 0 && quiet > SESSION_TIMEOUT)
            .then(|| format!("no word from the database for {}s", quiet.as_secs()))
    }

    /// How long since the database last answered.
    fn quiet(&self) -> Duration {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Runs `f` on the connection's thread and waits for its answer; connects first if needed.
    /// A call expected to be quick: while this process holds a term, it counts as lost once
    /// the database has said nothing for the whole session timeout (a silent network: the
    /// server has ended the session, and another process may lead), not only after
    /// [`ANSWER_TIMEOUT`].
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        self.run_within(false, f)
    }

    /// [`Self::run`] for a call whose work grows with the state (a whole load or write, the
    /// journal read or compacted): it may legitimately take longer than the session timeout,
    /// so only [`ANSWER_TIMEOUT`] ends it.
    fn run_bulk<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        self.run_within(true, f)
    }

    fn run_within<R: Send + 'static>(
        &self,
        bulk: bool,
        f: impl FnOnce(&mut postgres::Client) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        if let Some(why) = self.lost_reason() {
            return Err(Lost {
                at: self.shown.clone(),
                why,
            }
            .into());
        }
        let jobs = {
            let mut guard = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                *guard = Some(self.connect()?);
            }
            guard
                .clone()
                .context("the state database is not connected")?
        };
        let (answer, reply) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let _ = answer.send(f(client));
        });
        let lost = || -> anyhow::Error {
            let why = self
                .lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "its thread ended".into());
            Lost {
                at: self.shown.clone(),
                why,
            }
            .into()
        };
        jobs.send(job).map_err(|_| lost())?;
        let asked = Instant::now();
        let result = loop {
            match reply.recv_timeout(ANSWER_STEP) {
                Ok(result) => break result,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let why = if asked.elapsed() >= ANSWER_TIMEOUT {
                        Some(format!("no answer within {}s", ANSWER_TIMEOUT.as_secs()))
                    } else if bulk {
                        None
                    } else {
                        self.lost_reason()
                    };
                    if let Some(why) = why {
                        let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
                        l.get_or_insert(why);
                        drop(l);
                        return Err(lost());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(lost()),
            }
        };
        result.map_err(|e| {
            if let Some(over) = e.downcast_ref::<Superseded>() {
                // Another process leads now: this store writes nothing more.
                let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
                l.get_or_insert_with(|| format!("term {} began", over.current));
                return e;
            }
            // A broken connection is a lost one, said so.
            match e.downcast_ref::<postgres::Error>() {
                Some(pg) if ends_session(pg) => {
                    let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
                    l.get_or_insert_with(|| describe(pg));
                    drop(l);
                    lost()
                }
                // The server's own words and code, where it said something.
                Some(pg) => anyhow::anyhow!("the state database {}: {}", self.shown, describe(pg)),
                None => e,
            }
        })
    }

    /// Starts the connection's thread, which connects and creates the tables; waits for it.
    /// (The driver blocks on a runtime of its own: it must not run on an async thread.)
    fn connect(&self) -> anyhow::Result<mpsc::Sender<Job>> {
        let (mut config, (tls, root)) =
            parse(self.url.expose_secret()).map_err(|e| anyhow::anyhow!("{e}"))?;
        config
            // Names the process, so an operator (or a test) can find its session.
            .application_name(&application_name(&self.identity))
            .connect_timeout(SESSION_TIMEOUT)
            .tcp_user_timeout(SESSION_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(PING_EVERY);
        let connector = match tls {
            Tls::Disable => None,
            Tls::Prefer | Tls::Require => Some(tls_connector(root.as_deref())?),
        };
        let shown = self.shown.clone();
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::sync_channel::<anyhow::Result<()>>(1);
        let lost = Arc::clone(&self.lost);
        let heard = Arc::clone(&self.heard);
        std::thread::Builder::new()
            .name("keyward-state-db".into())
            .spawn(move || {
                let connected = match connector {
                    None => config.connect(postgres::NoTls),
                    Some(tls) => config.connect(tls),
                };
                let client = connected
                    .map_err(|e| {
                        let why = describe(&e);
                        anyhow::anyhow!(
                            "cannot connect to the state database {shown}: {why}{}",
                            certificate_hint(&why)
                        )
                    })
                    .and_then(|mut client| {
                        prepare(&mut client, &shown)?;
                        Ok(client)
                    });
                match client {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        serve(client, queue, lost, heard);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .context("starting the state database's thread")?;
        match started.recv_timeout(ANSWER_TIMEOUT) {
            Ok(connected) => connected?,
            Err(mpsc::RecvTimeoutError::Timeout) => anyhow::bail!(
                "cannot connect to the state database {}: no answer within {}s",
                self.shown,
                ANSWER_TIMEOUT.as_secs()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the state database's thread ended before it connected")
            }
        }
        Ok(jobs)
    }

    /// Refuses the write unless this process's term is the one in force (see the module doc).
    fn fenced(&self) -> anyhow::Result<i64> {
        match self.term.load(Ordering::SeqCst) {
            0 => anyhow::bail!(
                "the state database {}: writing needs its lock, which this process does not hold",
                self.shown
            ),
            term => Ok(term),
        }
    }
}

/// Sets the session's timeouts and creates the tables.
fn prepare(client: &mut postgres::Client, shown: &str) -> anyhow::Result<()> {
    let timeout = format!("{}ms", SESSION_TIMEOUT.as_millis());
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning; SET idle_session_timeout = '{timeout}'; SET idle_in_transaction_session_timeout = '{timeout}'"
        ))
        .map_err(|e| {
            anyhow::anyhow!(
                "the state database {shown} refused the session timeouts keyward needs (PostgreSQL 14 or later): {}",
                describe(&e)
            )
        })?;
    ensure_schema(client).with_context(|| format!("creating keyward's tables in {shown}"))
}

/// The connection's thread: runs jobs in order, and pings when idle; marks the connection lost
/// when the server or the network ends it.
fn serve(
    mut client: postgres::Client,
    queue: mpsc::Receiver<Job>,
    lost: Arc<Mutex<Option<String>>>,
    heard: Arc<Mutex<Boot>>,
) {
    let mark = |why: String| {
        let mut l = lost.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_none() {
            tracing::warn!("the state database connection was lost: {why}");
            *l = Some(why);
        }
    };
    loop {
        match queue.recv_timeout(PING_EVERY) {
            Ok(job) => job(&mut client),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = client.simple_query("SELECT 1") {
                    mark(describe(&e));
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if client.is_closed() {
            mark("the server closed it".into());
        } else {
            *heard.lock().unwrap_or_else(|e| e.into_inner()) = Boot::now();
        }
    }
}

/// Whether the error means the session is over: the connection closed, or the server ending
/// it (a FATAL error, SQLSTATE class 57 "operator intervention" such as
/// `pg_terminate_backend` or `idle_session_timeout`, or class 08 "connection exception").
fn ends_session(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("57")
                || code.starts_with("08")
                || matches!(db.severity(), "FATAL" | "PANIC")
        })
}

/// A driver error in one line: the server's own message and code where there is one.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => crate::text::with_sources(e.to_string(), e),
    }
}

/// Creates the tables if needed and refuses a database a newer keyward has migrated.
/// Tables already there at this version are only read: a user that may only read (for `plan`
/// and `status`) needs no more.
fn ensure_schema(client: &mut postgres::Client) -> anyhow::Result<()> {
    let present: bool = client
        .query_one(
            "SELECT to_regclass('keyward_meta') IS NOT NULL AND to_regclass('keyward_terms') IS NOT NULL",
            &[],
        )?
        .get(0);
    if present {
        let current: Option<String> = client
            .query_opt(
                "SELECT value FROM keyward_meta WHERE key = 'schema_version'",
                &[],
            )?
            .map(|r| r.get(0));
        if current.is_some_and(|v| v == SCHEMA_VERSION.to_string()) {
            return Ok(());
        }
    }
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute(SCHEMA)?;
    let version: Option<String> = tx
        .query_opt(
            "SELECT value FROM keyward_meta WHERE key = 'schema_version'",
            &[],
        )?
        .map(|r| r.get(0));
    match version.map(|v| v.parse::<i64>()) {
        None => {
            tx.execute(
                "INSERT INTO keyward_meta (key, value) VALUES ('schema_version', $1)",
                &[&SCHEMA_VERSION.to_string()],
            )?;
        }
        Some(Ok(v)) if v <= SCHEMA_VERSION => {}
        Some(Ok(v)) => anyhow::bail!(
            "the tables have schema version {v}, newer than this keyward understands ({SCHEMA_VERSION})"
        ),
        Some(Err(_)) => anyhow::bail!("keyward_meta's schema_version is not a number"),
    }
    tx.commit()?;
    Ok(())
}

/// Within a write's transaction: refuses it unless `term` is the term in force, and counts the
/// write against the term.
fn check_term(tx: &mut postgres::Transaction<'_>, term: i64, shown: &str) -> anyhow::Result<()> {
    let current: String = tx
        .query_one(
            "SELECT value FROM keyward_meta WHERE key = 'term' FOR SHARE",
            &[],
        )?
        .get(0);
    let current: i64 = current
        .parse()
        .context("keyward_meta's term is not a number")?;
    if current != term {
        return Err(Superseded {
            at: shown.to_string(),
            term,
            current,
        }
        .into());
    }
    tx.execute(
        "UPDATE keyward_terms SET writes = writes + 1, last_write = clock_timestamp() WHERE term = $1",
        &[&term],
    )?;
    Ok(())
}

/// Sets the state's serial and format version.
fn set_meta(tx: &mut postgres::Transaction<'_>, serial: u64) -> anyhow::Result<()> {
    for (key, value) in [
        ("format_version", FORMAT_VERSION.to_string()),
        ("serial", serial.to_string()),
    ] {
        tx.execute(
            "INSERT INTO keyward_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
    }
    Ok(())
}

/// Rows to write: provider, name, and the record's JSON (`None`: forget the user).
type Rows = Vec<(String, String, Option<String>)>;

impl Store for PgStore {
    fn location(&self) -> String {
        self.inner.shown.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn lost(&self) -> Option<String> {
        self.inner.lost_reason()
    }

    fn check_lease(&self) -> anyhow::Result<()> {
        if self.term() == 0 {
            return Ok(());
        }
        if let Some(why) = self.lost() {
            return Err(Lost {
                at: self.inner.shown.clone(),
                why,
            }
            .into());
        }
        let quiet = self.inner.quiet();
        if quiet > LEASE {
            anyhow::bail!(
                "no word from the state database {} for {}s (the process was paused, or the network is gone): it may no longer lead, so it starts nothing more",
                self.inner.shown,
                quiet.as_secs()
            );
        }
        Ok(())
    }

    fn busy(&self) -> Option<String> {
        if self.term() != 0 {
            return None;
        }
        self.inner
            .run(|client| {
                let Some(row) = client.query_opt(HOLDER_SESSION, &[&LEADER_LOCK])? else {
                    return Ok(None);
                };
                Ok(Some(
                    name_holder(client, row.get(0))?
                        .map(|h| format!("another keyward process ({h})"))
                        .unwrap_or_else(|| "another keyward process".to_string()),
                ))
            })
            .ok()
            .flatten()
    }

    fn leader(&self) -> Option<String> {
        if self.lost().is_some() {
            return None;
        }
        self.inner
            .run(|client| {
                Ok(client
                    .query_opt("SELECT value FROM keyward_meta WHERE key = 'leader'", &[])?
                    .map(|r| r.get(0)))
            })
            .ok()
            .flatten()
    }

    fn load(&self) -> anyhow::Result<State> {
        let shown = self.inner.shown.clone();
        self.inner.run_bulk(move |client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let meta =
                |tx: &mut postgres::Transaction<'_>, key: &str| -> anyhow::Result<Option<String>> {
                    Ok(tx
                        .query_opt("SELECT value FROM keyward_meta WHERE key = $1", &[&key])?
                        .map(|r| r.get(0)))
                };
            let version = meta(&mut tx, "format_version")?;
            let serial = meta(&mut tx, "serial")?;
            let mut state =
                crate::store::state_from_meta(version, serial, std::path::Path::new(&shown))?;
            for row in tx.query("SELECT provider, name, record FROM keyward_users", &[])? {
                crate::store::add_user_row(&mut state, row.get(0), row.get(1), row.get(2))?;
            }
            tx.commit()?;
            Ok(state)
        })
    }

    fn write(&self, state: &State) -> anyhow::Result<()> {
        let term = self.inner.fenced()?;
        let mut rows: Rows = Vec::new();
        for (provider, account) in &state.accounts {
            for (name, rec) in &account.users {
                rows.push((
                    provider.clone(),
                    name.clone(),
                    Some(serde_json::to_string(rec)?),
                ));
            }
        }
        let (serial, shown) = (state.serial, self.inner.shown.clone());
        self.inner.run_bulk(move |client| {
            let mut tx = client.transaction()?;
            check_term(&mut tx, term, &shown)?;
            tx.execute("DELETE FROM keyward_users", &[])?;
            put_rows(&mut tx, &rows, term)?;
            set_meta(&mut tx, serial)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn record_users(&self, serial: u64, users: &[UserRow]) -> anyhow::Result<()> {
        let term = self.inner.fenced()?;
        let rows: Rows = users
            .iter()
            .map(|(p, n, rec)| {
                Ok((
                    p.clone(),
                    n.clone(),
                    rec.as_ref().map(serde_json::to_string).transpose()?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let shown = self.inner.shown.clone();
        self.inner.run(move |client| {
            let mut tx = client.transaction()?;
            check_term(&mut tx, term, &shown)?;
            put_rows(&mut tx, &rows, term)?;
            set_meta(&mut tx, serial)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn lock(&self) -> anyhow::Result<StoreLock> {
        let (identity, shown) = (self.inner.identity.clone(), self.inner.shown.clone());
        let term = self.inner.run(move |client| {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
                .get(0);
            if !got {
                // The session that holds the lock names its process; the recorded leader may
                // be the one before it, when the holder has only just taken the lock.
                let session: Option<String> = client
                    .query_opt(HOLDER_SESSION, &[&LEADER_LOCK])
                    .ok()
                    .flatten()
                    .and_then(|r| r.get::<_, Option<String>>(0));
                let holder = name_holder(client, session)?;
                return Err(anyhow::Error::new(Locked(format!(
                    "the state database {shown} is locked by another keyward process{}",
                    holder
                        .map(|h| format!(" ({})", crate::text::escape(&h)))
                        .unwrap_or_default()
                ))));
            }
            let begun = (|| -> anyhow::Result<i64> {
                let mut tx = client.transaction()?;
                // Waits for the writes in flight of the term before (they hold this row).
                let term: String = tx
                    .query_one(
                        "UPDATE keyward_meta SET value = (value::bigint + 1)::text WHERE key = 'term' RETURNING value",
                        &[],
                    )?
                    .get(0);
                let term: i64 = term.parse().context("keyward_meta's term is not a number")?;
                tx.execute(
                    "INSERT INTO keyward_terms (term, holder, began) VALUES ($1, $2, clock_timestamp())",
                    &[&term, &identity],
                )?;
                tx.execute(
                    "INSERT INTO keyward_meta (key, value) VALUES ('leader', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&format!("{identity}, term {term}")],
                )?;
                tx.commit()?;
                Ok(term)
            })();
            if begun.is_err() {
                let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK]);
            }
            begun
        })?;
        self.inner.term.store(term, Ordering::SeqCst);
        tracing::info!(
            "holding the lock of the state database {} (term {term})",
            self.inner.shown
        );
        let lock = StoreLock::new(LeaderLock {
            inner: Arc::clone(&self.inner),
        });
        self.migrate().with_context(|| {
            format!(
                "copying the state directory's state into the state database {}",
                self.inner.shown
            )
        })?;
        Ok(lock)
    }

    fn journal(&self) -> anyhow::Result<Arc<dyn JournalLog>> {
        let last: i64 = self.inner.run(|client| {
            Ok(client
                .query_one("SELECT coalesce(max(seq), 0) FROM keyward_journal", &[])?
                .get(0))
        })?;
        Ok(Arc::new(PgJournal {
            inner: Arc::clone(&self.inner),
            seq: AtomicU64::new(u64::try_from(last).unwrap_or(0)),
        }))
    }

    fn journal_entries(&self) -> anyhow::Result<Vec<Entry>> {
        let shown = self.inner.shown.clone();
        self.inner.run_bulk(move |client| {
            let mut entries = Vec::new();
            for row in client.query("SELECT id, entry FROM keyward_journal ORDER BY id", &[])? {
                let (id, entry): (i64, String) = (row.get(0), row.get(1));
                entries.push(serde_json::from_str(&entry).with_context(|| {
                    format!(
                        "the journal in {shown} is corrupt at row {id}; keyward will not apply anything until it is repaired"
                    )
                })?);
            }
            Ok(entries)
        })
    }
}

/// Upserts (or deletes) user rows, marking them with `term`.
fn put_rows(tx: &mut postgres::Transaction<'_>, rows: &Rows, term: i64) -> anyhow::Result<()> {
    let put = tx.prepare(
        "INSERT INTO keyward_users (provider, name, record, term) VALUES ($1, $2, $3, $4) ON CONFLICT (provider, name) DO UPDATE SET record = excluded.record, term = excluded.term",
    )?;
    let forget = tx.prepare("DELETE FROM keyward_users WHERE provider = $1 AND name = $2")?;
    for (provider, name, record) in rows {
        match record {
            Some(record) => tx.execute(&put, &[provider, name, record, &term])?,
            None => tx.execute(&forget, &[provider, name])?,
        };
    }
    Ok(())
}

/// The leader's lock: released (and the term given up) when dropped.
struct LeaderLock {
    inner: Arc<Inner>,
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        if self.inner.lost_reason().is_some() {
            // The session (and its lock) is gone, or may hang: nothing to let go of.
            self.inner.term.store(0, Ordering::SeqCst);
            return;
        }
        self.inner.term.store(0, Ordering::SeqCst);
        // Best effort: a lost session released it already.
        let _ = self.inner.run(|client| {
            client.execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])?;
            Ok(())
        });
    }
}

/// The journal in the state database.
struct PgJournal {
    inner: Arc<Inner>,
    seq: AtomicU64,
}

impl JournalLog for PgJournal {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn append(&self, seq: u64, event: Event, durable: bool) -> anyhow::Result<()> {
        let term = self.inner.fenced()?;
        let entry = serde_json::to_string(&Entry {
            seq,
            at: jiff::Timestamp::now(),
            event,
        })?;
        let seq = i64::try_from(seq).context("journal sequence number out of range")?;
        let shown = self.inner.shown.clone();
        self.inner.run(move |client| {
            let mut tx = client.transaction()?;
            if !durable {
                // Lost in a crash of the database server at worst, as a file journal's
                // unsynced line would be; the entries that matter are durable.
                tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            }
            check_term(&mut tx, term, &shown)?;
            tx.execute(
                "INSERT INTO keyward_journal (seq, term, entry) VALUES ($1, $2, $3)",
                &[&seq, &term, &entry],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn compact(&self, keep: &dyn Fn(&Unfinished) -> bool) -> anyhow::Result<()> {
        let term = self.inner.fenced()?;
        let store = PgStore {
            inner: Arc::clone(&self.inner),
        };
        let entries = store.journal_entries()?;
        let kept: Vec<i64> = crate::oplog::unfinished(&entries)
            .into_iter()
            .filter(|op| keep(op))
            .filter_map(|op| i64::try_from(op.seq).ok())
            .collect();
        let shown = self.inner.shown.clone();
        self.inner.run_bulk(move |client| {
            let mut tx = client.transaction()?;
            check_term(&mut tx, term, &shown)?;
            tx.execute(
                "DELETE FROM keyward_journal WHERE NOT (seq = ANY($1))",
                &[&kept],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_that_ends_its_part_early_is_refused_with_the_encoding_hint() {
        for url in [
            "postgres://kw:pa#ss@db.example/keyward",
            "postgres://kw:12#34@db.example/keyward",
            "postgres://kw:pa/ss@db.example/keyward",
            "postgres://kw:12?x@db.example/keyward",
            "postgres://kw:5432/Secr3tPW@db.example:5433/keyward",
        ] {
            let e = check_url(url).expect_err(url);
            assert!(e.contains("must be percent-encoded"), "{url}: {e}");
            assert!(!e.contains("ss@") && !e.contains("34@"), "{url}: {e}");
        }
        // A stray `#` elsewhere is refused too, with the same advice.
        let e = check_url("postgres://db.example/keyward#x").unwrap_err();
        assert!(e.contains("%23"), "{e}");
        // Encoded, it is fine; an `@` in the password needs no encoding (the last `@` counts),
        // nor does one in an option.
        assert!(check_url("postgres://db.example:5432/k?application_name=a@b").is_ok());
        assert!(check_url("postgres://kw:pa%23ss%2F@db.example/keyward").is_ok());
        assert!(check_url("postgres://kw:p@ss@db.example/keyward").is_ok());
        // However it parses, a message never shows the password.
        let m = masked("postgres://kw:5432/Secr3tPW@db.example:5433/keyward");
        assert!(!m.contains("Secr3tPW"), "{m}");
        assert!(m.contains("db.example:5433"), "{m}");
    }

    #[test]
    fn a_refused_lock_names_the_process_that_holds_it_not_the_one_before() {
        let recorded = Some("db1 pid 10, term 4".to_string());
        // The recorded leader still holds it.
        assert_eq!(
            holder_of(recorded.clone(), Some("keyward db1 pid 10".into())).as_deref(),
            Some("db1 pid 10, term 4")
        );
        // Another process took it and has not yet recorded its term.
        assert_eq!(
            holder_of(recorded.clone(), Some("keyward db2 pid 10".into())).as_deref(),
            Some("db2 pid 10, taking the lead")
        );
        assert_eq!(
            holder_of(None, Some("keyward db2 pid 7".into())).as_deref(),
            Some("db2 pid 7, taking the lead")
        );
        // A pid that only begins like the recorded one is another process.
        assert_eq!(
            holder_of(recorded.clone(), Some("keyward db1 pid 1".into())).as_deref(),
            Some("db1 pid 1, taking the lead")
        );
        // The session cannot be seen (another role, no pg_read_all_stats): the record.
        assert_eq!(holder_of(recorded.clone(), None), recorded);
        // A host name too long for application_name: compared as PostgreSQL keeps it.
        let host = "h".repeat(70);
        let long = format!("{host} pid 3, term 9");
        let session = application_name(&format!("{host} pid 3"));
        assert_eq!(session.len(), 63);
        assert_eq!(holder_of(Some(long.clone()), Some(session)), Some(long));
    }

    #[test]
    fn passwords_are_masked_wherever_they_are_written() {
        let m = masked("postgres://keyward:s3cret@db.example:5432/keyward?sslmode=require");
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.contains("db.example") && m.contains("***"), "{m}");
        let m = masked("postgres://db.example/keyward?password=s3cret&sslmode=disable");
        assert!(!m.contains("s3cret"), "{m}");
        assert!(!masked("not a url s3cret").contains("s3cret"));
    }

    #[test]
    fn the_password_is_found_for_masking() {
        use secrecy::ExposeSecret as _;
        let url = SecretString::from("postgres://kw:p%40ss+word@h/db".to_string());
        assert_eq!(password_of(&url).unwrap().expose_secret(), "p@ss+word");
        let url = SecretString::from("postgres://h/db?password=qwerty".to_string());
        assert_eq!(password_of(&url).unwrap().expose_secret(), "qwerty");
        assert!(password_of(&SecretString::from("postgres://h/db".to_string())).is_none());
    }

    #[test]
    fn urls_are_checked_without_quoting_them() {
        assert!(check_url("postgres://u:p@127.0.0.1:5432/db?sslmode=disable").is_ok());
        assert!(check_url("postgresql://u@h/db?sslmode=verify-full").is_ok());
        let e = check_url("mysql://u:s3cret@h/db").unwrap_err();
        assert!(e.contains("postgres://") && !e.contains("s3cret"), "{e}");
        let e = check_url("postgres://u:s3cret@h/db?sslmode=sometimes").unwrap_err();
        assert!(e.contains("sslmode") && !e.contains("s3cret"), "{e}");
    }
}
