//! Ownership and attribute drift (product contract §10.2, §10.3), driving the real `keyward`
//! binary against the real `keyward-sandbox` over loopback. They pin:
//! - a lost state directory: keys whose every (json/env file) sink holds them are adopted — no
//!   rotation, no revocation, every delivered secret keeps working — while a slot whose sinks do
//!   not verifiably hold its key (exec sink, sink file gone or holding another key) rotates and
//!   its old key retires for the overlap, still working, never revoked at once;
//! - two installations with the same owner sharing the sinks: the second adopts, revokes nothing;
//!   when one rotates, the other adopts the new key and lets the old one retire;
//! - two installations with different owners on the same user, both with
//!   `prune.unknown_keys: revoke`: each sees the other's keys as `foreign_key`, never revokes
//!   them, across alternating applies and forced rotations (while an untagged key is revoked);
//!   `prune.users: delete|disable` keeps a user that holds the other installation's keys;
//! - attribute drift: an ACL or description changed at the provider, or edited in the file, is
//!   planned as `update_key` (before/after holding exactly the differing attributes), rendered
//!   `~ update key SLOT  acl: [...] -> [...]`, applied in place (same key id, no new key), and
//!   converges; keyward's tag wiped at the provider is put back; a saved plan with an update
//!   applies it, and goes stale when the attribute changes at the provider after it was saved.

mod common;

use std::collections::BTreeSet;

use common::{Sandbox, Workspace, changes, expect_code, text, warnings};
use jiff::Timestamp;
use serde_json::{Value, json};

// ── helpers ────────────────────────────────────────────────────────────────────────────────

fn id(doc: &Value) -> String {
    doc["key_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no key_id in {doc}"))
        .to_string()
}

