//! End-to-end tests: the real `keyward` binary against the real `keyward-sandbox` over loopback.
//! A fresh account converges in one apply, every delivered secret authenticates, drift is
//! planned and fixed, pagination sees every user, faults and rate limits are survived, and no
//! secret ever shows up outside its sink.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::{Sandbox, Workspace, expect_code, text};
use serde_json::json;

const TWO_USERS: &str = "users:
  - provider: ng
    name: ci-deployer
    keys:
      deploy:
        kind: api_key
        description: CI deploys
        rotate_every: 30d
      tunnel:
        kind: credential
        acl: [\"bind:*.example.com\"]
  - provider: ng
    name: backup-bot
    active: false
    keys:
      main: {}
";

/// Checks nothing the run printed or stored outside the sinks contains any delivered secret.
fn assert_no_leak(ws: &Workspace, outputs: &[&std::process::Output], secrets: &[String]) {
    for s in secrets {
        assert!(s.len() > 10, "suspiciously short secret");
        for out in outputs {
            assert!(!text(&out.stdout).contains(s.as_str()), "secret in stdout");
            assert!(!text(&out.stderr).contains(s.as_str()), "secret in stderr");
        }
        for (path, content) in ws.non_sink_files() {
            assert!(
                !content.contains(s.as_str()),
                "secret in {}",
                path.display()
            );
        }
    }
}

#[test]
fn fresh_account_converges_and_every_secret_works() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);

    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "first plan");
    let plan_text = text(&plan.stdout);
    assert!(plan_text.contains("+ create service user"), "{plan_text}");
    assert!(
        plan_text.contains("Plan: 5 to create, 0 to update, 0 to rotate, 0 to revoke."),
        "{plan_text}"
    );

    let apply = ws.keyward(&["apply", "--auto-approve", "-v"]);
    expect_code(&apply, 0, "apply");
    assert!(
        text(&apply.stdout).contains("Apply complete: 5 created"),
        "{}",
        text(&apply.stdout)
    );

    // Users exist, with the declared active flags.
    let ci = sb.user_by_name("ci-deployer").expect("ci-deployer exists");
    assert_eq!(ci["active"], true);
    let backup = sb.user_by_name("backup-bot").expect("backup-bot exists");
    assert_eq!(backup["active"], false);

    // Keys exist on their owners, tagged by keyward.
    let keys = sb.list("/api_keys", "keys");
    let creds = sb.list("/credentials", "credentials");
    let ci_keys: Vec<_> = keys.iter().filter(|k| k["owner_id"] == ci["id"]).collect();
    assert_eq!(ci_keys.len(), 1);
    assert_eq!(
        ci_keys[0]["metadata"],
        r#"{"managed_by":"keyward","owner":"keyward","slot":"deploy"}"#
    );
    assert_eq!(ci_keys[0]["description"], "CI deploys");
    let ci_creds: Vec<_> = creds.iter().filter(|k| k["owner_id"] == ci["id"]).collect();
    assert_eq!(ci_creds.len(), 1);
    assert_eq!(ci_creds[0]["acl"], json!(["bind:*.example.com"]));

    // Each sink holds a working secret, privately.
    let mut secrets = Vec::new();
    for (user, slot, kind) in [
        ("ci-deployer", "deploy", "api_key"),
        ("ci-deployer", "tunnel", "credential"),
        ("backup-bot", "main", "api_key"),
    ] {
        let doc = ws.sink(user, slot);
        assert_eq!(doc["provider"], "ng");
        assert_eq!(doc["provider_type"], "ngrok");
        assert_eq!(doc["user"], user);
        assert_eq!(doc["slot"], slot);
        assert_eq!(doc["kind"], kind);
        assert!(doc["expires_at"].is_null());
        let secret = doc["secret"].as_str().unwrap().to_string();
        if user == "backup-bot" {
            // An inactive user's API keys are suspended by the provider.
            assert!(
                !sb.secret_works(kind, &secret),
                "suspended user's key should not work"
            );
        } else {
            assert!(
                sb.secret_works(kind, &secret),
                "{user}/{slot} secret does not authenticate"
            );
        }
        let path = ws.path(&format!("secrets/ng/{user}/{slot}.json"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        secrets.push(secret);
    }
    let deploy = ws.sink("ci-deployer", "deploy");
    assert!(
        deploy["rotate_after"].is_string(),
        "rotate_after = created_at + rotate_every"
    );
    assert!(ws.sink("ci-deployer", "tunnel")["rotate_after"].is_null());

    // State: private, no secrets, records the keys.
    let state = ws.state_text();
    assert!(state.contains(deploy["key_id"].as_str().unwrap()));
    assert_eq!(
        std::fs::metadata(ws.path("state/state.db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Converged: a second plan has nothing to do.
    let again = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&again, 0, "second plan");
    assert!(text(&again.stdout).contains("No changes."));

    let status = ws.keyward(&["status", "--json"]);
    expect_code(&status, 0, "status");
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let entries = doc["keys"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e["state"] == "current"));

    assert_no_leak(&ws, &[&plan, &apply, &again, &status], &secrets);
}

#[test]
fn out_of_band_deactivation_is_planned_and_fixed() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");

    let ci = sb.user_by_name("ci-deployer").unwrap();
    let (status, _) = sb.api(
        "PATCH",
        &format!("/service_users/{}", ci["id"].as_str().unwrap()),
        Some(json!({"active": false})),
    );
    assert_eq!(status, 200);

    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2, "plan after drift");
    let out = text(&plan.stdout);
    assert!(
        out.contains("~ update service user        active: false -> true"),
        "{out}"
    );
    assert!(
        out.contains("Plan: 0 to create, 1 to update, 0 to rotate, 0 to revoke."),
        "{out}"
    );

    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply fix");
    assert_eq!(sb.user_by_name("ci-deployer").unwrap()["active"], true);
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "plan after fix",
    );
    // The key survived the suspension and works again.
    let secret = ws.sink("ci-deployer", "deploy")["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(sb.secret_works("api_key", &secret));
}

