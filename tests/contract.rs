//! Rules of the product contract (`product.md` §1–§9) that nothing else pins, each through the
//! real binary against the sandbox: never every key of a user at once (§3), the client-side rate
//! budget and the concurrency cap (§2), `--only`, flags before the subcommand and
//! `$KEYWARD_CONFIG` (§1, §9), delivery retried through transient failures and the file sink's
//! durability steps (§4), inactive users' keys rotated (§9), the sink document's values and
//! formats (§7), the status table and its JSON values (§1, §9), a 403 (§9) and JSON log lines.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Sandbox, Workspace, expect_code, text};
use serde_json::{Value, json};

fn one_user(name: &str, keys: &str) -> String {
    format!("users:\n  - provider: ng\n    name: {name}\n    keys:\n{keys}")
}

/// `keyward.yaml` like [`Workspace::write_config`], with the provider's `rate_limit` and the
/// `concurrency` given.
fn write_budgeted(ws: &Workspace, rate_limit: &str, concurrency: usize, users: &str) {
    let text = format!(
        "version: 1\nsettings:\n  state_dir: state\n  concurrency: {concurrency}\nproviders:\n  ng:\n    type: ngrok\n    api_key: ${{NGROK_API_KEY}}\n    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: {rate_limit}\nsinks:\n  local:\n    type: file\n    path: secrets/{{provider}}/{{user}}/{{slot}}.json\ndefaults:\n  sink: local\n{users}"
    );
    std::fs::write(ws.config_path(), text).unwrap();
}

fn many_users(n: usize) -> String {
    let mut y = String::from("users:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - provider: ng\n    name: fleet-{i:03}\n    keys:\n      main: {{}}\n"
        ));
    }
    y
}

// §3 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn a_user_never_loses_every_key_in_one_apply() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: holder\nprune:\n  unknown_keys: revoke\n",
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "create holder",
    );
    let holder = sb.user_by_name("holder").unwrap();
    let mut made = Vec::new();
    for _ in 0..2 {
        let (status, key) = sb.api("POST", "/api_keys", Some(json!({"owner_id": holder["id"]})));
        assert!(status < 300, "{key}");
        made.push(key);
        std::thread::sleep(Duration::from_millis(1100));
    }
    let plan = ws.plan_json();
    let kept: Vec<&Value> = plan["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter(|w| w["kind"] == "last_key_kept")
        .collect();
    assert_eq!(kept.len(), 1, "{plan}");
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 0, "apply with prune.unknown_keys: revoke");
    let left = sb.key_ids_of("holder");
    assert_eq!(left.len(), 1, "exactly one key stays: {left:?}");
    // The newest one: the other was revoked.
    assert_eq!(kept[0]["key_id"], made[1]["id"]);
    assert!(left.contains(made[1]["id"].as_str().unwrap()));
    // And it stays on the next run too.
    let out = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&out, 0, "nothing more to do");
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "again");
    assert_eq!(sb.key_ids_of("holder").len(), 1);
}

// §2 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn the_client_rate_budget_keeps_keyward_under_the_account_limit() {
    // The account allows 12 requests in any second; keyward's own budget is 5 a second, never
    // more than 5 in any second.
    let sb = Sandbox::start(&["--rate-limit", "12/1s"]);
    let ws = Workspace::new(&sb);
    write_budgeted(&ws, "5/1s", 8, &many_users(12));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let stats = sb.stats();
    assert!(stats["requests"].as_u64().unwrap() > 24, "{stats}");
    assert_eq!(
        stats["rate_limited"], 0,
        "keyward went past its budget: {stats}"
    );

    // The same work without a budget worth the name draws 429s from the same account: the
    // check above could fail.
    let sb = Sandbox::start(&["--rate-limit", "12/1s"]);
    let ws = Workspace::new(&sb);
    write_budgeted(&ws, "100000/1s", 8, &many_users(12));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    assert!(
        sb.stats()["rate_limited"].as_u64().unwrap() > 0,
        "{}",
        sb.stats()
    );
}

