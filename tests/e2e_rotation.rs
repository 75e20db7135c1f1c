//! End-to-end tests of rotation, driving the real `keyward` binary against the real
//! `keyward-sandbox` over loopback (ngrok unless noted). They pin: rotation by age, the old key
//! staying valid through `overlap` and revoked after it; a cron window delaying a due rotation,
//! and a seconds-field schedule rotating exactly once per fire time; `keyward rotate` touching
//! only its targets and nothing at all for a bad target; unknown keys reported vs revoked;
//! `prune.users` keep / disable / delete never touching hand-made users; `max_deletions`
//! refusing a large prune; the exec sink's stdin and argv, and a failing exec sink revoking the
//! new key while the old one stays current, working and in every sink; a saved plan with a
//! rotation applying once and then being refused as stale.
//!
//! Time passes for real (sleeps of a few seconds); no assertion is about how long anything took.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::asa;
use common::{Sandbox, Workspace, changes, expect_code, text, warnings};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::{Value, json};

/// The tests of this file run one at a time: each measures seconds-long policies in real time,
/// and several at once on a busy 2-core machine would stretch a step past an overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it poisons nothing the others need.
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn id(doc: &Value) -> String {
    doc["key_id"].as_str().expect("key_id").to_string()
}

fn secret(doc: &Value) -> String {
    doc["secret"].as_str().expect("secret").to_string()
}

fn status_of(ws: &Workspace, key_id: &str) -> Option<Value> {
    ws.status_keys().into_iter().find(|e| e["key_id"] == key_id)
}

/// Sleeps until the wall clock is `ms_after` milliseconds past `t`.
fn sleep_until(t: Timestamp, ms_after: i64) {
    let target = t + jiff::SignedDuration::from_millis(ms_after);
    let left = Timestamp::now().duration_until(target);
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
}

// 1 ─────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn rotation_by_age_keeps_the_old_key_through_the_overlap_then_revokes_it() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let users = |every: &str| {
        format!(
            "users:\n  - provider: ng\n    name: ager\n    keys:\n      deploy: {{rotate_every: {every}, overlap: 3s}}\n"
        )
    };
    ws.write_config("", &users("3s"));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let k1 = ws.sink("ager", "deploy");

    // Fresh: nothing to do, the rotation is listed as upcoming.
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "plan of a fresh key");
    let out = text(&plan.stdout);
    assert!(out.contains("Upcoming (nothing to do now):"), "{out}");
    assert!(
        out.contains("ng / ager: next rotation of deploy in"),
        "{out}"
    );

    // Older than rotate_every: due.
    sleep_ms(3500);
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "plan of a key older than rotate_every");
    let out = text(&plan.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("↻ rotate key deploy"))
        .unwrap_or_else(|| panic!("no rotate line:\n{out}"));
    assert!(line.contains("(rotate_every 3s)"), "{line}");
    assert!(
        out.contains("Plan: 0 to create, 0 to update, 1 to rotate, 0 to revoke."),
        "{out}"
    );

    let apply = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&apply, 0, "rotating apply");
    assert!(
        text(&apply.stdout).contains("1 rotated"),
        "{}",
        text(&apply.stdout)
    );
    let k2 = ws.sink("ager", "deploy");
    assert_ne!(id(&k1), id(&k2), "the sink holds a new key");
    assert!(sb.secret_works("api_key", &secret(&k2)), "new key works");
    assert!(
        sb.secret_works("api_key", &secret(&k1)),
        "the old key still works during the overlap"
    );
    assert_eq!(status_of(&ws, &id(&k1)).unwrap()["state"], "retiring");
    assert_eq!(status_of(&ws, &id(&k2)).unwrap()["state"], "current");
    assert_eq!(
        sb.key_ids_of("ager"),
        BTreeSet::from([id(&k1), id(&k2)]),
        "exactly the old and the new key exist"
    );

    // With rotate_every 3s the new key would come due the moment the overlap ends; a longer
    // period isolates the revocation.
    ws.write_config("", &users("1h"));
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "during the overlap");
    assert!(
        text(&plan.stdout).contains("when its overlap ends"),
        "{}",
        text(&plan.stdout)
    );

    sleep_ms(3500);
    let plan = ws.plan_json();
    let cs = changes(&plan);
    assert_eq!(cs.len(), 1, "{plan}");
    assert_eq!(cs[0]["action"], "revoke_key");
    assert_eq!(cs[0]["key_id"], id(&k1).as_str());
    assert!(
        cs[0]["reason"].as_str().unwrap().contains("overlap ended"),
        "{plan}"
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "revoking apply",
    );
    assert!(
        !sb.secret_works("api_key", &secret(&k1)),
        "the old key is revoked"
    );
    assert_eq!(sb.key_ids_of("ager"), BTreeSet::from([id(&k2)]));
    assert!(sb.secret_works("api_key", &secret(&k2)));
    assert!(status_of(&ws, &id(&k1)).is_none());
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged after the revocation",
    );
}

