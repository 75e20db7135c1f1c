//! End-to-end tests for Okta ASA: the real `keyward` binary against the real `keyward-sandbox`
//! over loopback. Users and keys converge and every delivered key pair mints a token; a forced
//! rotation puts the old key on ASA's expiry clock and revokes it after `overlap`; short-lived
//! tokens, Link paging (absolute and relative), 429s with `X-RateLimit-Retry-At`, disabling and
//! soft deletion are all handled; ngrok and ASA providers share one config and one run.

mod common;

use common::asa::{self, Asa};
use common::{Sandbox, expect_code, text};
use serde_json::{Value, json};

const TWO_USERS: &str = "users:
  - provider: asa
    name: backup-bot
    keys:
      main: {rotate_every: 90d}
  - provider: asa
    name: paused-bot
    active: false
    keys:
      main: {}
";

fn plan_json(ws: &common::Workspace) -> Value {
    let out = ws.keyward(&["plan", "--json"]);
    expect_code(&out, 0, "plan --json");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn users_and_keys_converge_and_delivered_keys_mint_tokens() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    asa::write_config(&ws, "", TWO_USERS);

    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "first plan");
    let plan_text = text(&plan.stdout);
    assert!(plan_text.contains("asa / backup-bot"), "{plan_text}");
    assert!(
        plan_text.contains("Plan: 4 to create, 0 to update, 0 to rotate, 0 to revoke."),
        "{plan_text}"
    );

    let apply = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&apply, 0, "apply");

    let api = Asa::new(&sb);
    assert_eq!(api.user("backup-bot").unwrap()["status"], "ACTIVE");
    assert_eq!(api.user("paused-bot").unwrap()["status"], "DISABLED");

    let doc = asa::sink(&ws, "backup-bot", "main");
    assert_eq!(doc["provider"], "asa");
    assert_eq!(doc["provider_type"], "okta-asa");
    assert_eq!(doc["team"], sb.asa_team.as_str());
    assert_eq!(doc["kind"], "api_key");
    assert!(doc["expires_at"].is_null(), "a fresh ASA key never expires");
    assert!(doc["rotate_after"].is_string());
    assert_eq!(doc["user_id"], api.user("backup-bot").unwrap()["id"]);
    let keys = api.keys("backup-bot");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], doc["key_id"]);
    assert!(
        asa::secret_works(&sb, &doc),
        "the delivered key mints a token"
    );
    // A disabled user's key is kept but cannot mint tokens until the user is enabled again.
    let paused = asa::sink(&ws, "paused-bot", "main");
    assert!(!asa::secret_works(&sb, &paused));

    let again = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&again, 0, "second plan");

    // Nothing outside the sinks holds a secret.
    for secret in [&doc["secret"], &paused["secret"]] {
        let s = secret.as_str().unwrap();
        for out in [&plan, &apply, &again] {
            assert!(!text(&out.stdout).contains(s) && !text(&out.stderr).contains(s));
        }
        for (path, content) in ws.non_sink_files() {
            assert!(!content.contains(s), "secret in {}", path.display());
        }
    }
    let status = ws.keyward(&["status", "--json"]);
    expect_code(&status, 0, "status");
    let st: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn forced_rotation_sets_provider_expiry_then_revokes_after_overlap() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    asa::write_config(
        &ws,
        "",
        "users:\n  - provider: asa\n    name: backup-bot\n    keys:\n      main: {overlap: 2s}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let old = asa::sink(&ws, "backup-bot", "main");

    let rotate = ws.keyward(&["rotate", "backup-bot", "--auto-approve"]);
    expect_code(&rotate, 0, "rotate");
    let new = asa::sink(&ws, "backup-bot", "main");
    assert_ne!(old["key_id"], new["key_id"]);
    assert!(asa::secret_works(&sb, &new));

    let api = Asa::new(&sb);
    let keys = api.keys("backup-bot");
    assert_eq!(keys.len(), 2, "{keys:?}");
    let old_remote = keys.iter().find(|k| k["id"] == old["key_id"]).unwrap();
    let new_remote = keys.iter().find(|k| k["id"] == new["key_id"]).unwrap();
    assert_eq!(new_remote["expires_at"], "0001-01-01T00:00:00Z");
    // ASA's rotation put the old key on a 2-day clock.
    let exp: jiff::Timestamp = old_remote["expires_at"].as_str().unwrap().parse().unwrap();
    let left = jiff::Timestamp::now().duration_until(exp);
    assert!(
        left > jiff::SignedDuration::from_hours(47) && left <= jiff::SignedDuration::from_hours(48),
        "{left:?}"
    );
    // Still valid during the overlap.
    assert!(asa::secret_works(&sb, &old));

    std::thread::sleep(std::time::Duration::from_millis(2500));
    let plan = ws.keyward(&["plan"]);
    assert!(
        text(&plan.stdout).contains("- revoke key"),
        "{}",
        text(&plan.stdout)
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "revoke");
    let keys = api.keys("backup-bot");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], new["key_id"]);
    assert!(!asa::secret_works(&sb, &old), "the old key is gone");
    assert!(asa::secret_works(&sb, &new));
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );

    // A key that expires at ASA cannot mint tokens, and keyward rotates it.
    asa::expire(&sb, new["key_id"].as_str().unwrap());
    assert!(!asa::secret_works(&sb, &new));
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "an expired key is due");
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "replace");
    assert!(asa::secret_works(
        &sb,
        &asa::sink(&ws, "backup-bot", "main")
    ));
}