#[test]
fn a_budget_just_under_the_account_limit_draws_no_429_over_any_rolling_window() {
    // The account counts 21 requests in any rolling second; keyward's budget is 20 a second.
    // A bucket of 20 that refills at 20 a second would send up to 39 in the first second; the
    // budget must hold over every window, the first one included, for several seconds of work.
    let sb = Sandbox::start(&["--rate-limit", "21/1s"]);
    let ws = Workspace::new(&sb);
    write_budgeted(&ws, "20/1s", 16, &many_users(40));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let stats = sb.stats();
    let sent = stats["requests"].as_u64().unwrap();
    assert!(sent > 80, "enough work to span several windows: {stats}");
    assert_eq!(
        stats["rate_limited"], 0,
        "keyward went past the account's rolling window: {stats}"
    );
}

#[test]
fn concurrency_caps_the_requests_in_flight() {
    for (cap, users) in [(2u64, 16), (6, 16)] {
        let sb = Sandbox::start(&["--latency", "100ms"]);
        let ws = Workspace::new(&sb);
        write_budgeted(&ws, "100000/1s", cap as usize, &many_users(users));
        expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
        let most = sb.stats()["max_in_flight"].as_u64().expect("max_in_flight");
        assert!(
            most <= cap,
            "{most} requests in flight with concurrency {cap}"
        );
        // With 16 users to create and 100 ms per answer, the cap is reached.
        assert_eq!(most, cap, "concurrency {cap} was never used in full");
    }
}

// §1, §9 ───────────────────────────────────────────────────────────────────────────────────────

#[test]
fn only_limits_plan_and_apply_to_the_named_users() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: alpha\n    keys:\n      main: {}\n  - provider: ng\n    name: beta\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan", "--json", "--only", "alpha"]);
    expect_code(&out, 0, "plan --only");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let users: Vec<&str> = plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    assert!(
        !users.is_empty() && users.iter().all(|u| *u == "alpha"),
        "{users:?}"
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve", "--only", "ng:alpha"]),
        0,
        "apply --only",
    );
    assert!(sb.user_by_name("alpha").is_some());
    assert!(sb.user_by_name("beta").is_none(), "beta is outside --only");
    let out = ws.keyward(&["apply", "--auto-approve", "--only", "nobody"]);
    expect_code(&out, 1, "--only an unknown user");
    assert!(sb.user_by_name("beta").is_none());
}

#[test]
fn flags_go_before_or_after_the_subcommand_and_keyward_config_is_the_default() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", &one_user("flagged", "      main: {}\n"));
    let cfg = ws.config_path().display().to_string();
    let run = |args: &[&str], config_env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(args)
            .env_remove("KEYWARD_CONFIG")
            .env("NO_COLOR", "1")
            .current_dir(ws.dir.path());
        if let Some(c) = config_env {
            cmd.env("KEYWARD_CONFIG", c);
        }
        for (k, v) in &ws.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for args in [
        vec!["-c", &cfg, "--log-format", "json", "-v", "plan", "--json"],
        vec!["plan", "-c", &cfg, "--json", "-v", "--log-format", "json"],
    ] {
        let out = run(&args, None);
        expect_code(&out, 0, &format!("{args:?}"));
        let doc: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document: {e}"));
        assert_eq!(doc["format_version"], "1");
    }
    // No -c: $KEYWARD_CONFIG names the file.
    let out = run(&["plan", "--json"], Some(&cfg));
    expect_code(&out, 0, "plan with KEYWARD_CONFIG");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["changes"][0]["user"], "flagged");
    // And without either, the default path is used (and is not there).
    let out = run(&["plan"], None);
    expect_code(&out, 1, "plan with no config");
    assert!(
        text(&out.stderr).contains("/etc/keyward/keyward.yaml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", &one_user("logged", "      main: {}\n"));
    let out = ws.keyward(&["--log-format", "json", "-v", "apply", "--auto-approve"]);
    expect_code(&out, 0, "apply with JSON logs");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert!(v.is_object() && v.get("level").is_some(), "{l}");
    }
}

// §4 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn delivery_is_retried_through_transient_failures_until_it_succeeds() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // Fails twice, then takes the document.
    let count = ws.path("attempts");
    let got = ws.path("delivered.json");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; if [ $n -le 2 ]; then echo not yet >&2; exit 1; fi; cat > {g}",
        c = count.display(),
        g = got.display()
    );
    ws.write_config_with_sinks(
        "",
        &format!(
            "  flaky:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", {script:?}]\n    timeout: 10s\n"
        ),
        &one_user("retried", "      main: {sink: flaky}\n"),
    );
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 0, "apply through two failed deliveries");
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&got).unwrap()).unwrap();
    assert!(sb.secret_works("api_key", doc["secret"].as_str().unwrap()));
    assert!(
        text(&out.stderr).contains("retrying"),
        "{}",
        text(&out.stderr)
    );
    // The key delivered is the one recorded: nothing left to do.
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "plan after delivery",
    );
}