// 2 ─────────────────────────────────────────────────────────────────────────────────────────

/// The first `0 3 1 1 *` in `zone` at or after `t`.
fn next_new_year_3am(t: Timestamp, zone: &str) -> Timestamp {
    let tz = TimeZone::get(zone).unwrap();
    let year = t.to_zoned(tz.clone()).year();
    for y in [year, year + 1] {
        let at = jiff::civil::date(y, 1, 1)
            .at(3, 0, 0, 0)
            .to_zoned(tz.clone())
            .unwrap()
            .timestamp();
        if at >= t {
            return at;
        }
    }
    unreachable!()
}

#[test]
fn cron_window_delays_a_due_rotation() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: windowed\n    keys:\n      deploy: {rotate_every: 1s, schedule: \"0 3 1 1 *\", timezone: Pacific/Auckland}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let k1 = ws.sink("windowed", "deploy");
    let created: Timestamp = k1["created_at"].as_str().unwrap().parse().unwrap();
    let window = next_new_year_3am(
        created + jiff::SignedDuration::from_secs(1),
        "Pacific/Auckland",
    );

    sleep_ms(2000);
    // Due by age, but the window has not opened: no change, the window time is announced.
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "plan before the window");
    let out = text(&plan.stdout);
    let upcoming = out
        .lines()
        .find(|l| l.contains("next rotation of deploy"))
        .unwrap_or_else(|| panic!("no upcoming rotation:\n{out}"));
    let shown = window.strftime("%Y-%m-%d %H:%M UTC").to_string();
    assert!(upcoming.contains(&shown), "expected {shown}: {upcoming}");
    assert!(changes(&ws.plan_json()).is_empty());
    let st = status_of(&ws, &id(&k1)).unwrap();
    assert_eq!(st["state"], "current");
    assert_eq!(st["next_rotation"], window.to_string());
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    assert_eq!(id(&ws.sink("windowed", "deploy")), id(&k1), "not rotated");
}

/// The first multiple of 5 seconds strictly after `t` (what `*/5 * * * * *` fires at).
fn next_five(t: Timestamp) -> Timestamp {
    let s = t.as_second();
    Timestamp::from_second(s - s.rem_euclid(5) + 5).unwrap()
}

#[test]
fn seconds_schedule_without_age_rotates_once_per_fire_time() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: ticker\n    keys:\n      deploy: {schedule: \"*/5 * * * * *\", overlap: 0s}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let k1 = ws.sink("ticker", "deploy");
    let c1: Timestamp = k1["created_at"].as_str().unwrap().parse().unwrap();

    // Just after the next fire time: one rotation, then a second apply in the same window
    // (the next fire time is ~5 s away) does nothing.
    sleep_until(next_five(c1), 300);
    let first = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&first, 0, "apply after the fire time");
    assert!(
        text(&first.stdout).contains("1 rotated"),
        "{}",
        text(&first.stdout)
    );
    let k2 = ws.sink("ticker", "deploy");
    assert_ne!(id(&k1), id(&k2));
    let second = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&second, 0, "second apply in the same window");
    assert!(
        text(&second.stdout).contains("No changes."),
        "rotated twice in one window:\n{}",
        text(&second.stdout)
    );
    assert_eq!(id(&ws.sink("ticker", "deploy")), id(&k2));
    // overlap 0s: the replaced key went at once.
    assert_eq!(sb.key_ids_of("ticker"), BTreeSet::from([id(&k2)]));

    // The next fire time rotates again, and names the schedule.
    let c2: Timestamp = k2["created_at"].as_str().unwrap().parse().unwrap();
    sleep_until(next_five(c2), 300);
    let plan = ws.plan_json();
    let cs = changes(&plan);
    assert_eq!(cs.len(), 1, "{plan}");
    assert_eq!(cs[0]["action"], "rotate_key");
    assert!(
        cs[0]["reason"]
            .as_str()
            .unwrap()
            .contains("schedule `*/5 * * * * *` fired"),
        "{plan}"
    );
}

