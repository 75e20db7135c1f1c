//! `keyward import` (product contract §10.1), driven through the real binary against the
//! sandbox: an account seeded with users and keys that existed before keyward → `import --out`
//! → the document validates → with it in the config, `plan --detailed-exitcode` exits 0 → the
//! first rotation of an adopted key delivers a new key and the adopted key retires for the
//! overlap (still valid, never revoked at once). For ngrok and Okta ASA; plus the single-key
//! form and what import refuses.

mod common;

use common::*;
use serde_json::{Value, json};

/// The config so far, with `document` (an import's output) pasted in as its `users:` list.
fn with_users(ws: &Workspace, document: &str) {
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    std::fs::write(ws.config_path(), format!("{config}{document}")).unwrap();
}

fn import_out(ws: &Workspace, args: &[&str]) -> String {
    let out_path = ws.path("imported.yaml");
    let path = out_path.to_str().unwrap();
    let mut full = vec!["import", "--out", path];
    full.extend_from_slice(args);
    let out = ws.keyward(&full);
    expect_code(&out, 0, "import --out");
    assert!(
        out.stdout.is_empty(),
        "with --out, stdout stays empty: {}",
        text(&out.stdout)
    );
    std::fs::read_to_string(&out_path).unwrap()
}

fn plan_exit(ws: &Workspace) -> (i32, String) {
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
fn an_ngrok_estate_is_imported_adopted_and_rotated_with_overlap() {
    let sb = Sandbox::start(&[]);
    // 20 service users that existed before keyward: API keys and credentials, some users
    // inactive, descriptions that do and do not make slot names, one user without keys.
    let mut users = Vec::new();
    let mut api_keys = Vec::new();
    let mut credentials = Vec::new();
    for i in 0..20 {
        users.push(json!({"name": format!("legacy-{i:02}"), "active": i % 5 != 0}));
        if i == 7 {
            continue;
        }
        api_keys.push(json!({"owner_name": format!("legacy-{i:02}"), "description": "deploy"}));
        if i % 2 == 0 {
            api_keys.push(
                json!({"owner_name": format!("legacy-{i:02}"), "description": "CI deploys, v2"}),
            );
        }
        if i % 3 == 0 {
            credentials.push(json!({"owner_name": format!("legacy-{i:02}"), "description": "tunnel", "acl": ["bind:*.example.com"]}));
        }
    }
    let seeded =
        sb.seed(json!({"service_users": users, "api_keys": api_keys, "credentials": credentials}));
    let token_of = |id: &str| -> String {
        seeded["api_keys"]
            .as_array()
            .unwrap()
            .iter()
            .chain(seeded["credentials"].as_array().unwrap())
            .find(|k| k["id"] == id)
            .and_then(|k| k["token"].as_str())
            .unwrap_or_else(|| panic!("no seeded token for {id}"))
            .to_string()
    };
    let before: std::collections::BTreeSet<String> = (0..20)
        .flat_map(|i| sb.key_ids_of(&format!("legacy-{i:02}")))
        .collect();
    let seeded_keys = api_keys.len() + credentials.len();
    assert_eq!(before.len(), seeded_keys);

    let ws = Workspace::new(&sb);
    ws.write_config("", "");
    let document = import_out(&ws, &[]);
    // Every user and every key, in the contract's shape.
    for i in 0..20 {
        assert!(
            document.contains(&format!("name: \"legacy-{i:02}\"")),
            "{document}"
        );
    }
    assert_eq!(document.matches("active: false").count(), 4, "{document}");
    assert_eq!(
        document.matches("kind: credential").count(),
        credentials.len()
    );
    assert_eq!(
        document.matches("acl: [\"bind:*.example.com\"]").count(),
        credentials.len()
    );
    assert!(
        document.contains(
            "      \"deploy\":\n        kind: api_key\n        description: \"deploy\"\n"
        ),
        "{document}"
    );
    assert!(
        document.contains(
            "      \"key-1\":\n        kind: api_key\n        description: \"CI deploys, v2\"\n"
        ),
        "{document}"
    );
    // Nothing remote changed.
    let after: std::collections::BTreeSet<String> = (0..20)
        .flat_map(|i| sb.key_ids_of(&format!("legacy-{i:02}")))
        .collect();
    assert_eq!(before, after);
    // --out never overwrites.
    let again = ws.keyward(&[
        "import",
        "--out",
        ws.path("imported.yaml").to_str().unwrap(),
    ]);
    expect_code(&again, 1, "import --out onto an existing file");
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );

    // The document is the config's user list: it validates and the plan is a no-op.
    with_users(&ws, &document);
    expect_code(
        &ws.keyward(&["validate"]),
        0,
        "validate with the imported document",
    );
    let (code, shown) = plan_exit(&ws);
    assert_eq!(code, 0, "plan after import changes nothing:\n{shown}");
    let keys = ws.status_keys();
    assert_eq!(keys.len(), seeded_keys, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k["delivery"] == "adopted" && k["state"] == "current"),
        "{keys:?}"
    );
    // Imported users are never pruned: with prune.users: delete and the document removed,
    // the plan deletes nothing.
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    std::fs::write(
        ws.config_path(),
        config.replace(&document, "prune:\n  users: delete\n"),
    )
    .unwrap();
    let plan = ws.plan_json();
    assert!(
        plan["changes"].as_array().unwrap().is_empty(),
        "imported users are not keyward's to prune: {plan}"
    );
    std::fs::write(ws.config_path(), &config).unwrap();

    // The first rotation of an adopted key: a new key delivered, the adopted one retiring for
    // the overlap and still valid.
    let status = ws.status_keys();
    let adopted = status
        .iter()
        .find(|k| k["user"] == "legacy-03" && k["slot"] == "deploy")
        .expect("legacy-03/deploy");
    let adopted_id = adopted["key_id"].as_str().unwrap().to_string();
    let plan = ws.keyward(&["plan", "--only", "legacy-03"]);
    expect_code(&plan, 0, "plan");
    let rotate = ws.keyward(&["rotate", "legacy-03/deploy", "--auto-approve"]);
    expect_code(&rotate, 0, "rotate the adopted key");
    let doc = ws.sink("legacy-03", "deploy");
    assert_ne!(doc["key_id"], adopted_id.as_str());
    assert!(sb.secret_works("api_key", doc["secret"].as_str().unwrap()));
    assert!(
        sb.key_ids_of("legacy-03").contains(&adopted_id),
        "the adopted key is not revoked at once"
    );
    assert!(
        sb.secret_works("api_key", &token_of(&adopted_id)),
        "the adopted key still authenticates during the overlap"
    );
    let status = ws.status_keys();
    let retiring = status
        .iter()
        .find(|k| k["key_id"] == adopted_id.as_str())
        .expect("adopted key listed");
    assert_eq!(retiring["state"], "retiring", "{retiring}");
    let new = status
        .iter()
        .find(|k| k["key_id"] == doc["key_id"])
        .expect("new key listed");
    assert_eq!(new["delivery"], "delivered", "{new}");
    let (code, shown) = plan_exit(&ws);
    assert_eq!(
        code, 0,
        "nothing more to do until the overlap ends:\n{shown}"
    );
}