#[test]
fn tokens_expiring_mid_run_are_renewed() {
    let sb = Sandbox::start(&["--asa-token-lifetime", "1s", "--latency", "150ms"]);
    let ws = asa::workspace(&sb);
    let mut users = String::from("users:\n");
    for i in 0..10 {
        users.push_str(&format!(
            "  - provider: asa\n    name: short-{i}\n    keys:\n      main: {{}}\n"
        ));
    }
    asa::write_config(&ws, "  concurrency: 1\n", &users);
    let apply = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&apply, 0, "apply with 1-second tokens");
    // 1 + 10 × 2 requests at 150 ms each, one at a time, outlive any 1–2 s token: the run
    // had to get a new one.
    let tokens = asa::route_count(&sb, "POST /v1/teams/{team}/service_token");
    assert!(tokens >= 2, "tokens were renewed: {}", sb.stats());
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
    for i in [0, 9] {
        assert!(asa::secret_works(
            &sb,
            &asa::sink(&ws, &format!("short-{i}"), "main")
        ));
    }
}

#[test]
fn disable_and_enable_follow_the_file() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    let on = "users:\n  - provider: asa\n    name: toggler\n    keys:\n      main: {}\n";
    asa::write_config(&ws, "", on);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "create");
    let api = Asa::new(&sb);
    let doc = asa::sink(&ws, "toggler", "main");

    asa::write_config(
        &ws,
        "",
        &on.replace("name: toggler\n", "name: toggler\n    active: false\n"),
    );
    let plan = ws.keyward(&["plan"]);
    assert!(
        text(&plan.stdout).contains("~ update service user"),
        "{}",
        text(&plan.stdout)
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "disable");
    assert_eq!(api.user("toggler").unwrap()["status"], "DISABLED");
    assert!(!asa::secret_works(&sb, &doc));
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "disabled is converged",
    );

    asa::write_config(&ws, "", on);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "enable");
    assert_eq!(api.user("toggler").unwrap()["status"], "ACTIVE");
    assert!(asa::secret_works(&sb, &doc), "the key survived");
}

#[test]
fn pruned_user_is_soft_deleted_irreversibly() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    let both = "users:
  - provider: asa
    name: keeper
  - provider: asa
    name: leaver
    keys:
      main: {}
prune:
  users: delete