// 3 ─────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn forced_rotation_touches_only_its_targets() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: fixer\n    keys:\n      a: {}\n      b: {kind: credential}\n  - provider: ng\n    name: other\n    keys:\n      c: {}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let ids = || {
        (
            id(&ws.sink("fixer", "a")),
            id(&ws.sink("fixer", "b")),
            id(&ws.sink("other", "c")),
        )
    };
    let remote = || {
        let mut all = sb.key_ids_of("fixer");
        all.extend(sb.key_ids_of("other"));
        all
    };
    let (a0, b0, c0) = ids();

    let out = ws.keyward(&["rotate", "fixer/a", "--auto-approve"]);
    expect_code(&out, 0, "rotate fixer/a");
    let (a1, b1, c1) = ids();
    assert_ne!(a1, a0, "fixer/a rotated");
    assert_eq!(
        (b1.as_str(), c1.as_str()),
        (b0.as_str(), c0.as_str()),
        "nothing else"
    );
    assert!(sb.secret_works("api_key", &secret(&ws.sink("fixer", "a"))));
    assert_eq!(status_of(&ws, &a0).unwrap()["state"], "retiring");

    let out = ws.keyward(&["rotate", "fixer", "--auto-approve"]);
    expect_code(&out, 0, "rotate fixer");
    assert!(
        text(&out.stdout).contains("2 rotated"),
        "{}",
        text(&out.stdout)
    );
    let (a2, b2, c2) = ids();
    assert!(a2 != a1 && b2 != b1, "every slot of fixer rotated");
    assert_eq!(c2, c0, "other untouched");
    assert!(sb.secret_works("credential", &secret(&ws.sink("fixer", "b"))));

    // Bad targets: exit 1, nothing rotated anywhere — even alongside a good target.
    let before = remote();
    for args in [
        vec!["rotate", "nobody", "--auto-approve"],
        vec!["rotate", "fixer/nope", "--auto-approve"],
        vec!["rotate", "other", "nobody", "--auto-approve"],
    ] {
        let out = ws.keyward(&args);
        expect_code(&out, 1, &args.join(" "));
        assert_eq!(remote(), before, "{args:?} changed keys");
        assert_eq!(ids(), (a2.clone(), b2.clone(), c2.clone()), "{args:?}");
    }
}

#[test]
fn ambiguous_rotate_target_rotates_nothing_at_either_provider() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    asa::write_config(
        &ws,
        "",
        "users:\n  - provider: ng\n    name: twin\n    keys:\n      deploy: {}\n  - provider: asa\n    name: twin\n    keys:\n      main: {}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let api = asa::Asa::new(&sb);
    let ng0 = id(&ws.sink("twin", "deploy"));
    let asa0 = id(&asa::sink(&ws, "twin", "main"));
    let asa_keys = || -> BTreeSet<String> {
        api.keys("twin")
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };

    let out = ws.keyward(&["rotate", "twin", "--auto-approve"]);
    expect_code(&out, 1, "ambiguous target");
    let err = text(&out.stderr);
    assert!(err.contains("asa:twin") && err.contains("ng:twin"), "{err}");
    assert_eq!(sb.key_ids_of("twin"), BTreeSet::from([ng0.clone()]));
    assert_eq!(asa_keys(), BTreeSet::from([asa0.clone()]));

    expect_code(
        &ws.keyward(&["rotate", "ng:twin/deploy", "--auto-approve"]),
        0,
        "qualified target",
    );
    assert_ne!(id(&ws.sink("twin", "deploy")), ng0);
    assert_eq!(asa_keys(), BTreeSet::from([asa0.clone()]), "ASA untouched");
    assert_eq!(id(&asa::sink(&ws, "twin", "main")), asa0);
}