#[test]
fn the_file_sink_writes_a_temp_file_fsyncs_renames_and_fsyncs_the_directory() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", &one_user("durable", "      main: {}\n"));
    let trace = ws.path("trace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=openat,linkat,fsync,fdatasync,rename,renameat,renameat2",
        "-o",
    ])
    .arg(&trace)
    .arg(env!("CARGO_BIN_EXE_keyward"))
    .args(["apply", "--auto-approve", "-c"])
    .arg(ws.config_path())
    .env("NO_COLOR", "1")
    .current_dir(ws.dir.path());
    for (k, v) in &ws.env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("strace is installed (.ci/run installs it)");
    expect_code(&out, 0, "apply under strace");
    let log = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("= -1")).collect();
    let args = |l: &str| -> Vec<String> {
        let inner = &l[l.find('(').unwrap() + 1..l.rfind(')').unwrap()];
        inner
            .split(", ")
            .map(|a| a.trim_matches('"').to_string())
            .collect()
    };
    let ret = |l: &str| l.rsplit("= ").next().unwrap().trim().to_string();
    // The rename onto the sink file, relative to a directory descriptor.
    let rename = lines
        .iter()
        .position(|l| l.contains("renameat") && l.contains("\"main.json\""))
        .unwrap_or_else(|| panic!("no rename onto the sink file:\n{log}"));
    let a = args(lines[rename]);
    let (dir_fd, temp) = (a[0].clone(), a[1].clone());
    // The directory descriptor is the sink's directory.
    let dir = ws.path("secrets/ng/durable").display().to_string();
    assert!(
        lines[..rename]
            .iter()
            .any(|l| l.contains("openat") && l.contains(&format!("\"{dir}\"")) && ret(l) == dir_fd),
        "fd {dir_fd} is not the sink directory:\n{log}"
    );
    // The temp file: an unnamed one linked in under the temp name, or one created by name.
    let temp_fd = lines[..rename]
        .iter()
        .rev()
        .find_map(|l| {
            if l.contains("linkat") && l.contains(&format!("\"{temp}\"")) {
                args(l)[1]
                    .strip_prefix("/proc/self/fd/")
                    .map(str::to_string)
            } else if l.contains("openat")
                && l.contains(&format!("\"{temp}\""))
                && l.contains("O_CREAT")
            {
                Some(ret(l))
            } else {
                None
            }
        })
        .unwrap_or_else(|| panic!("no temp file {temp} before the rename:\n{log}"));
    assert!(
        lines[..rename]
            .iter()
            .any(|l| (l.contains("fsync(") || l.contains("fdatasync(")) && args(l)[0] == temp_fd),
        "the temp file (fd {temp_fd}) was not synced before the rename:\n{log}"
    );
    assert!(
        lines[rename..]
            .iter()
            .any(|l| l.contains("fsync(") && args(l)[0] == dir_fd),
        "the sink directory (fd {dir_fd}) was not fsynced after the rename:\n{log}"
    );
}

#[test]
fn an_inactive_users_keys_are_still_created_and_rotated() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: dormant\n    active: false\n    keys:\n      main: {rotate_every: 2s, overlap: 0s}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let user = sb.user_by_name("dormant").unwrap();
    assert_eq!(user["active"], false, "{user}");
    let first = ws.sink("dormant", "main")["key_id"].clone();
    std::thread::sleep(Duration::from_millis(2500));
    let plan = ws.plan_json();
    assert!(
        plan["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c["action"] == "rotate_key"),
        "{plan}"
    );
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "rotating apply",
    );
    let second = ws.sink("dormant", "main")["key_id"].clone();
    assert_ne!(first, second, "the key of an inactive user was rotated");
    assert_eq!(
        sb.key_ids_of("dormant"),
        std::collections::BTreeSet::from([second.as_str().unwrap().to_string()]),
        "overlap 0s: the old key is gone"
    );
}