";
    asa::write_config(&ws, "", both);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "create");
    let leaver_key = asa::sink(&ws, "leaver", "main");

    let only_keeper = "users:\n  - provider: asa\n    name: keeper\nprune:\n  users: delete\n";
    asa::write_config(&ws, "", only_keeper);
    let plan = plan_json(&ws);
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(changes[0]["action"], "delete_user");
    assert_eq!(changes[0]["user"], "leaver");
    assert!(
        changes[0]["reason"]
            .as_str()
            .unwrap()
            .contains("irreversible"),
        "{plan}"
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "delete");

    let api = Asa::new(&sb);
    let leaver = api.user("leaver").expect("a deleted user is still there");
    assert_eq!(leaver["status"], "DELETED");
    assert!(leaver["deleted_at"].is_string());
    assert!(!asa::secret_works(&sb, &leaver_key));
    assert!(api.users().iter().any(|u| u["name"] == "leaver"));
    let (status, _, body) = api.call("POST", "/service_users", Some(json!({"name": "leaver"})));
    assert_eq!(status, 409, "{body}");
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "a deleted user is not planned again",
    );

    // Declaring the name again cannot succeed: ASA keeps it reserved. keyward says so (product
    // contract §10.3) instead of attempting a create that ASA answers 409 on every run.
    asa::write_config(&ws, "", both);
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "re-creating a deleted name");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("held by a deleted Okta ASA service user"),
        "{all}"
    );
}

#[test]
fn two_hundred_fifty_users_across_link_pages_are_all_seen() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    let seeded: Vec<Value> = (0..250)
        .map(|i| json!({"name": format!("svc-{i:03}")}))
        .collect();
    asa::seed(&sb, json!({"service_users": seeded}));
    // Declare every seeded user (the last ones are on the third page) plus two new ones.
    let mut users = String::from("users:\n");
    for i in 0..252 {
        users.push_str(&format!("  - provider: asa\n    name: svc-{i:03}\n"));
    }
    asa::write_config(&ws, "", &users);
    let plan = plan_json(&ws);
    let creates: Vec<&Value> = plan["changes"].as_array().unwrap().iter().collect();
    assert_eq!(creates.len(), 2, "only the two new users: {plan}");
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    sb.reset_stats();
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "plan sees all 252",
    );
    // 253 users (with the admin) in pages of 100, then one key list per managed user: the
    // undeclared admin's keys are not listed.
    assert_eq!(
        asa::route_count(&sb, "GET /v1/teams/{team}/service_users"),
        3,
        "{}",
        sb.stats()
    );
    assert_eq!(
        asa::route_count(&sb, "GET /v1/teams/{team}/service_users/{user_name}/keys"),
        252
    );
}

#[test]
fn relative_links_and_small_pages_cover_users_and_keys() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    asa::settings(&sb, json!({"page_size": 3, "relative_links": true}));
    let keys: Vec<Value> = (0..7).map(|_| json!({})).collect();
    asa::seed(
        &sb,
        json!({"service_users": [{"name": "holder", "keys": keys}, {"name": "a"}, {"name": "b"}, {"name": "c"}]}),
    );
    asa::write_config(
        &ws,
        "",
        "users:\n  - provider: asa\n    name: holder\n  - provider: asa\n    name: zed\n",
    );
    let plan = plan_json(&ws);
    let unknown: Vec<&Value> = plan["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "unknown_key")
        .collect();
    assert_eq!(unknown.len(), 7, "every key across 3 pages: {plan}");
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(changes[0]["user"], "zed");
}

#[test]
fn rate_limited_requests_wait_for_retry_at_and_converge() {
    let sb = Sandbox::start(&["--rate-limit", "10/1s"]);
    let ws = asa::workspace(&sb);
    let mut users = String::from("users:\n");
    for i in 0..8 {
        users.push_str(&format!(
            "  - provider: asa\n    name: busy-{i}\n    keys:\n      main: {{}}\n"
        ));
    }
    asa::write_config(&ws, "  concurrency: 8\n", &users);
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply under 429s",
    );
    let stats = sb.stats();
    assert!(
        stats["rate_limited"].as_u64().unwrap() > 0,
        "the rate limit never hit: {stats}"
    );
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
    assert!(asa::secret_works(&sb, &asa::sink(&ws, "busy-7", "main")));
}