#[test]
fn an_okta_asa_estate_is_imported_with_the_newest_key_in_slot_main() {
    let sb = Sandbox::start(&[]);
    let mut users = Vec::new();
    for i in 0..20 {
        let keys: Vec<Value> = (0..(i % 3)).map(|_| json!({})).collect();
        let mut u = json!({"name": format!("asa-legacy-{i:02}"), "keys": keys});
        if i % 4 == 0 {
            u["status"] = json!("DISABLED");
        }
        users.push(u);
    }
    let seeded = asa::seed(&sb, json!({ "service_users": users }));
    let ws = asa::workspace(&sb);
    asa::write_config(&ws, "", "");
    let document = import_out(&ws, &["--provider", "asa"]);
    for i in 0..20 {
        assert!(
            document.contains(&format!("name: \"asa-legacy-{i:02}\"")),
            "{document}"
        );
    }
    assert!(
        !document.contains("provider: \"ng\""),
        "only --provider asa: {document}"
    );
    assert_eq!(document.matches("active: false").count(), 5, "{document}");
    let with_keys = (0..20).filter(|i| i % 3 != 0).count();
    assert_eq!(
        document.matches("      \"main\":\n").count(),
        with_keys,
        "{document}"
    );
    with_users(&ws, &document);
    expect_code(&ws.keyward(&["validate"]), 0, "validate");
    let (code, shown) = plan_exit(&ws);
    assert_eq!(code, 0, "plan after import changes nothing:\n{shown}");
    // Slot main holds each user's newest key.
    let client = asa::Asa::new(&sb);
    let status = ws.status_keys();
    for s in status.iter().filter(|k| k["state"] == "current") {
        let user = s["user"].as_str().unwrap();
        let newest = client
            .keys(user)
            .into_iter()
            .max_by_key(|k| {
                (
                    k["issued_at"].as_str().unwrap().to_string(),
                    k["id"].as_str().unwrap().to_string(),
                )
            })
            .unwrap();
        assert_eq!(s["key_id"], newest["id"], "{user}");
        assert_eq!(s["delivery"], "adopted");
    }

    // The first rotation of an adopted ASA key: delivered, and the adopted key still works.
    let user = "asa-legacy-01";
    let adopted = status
        .iter()
        .find(|k| k["user"] == user && k["state"] == "current")
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = seeded["service_users"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["keys"].as_array().unwrap())
        .find(|k| k["id"] == adopted.as_str())
        .unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    expect_code(
        &ws.keyward(&["rotate", &format!("{user}/main"), "--auto-approve"]),
        0,
        "rotate the adopted ASA key",
    );
    let doc = asa::sink(&ws, user, "main");
    assert_ne!(doc["key_id"], adopted.as_str());
    assert!(asa::secret_works(&sb, &doc));
    assert_eq!(
        asa::service_token(&sb, &adopted, &secret).0,
        200,
        "the adopted key still authenticates during the overlap"
    );
    let status = ws.status_keys();
    let old = status
        .iter()
        .find(|k| k["key_id"] == adopted.as_str())
        .expect("adopted key listed");
    assert_eq!(old["state"], "retiring", "{old}");
}