fn secret(doc: &Value) -> String {
    doc["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("no secret in {doc}"))
        .to_string()
}

fn actions(plan: &Value, action: &str) -> Vec<Value> {
    changes(plan)
        .into_iter()
        .filter(|c| c["action"] == action)
        .collect()
}

/// The warning kinds the plan gives for `key_id`.
fn warning_kinds(plan: &Value, key_id: &str) -> Vec<String> {
    warnings(plan)
        .into_iter()
        .filter(|w| w["key_id"] == key_id)
        .map(|w| w["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

fn read_json(path: &std::path::Path) -> Value {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}: {t}", path.display()))
}

fn status_of(ws: &Workspace, key_id: &str) -> Option<Value> {
    ws.status_keys().into_iter().find(|e| e["key_id"] == key_id)
}

/// Runs `apply --auto-approve`, requires exit 0, returns stdout.
fn apply(ws: &Workspace, what: &str) -> String {
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 0, what);
    text(&out.stdout)
}

/// An apply's report shows no revocation: either nothing to do ("No changes.") or a summary
/// with "0 revoked", and no `- revoke key` change line (an upcoming revocation may be listed).
fn assert_revoked_nothing(out: &str) {
    assert!(
        !out.lines()
            .any(|l| l.trim_start().starts_with("- revoke key"))
            && (out.contains("No changes.") || out.contains(" 0 revoked,")),
        "the apply revoked something:\n{out}"
    );
}

/// Every key object (API keys and credentials) at the sandbox owned by service user `name`.
fn key_objects(sb: &Sandbox, name: &str) -> Vec<Value> {
    let user = sb
        .user_by_name(name)
        .unwrap_or_else(|| panic!("no service user {name} at the sandbox"));
    sb.list("/api_keys", "keys")
        .into_iter()
        .chain(sb.list("/credentials", "credentials"))
        .filter(|k| k["owner_id"] == user["id"])
        .collect()
}

fn key_object(sb: &Sandbox, name: &str, key_id: &str) -> Value {
    key_objects(sb, name)
        .into_iter()
        .find(|k| k["id"] == key_id)
        .unwrap_or_else(|| panic!("key {key_id} of {name} is not at the sandbox"))
}

/// The `owner` in a key's keyward tag (its `metadata`), if it has one.
fn tag_owner(key: &Value) -> Option<String> {
    let meta: Value = serde_json::from_str(key["metadata"].as_str()?).ok()?;
    (meta["managed_by"] == "keyward").then(|| meta["owner"].as_str().unwrap_or("").to_string())
}

/// Plan JSON and plan `--detailed-exitcode` agree that nothing is to be done.
fn assert_converged(ws: &Workspace, what: &str) {
    let plan = ws.plan_json();
    assert!(
        changes(&plan).is_empty(),
        "{what}: expected no changes: {plan}"
    );
    expect_code(&ws.keyward(&["plan", "--detailed-exitcode"]), 0, what);
}

// 1 ─ state lost, every sink holds the key: adopted ──────────────────────────────────────────

const ADOPT_USERS: &str = "users:
  - provider: ng
    name: keeper
    keys:
      deploy:
        kind: api_key
        description: keeper deploys
        sink: [local, dotenv]
      tunnel:
        kind: credential
        acl: [\"bind:*.example.com\"]
";

const DOTENV_SINK: &str =
    "  dotenv:\n    type: file\n    path: secrets/{provider}/{user}/{slot}.env\n    format: env\n";

#[test]
fn lost_state_with_file_sinks_adopts_every_key_and_revokes_nothing() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config_with_sinks("", DOTENV_SINK, ADOPT_USERS);
    apply(&ws, "first apply");
    let deploy = ws.sink("keeper", "deploy");
    let tunnel = ws.sink("keeper", "tunnel");
    let env = std::fs::read_to_string(ws.path("secrets/ng/keeper/deploy.env")).unwrap();
    assert!(
        env.lines()
            .any(|l| l == format!("KEYWARD_KEY_ID={}", id(&deploy))),
        "the env sink names the key: {env}"
    );
    let before = sb.key_ids_of("keeper");
    assert_eq!(before, BTreeSet::from([id(&deploy), id(&tunnel)]));

    std::fs::remove_dir_all(ws.path("state")).unwrap();

    let plan = ws.plan_json();
    assert!(
        actions(&plan, "revoke_key").is_empty() && actions(&plan, "rotate_key").is_empty(),
        "lost state must neither revoke nor rotate keys the sinks hold: {plan}"
    );
    assert!(
        changes(&plan).is_empty(),
        "nothing to do once adopted: {plan}"
    );
    for key in [&deploy, &tunnel] {
        assert_eq!(
            warning_kinds(&plan, &id(key)),
            ["adopted_key"],
            "key {} held by every sink: {plan}",
            id(key)
        );
    }
    let human = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(
        &human,
        0,
        "plan --detailed-exitcode after the state was lost",
    );
    assert!(
        text(&human.stdout).contains("adopted key"),
        "the human plan says the keys are adopted:\n{}",
        text(&human.stdout)
    );

    let out = apply(&ws, "apply after the state was lost");
    assert_revoked_nothing(&out);
    assert_eq!(
        sb.key_ids_of("keeper"),
        before,
        "no key was revoked or minted"
    );
    assert!(sb.secret_works("api_key", &secret(&deploy)));
    assert!(sb.secret_works("credential", &secret(&tunnel)));
    assert_eq!(ws.sink("keeper", "deploy"), deploy, "sink untouched");
    assert_eq!(ws.sink("keeper", "tunnel"), tunnel, "sink untouched");
    for key in [&deploy, &tunnel] {
        let st = status_of(&ws, &id(key)).expect("status lists the adopted key");
        assert_eq!(st["state"], "current", "{st}");
        assert_eq!(st["delivery"], "delivered", "{st}");
    }

    // Recorded now: a further plan is a no-op and explains nothing any more.
    let plan = ws.plan_json();
    assert!(changes(&plan).is_empty(), "{plan}");
    for key in [&deploy, &tunnel] {
        assert!(
            warning_kinds(&plan, &id(key)).is_empty(),
            "the adopted key is recorded now: {plan}"
        );
    }
    assert_converged(&ws, "plan after the adopting apply");
    assert_eq!(sb.key_ids_of("keeper"), before);
}

// 1b ─ state lost, a sink does not verifiably hold the key: rotated, old key retires ───────────

#[test]
fn lost_state_rotates_only_slots_whose_sinks_do_not_hold_their_key() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:
  - provider: ng
    name: partial
    keys:
      kept: {overlap: 1h}
      gone: {overlap: 1h}
      other: {overlap: 1h}
",
    );
    apply(&ws, "first apply");
    let kept = ws.sink("partial", "kept");
    let gone = ws.sink("partial", "gone");
    let other = ws.sink("partial", "other");

    std::fs::remove_dir_all(ws.path("state")).unwrap();
    // `gone`'s sink file is deleted; `other`'s names a different key (written in place: the
    // file keeps its owner and mode 0600).
    std::fs::remove_file(ws.path("secrets/ng/partial/gone.json")).unwrap();
    let mut forged = other.clone();
    forged["key_id"] = json!(id(&kept));
    std::fs::write(
        ws.path("secrets/ng/partial/other.json"),
        serde_json::to_string(&forged).unwrap(),
    )
    .unwrap();

    let plan = ws.plan_json();
    assert!(
        actions(&plan, "revoke_key").is_empty(),
        "nothing is revoked at once: {plan}"
    );
    let rotated: BTreeSet<String> = actions(&plan, "rotate_key")
        .iter()
        .map(|c| c["key_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        rotated,
        BTreeSet::from([id(&gone), id(&other)]),
        "exactly the slots whose sinks do not hold their key rotate: {plan}"
    );
    assert_eq!(warning_kinds(&plan, &id(&kept)), ["adopted_key"], "{plan}");
    for key in [&gone, &other] {
        assert_eq!(warning_kinds(&plan, &id(key)), ["untracked_key"], "{plan}");
    }

    apply(&ws, "apply after the state was lost");
    assert_eq!(ws.sink("partial", "kept"), kept);
    for (slot, old) in [("gone", &gone), ("other", &other)] {
        let new = ws.sink("partial", slot);
        assert_ne!(id(&new), id(old), "{slot} got a new key");
        assert!(sb.secret_works("api_key", &secret(&new)), "{slot} new key");
        assert!(
            sb.secret_works("api_key", &secret(old)),
            "{slot}: the old key still works during the overlap"
        );
        let st = status_of(&ws, &id(old)).expect("the old key is listed");
        assert_eq!(st["state"], "retiring", "{st}");
    }
    assert!(sb.secret_works("api_key", &secret(&kept)));
    assert_converged(&ws, "plan after the apply");
}

// 2 ─ state lost, exec sink only: rotated, old key retires for the overlap ────────────────────

#[test]
fn lost_state_with_an_exec_sink_rotates_and_the_old_key_retires_for_the_overlap() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let hook_dir = ws.path("secrets/hook");
    std::fs::create_dir_all(&hook_dir).unwrap();
    let hook = ws.path("hook.sh");
    std::fs::write(
        &hook,
        format!("cat > {}/\"$1-$2.json\"\n", hook_dir.display()),
    )
    .unwrap();
    ws.write_config_with_sinks(
        "",
        &format!(
            "  hook:\n    type: exec\n    command: [/bin/sh, \"{}\", \"{{user}}\", \"{{slot}}\"]\n    timeout: 10s\n",
            hook.display()
        ),
        "users:\n  - provider: ng\n    name: hooked\n    keys:\n      main: {sink: hook, overlap: 1h}\n",
    );
    apply(&ws, "first apply");
    let delivered = hook_dir.join("hooked-main.json");
    let old = read_json(&delivered);
    assert!(sb.secret_works("api_key", &secret(&old)));

    std::fs::remove_dir_all(ws.path("state")).unwrap();

    let plan = ws.plan_json();
    assert!(
        actions(&plan, "revoke_key").is_empty(),
        "an untracked key is never revoked at once: {plan}"
    );
    let rotations = actions(&plan, "rotate_key");
    assert_eq!(rotations.len(), 1, "{plan}");
    assert_eq!(rotations[0]["slot"], "main", "{plan}");
    assert_eq!(rotations[0]["key_id"], id(&old).as_str(), "{plan}");
    assert_eq!(warning_kinds(&plan, &id(&old)), ["untracked_key"], "{plan}");
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        2,
        "plan with the rotation",
    );

    let applied_at = Timestamp::now();
    let out = apply(&ws, "apply after the state was lost");
    assert!(
        out.contains("1 rotated") && out.contains("0 revoked"),
        "{out}"
    );
    let new = read_json(&delivered);
    assert_ne!(id(&new), id(&old), "the hook got a new key");
    assert!(sb.secret_works("api_key", &secret(&new)), "new key works");
    assert!(
        sb.key_ids_of("hooked").contains(&id(&old)),
        "the old key still exists at the provider"
    );
    assert!(
        sb.secret_works("api_key", &secret(&old)),
        "the old key still authenticates during the overlap"
    );

    let st = status_of(&ws, &id(&old)).expect("status lists the old key");
    assert_eq!(st["state"], "retiring", "{st}");
    assert_eq!(
        st["delivery"], "unconfirmed",
        "found after the state was lost, held by no sink keyward can read: {st}"
    );
    let until: Timestamp = st["revoke_after"]
        .as_str()
        .unwrap_or_else(|| panic!("no revoke_after: {st}"))
        .parse()
        .unwrap();
    let hour = jiff::SignedDuration::from_hours(1);
    let slack = jiff::SignedDuration::from_mins(5);
    assert!(
        until > applied_at + hour - slack && until < Timestamp::now() + hour + slack,
        "revoke_after {until} is about the 1h overlap after the apply at {applied_at}"
    );
    let cur = status_of(&ws, &id(&new)).expect("status lists the new key");
    assert_eq!(cur["state"], "current", "{cur}");
    assert_eq!(cur["delivery"], "delivered", "{cur}");

    // Nothing more to do until the overlap ends.
    assert_converged(&ws, "plan after the rotation");
    assert!(sb.secret_works("api_key", &secret(&old)));
}