// 4 ─────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn unknown_keys_are_reported_and_revoked_only_when_told() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let users = "users:\n  - provider: ng\n    name: holder\n    keys:\n      main: {}\n";
    ws.write_config("", users);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let managed = ws.sink("holder", "main");
    let holder = sb.user_by_name("holder").unwrap();
    let (st, made) = sb.api(
        "POST",
        "/api_keys",
        Some(json!({"owner_id": holder["id"], "description": "hand-made"})),
    );
    assert_eq!(st, 201, "{made}");
    let (st, cred) = sb.api(
        "POST",
        "/credentials",
        Some(json!({"owner_id": holder["id"], "description": "hand-made"})),
    );
    assert_eq!(st, 201, "{cred}");
    let hand: BTreeSet<String> = [&made, &cred]
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();

    // report (the default): warnings carrying the key ids, no change, exit 0.
    let plan = ws.plan_json();
    assert!(changes(&plan).is_empty(), "{plan}");
    let unknown: BTreeSet<String> = warnings(&plan)
        .iter()
        .filter(|w| w["kind"] == "unknown_key")
        .inspect(|w| {
            assert_eq!(w["provider"], "ng");
            assert_eq!(w["user"], "holder");
        })
        .map(|w| w["key_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(unknown, hand, "{plan}");
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 0, "warnings alone");
    assert!(
        text(&out.stdout).contains("! unknown key"),
        "{}",
        text(&out.stdout)
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply (report)",
    );
    assert!(
        hand.is_subset(&sb.key_ids_of("holder")),
        "report revokes nothing"
    );
    let st = ws.status_keys();
    assert_eq!(
        st.iter().filter(|e| e["state"] == "unknown").count(),
        2,
        "{st:?}"
    );

    // revoke: a revoke_key change per unknown key, and apply removes exactly those.
    ws.write_config("", &format!("{users}prune:\n  unknown_keys: revoke\n"));
    let plan = ws.plan_json();
    let revokes: BTreeSet<String> = changes(&plan)
        .iter()
        .inspect(|c| assert_eq!(c["action"], "revoke_key", "{plan}"))
        .map(|c| c["key_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(revokes, hand, "{plan}");
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        2,
        "revocations are changes",
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply (revoke)",
    );
    assert_eq!(sb.key_ids_of("holder"), BTreeSet::from([id(&managed)]));
    assert!(!sb.secret_works("api_key", made["token"].as_str().unwrap()));
    assert!(sb.secret_works("api_key", &secret(&managed)));
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
}

// 5, 6 ──────────────────────────────────────────────────────────────────────────────────────

/// A sandbox where keyward created `stay` and `leaver` (each with a key), adopted the
/// hand-made `adoptee` (declared, with a key slot) and never heard of the hand-made
/// `bystander`; then `leaver` and `adoptee` leave the file under `prune.users: mode`.
struct PruneWorld {
    sb: Sandbox,
    ws: Workspace,
    leaver_key: Value,
    hand_keys: BTreeSet<String>,
}

fn prune_world(mode: &str) -> PruneWorld {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let mut hand_keys = BTreeSet::new();
    for name in ["adoptee", "bystander"] {
        let (st, u) = sb.api("POST", "/service_users", Some(json!({"name": name})));
        assert_eq!(st, 201, "{u}");
        let (st, k) = sb.api("POST", "/api_keys", Some(json!({"owner_id": u["id"]})));
        assert_eq!(st, 201, "{k}");
        hand_keys.insert(k["id"].as_str().unwrap().to_string());
    }
    let user =
        |name: &str| format!("  - provider: ng\n    name: {name}\n    keys:\n      main: {{}}\n");
    ws.write_config(
        "",
        &format!(
            "users:\n{}{}{}",
            user("stay"),
            user("leaver"),
            user("adoptee")
        ),
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "initial apply",
    );
    let leaver_key = ws.sink("leaver", "main");
    ws.write_config(
        "",
        &format!("users:\n{}prune:\n  users: {mode}\n", user("stay")),
    );
    PruneWorld {
        sb,
        ws,
        leaver_key,
        hand_keys,
    }
}

impl PruneWorld {
    /// The hand-made users are exactly as they were: active, with their hand-made keys.
    fn hand_made_untouched(&self) {
        for name in ["adoptee", "bystander"] {
            let u = self
                .sb
                .user_by_name(name)
                .unwrap_or_else(|| panic!("{name} deleted"));
            assert_eq!(u["active"], true, "{name} changed");
        }
        let mut remote = self.sb.key_ids_of("adoptee");
        remote.extend(self.sb.key_ids_of("bystander"));
        assert!(
            self.hand_keys.is_subset(&remote),
            "a hand-made key was revoked"
        );
    }
}

#[test]
fn prune_keep_only_warns() {
    let _serial = serial();
    let w = prune_world("keep");
    let plan = w.ws.plan_json();
    assert!(changes(&plan).is_empty(), "{plan}");
    let kinds: Vec<(String, String)> = warnings(&plan)
        .iter()
        .map(|x| {
            (
                x["kind"].as_str().unwrap().to_string(),
                x["user"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("pruned_user_kept".into(), "leaver".into())),
        "{plan}"
    );
    assert!(
        kinds.contains(&("unmanaged_user".into(), "adoptee".into())),
        "{plan}"
    );
    assert!(
        kinds.contains(&("unmanaged_user".into(), "bystander".into())),
        "{plan}"
    );
    expect_code(
        &w.ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "keep: warnings only",
    );
    expect_code(&w.ws.keyward(&["apply", "--auto-approve"]), 0, "apply keep");
    assert_eq!(w.sb.user_by_name("leaver").unwrap()["active"], true);
    assert!(w.sb.secret_works("api_key", &secret(&w.leaver_key)));
    w.hand_made_untouched();
}

#[test]
fn prune_disable_deactivates_only_what_keyward_created() {
    let _serial = serial();
    let w = prune_world("disable");
    let out = w.ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 2, "disable plan");
    let t = text(&out.stdout);
    let group = t
        .split("ng / leaver")
        .nth(1)
        .unwrap_or_else(|| panic!("{t}"));
    assert!(group.contains("~ update service user"), "{t}");
    let plan = w.ws.plan_json();
    let cs = changes(&plan);
    assert_eq!(cs.len(), 1, "{plan}");
    assert_eq!(
        (cs[0]["action"].as_str(), cs[0]["user"].as_str()),
        (Some("update_user"), Some("leaver"))
    );
    assert_eq!(cs[0]["after"]["active"], false);
    expect_code(
        &w.ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply disable",
    );
    assert_eq!(w.sb.user_by_name("leaver").unwrap()["active"], false);
    assert!(
        w.sb.key_ids_of("leaver").contains(&id(&w.leaver_key)),
        "keys kept"
    );
    w.hand_made_untouched();
    expect_code(
        &w.ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "disabled is converged",
    );
}

#[test]
fn prune_delete_removes_only_what_keyward_created_with_its_keys() {
    let _serial = serial();
    let w = prune_world("delete");
    let out = w.ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 2, "delete plan");
    let t = text(&out.stdout);
    assert!(t.contains("- delete service user"), "{t}");
    let plan = w.ws.plan_json();
    let cs = changes(&plan);
    assert_eq!(cs.len(), 1, "{plan}");
    assert_eq!(
        (cs[0]["action"].as_str(), cs[0]["user"].as_str()),
        (Some("delete_user"), Some("leaver"))
    );
    expect_code(
        &w.ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply delete",
    );
    assert!(w.sb.user_by_name("leaver").is_none(), "leaver deleted");
    let all_keys: BTreeSet<String> =
        w.sb.list("/api_keys", "keys")
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect();
    assert!(
        !all_keys.contains(&id(&w.leaver_key)),
        "its keys went with it"
    );
    assert!(!w.sb.secret_works("api_key", &secret(&w.leaver_key)));
    w.hand_made_untouched();
    expect_code(
        &w.ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged after the delete",
    );
}

#[test]
fn max_deletions_refuses_a_large_prune_and_deletes_nothing() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let names = ["p0", "p1", "p2"];
    let mut users = String::from("users:\n  - provider: ng\n    name: stay\n");
    for n in names {
        users.push_str(&format!(
            "  - provider: ng\n    name: {n}\n    keys:\n      main: {{}}\n"
        ));
    }
    ws.write_config("  max_deletions: 2\n", &users);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "create");
    let prune = "users:\n  - provider: ng\n    name: stay\nprune:\n  users: delete\n";
    ws.write_config("  max_deletions: 2\n", prune);
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply over max_deletions");
    let err = text(&out.stderr);
    assert!(
        err.contains("max_deletions") && err.contains("3 objects"),
        "{err}"
    );
    for n in names {
        assert!(
            sb.user_by_name(n).is_some(),
            "{n} deleted despite the refusal"
        );
        assert_eq!(
            sb.key_ids_of(n).len(),
            1,
            "{n}'s key revoked despite the refusal"
        );
    }
    // Exactly at the limit it goes through.
    ws.write_config("  max_deletions: 3\n", prune);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "at the limit");
    for n in names {
        assert!(sb.user_by_name(n).is_none(), "{n} left");
    }
    assert!(sb.user_by_name("stay").is_some());
}