// §7 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn sink_documents_carry_their_values_in_each_format() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config_with_sinks(
        "",
        "  as-env:\n    type: file\n    path: secrets/{user}.env\n    format: env\n  as-raw:\n    type: file\n    path: secrets/{user}.raw\n    format: raw\n",
        &one_user("formats", "      main: {rotate_every: 30d, sink: [local, as-env, as-raw]}\n"),
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let doc = ws.sink("formats", "main");
    let created: jiff::Timestamp = doc["created_at"].as_str().unwrap().parse().unwrap();
    let after: jiff::Timestamp = doc["rotate_after"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        after,
        created + jiff::SignedDuration::from_hours(30 * 24),
        "rotate_after is created_at + rotate_every: {doc}"
    );
    assert!(doc["expires_at"].is_null(), "{doc}");
    let user = sb.user_by_name("formats").unwrap();
    assert_eq!(doc["user_id"], user["id"]);
    assert_eq!(doc["provider"], "ng");
    assert_eq!(doc["provider_type"], "ngrok");
    assert_eq!(doc["kind"], "api_key");
    let secret = doc["secret"].as_str().unwrap();
    let env = std::fs::read_to_string(ws.path("secrets/formats.env")).unwrap();
    assert_eq!(
        env,
        format!(
            "KEYWARD_KEY_ID={}\nKEYWARD_SECRET={secret}\n",
            doc["key_id"].as_str().unwrap()
        )
    );
    let raw = std::fs::read_to_string(ws.path("secrets/formats.raw")).unwrap();
    assert_eq!(raw, format!("{secret}\n"));
    assert!(sb.secret_works("api_key", raw.trim_end()));
}

#[test]
fn status_shows_every_key_by_value_as_a_table_and_as_json() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", &one_user("shown", "      main: {rotate_every: 30d}\n"));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let doc = ws.sink("shown", "main");
    let keys = ws.status_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let k = &keys[0];
    assert_eq!(k["provider"], "ng");
    assert_eq!(k["user"], "shown");
    assert_eq!(k["slot"], "main");
    assert_eq!(k["key_id"], doc["key_id"]);
    assert_eq!(k["state"], "current");
    assert_eq!(k["delivery"], "delivered", "{k}");
    assert_eq!(k["created_at"], doc["created_at"], "{k}");
    assert!(k["expires_at"].is_null(), "{k}");
    assert_eq!(k["next_rotation"], doc["rotate_after"], "{k}");
    let out = ws.keyward(&["status"]);
    expect_code(&out, 0, "status");
    let table = text(&out.stdout);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "PROVIDER", "USER", "SLOT", "KEY", "CREATED", "AGE", "EXPIRES", "NEXT", "ROTATION",
            "STATE", "DELIVERY"
        ]
    );
    let row = lines.next().expect("one row");
    assert!(row.starts_with("ng"), "{row}");
    assert!(row.contains("shown") && row.contains("main"), "{row}");
    assert!(row.contains("never") && row.contains("in 29d"), "{row}");
    assert!(row.trim_end().ends_with("current  delivered"), "{row}");
    assert!(lines.next().is_none(), "{table}");
}