// 3 ─ two installations, same owner, same sinks ────────────────────────────────────────────

#[test]
fn second_installation_with_the_same_owner_and_sinks_adopts_and_revokes_nothing() {
    let sb = Sandbox::start(&[]);
    let shared = tempfile::tempdir().unwrap();
    let sink = format!(
        "  shared:\n    type: file\n    path: {}/{{provider}}/{{user}}/{{slot}}.json\n    format: json\n",
        shared.path().display()
    );
    let users = "users:
  - provider: ng
    name: twin
    keys:
      deploy: {sink: shared, description: twin deploys}
      tunnel: {sink: shared, kind: credential, acl: [\"bind:*.example.com\"]}
";
    let (a, b) = (Workspace::new(&sb), Workspace::new(&sb));
    a.write_config_with_sinks("", &sink, users);
    b.write_config_with_sinks("", &sink, users);
    let doc = |slot: &str| read_json(&shared.path().join(format!("ng/twin/{slot}.json")));

    apply(&a, "A's first apply");
    let (deploy, tunnel) = (doc("deploy"), doc("tunnel"));
    let keys = sb.key_ids_of("twin");
    assert_eq!(keys, BTreeSet::from([id(&deploy), id(&tunnel)]));

    let plan = b.plan_json();
    assert!(
        changes(&plan).is_empty(),
        "B finds A's keys in the sinks: {plan}"
    );
    for key in [&deploy, &tunnel] {
        assert_eq!(warning_kinds(&plan, &id(key)), ["adopted_key"], "{plan}");
    }
    expect_code(
        &b.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "B's first plan",
    );

    let out = apply(&b, "B's first apply");
    assert_revoked_nothing(&out);
    assert_eq!(sb.key_ids_of("twin"), keys, "B revoked or minted nothing");
    assert!(
        sb.secret_works("api_key", &secret(&deploy)),
        "A's delivered key still works after B's apply"
    );
    assert!(sb.secret_works("credential", &secret(&tunnel)));
    assert_eq!(
        (doc("deploy"), doc("tunnel")),
        (deploy.clone(), tunnel.clone())
    );
    for key in [&deploy, &tunnel] {
        let st = status_of(&b, &id(key)).expect("B lists the key");
        assert_eq!(st["state"], "current", "{st}");
    }

    // Both converged, in either order.
    for round in 0..2 {
        for (ws, who) in [(&a, "A"), (&b, "B")] {
            assert_converged(ws, &format!("{who}'s plan, round {round}"));
            apply(ws, &format!("{who}'s apply, round {round}"));
        }
    }
    assert_eq!(sb.key_ids_of("twin"), keys);
    assert!(sb.secret_works("api_key", &secret(&deploy)));
    assert!(sb.secret_works("credential", &secret(&tunnel)));
}

// 4 ─ two installations, different owners, same user ─────────────────────────────────────────

#[test]
fn installations_with_different_owners_never_revoke_each_others_keys() {
    let sb = Sandbox::start(&[]);
    let side = |owner: &str, tunnel: &str| {
        let ws = Workspace::new(&sb);
        ws.write_config(
            &format!("  owner: {owner}\n"),
            &format!(
                "users:
  - provider: ng
    name: shared-bot
    keys:
      deploy: {{overlap: 0s}}
      {tunnel}: {{kind: credential, acl: [\"bind:{owner}.example.com\"]}}
prune:
  unknown_keys: revoke
"
            ),
        );
        ws
    };
    let sides = [
        ("team-a", "tunnel-a", side("team-a", "tunnel-a")),
        ("team-b", "tunnel-b", side("team-b", "tunnel-b")),
    ];
    // What each side's sinks hold must keep working, whatever the other side does.
    let check_sinks = |when: &str| {
        for (owner, tunnel, ws) in &sides {
            if !ws.path("secrets/ng/shared-bot/deploy.json").exists() {
                // team-b before its first apply: nothing delivered yet.
                continue;
            }
            let d = ws.sink("shared-bot", "deploy");
            let t = ws.sink("shared-bot", tunnel);
            assert!(
                sb.secret_works("api_key", &secret(&d)),
                "{when}: {owner}'s deploy secret stopped working"
            );
            assert!(
                sb.secret_works("credential", &secret(&t)),
                "{when}: {owner}'s {tunnel} secret stopped working"
            );
        }
    };
    let ids_owned_by = |owner: &str| -> BTreeSet<String> {
        key_objects(&sb, "shared-bot")
            .into_iter()
            .filter(|k| tag_owner(k).as_deref() == Some(owner))
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };

    apply(&sides[0].2, "team-a's first apply");
    // A key nobody tagged: with prune.unknown_keys: revoke, it must go (both sides are in
    // revoke mode) — foreign keys must not share its fate.
    let user = sb.user_by_name("shared-bot").unwrap();
    let (status, stray) = sb.api(
        "POST",
        "/api_keys",
        Some(json!({"description": "by hand", "owner_id": user["id"]})),
    );
    assert_eq!(status, 201, "{stray}");
    let stray_id = stray["id"].as_str().unwrap().to_string();

    let mut stray_revoked = false;
    for round in 1..=5 {
        for (i, (owner, _, ws)) in sides.iter().enumerate() {
            let other_owner = sides[1 - i].0;
            let theirs = ids_owned_by(other_owner);

            let plan = ws.plan_json();
            for k in &theirs {
                assert_eq!(
                    warning_kinds(&plan, k),
                    ["foreign_key"],
                    "round {round}: {owner} must report {other_owner}'s key {k} as foreign: {plan}"
                );
            }
            for c in actions(&plan, "revoke_key") {
                let k = c["key_id"].as_str().unwrap_or("");
                assert!(
                    !theirs.contains(k),
                    "round {round}: {owner} plans to revoke {other_owner}'s key {k}: {plan}"
                );
            }
            if !stray_revoked {
                assert!(
                    actions(&plan, "revoke_key")
                        .iter()
                        .any(|c| c["key_id"] == stray_id.as_str()),
                    "round {round}: {owner} in revoke mode plans to revoke the untagged key: {plan}"
                );
            }

            // Rounds 2 and 4 also force a rotation (overlap 0s: the old key goes at once), so
            // that each side revokes keys of its own while the other's are there.
            let rotated_from = (round % 2 == 0).then(|| {
                let from = id(&ws.sink("shared-bot", "deploy"));
                let out = ws.keyward(&["rotate", "shared-bot", "--auto-approve"]);
                expect_code(
                    &out,
                    0,
                    &format!("round {round}: {owner}'s forced rotation"),
                );
                from
            });
            apply(ws, &format!("round {round}: {owner}'s apply"));
            if let Some(from) = rotated_from {
                assert_ne!(id(&ws.sink("shared-bot", "deploy")), from, "round {round}");
                assert!(
                    !sb.key_ids_of("shared-bot").contains(&from),
                    "round {round}: {owner}'s own replaced key {from} is revoked (overlap 0s)"
                );
            }
            stray_revoked = !sb.key_ids_of("shared-bot").contains(&stray_id);
            assert!(
                stray_revoked,
                "round {round}: {owner}'s apply left the untagged key in revoke mode"
            );

            let still = ids_owned_by(other_owner);
            assert_eq!(
                still, theirs,
                "round {round}: {owner}'s run changed {other_owner}'s keys"
            );
            check_sinks(&format!("round {round}, after {owner}'s apply"));
        }
    }

    // Each side's status lists the other side's keys as foreign, its own as current.
    for (i, (owner, tunnel, ws)) in sides.iter().enumerate() {
        let other_owner = sides[1 - i].0;
        let status = ws.status_keys();
        for k in ids_owned_by(other_owner) {
            let e = status
                .iter()
                .find(|e| e["key_id"] == k.as_str())
                .unwrap_or_else(|| panic!("{owner}'s status lacks {k}: {status:?}"));
            assert_eq!(e["state"], "foreign", "{owner}: {e}");
        }
        for slot in ["deploy", *tunnel] {
            let doc = ws.sink("shared-bot", slot);
            let e = status
                .iter()
                .find(|e| e["key_id"] == id(&doc).as_str())
                .unwrap_or_else(|| panic!("{owner}'s status lacks its {slot}: {status:?}"));
            assert_eq!(e["state"], "current", "{owner}: {e}");
            let key = key_object(&sb, "shared-bot", &id(&doc));
            assert_eq!(tag_owner(&key).as_deref(), Some(*owner), "{key}");
        }
    }
}

// 5 ─ attribute drift ──────────────────────────────────────────────────────────────────────

const DRIFT_USERS: &str = "users:
  - provider: ng
    name: drifter
    keys:
      deploy:
        description: drifter deploys
      tunnel:
        kind: credential
        acl: [\"bind:*.example.com\"]
";

/// The single `update_key` change of the plan, for `slot`.
fn the_update(plan: &Value, slot: &str) -> Value {
    let ups = actions(plan, "update_key");
    assert_eq!(ups.len(), 1, "one update_key expected: {plan}");
    assert_eq!(ups[0]["slot"], slot, "{plan}");
    assert_eq!(
        changes(plan).len(),
        1,
        "nothing but the update is planned: {plan}"
    );
    ups[0].clone()
}

/// The human plan's line for the update of `slot`.
fn human_update_line(ws: &Workspace, slot: &str) -> String {
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 2, "plan --detailed-exitcode with drift");
    let t = text(&out.stdout);
    assert!(
        t.contains("Plan: 0 to create, 1 to update, 0 to rotate, 0 to revoke."),
        "{t}"
    );
    t.lines()
        .find(|l| l.contains(&format!("~ update key {slot}")))
        .unwrap_or_else(|| panic!("no `~ update key {slot}` line:\n{t}"))
        .to_string()
}

#[test]
fn acl_widened_at_the_provider_is_put_back_in_place() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", DRIFT_USERS);
    apply(&ws, "first apply");
    let tunnel = ws.sink("drifter", "tunnel");
    let keys = sb.key_ids_of("drifter");
    assert_converged(&ws, "fresh apply");

    let (status, body) = sb.api(
        "PATCH",
        &format!("/credentials/{}", id(&tunnel)),
        Some(json!({"acl": []})),
    );
    assert_eq!(status, 200, "{body}");

    let plan = ws.plan_json();
    let up = the_update(&plan, "tunnel");
    assert_eq!(up["key_id"], id(&tunnel).as_str(), "{up}");
    assert_eq!(
        up["before"],
        json!({"key_id": id(&tunnel), "acl": []}),
        "before holds exactly the drifted attribute: {up}"
    );
    assert_eq!(
        up["after"],
        json!({"acl": ["bind:*.example.com"]}),
        "after holds it as declared: {up}"
    );
    let line = human_update_line(&ws, "tunnel");
    assert!(
        line.contains(r#"acl: [] -> ["bind:*.example.com"]"#),
        "{line}"
    );

    let out = apply(&ws, "apply putting the ACL back");
    assert!(out.contains("1 updated"), "{out}");
    let cred = key_object(&sb, "drifter", &id(&tunnel));
    assert_eq!(cred["acl"], json!(["bind:*.example.com"]), "{cred}");
    assert_eq!(
        sb.key_ids_of("drifter"),
        keys,
        "updated in place, no new key"
    );
    assert_eq!(ws.sink("drifter", "tunnel"), tunnel);
    assert!(sb.secret_works("credential", &secret(&tunnel)));
    assert_converged(&ws, "after the update");

    // Widened by adding a rule: the same.
    let (status, body) = sb.api(
        "PATCH",
        &format!("/credentials/{}", id(&tunnel)),
        Some(json!({"acl": ["bind:*.example.com", "bind:*"]})),
    );
    assert_eq!(status, 200, "{body}");
    let plan = ws.plan_json();
    let up = the_update(&plan, "tunnel");
    assert_eq!(
        up["before"]["acl"],
        json!(["bind:*.example.com", "bind:*"]),
        "{up}"
    );
    apply(&ws, "apply removing the added rule");
    let cred = key_object(&sb, "drifter", &id(&tunnel));
    assert_eq!(cred["acl"], json!(["bind:*.example.com"]), "{cred}");
    assert_converged(&ws, "after the second update");
    assert_eq!(sb.key_ids_of("drifter"), keys);
}

#[test]
fn description_edited_at_the_provider_is_put_back_in_place() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", DRIFT_USERS);
    apply(&ws, "first apply");
    let deploy = ws.sink("drifter", "deploy");
    let keys = sb.key_ids_of("drifter");

    let (status, body) = sb.api(
        "PATCH",
        &format!("/api_keys/{}", id(&deploy)),
        Some(json!({"description": "borrowed by bob"})),
    );
    assert_eq!(status, 200, "{body}");

    let plan = ws.plan_json();
    let up = the_update(&plan, "deploy");
    assert_eq!(
        up["before"],
        json!({"key_id": id(&deploy), "description": "borrowed by bob"}),
        "{up}"
    );
    assert_eq!(
        up["after"],
        json!({"description": "drifter deploys"}),
        "{up}"
    );
    let line = human_update_line(&ws, "deploy");
    assert!(
        line.contains(r#"description: "borrowed by bob" -> "drifter deploys""#),
        "{line}"
    );

    apply(&ws, "apply putting the description back");
    let key = key_object(&sb, "drifter", &id(&deploy));
    assert_eq!(key["description"], "drifter deploys", "{key}");
    assert_eq!(
        sb.key_ids_of("drifter"),
        keys,
        "updated in place, no new key"
    );
    assert!(sb.secret_works("api_key", &secret(&deploy)));
    assert_converged(&ws, "after the update");
}

#[test]
fn acl_and_description_edited_in_the_file_are_applied_in_place() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", DRIFT_USERS);
    apply(&ws, "first apply");
    let deploy = ws.sink("drifter", "deploy");
    let tunnel = ws.sink("drifter", "tunnel");
    let keys = sb.key_ids_of("drifter");

    ws.write_config(
        "",
        "users:
  - provider: ng
    name: drifter
    keys:
      deploy:
        description: drifter ships
      tunnel:
        kind: credential
        acl: [\"bind:*.example.com\", \"bind:*.example.org\"]
",
    );
    let plan = ws.plan_json();
    let ups = actions(&plan, "update_key");
    assert_eq!(ups.len(), 2, "{plan}");
    assert_eq!(changes(&plan).len(), 2, "only the two updates: {plan}");
    let by_slot = |slot: &str| {
        ups.iter()
            .find(|c| c["slot"] == slot)
            .cloned()
            .unwrap_or_else(|| panic!("no update_key for {slot}: {plan}"))
    };
    let d = by_slot("deploy");
    assert_eq!(
        d["before"],
        json!({"key_id": id(&deploy), "description": "drifter deploys"}),
        "{d}"
    );
    assert_eq!(d["after"], json!({"description": "drifter ships"}), "{d}");
    let t = by_slot("tunnel");
    assert_eq!(
        t["before"],
        json!({"key_id": id(&tunnel), "acl": ["bind:*.example.com"]}),
        "{t}"
    );
    assert_eq!(
        t["after"],
        json!({"acl": ["bind:*.example.com", "bind:*.example.org"]}),
        "{t}"
    );
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 2, "plan after the file edit");
    let human = text(&out.stdout);
    assert!(human.contains("~ update key deploy"), "{human}");
    assert!(human.contains("~ update key tunnel"), "{human}");
    assert!(
        human.contains("Plan: 0 to create, 2 to update, 0 to rotate, 0 to revoke."),
        "{human}"
    );

    let out = apply(&ws, "apply of the edit");
    assert!(
        out.contains("2 updated") && out.contains("0 rotated"),
        "{out}"
    );
    assert_eq!(sb.key_ids_of("drifter"), keys, "no new key was minted");
    let k = key_object(&sb, "drifter", &id(&deploy));
    assert_eq!(k["description"], "drifter ships", "{k}");
    let c = key_object(&sb, "drifter", &id(&tunnel));
    let acl: BTreeSet<String> = serde_json::from_value(c["acl"].clone()).unwrap();
    assert_eq!(
        acl,
        BTreeSet::from(["bind:*.example.com".into(), "bind:*.example.org".into()]),
        "{c}"
    );
    assert_eq!(ws.sink("drifter", "deploy"), deploy, "no new delivery");
    assert_eq!(ws.sink("drifter", "tunnel"), tunnel, "no new delivery");
    assert!(sb.secret_works("api_key", &secret(&deploy)));
    assert!(sb.secret_works("credential", &secret(&tunnel)));
    assert_converged(&ws, "after applying the edit");
}

// 6 ─ keyward's tag wiped at the provider ──────────────────────────────────────────────────

#[test]
fn tag_wiped_at_the_provider_is_restored() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("  owner: ops-1\n", DRIFT_USERS);
    apply(&ws, "first apply");
    let deploy = ws.sink("drifter", "deploy");
    let tunnel = ws.sink("drifter", "tunnel");
    let keys = sb.key_ids_of("drifter");
    let tag = |slot: &str| format!(r#"{{"managed_by":"keyward","owner":"ops-1","slot":"{slot}"}}"#);
    assert_eq!(
        key_object(&sb, "drifter", &id(&deploy))["metadata"],
        tag("deploy")
    );

    for (coll, doc) in [("api_keys", &deploy), ("credentials", &tunnel)] {
        let (status, body) = sb.api(
            "PATCH",
            &format!("/{coll}/{}", id(doc)),
            Some(json!({"metadata": ""})),
        );
        assert_eq!(status, 200, "{body}");
    }

    let plan = ws.plan_json();
    let ups = actions(&plan, "update_key");
    assert_eq!(ups.len(), 2, "{plan}");
    assert!(
        actions(&plan, "revoke_key").is_empty() && actions(&plan, "rotate_key").is_empty(),
        "{plan}"
    );
    for (slot, doc) in [("deploy", &deploy), ("tunnel", &tunnel)] {
        let up = ups
            .iter()
            .find(|c| c["slot"] == slot)
            .unwrap_or_else(|| panic!("no update_key for {slot}: {plan}"));
        assert_eq!(
            up["before"],
            json!({"key_id": id(doc), "metadata": ""}),
            "{up}"
        );
        assert_eq!(up["after"], json!({"metadata": tag(slot)}), "{up}");
    }
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        2,
        "plan with wiped tags",
    );

    apply(&ws, "apply restoring the tags");
    for (slot, doc) in [("deploy", &deploy), ("tunnel", &tunnel)] {
        let k = key_object(&sb, "drifter", &id(doc));
        assert_eq!(k["metadata"], tag(slot), "{k}");
    }
    assert_eq!(sb.key_ids_of("drifter"), keys, "no new key");
    assert!(sb.secret_works("api_key", &secret(&deploy)));
    assert!(sb.secret_works("credential", &secret(&tunnel)));
    assert_converged(&ws, "after restoring the tags");
}

// 3b ─ same owner: a rotation by one installation is adopted by the other ───────────────────

#[test]
fn rotation_by_one_installation_is_adopted_by_the_other_with_the_same_owner() {
    let sb = Sandbox::start(&[]);
    let shared = tempfile::tempdir().unwrap();
    let sink = format!(
        "  shared:\n    type: file\n    path: {}/{{provider}}/{{user}}/{{slot}}.json\n    format: json\n",
        shared.path().display()
    );
    let users = "users:\n  - provider: ng\n    name: twin\n    keys:\n      deploy: {sink: shared, overlap: 1h}\n";
    let (a, b) = (Workspace::new(&sb), Workspace::new(&sb));
    a.write_config_with_sinks("", &sink, users);
    b.write_config_with_sinks("", &sink, users);
    let doc = || read_json(&shared.path().join("ng/twin/deploy.json"));
    apply(&a, "A's first apply");
    apply(&b, "B's first apply");
    let k1 = doc();

    expect_code(
        &a.keyward(&["rotate", "twin/deploy", "--auto-approve"]),
        0,
        "A rotates",
    );
    let k2 = doc();
    assert_ne!(id(&k1), id(&k2), "the shared sink holds A's new key");

    // B recorded k1 as current; it finds k2 in the sink: adopted, and k1 retires — nothing is
    // revoked or rotated.
    let plan = b.plan_json();
    assert!(changes(&plan).is_empty(), "{plan}");
    assert_eq!(warning_kinds(&plan, &id(&k2)), ["adopted_key"], "{plan}");
    let out = apply(&b, "B's apply after A's rotation");
    assert_revoked_nothing(&out);
    assert_eq!(
        sb.key_ids_of("twin"),
        BTreeSet::from([id(&k1), id(&k2)]),
        "B minted or revoked nothing"
    );
    assert!(
        sb.secret_works("api_key", &secret(&k1)),
        "k1 in its overlap"
    );
    assert!(sb.secret_works("api_key", &secret(&k2)));
    assert_eq!(doc(), k2, "B did not deliver anything");
    for (ws, who) in [(&a, "A"), (&b, "B")] {
        let cur = status_of(ws, &id(&k2)).expect("k2 listed");
        assert_eq!(cur["state"], "current", "{who}: {cur}");
        let old = status_of(ws, &id(&k1)).expect("k1 listed");
        assert_eq!(old["state"], "retiring", "{who}: {old}");
        assert!(!old["revoke_after"].is_null(), "{who}: {old}");
        assert_converged(ws, &format!("{who} after the rotation"));
    }
}

// 4b ─ different owners: pruning a user must not destroy the other installation's keys ──────

/// Contract §10.2: a key tagged by another owner is never revoked. team-a created the user;
/// team-b keeps its own key on it. When team-a drops the user from its file with
/// `prune.users: delete` (or `disable`, which suspends the user's keys), team-b's key must
/// survive: the user holds keys of another installation.
#[test]
fn pruning_a_user_never_destroys_another_installations_keys() {
    for mode in ["delete", "disable"] {
        let sb = Sandbox::start(&[]);
        let cfg = |ws: &Workspace, owner: &str, declare: bool| {
            let users = if declare {
                "users:\n  - provider: ng\n    name: shared-bot\n    keys:\n      deploy: {}\n"
            } else {
                "users: []\n"
            };
            ws.write_config(
                &format!("  owner: {owner}\n"),
                &format!("{users}prune:\n  users: {mode}\n"),
            );
        };
        let (a, b) = (Workspace::new(&sb), Workspace::new(&sb));
        cfg(&a, "team-a", true);
        cfg(&b, "team-b", true);
        apply(&a, "team-a's first apply");
        apply(&b, "team-b's first apply");
        let theirs = b.sink("shared-bot", "deploy");
        assert!(sb.secret_works("api_key", &secret(&theirs)));

        cfg(&a, "team-a", false);
        let plan = a.plan_json();
        assert!(
            changes(&plan).is_empty(),
            "prune.users: {mode}: team-a must not delete or disable a user holding team-b's key {}: {plan}",
            id(&theirs)
        );
        let out = a.keyward(&["apply", "--auto-approve"]);
        expect_code(&out, 0, &format!("team-a's apply (prune.users: {mode})"));
        let user = sb.user_by_name("shared-bot");
        assert!(
            user.as_ref().is_some_and(|u| u["active"] == true),
            "prune.users: {mode}: the shared user is gone or disabled: {user:?}\n{}",
            text(&out.stdout)
        );
        assert!(
            sb.secret_works("api_key", &secret(&theirs)),
            "prune.users: {mode}: team-b's key stopped working after team-a's apply:\n{}",
            text(&out.stdout)
        );
        assert_converged(&b, &format!("team-b after team-a's prune ({mode})"));
    }
}

// 5b ─ a saved plan with a drift update ───────────────────────────────────────────────────

/// A saved plan with an `update_key` applies it; and a change of the drifted attribute at the
/// provider after the plan was saved makes it stale (§9: the digest covers every remote object
/// the plan's decisions read; §10.3: those now include description and ACL).
#[test]
fn saved_plan_with_an_update_key_applies_and_goes_stale_when_the_attribute_changes() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", DRIFT_USERS);
    apply(&ws, "first apply");
    let tunnel = ws.sink("drifter", "tunnel");
    let deploy = ws.sink("drifter", "deploy");
    let patch = |path: String, body: Value| {
        let (status, got) = sb.api("PATCH", &path, Some(body));
        assert_eq!(status, 200, "{got}");
    };
    let acl_path = format!("/credentials/{}", id(&tunnel));

    patch(acl_path.clone(), json!({"acl": []}));
    expect_code(&ws.keyward(&["plan", "--out", "p1.json"]), 0, "plan --out");
    let out = ws.keyward(&["apply", "p1.json"]);
    expect_code(&out, 0, "apply PLANFILE");
    assert!(
        text(&out.stdout).contains("1 updated"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        key_object(&sb, "drifter", &id(&tunnel))["acl"],
        json!(["bind:*.example.com"])
    );
    assert_converged(&ws, "after apply PLANFILE");

    // Saved with an ACL update; the ACL changes again at the provider before the apply.
    patch(acl_path.clone(), json!({"acl": []}));
    expect_code(&ws.keyward(&["plan", "--out", "p2.json"]), 0, "plan --out");
    patch(acl_path, json!({"acl": ["bind:*"]}));
    let out = ws.keyward(&["apply", "p2.json"]);
    expect_code(&out, 1, "apply of a plan saved before an ACL change");
    assert!(
        text(&out.stderr).contains("plan is stale") || text(&out.stdout).contains("plan is stale"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        key_object(&sb, "drifter", &id(&tunnel))["acl"],
        json!(["bind:*"]),
        "a refused plan changes nothing"
    );

    // The same for a description changed after the plan was saved.
    apply(&ws, "apply putting the ACL back");
    expect_code(&ws.keyward(&["plan", "--out", "p3.json"]), 0, "plan --out");
    patch(
        format!("/api_keys/{}", id(&deploy)),
        json!({"description": "borrowed by bob"}),
    );
    let out = ws.keyward(&["apply", "p3.json"]);
    expect_code(&out, 1, "apply of a plan saved before a description change");
    assert!(
        text(&out.stderr).contains("plan is stale") || text(&out.stdout).contains("plan is stale"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