#[test]
fn one_key_is_adopted_into_a_declared_slot_and_bad_targets_change_nothing() {
    let sb = Sandbox::start(&[]);
    let seeded = sb.seed(json!({
        "service_users": [{"name": "bot"}, {"name": "other"}],
        "api_keys": [{"owner_name": "bot", "description": "old"}, {"owner_name": "other"}],
        "credentials": [{"owner_name": "bot"}],
    }));
    let id = |kind: &str, owner_index: usize| -> String {
        let owner = &seeded["service_users"][owner_index]["id"];
        seeded[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["owner_id"] == *owner)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (key, credential, foreign) = (id("api_keys", 0), id("credentials", 0), id("api_keys", 1));
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {description: old}\n",
    );
    let state_before = || ws.state_text();
    for (target, key_id, says) in [
        ("bot/main", foreign.as_str(), "owns no key"),
        (
            "bot/main",
            credential.as_str(),
            "slot main holds kind api_key",
        ),
        ("bot/nope", key.as_str(), "has no slot nope"),
        ("ghost/main", key.as_str(), "no user ghost"),
        ("bot", key.as_str(), "name the slot"),
    ] {
        let was = state_before();
        let out = ws.keyward(&["import", target, key_id]);
        expect_code(&out, 1, &format!("import {target} {key_id}"));
        let err = text(&out.stderr);
        assert!(err.contains(says), "{target}: {err}");
        assert!(err.contains("nothing was imported"), "{err}");
        assert_eq!(state_before(), was, "a refused import records nothing");
    }
    let out = ws.keyward(&["import", "ng:bot/main", &key]);
    expect_code(&out, 0, "import one key");
    let keys = ws.status_keys();
    let main = keys.iter().find(|k| k["slot"] == "main").unwrap();
    assert_eq!(main["key_id"], key.as_str());
    assert_eq!(main["delivery"], "adopted");
    let (code, shown) = plan_exit(&ws);
    assert_eq!(code, 0, "the adopted key fills the slot:\n{shown}");
    // The slot has a current key now: a second import is refused.
    let out = ws.keyward(&["import", "bot/main", &key]);
    expect_code(&out, 1, "import into a slot that has a key");
}