// §9 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn a_403_names_the_provider_and_never_echoes_the_credential() {
    let sb = Sandbox::start(&[]);
    let admin = common::asa::Asa::new(&sb);
    let (status, _, body) = admin.call("POST", "/service_users", Some(json!({"name": "viewer"})));
    assert!(status < 300, "{body}");
    let (status, _, key) = admin.call("POST", "/service_users/viewer/keys", None);
    assert!(status < 300, "{key}");
    let secret = key["secret"].as_str().unwrap().to_string();
    let mut ws = common::asa::workspace(&sb);
    ws.env
        .retain(|(k, _)| k != "ASA_KEY_ID" && k != "ASA_KEY_SECRET");
    ws.env
        .push(("ASA_KEY_ID".into(), key["id"].as_str().unwrap().to_string()));
    ws.env.push(("ASA_KEY_SECRET".into(), secret.clone()));
    common::asa::write_config(
        &ws,
        "",
        "users:\n  - provider: asa\n    name: backup-bot\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 1, "plan as a service user without the admin role");
    let err = text(&out.stderr);
    assert!(err.contains("provider asa"), "{err}");
    assert!(err.contains("403"), "{err}");
    assert!(
        !err.contains(&secret) && !text(&out.stdout).contains(&secret),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

// §1 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn apply_asks_yes_on_a_terminal_and_only_yes_approves() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("", &one_user("asked", "      main: {}\n"));
    // `script` gives keyward a terminal; the answer comes on its stdin.
    let answer = |reply: &str| {
        let cmd = format!(
            "{} apply -c {}",
            env!("CARGO_BIN_EXE_keyward"),
            ws.config_path().display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .current_dir(ws.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        for (k, v) in &ws.env {
            c.env(k, v);
        }
        let mut child = c
            .spawn()
            .expect("script (util-linux) runs a command on a terminal");
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        // Answer once the question is on the screen (a generous wait: the answer is buffered
        // by the terminal anyway).
        std::thread::sleep(Duration::from_millis(500));
        let _ = stdin.write_all(format!("{reply}\n").as_bytes());
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stdout))
    };
    let (code, screen) = answer("no");
    assert_eq!(code, Some(1), "{screen}");
    assert!(screen.contains("Only 'yes' will be accepted"), "{screen}");
    assert!(screen.contains("nothing was changed"), "{screen}");
    assert!(
        sb.user_by_name("asked").is_none(),
        "a `no` changed something"
    );
    let (code, screen) = answer("yes");
    assert_eq!(code, Some(0), "{screen}");
    assert!(sb.user_by_name("asked").is_some(), "{screen}");
}

// §2 ──────────────────────────────────────────────────────────────────────────────────────────

#[test]
fn an_exec_sink_past_its_timeout_fails_and_the_new_key_is_revoked() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config_with_sinks(
        "",
        "  stuck:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"cat > /dev/null; sleep 30\"]\n    timeout: 1s\n",
        &one_user("waiter", "      main: {sink: stuck}\n"),
    );
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a sink that never finishes");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("did not finish within 1s"), "{all}");
    assert!(all.contains("was revoked"), "{all}");
    assert!(
        sb.key_ids_of("waiter").is_empty(),
        "the undelivered key was revoked"
    );
}

// §10.4 ───────────────────────────────────────────────────────────────────────────────────────

