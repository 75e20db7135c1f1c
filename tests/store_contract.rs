//! The state-store contract, held by both backends: the state directory (SQLite, files) and a
//! real PostgreSQL database (`settings.state_url`). Each store instance stands for a process:
//! two instances on one location contend for its lock as two keyward processes would. Then
//! what only the shared backend promises: fenced writes, a lost session that writes nothing
//! more, and a record of every term's writes.

mod common;

use std::sync::Arc;

use common::pg::Pg;
use jiff::Timestamp;
use keyward::model::{Action, KeyKind};
use keyward::oplog::Event;
use keyward::pgstore::PgStore;
use keyward::state::{FORMAT_VERSION, State};
use keyward::store::{Locked, StateDir, Store};
use secrecy::SecretString;
use std::str::FromStr as _;

type Make<'a> = &'a dyn Fn() -> Arc<dyn Store>;

fn state_with(users: &[(&str, &str, &str)]) -> State {
    let mut state = State {
        format_version: FORMAT_VERSION,
        ..State::default()
    };
    for (provider, name, id) in users {
        state.record_user(provider, name, id, true, None);
    }
    state
}

fn intent(user: &str) -> Event {
    Event::Intent {
        action: Action::RotateKey,
        provider: "ng".into(),
        user: user.into(),
        user_id: Some(format!("bot_{user}")),
        slot: Some("deploy".into()),
        key_id: Some("ak_old".into()),
        forced: false,
    }
}

/// What every backend promises.
fn contract(make: Make<'_>) {
    let a = make();
    // Empty at first: nothing recorded, nothing journalled.
    let empty = a.load().unwrap();
    assert_eq!(empty.serial, 0);
    assert!(empty.accounts.is_empty());
    assert!(a.journal_entries().unwrap().is_empty());

    // One lock holder at a time; the other is told who holds it.
    let held = a.lock().unwrap();
    let b = make();
    let refused = b.lock().expect_err("a second holder");
    assert!(refused.downcast_ref::<Locked>().is_some(), "{refused:#}");
    assert!(refused.to_string().contains("locked"), "{refused:#}");
    assert!(
        refused
            .to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{refused:#}"
    );

    // A whole state, then one user recorded and one forgotten, as the executor does.
    let mut state = state_with(&[("ng", "alpha", "bot_a"), ("ng", "beta", "bot_b")]);
    state.serial = 1;
    a.write(&state).unwrap();
    assert_eq!(
        b.load().unwrap(),
        state,
        "another process reads what was written"
    );
    let mut next = state.clone();
    next.record_user("ng", "gamma", "bot_c", true, None);
    next.forget_user("ng", "alpha");
    next.serial = 2;
    a.record_users(
        2,
        &[
            (
                "ng".into(),
                "gamma".into(),
                next.user("ng", "gamma").cloned(),
            ),
            ("ng".into(), "alpha".into(), None),
        ],
    )
    .unwrap();
    assert_eq!(b.load().unwrap(), next);

    // The journal: numbers go on after a reopen, entries come back in order, and compaction
    // keeps only the unfinished operations it is told to keep.
    let journal = a.journal().unwrap();
    let (one, two) = (journal.next_seq(), journal.next_seq());
    assert!(two > one);
    journal.append(one, intent("beta"), true).unwrap();
    journal
        .append(
            one,
            Event::Created {
                key_id: "ak_new".into(),
                kind: KeyKind::ApiKey,
                created_at: Timestamp::now(),
            },
            true,
        )
        .unwrap();
    journal.append(two, intent("gamma"), true).unwrap();
    journal.append(two, Event::Done, false).unwrap();
    let reopened = a.journal().unwrap();
    assert!(
        reopened.next_seq() > two,
        "sequence numbers go on after a reopen"
    );
    let entries = b.journal_entries().unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![one, one, two, two]
    );
    let open = keyward::oplog::unfinished(&entries);
    assert_eq!(open.len(), 1);
    assert_eq!(
        open[0].created.as_ref().map(|c| c.0.as_str()),
        Some("ak_new")
    );
    journal.compact(&|op| op.user == "beta").unwrap();
    let kept = b.journal_entries().unwrap();
    assert_eq!(kept.len(), 2, "the finished operation is gone: {kept:?}");
    journal.compact(&|_| false).unwrap();
    assert!(b.journal_entries().unwrap().is_empty());

    // The lock let go, the other takes it, and the state is as left.
    drop(held);
    let taken = b.lock().unwrap();
    assert_eq!(b.load().unwrap(), next);
    drop(taken);
}