#[test]
fn two_hundred_fifty_users_across_pages_are_all_seen() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let mut users = String::from("users:\n");
    for i in 0..250 {
        users.push_str(&format!("  - provider: ng\n    name: svc-{i:03}\n"));
    }
    ws.write_config("", &users);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply 250");
    assert_eq!(sb.list("/service_users", "service_users").len(), 250);
    sb.reset_stats();
    let plan = ws.keyward(&["plan", "--detailed-exitcode", "--json"]);
    expect_code(&plan, 0, "plan sees all 250");
    let doc: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(doc["changes"].as_array().unwrap().len(), 0);
    // 250 users = 3 pages; keys and credentials one page each.
    assert_eq!(sb.stats()["requests"], 5, "{}", sb.stats());
}

#[test]
fn faults_and_rate_limits_still_converge() {
    let sb = Sandbox::start(&[
        "--error-rate",
        "0.2",
        "--rate-limit",
        "40/1s",
        "--rng-seed",
        "7",
    ]);
    let ws = Workspace::new(&sb);
    let mut users = String::from("users:\n");
    for i in 0..30 {
        users.push_str(&format!(
            "  - provider: ng\n    name: flaky-{i:02}\n    keys:\n      main: {{}}\n"
        ));
    }
    ws.write_config("  concurrency: 8\n", &users);
    // Injected errors change nothing at the sandbox, and every transient failure is retried:
    // the one apply succeeds.
    let apply = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&apply, 0, "apply under faults");
    let stats = sb.stats();
    assert!(
        stats["injected_errors"].as_u64().unwrap() > 0,
        "no errors were injected: {stats}"
    );
    assert!(
        stats["rate_limited"].as_u64().unwrap() > 0,
        "the rate limit never hit: {stats}"
    );
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "converged under faults");
    sb.set_faults(json!({"error_rate": 0.0, "rate_limit": null}));
    for i in 0..30 {
        let secret = ws.sink(&format!("flaky-{i:02}"), "main")["secret"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            sb.secret_works("api_key", &secret),
            "flaky-{i:02}'s delivered secret does not authenticate"
        );
    }
    assert_eq!(sb.list("/service_users", "service_users").len(), 30);
}

#[test]
fn wrong_or_missing_api_key_is_one_clear_line() {
    let sb = Sandbox::start(&[]);
    let mut ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);
    let bogus = "bogus_key_that_must_never_be_echoed_0123456789";
    ws.env.retain(|(k, _)| k != "NGROK_API_KEY");
    ws.env.push(("NGROK_API_KEY".into(), bogus.into()));
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 1, "plan with a wrong key");
    let err = text(&out.stderr);
    assert!(err.contains("provider ng"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("ERR_NGROK_"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(!err.contains(bogus) && !text(&out.stdout).contains(bogus));
    assert!(!err.contains(&bogus[..12]));

    ws.env.retain(|(k, _)| k != "NGROK_API_KEY");
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 1, "plan with no key");
    let err = text(&out.stderr);
    assert!(err.contains("NGROK_API_KEY"), "{err}");
    assert!(err.contains("keyward.yaml:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn apply_refuses_without_terminal_or_approval() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);
    let out = ws.keyward_stdin(&["apply"], Stdio::piped());
    expect_code(&out, 1, "apply without approval");
    assert!(
        text(&out.stderr).contains("--auto-approve"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        sb.user_by_name("ci-deployer").is_none(),
        "nothing may change"
    );
}

#[test]
fn saved_plan_applies_once_and_stale_plan_is_refused() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);
    let planfile = ws.path("plan.json");
    let p = planfile.to_str().unwrap();
    expect_code(&ws.keyward(&["plan", "--out", p]), 0, "plan --out");
    expect_code(&ws.keyward(&["apply", p]), 0, "apply saved plan");
    assert!(sb.user_by_name("backup-bot").is_some());
    // The same plan again: the world it was made from is gone.
    let again = ws.keyward(&["apply", p]);
    expect_code(&again, 1, "re-applying a used plan");
    assert!(text(&again.stderr).contains("plan is stale"));

    // A fresh plan, then an out-of-band change: stale, nothing applied.
    ws.write_config("", &TWO_USERS.replace("active: false", "active: true"));
    expect_code(&ws.keyward(&["plan", "--out", p]), 0, "plan --out 2");
    let ci = sb.user_by_name("ci-deployer").unwrap();
    sb.api(
        "POST",
        "/api_keys",
        Some(json!({"owner_id": ci["id"], "description": "hand-made"})),
    );
    let stale = ws.keyward(&["apply", p]);
    expect_code(&stale, 1, "stale plan");
    assert!(text(&stale.stderr).contains("plan is stale"));
    assert_eq!(
        sb.user_by_name("backup-bot").unwrap()["active"],
        false,
        "stale plan changed nothing"
    );
}

#[test]
fn global_flags_after_subcommand_and_json_is_one_document() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", TWO_USERS);
    for fmt in ["text", "json"] {
        let out = ws.keyward(&["plan", "--json", "-v", "--log-format", fmt]);
        expect_code(&out, 0, "plan --json -v");
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON document");
        assert_eq!(doc["format_version"], "1");
        assert_eq!(doc["summary"]["create"], 5);
    }
}

#[test]
fn max_deletions_refuses_a_large_apply() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "  max_deletions: 1\n",
        "users:\n  - provider: ng\n    name: holder\nprune:\n  unknown_keys: revoke\n",
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "create holder",
    );
    let holder = sb.user_by_name("holder").unwrap();
    // Three unknown keys: two are revoked (the last key of a user never is), one more than
    // max_deletions allows.
    for _ in 0..3 {
        sb.api("POST", "/api_keys", Some(json!({"owner_id": holder["id"]})));
    }
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply over max_deletions");
    assert!(
        text(&out.stderr).contains("max_deletions"),
        "{}",
        text(&out.stderr)
    );
    let left = sb
        .list("/api_keys", "keys")
        .into_iter()
        .filter(|k| k["owner_id"] == holder["id"])
        .count();
    assert_eq!(left, 3, "nothing revoked");
}