#[test]
fn spread_pushes_each_slots_next_rotation_into_the_window_in_status_and_plan() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let mut users = String::from("users:\n");
    for i in 0..10 {
        users.push_str(&format!(
            "  - provider: ng\n    name: fleet-{i:02}\n    keys:\n      main: {{rotate_every: 30d, spread: 24h}}\n"
        ));
    }
    ws.write_config("", &users);
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    let ts = |v: &Value| -> jiff::Timestamp { v.as_str().unwrap().parse().unwrap() };
    let mut offsets = std::collections::BTreeSet::new();
    for k in ws.status_keys() {
        let pushed = ts(&k["next_rotation"]).duration_since(ts(&k["created_at"]));
        let past = pushed - jiff::SignedDuration::from_hours(24 * 30);
        assert!(
            past >= jiff::SignedDuration::ZERO && past < jiff::SignedDuration::from_hours(24),
            "next rotation {past:?} past rotate_every, outside the 24h spread: {k}"
        );
        offsets.insert(past.as_secs());
    }
    assert!(
        offsets.len() >= 8,
        "keys created together come due spread over the window: {offsets:?}"
    );
    // The plan's upcoming list shows the same spread due times.
    let plan = ws.plan_json();
    let status: std::collections::BTreeMap<String, String> = ws
        .status_keys()
        .into_iter()
        .map(|k| {
            (
                k["user"].as_str().unwrap().to_string(),
                k["next_rotation"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for u in plan["upcoming"].as_array().unwrap() {
        let user = u["user"].as_str().unwrap();
        assert_eq!(ts(&u["at"]), ts(&Value::from(status[user].clone())), "{u}");
    }
}

#[test]
fn include_and_names_make_one_user_list_and_errors_name_the_file_that_has_them() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    std::fs::create_dir(ws.path("users.d")).unwrap();
    ws.write_config(
        "",
        "include: [\"users.d/*.yaml\"]\nusers:\n  - provider: ng\n    name: core\n    keys:\n      main: {}\n",
    );
    std::fs::write(
        ws.path("users.d/10-agents.yaml"),
        "users:\n  - provider: ng\n    names: [agent-1, agent-2, agent-3]\n    active: false\n    keys:\n      tunnel: {kind: credential, acl: [\"bind:*.example.com\"]}\n",
    )
    .unwrap();
    std::fs::write(
        ws.path("users.d/20-bots.yaml"),
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
    )
    .unwrap();
    // Not matched by the pattern: never read.
    std::fs::write(ws.path("users.d/notes.txt"), "not yaml: [").unwrap();
    expect_code(&ws.keyward(&["validate"]), 0, "validate with includes");
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    for name in ["core", "agent-1", "agent-2", "agent-3", "bot"] {
        let u = sb
            .user_by_name(name)
            .unwrap_or_else(|| panic!("{name} created"));
        assert_eq!(u["active"], !name.starts_with("agent"), "{u}");
    }
    let agent = ws.sink("agent-2", "tunnel");
    assert_eq!(agent["kind"], "credential");
    let creds = sb.list("/credentials", "credentials");
    assert_eq!(
        creds
            .iter()
            .filter(|c| c["acl"] == json!(["bind:*.example.com"]))
            .count(),
        3
    );
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "nothing left to do",
    );

    // Errors name the included file, with line and column.
    let bad = ws.path("users.d/30-bad.yaml");
    std::fs::write(
        &bad,
        "users:\n  - provider: ng\n    names: [ok-name, core]\n    keys:\n      main: {rotate_every: 3x}\n",
    )
    .unwrap();
    let out = ws.keyward(&["validate"]);
    expect_code(&out, 1, "validate with a broken included file");
    let err = text(&out.stderr);
    let shown = bad.display().to_string();
    assert!(
        err.contains(&format!("{shown}:3:22: user `core` is declared twice")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{shown}:5:28: rotate_every")),
        "{err}"
    );
    // An included file holds only users.
    std::fs::write(&bad, "settings:\n  interval: 1m\nusers: []\n").unwrap();
    let out = ws.keyward(&["validate"]);
    expect_code(&out, 1, "validate with settings in an included file");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{shown}:1:1: an included file holds only `users:`; `settings`"
        )),
        "{err}"
    );
    // name and names together, and neither.
    std::fs::write(
        &bad,
        "users:\n  - provider: ng\n    name: x\n    names: [y]\n  - provider: ng\n    keys: {}\n",
    )
    .unwrap();
    let err = text(&ws.keyward(&["validate"]).stderr);
    assert!(
        err.contains(&format!(
            "{shown}:3:11: a user entry has `name` or `names`, not both"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{shown}:5:5: a user entry needs `name`")),
        "{err}"
    );
}

#[test]
fn an_include_that_matches_nothing_prunes_nobody() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    std::fs::create_dir(ws.path("users.d")).unwrap();
    std::fs::write(
        ws.path("users.d/fleet.yaml"),
        "users:\n  - provider: ng\n    names: [edge-1, edge-2]\n    keys:\n      main: {}\n",
    )
    .unwrap();
    let config = |pattern: &str| {
        format!(
            "include: [\"{pattern}\"]\nusers:\n  - provider: ng\n    name: core\n    keys:\n      main: {{}}\nprune:\n  users: delete\n"
        )
    };
    ws.write_config("", &config("users.d/*.yaml"));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    // A typo in the pattern: the fleet's users are no longer declared, yet none is deleted.
    ws.write_config("", &config("userz.d/*.yaml"));
    let plan = ws.plan_json();
    assert!(
        common::changes(&plan)
            .iter()
            .all(|c| c["action"] != "delete_user"),
        "{plan}"
    );
    let kept: Vec<_> = common::warnings(&plan)
        .into_iter()
        .filter(|w| w["kind"] == "pruned_user_kept")
        .filter(|w| {
            w["message"]
                .as_str()
                .unwrap_or("")
                .contains("matches no file")
        })
        .collect();
    assert_eq!(kept.len(), 2, "{plan}");
    // A real deletion once the pattern matches a file again.
    ws.write_config("", &config("users.d/*.yaml"));
    std::fs::write(
        ws.path("users.d/fleet.yaml"),
        "users:\n  - provider: ng\n    names: [edge-1]\n    keys:\n      main: {}\n",
    )
    .unwrap();
    let plan = ws.plan_json();
    let deleted: Vec<_> = common::changes(&plan)
        .into_iter()
        .filter(|c| c["action"] == "delete_user")
        .map(|c| c["user"].clone())
        .collect();
    assert_eq!(deleted, vec![json!("edge-2")], "{plan}");
}