// 7 ─────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn exec_sink_gets_the_document_and_its_failure_keeps_the_old_key() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // The hook's files live under secrets/, which the leak check skips: it receives secrets.
    let hook_dir = ws.path("secrets/hook");
    std::fs::create_dir_all(&hook_dir).unwrap();
    let hook = ws.path("hook.sh");
    let good = format!(
        "cat > {d}/$2-$3.json && printf '%s\\n' \"$@\" > {d}/$2-$3.argv\n",
        d = hook_dir.display()
    );
    // Keeps what it got, says why it refuses (quoting the secret, which must be masked), exits 3.
    let bad = format!(
        "cat > {d}/refused.json\nsed -n 's/.*\"secret\": \"\\(.*\\)\".*/hook refused: vault is sealed (got \\1)/p' {d}/refused.json >&2\nexit 3\n",
        d = hook_dir.display()
    );
    std::fs::write(&hook, &good).unwrap();
    ws.write_config_with_sinks(
        "",
        &format!(
            "  hook:\n    type: exec\n    command: [/bin/sh, \"{}\", \"{{provider}}\", \"{{user}}\", \"{{slot}}\", \"{{key_id}}\"]\n    timeout: 10s\n",
            hook.display()
        ),
        "users:\n  - provider: ng\n    name: hooked\n    keys:\n      main: {sink: [local, hook]}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let local = ws.sink("hooked", "main");
    let got: Value =
        serde_json::from_str(&std::fs::read_to_string(hook_dir.join("hooked-main.json")).unwrap())
            .expect("the hook got a JSON document on stdin");
    assert_eq!(
        got, local,
        "the hook and the file sink got the same document"
    );
    assert!(sb.secret_works("api_key", &secret(&got)));
    let argv = std::fs::read_to_string(hook_dir.join("hooked-main.argv")).unwrap();
    assert_eq!(
        argv.lines().collect::<Vec<_>>(),
        ["ng", "hooked", "main", id(&local).as_str()],
        "placeholders filled in argv"
    );

    // The hook fails: the rotation fails, the new key is revoked, the old one stays.
    std::fs::write(&hook, &bad).unwrap();
    let out = ws.keyward(&["rotate", "hooked/main", "--auto-approve"]);
    expect_code(&out, 1, "rotation with a failing hook");
    let report = text(&out.stdout);
    let refused: Value =
        serde_json::from_str(&std::fs::read_to_string(hook_dir.join("refused.json")).unwrap())
            .unwrap();
    let new_id = id(&refused);
    let new_secret = secret(&refused);
    assert_ne!(new_id, id(&local));
    let failed = report
        .lines()
        .find(|l| l.contains("failed:        ng / hooked: rotate key main"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        failed.contains(&format!(
            "delivery failed; the new key {new_id} was revoked"
        )),
        "{failed}"
    );
    assert!(failed.contains("hook refused: vault is sealed"), "{failed}");
    assert!(failed.contains("exit status: 3"), "{failed}");
    assert!(
        failed.contains("[REDACTED]"),
        "the echoed secret is masked: {failed}"
    );
    for (what, s) in [("stdout", &report), ("stderr", &text(&out.stderr))] {
        assert!(!s.contains(&new_secret), "new secret in {what}");
        assert!(!s.contains(&secret(&local)), "old secret in {what}");
    }
    for (path, content) in ws.non_sink_files() {
        assert!(
            !content.contains(&new_secret),
            "secret in {}",
            path.display()
        );
    }
    assert!(
        !sb.key_ids_of("hooked").contains(&new_id),
        "the new key was revoked"
    );
    assert!(!sb.secret_works("api_key", &new_secret));
    assert_eq!(sb.key_ids_of("hooked"), BTreeSet::from([id(&local)]));
    assert!(
        sb.secret_works("api_key", &secret(&local)),
        "the old key still works"
    );
    assert_eq!(status_of(&ws, &id(&local)).unwrap()["state"], "current");
    // Every sink still holds the key in force: the file sink got the new document before the
    // hook failed, and must not be left holding a revoked key.
    assert_eq!(
        ws.sink("hooked", "main"),
        local,
        "the file sink was left holding the revoked key"
    );
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "nothing pending after the failed rotation",
    );

    // Fixed hook: the same rotation goes through.
    std::fs::write(&hook, &good).unwrap();
    expect_code(
        &ws.keyward(&["rotate", "hooked/main", "--auto-approve"]),
        0,
        "rotation with the hook fixed",
    );
    let now_local = ws.sink("hooked", "main");
    let now_hook: Value =
        serde_json::from_str(&std::fs::read_to_string(hook_dir.join("hooked-main.json")).unwrap())
            .unwrap();
    assert_eq!(now_local, now_hook);
    assert!(id(&now_local) != id(&local) && id(&now_local) != new_id);
    assert!(sb.secret_works("api_key", &secret(&now_local)));
    assert_eq!(status_of(&ws, &id(&local)).unwrap()["state"], "retiring");
}