#[test]
fn a_user_keyward_created_and_then_imported_is_never_pruned() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: made-here\n    keys:\n      main: {}\nprune:\n  users: delete\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    // Out of the file: keyward created it, so prune.users: delete would delete it ...
    ws.write_config("", "users: []\nprune:\n  users: delete\n");
    let plan = ws.plan_json();
    assert!(
        plan["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"] == "delete_user" && c["user"] == "made-here"),
        "a user keyward created is pruned once it leaves the file: {plan}"
    );
    // ... until it is imported: then it is the team's, and never pruned.
    let out = ws.keyward(&["import"]);
    expect_code(&out, 0, "import");
    assert!(
        text(&out.stdout).contains("name: \"made-here\""),
        "{}",
        text(&out.stdout)
    );
    let plan = ws.plan_json();
    assert!(
        plan["changes"].as_array().unwrap().is_empty(),
        "an imported user is never pruned: {plan}"
    );
    assert!(sb.user_by_name("made-here").is_some());
}

#[test]
fn import_leaves_out_what_a_config_cannot_declare_and_records_nothing_it_could_not_write() {
    let sb = Sandbox::start(&[]);
    sb.seed(json!({
        "service_users": [
            {"name": "fine"}, {"name": ".."}, {"name": "a/b"}, {"name": "tab\tbot"}
        ],
        "api_keys": [
            {"owner_name": "fine", "description": "null"},
            {"owner_name": "fine", "description": "true"},
            {"owner_name": ".."}, {"owner_name": "a/b"}, {"owner_name": "tab\tbot"}
        ],
    }));
    let ws = Workspace::new(&sb);
    ws.write_config("", "");
    // An --out in a directory that does not exist: refused before anything is recorded.
    let missing = ws.path("no/such/dir/users.yaml");
    let out = ws.keyward(&["import", "--out", missing.to_str().unwrap()]);
    expect_code(&out, 1, "import into a missing directory");
    assert!(
        text(&out.stderr).contains("nothing was imported"),
        "{}",
        text(&out.stderr)
    );
    let state = ws.state_text();
    assert!(!state.contains("\"fine\""), "nothing recorded: {state}");

    let out = ws.keyward(&["import"]);
    expect_code(&out, 0, "import");
    let document = text(&out.stdout);
    let err = text(&out.stderr);
    // Names the sink path `secrets/{provider}/{user}/{slot}.json` cannot hold, and a control
    // character, are left out with a reason; slot names YAML would read as null or a boolean
    // are quoted.
    for skipped in ["name: \"..\"", "name: \"a/b\"", "tab\\tbot"] {
        assert!(!document.contains(skipped), "{skipped}: {document}");
    }
    assert!(document.contains("name: \"fine\""), "{document}");
    assert!(err.contains("a/b") && err.contains("skipped"), "{err}");
    assert!(err.contains("control character"), "{err}");
    assert!(
        document.contains("\"null\":") && document.contains("\"true\":"),
        "{document}"
    );
    let state = ws.state_text();
    assert!(
        !state.contains("\"a/b\""),
        "a skipped user is not recorded: {state}"
    );
    // The document is the config's user list as it is.
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    std::fs::write(ws.config_path(), format!("{config}{document}")).unwrap();
    expect_code(
        &ws.keyward(&["validate"]),
        0,
        "validate the imported document",
    );
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "nothing to do for the imported users",
    );
}