#[test]
fn ngrok_and_asa_in_one_config_plan_and_apply_together() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    asa::write_config(
        &ws,
        "",
        "users:
  - provider: ng
    name: ci-deployer
    keys:
      deploy: {kind: api_key}
  - provider: asa
    name: ci-deployer
    keys:
      main: {}
",
    );
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "plan");
    let out = text(&plan.stdout);
    assert!(
        out.contains("ng / ci-deployer") && out.contains("asa / ci-deployer"),
        "{out}"
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let ng = ws.sink("ci-deployer", "deploy");
    assert!(sb.secret_works("api_key", ng["secret"].as_str().unwrap()));
    assert!(ng["team"].is_null());
    let a = asa::sink(&ws, "ci-deployer", "main");
    assert_eq!(a["team"], sb.asa_team.as_str());
    assert!(asa::secret_works(&sb, &a));
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
}

#[test]
fn a_wrong_asa_secret_is_one_clear_line_without_the_secret() {
    let sb = Sandbox::start(&[]);
    let mut ws = asa::workspace(&sb);
    asa::write_config(&ws, "", TWO_USERS);
    let bogus = "bm90LXRoZS1yZWFsLXNlY3JldC1hdC1hbGwtMDEyMzQ1Njc4OQ==";
    ws.env.retain(|(k, _)| k != "ASA_KEY_SECRET");
    ws.env.push(("ASA_KEY_SECRET".into(), bogus.into()));
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 1, "plan with a wrong secret");
    let err = text(&out.stderr);
    assert!(err.contains("provider asa"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(!err.contains(bogus) && !err.contains(&bogus[..12]), "{err}");
    assert!(!text(&out.stdout).contains(bogus));
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_name_held_by_a_deleted_user_is_an_error_not_a_create_every_run() {
    let sb = Sandbox::start(&[]);
    let ws = asa::workspace(&sb);
    let api = Asa::new(&sb);
    // `ghost` existed once and was deleted: ASA keeps its name reserved.
    let (status, _, body) = api.call("POST", "/service_users", Some(json!({"name": "ghost"})));
    assert!(status < 300, "{body}");
    let (status, _, body) = api.call(
        "PUT",
        "/service_users/ghost",
        Some(json!({"name": "ghost", "status": "DELETED"})),
    );
    assert!(status < 300, "{body}");
    asa::write_config(
        &ws,
        "",
        "users:\n  - provider: asa\n    name: ghost\n    keys:\n      main: {}\n  - provider: asa\n    name: living\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 1, "plan with a reserved name");
    let err = text(&out.stderr);
    assert!(
        err.contains("asa / ghost") && err.contains("Rename it in the file"),
        "{err}"
    );
    let shown = text(&out.stdout);
    assert!(!shown.contains("ghost\n    + create"), "{shown}");
    // Nothing is proposed for ghost; the other user is planned as usual.
    let doc: Value = serde_json::from_slice(&ws.keyward(&["plan", "--json"]).stdout).unwrap();
    let changes = doc["changes"].as_array().expect("changes");
    assert!(changes.iter().all(|c| c["user"] != "ghost"), "{doc}");
    assert!(changes.iter().any(|c| c["user"] == "living"), "{doc}");
    assert_eq!(doc["errors"][0]["user"], "ghost", "{doc}");
    // apply does the rest, and says ghost could not be done: exit 1, no create attempted.
    sb.reset_stats();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a reserved name");
    assert!(api.user("living").is_some());
    assert_eq!(
        asa::route_count(&sb, "POST /v1/teams/{team}/service_users"),
        1,
        "only living was created: {}",
        sb.stats()
    );
}