// 8 ─────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn saved_plan_with_a_due_rotation_applies_once() {
    let _serial = serial();
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: planned\n    keys:\n      main: {rotate_every: 2s}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let k1 = ws.sink("planned", "main");
    sleep_ms(3000);
    let planfile = ws.path("rotate.plan.json");
    let p = planfile.to_str().unwrap();
    expect_code(
        &ws.keyward(&["plan", "--out", p, "--detailed-exitcode"]),
        2,
        "plan --out with a due rotation",
    );
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&planfile).unwrap()).unwrap();
    let cs = changes(&saved);
    assert_eq!(cs.len(), 1, "{saved}");
    assert_eq!(cs[0]["action"], "rotate_key");
    assert_eq!(cs[0]["key_id"], id(&k1).as_str());

    expect_code(&ws.keyward(&["apply", p]), 0, "apply the saved plan");
    let k2 = ws.sink("planned", "main");
    assert_ne!(id(&k1), id(&k2));
    assert!(sb.secret_works("api_key", &secret(&k2)));
    let after = sb.key_ids_of("planned");
    assert_eq!(after, BTreeSet::from([id(&k1), id(&k2)]));

    let again = ws.keyward(&["apply", p]);
    expect_code(&again, 1, "the same plan again");
    assert!(
        text(&again.stderr).contains("plan is stale"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        id(&ws.sink("planned", "main")),
        id(&k2),
        "no second rotation"
    );
    assert_eq!(sb.key_ids_of("planned"), after);
}