#[test]
fn partial_failure_is_reported_and_a_rerun_finishes() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // The sink directory is a file: delivery fails, the new key must not survive.
    ws.write_config("", TWO_USERS);
    std::fs::create_dir_all(ws.path("secrets/ng")).unwrap();
    std::fs::write(ws.path("secrets/ng/ci-deployer"), "in the way").unwrap();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a broken sink");
    let report = text(&out.stdout);
    assert!(report.contains("Apply failed:"), "{report}");
    assert!(
        report.contains("failed:        ng / ci-deployer: create key"),
        "{report}"
    );
    let ci = sb.user_by_name("ci-deployer").unwrap();
    let ci_keys = sb
        .list("/api_keys", "keys")
        .into_iter()
        .filter(|k| k["owner_id"] == ci["id"])
        .count();
    assert_eq!(ci_keys, 0, "an undelivered key is revoked");
    // backup-bot went through.
    assert!(ws.sink("backup-bot", "main")["secret"].is_string());

    std::fs::remove_file(ws.path("secrets/ng/ci-deployer")).unwrap();
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "re-run");
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
    let secret = ws.sink("ci-deployer", "deploy")["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(sb.secret_works("api_key", &secret));
}

#[test]
fn a_json_state_of_an_earlier_keyward_migrates_into_the_state_database() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: old-one\n    keys:\n      main: {rotate_every: 30d}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let recorded = ws.state_text();
    assert!(recorded.contains("old-one"), "{recorded}");
    // What an earlier keyward left: state.json, and no database.
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(ws.path(&format!("state/{f}")));
    }
    std::fs::write(ws.path("state/state.json"), &recorded).unwrap();
    // Read as it is: nothing to do, nothing written.
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "plan on a JSON state",
    );
    assert!(!ws.path("state/state.db").exists());
    // The first write migrates it; the old file is kept aside.
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: old-one\n    keys:\n      main: {rotate_every: 30d}\n  - provider: ng\n    name: new-one\n    keys:\n      main: {}\n",
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "apply after migration",
    );
    assert!(ws.path("state/state.db").exists());
    assert!(!ws.path("state/state.json").exists());
    assert!(ws.path("state/state.json.migrated").exists());
    let now: serde_json::Value = serde_json::from_str(&ws.state_text()).unwrap();
    let users = &now["accounts"]["ng"]["users"];
    assert!(
        users["old-one"].is_object() && users["new-one"].is_object(),
        "{now}"
    );
    // The migrated record still counts: the old user's key was neither replaced nor revoked.
    let before: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    assert_eq!(
        users["old-one"]["slots"]["main"]["current"]["id"],
        before["accounts"]["ng"]["users"]["old-one"]["slots"]["main"]["current"]["id"]
    );
    // A state.json that turns up beside the database later (a backup restored) is not read,
    // and says so.
    std::fs::write(ws.path("state/state.json"), &recorded).unwrap();
    let plan = ws.keyward(&["plan"]);
    expect_code(&plan, 0, "plan beside a stray state.json");
    let stderr = common::text(&plan.stderr);
    assert!(
        stderr.contains("state.json is ignored") && stderr.contains("state.db"),
        "{stderr}"
    );
}