#[test]
fn the_state_directory_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    contract(&|| Arc::new(StateDir::new(path.clone())) as Arc<dyn Store>);
}

fn pg_store(pg: &Pg) -> PgStore {
    PgStore::new(SecretString::from(pg.url.clone()))
}

#[test]
fn postgresql_keeps_the_store_contract() {
    let pg = Pg::new();
    contract(&|| Arc::new(pg_store(&pg)) as Arc<dyn Store>);
    // The tables are keyward's own, named so.
    let mut client = pg.client();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "keyward_journal",
            "keyward_meta",
            "keyward_terms",
            "keyward_users"
        ]
    );
    // A lock held in another database of the same server guards another state: nobody here
    // is busy because of it.
    let elsewhere = Pg::new();
    let mut far = postgres::Config::from_str(&elsewhere.url)
        .unwrap()
        .application_name("keyward far pid 1")
        .connect(postgres::NoTls)
        .unwrap();
    assert!(
        far.query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&keyward::pgstore::LEADER_LOCK]
        )
        .unwrap()
        .get::<_, bool>(0)
    );
    assert_eq!(pg_store(&pg).busy(), None);
    // A process that has only just taken the lock is named, not the leader recorded before
    // it (the holder's session says who it is).
    let mut other = postgres::Config::from_str(&pg.url).unwrap();
    let mut other = other
        .application_name("keyward db9 pid 4242")
        .connect(postgres::NoTls)
        .unwrap();
    assert!(
        other
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&keyward::pgstore::LEADER_LOCK]
            )
            .unwrap()
            .get::<_, bool>(0)
    );
    let refused = pg_store(&pg).lock().expect_err("the lock is held");
    assert!(
        refused
            .to_string()
            .contains("(db9 pid 4242, taking the lead)"),
        "{refused:#}"
    );
    // And a plan beside it says who is at work.
    assert_eq!(
        pg_store(&pg).busy().as_deref(),
        Some("another keyward process (db9 pid 4242, taking the lead)")
    );
    drop(far);
    drop(other);
    // A role that may only read (for `plan` and `status`) reads the state; it cannot lead.
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .unwrap()
        .get(0);
    let reader = format!("{db}_reader");
    client
        .batch_execute(&format!(
            "CREATE ROLE {reader} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}"
        ))
        .unwrap();
    let mut as_reader = url::Url::parse(&pg.url).unwrap();
    as_reader.set_username(&reader).unwrap();
    let store = PgStore::new(SecretString::from(as_reader.to_string()));
    let loaded = store.load();
    assert!(loaded.is_ok(), "{loaded:?}");
    let e = store.lock().expect_err("a reader cannot begin a term");
    assert!(e.to_string().contains("permission denied"), "{e:#}");
    drop(store);
    client
        .batch_execute(&format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {reader}; DROP ROLE {reader}"
        ))
        .unwrap();
}

#[test]
fn postgresql_refuses_writes_without_the_lock_and_from_a_superseded_term() {
    let pg = Pg::new();
    let a = pg_store(&pg);
    let state = state_with(&[("ng", "alpha", "bot_a")]);
    let e = a.write(&state).expect_err("no lock, no write");
    assert!(e.to_string().contains("lock"), "{e:#}");

    let _held = a.lock().unwrap();
    let first = a.term();
    assert!(first >= 1);
    a.write(&state).unwrap();
    let journal = a.journal().unwrap();

    // Another term begins behind this process's back (as a leader that lost its session
    // would find): every write of the old term is refused, and the store says it is lost.
    let mut client = pg.client();
    client
        .batch_execute(
            "UPDATE keyward_meta SET value = (value::bigint + 1)::text WHERE key = 'term'",
        )
        .unwrap();
    let e = a
        .record_users(9, &[("ng".into(), "alpha".into(), None)])
        .expect_err("a superseded term writes nothing");
    assert!(
        e.downcast_ref::<keyward::pgstore::Superseded>().is_some(),
        "{e:#}"
    );
    assert!(a.lost().is_some());
    let seq = journal.next_seq();
    assert!(journal.append(seq, intent("alpha"), true).is_err());
    let after = a.load();
    assert!(after.is_err(), "a lost store is not used again");
    let b = pg_store(&pg);
    assert_eq!(b.load().unwrap().serial, state.serial);
    assert!(b.journal_entries().unwrap().is_empty());
    assert!(b.load().unwrap().user("ng", "alpha").is_some());
}