#[test]
fn a_slot_that_leaves_the_file_keeps_its_key_for_the_overlap() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: renamed\n    keys:\n      old-name: {}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let old = ws.sink("renamed", "old-name");
    // The slot is renamed in the file: a new key for the new slot, and the old slot's key, which
    // its consumers still hold, is not revoked at once.
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: renamed\n    keys:\n      new-name: {}\n",
    );
    let plan = ws.plan_json();
    let changes = plan["changes"].as_array().unwrap();
    assert!(
        !changes.iter().any(|c| c["action"] == "revoke_key"),
        "no revoke at once: {plan}"
    );
    assert!(
        plan["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["kind"] == "retiring_key" && w["key_id"] == old["key_id"]),
        "{plan}"
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply the rename",
    );
    assert!(sb.secret_works("api_key", old["secret"].as_str().unwrap()));
    assert!(sb.secret_works(
        "api_key",
        ws.sink("renamed", "new-name")["secret"].as_str().unwrap()
    ));
    let status = ws.status_keys();
    let ts = |v: &serde_json::Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let retiring = status
        .iter()
        .find(|k| k["key_id"] == old["key_id"])
        .unwrap_or_else(|| panic!("old key listed: {status:?}"));
    assert_eq!(retiring["state"], "retiring", "{retiring}");
    let left = ts(&retiring["revoke_after"]).duration_since(jiff::Timestamp::now());
    assert!(
        left > jiff::SignedDuration::from_hours(23) && left <= jiff::SignedDuration::from_hours(24),
        "revoked when the default 24h overlap ends: {retiring}"
    );
    // Nothing more to do until then.
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "plan during the overlap",
    );
}