#[test]
fn postgresql_a_terminated_session_loses_the_lock_and_the_next_leader_sees_every_write() {
    let pg = Pg::new();
    let a = pg_store(&pg);
    let _held = a.lock().unwrap();
    let old = a.term();
    let journal = a.journal().unwrap();
    let seq = journal.next_seq();
    journal.append(seq, intent("alpha"), true).unwrap();

    // The leader's backend is terminated (a partition, an operator): its lock is gone.
    let mut client = pg.client();
    let ended: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'keyward%' AND datname = current_database() AND pid <> pg_backend_pid()) t",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ended >= 1);
    let b = pg_store(&pg);
    let mut took = None;
    for _ in 0..50 {
        match b.lock() {
            Ok(l) => {
                took = Some(l);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    let _took = took.expect("the lock is free once the session ended");
    assert!(b.term() > old);

    // The old leader writes nothing more, and knows it.
    let e = journal
        .append(seq, Event::Done, true)
        .expect_err("the old leader's write");
    assert!(a.lost().is_some(), "{e:#}");
    // The new leader sees the old one's unfinished operation, as crash recovery needs.
    let open = keyward::oplog::unfinished(&b.journal_entries().unwrap());
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].user, "alpha");
    // Every term's writes ended before the next term began.
    let rows = client
        .query(
            "SELECT t.term, t.writes, t.last_write <= n.began FROM keyward_terms t JOIN keyward_terms n ON n.term = t.term + 1",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let (term, writes, before): (i64, i64, Option<bool>) = (r.get(0), r.get(1), r.get(2));
        assert!(writes >= 1, "term {term} wrote");
        assert_eq!(before, Some(true), "term {term} wrote after the next began");
    }
}

#[test]
fn postgresql_connections_use_tls_as_sslmode_says_and_check_the_server() {
    let pg = Pg::with_tls();
    let (ca, port) = (pg.ca(), pg.port());
    let load = |host: &str, query: String| {
        PgStore::new(SecretString::from(format!(
            "postgres://postgres@{host}:{port}/postgres?{query}"
        )))
        .load()
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    let root = format!("sslrootcert={}", ca.display());
    // TLS, the server's certificate checked against the given root and for its name.
    load("localhost", format!("sslmode=verify-full&{root}")).unwrap();
    load("localhost", format!("sslmode=prefer&{root}")).unwrap();
    // Plain: this server takes none.
    let e = load("localhost", "sslmode=disable".into()).unwrap_err();
    assert!(e.contains("no encryption"), "{e}");
    // `require` checks the certificate too: the system's roots do not know this CA.
    let e = load("localhost", "sslmode=require".into()).unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // And says what to do about it.
    assert!(e.contains("sslrootcert=FILE"), "{e}");
    // The name is checked: the certificate is for localhost, not 127.0.0.1.
    let e = load("127.0.0.1", format!("sslmode=verify-full&{root}")).unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[test]
fn postgresql_takes_over_a_state_directory_once_on_first_use() {
    let pg = Pg::new();
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    // An installation that ran on one host: a state and an unfinished operation.
    let mut state = state_with(&[("ng", "alpha", "bot_a"), ("ng", "beta", "bot_b")]);
    state.serial = 7;
    {
        let local = StateDir::new(&first);
        let _held = Store::lock(&local).unwrap();
        Store::write(&local, &state).unwrap();
        let journal = local.journal().unwrap();
        journal
            .append(journal.next_seq(), intent("alpha"), true)
            .unwrap();
    }
    let store = pg_store(&pg).migrating_from(&first);
    let held = store.lock().unwrap();
    assert_eq!(store.load().unwrap(), state);
    let open = keyward::oplog::unfinished(&store.journal_entries().unwrap());
    assert_eq!(open.len(), 1, "the unfinished operation came along");
    drop(held);
    // Once the database holds a state, no directory is copied in again.
    {
        let local = StateDir::new(&second);
        let _held = Store::lock(&local).unwrap();
        Store::write(&local, &state_with(&[("ng", "gamma", "bot_c")])).unwrap();
    }
    let other = pg_store(&pg).migrating_from(&second);
    let _held = other.lock().unwrap();
    assert_eq!(other.load().unwrap(), state);
}
