//! One pipeline for every command: `keyward plan` shows the forced re-rotation that an
//! interrupted `keyward rotate` left (what `apply` will do, a saved plan does too), and a
//! signal during `keyward apply` lets the delivery in flight finish and exits with a report,
//! leaving nothing for recovery to revoke.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, Workspace, expect_code, text};
use serde_json::Value;

/// Waits for `check`, failing with `what` after a generous bound.
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let t = Instant::now();
    while !check() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(ws: &Workspace, args: &[&str]) -> std::process::Child {
    let mut cmd = ws.command(args);
    cmd.arg("-c")
        .arg(ws.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start keyward")
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

#[test]
fn plan_shows_the_forced_rotation_an_interrupted_rotate_left() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // A file sink, then a slow program: a kill between the two leaves a key the file holds
    // but whose delivery was never completed.
    let started = ws.path("hook-started");
    ws.write_config_with_sinks(
        "",
        &format!(
            "  slow:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"cat > /dev/null; touch {}; sleep 30\"]\n    timeout: 60s\n",
            started.display()
        ),
        "users:\n  - provider: ng\n    name: cut\n    keys:\n      main: {sink: [local, slow], overlap: 1h}\n",
    );
    // The first apply must get past the slow sink: let it finish once.
    std::fs::write(
        ws.config_path(),
        std::fs::read_to_string(ws.config_path())
            .unwrap()
            .replace("sleep 30", "true"),
    )
    .unwrap();
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let first = ws.sink("cut", "main")["key_id"].clone();
    std::fs::write(
        ws.config_path(),
        std::fs::read_to_string(ws.config_path())
            .unwrap()
            .replace("; true", "; sleep 30"),
    )
    .unwrap();
    let _ = std::fs::remove_file(&started);

    let mut rotate = spawn(&ws, &["rotate", "cut", "--auto-approve"]);
    wait_for("the slow sink started", || started.exists());
    // The file sink already holds the new key.
    let held = ws.sink("cut", "main")["key_id"].clone();
    assert_ne!(held, first);
    let _ = rotate.kill();
    let _ = rotate.wait();

    // `plan` (which writes nothing) shows what `apply` will do: rotate again (forced). The key
    // whose delivery was cut short is not revoked: the file sink holds it, and a consumer may
    // already have read it.
    let plan = ws.plan_json();
    let changes = plan["changes"].as_array().expect("changes");
    let rotate = changes
        .iter()
        .find(|c| c["action"] == "rotate_key")
        .unwrap_or_else(|| panic!("no forced re-rotation in the plan: {plan}"));
    assert_eq!(rotate["after"]["forced"], true, "{plan}");
    assert!(
        !changes
            .iter()
            .any(|c| c["action"] == "revoke_key" && c["key_id"] == held),
        "a key a sink holds is never revoked at once: {plan}"
    );
    let held_secret = ws.sink("cut", "main")["secret"]
        .as_str()
        .unwrap()
        .to_string();

    // A saved plan holds the same: applied, every sink ends with a working key.
    std::fs::write(
        ws.config_path(),
        std::fs::read_to_string(ws.config_path())
            .unwrap()
            .replace("; sleep 30", "; true"),
    )
    .unwrap();
    expect_code(
        &ws.keyward(&["plan", "--out", "plan.json"]),
        0,
        "plan --out",
    );
    expect_code(
        &ws.keyward(&["apply", "plan.json"]),
        0,
        "apply the saved plan",
    );
    let doc = ws.sink("cut", "main");
    assert_ne!(doc["key_id"], held);
    assert!(
        sb.secret_works("api_key", doc["secret"].as_str().unwrap()),
        "the file sink's key works"
    );
    // The key the file held before keeps working for the overlap: it retires, it is not
    // revoked.
    assert!(sb.secret_works("api_key", &held_secret));
    let status = ws.status_keys();
    assert!(
        status
            .iter()
            .any(|k| k["key_id"] == held && k["state"] == "retiring"),
        "{status:?}"
    );
}

/// SIGTERM once, or SIGINT twice (a second signal still lets the step in flight finish):
/// the delivery in flight completes and is recorded, the rest is reported not attempted.
fn signal_during_apply(signals: &[&str]) {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let started = ws.path("hook-started");
    ws.write_config_with_sinks(
        "  concurrency: 1\n",
        &format!(
            "  slow:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"cat > /dev/null; touch {}; sleep 2\"]\n    timeout: 60s\n",
            started.display()
        ),
        "users:\n  - provider: ng\n    name: first\n    keys:\n      main: {sink: [local, slow]}\n  - provider: ng\n    name: second\n    keys:\n      main: {sink: [local, slow]}\n  - provider: ng\n    name: third\n    keys:\n      main: {sink: [local, slow]}\n",
    );
    let apply = spawn(&ws, &["apply", "--auto-approve"]);
    wait_for("a delivery is in flight", || started.exists());
    for sig in signals {
        signal(&apply, sig);
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = apply.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("Apply failed:"), "{stdout}");
    assert!(
        stdout.contains("not attempted") && stdout.contains("shutting down"),
        "{stdout}"
    );
    // The key whose delivery was in flight was delivered and recorded.
    let delivered: Vec<Value> = ["first", "second", "third"]
        .iter()
        .filter(|u| ws.path(&format!("secrets/ng/{u}/main.json")).exists())
        .map(|u| ws.sink(u, "main"))
        .collect();
    assert!(!delivered.is_empty(), "{stdout}");
    for doc in &delivered {
        assert!(sb.secret_works("api_key", doc["secret"].as_str().unwrap()));
    }
    let keys = ws.status_keys();
    for doc in &delivered {
        assert!(
            keys.iter()
                .any(|k| k["key_id"] == doc["key_id"] && k["state"] == "current"),
            "{keys:?}"
        );
    }
    // Nothing left for recovery: no unfinished journal entry, nothing to revoke.
    let plan = ws.plan_json();
    let changes = plan["changes"].as_array().expect("changes");
    assert!(
        !changes.iter().any(|c| c["action"] == "revoke_key"),
        "{plan}"
    );
    let journal = std::fs::read_to_string(ws.path("state/journal.jsonl")).unwrap_or_default();
    assert!(journal.trim().is_empty(), "unfinished journal: {journal}");
    // And the next run finishes the job.
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "the next apply",
    );
}

#[test]
fn sigterm_during_apply_finishes_the_delivery_in_flight_and_reports() {
    signal_during_apply(&["TERM"]);
}

#[test]
fn a_second_sigint_during_apply_still_lets_the_delivery_finish() {
    signal_during_apply(&["INT", "INT"]);
}

#[test]
fn a_saved_plan_is_stale_once_a_key_it_read_is_removed() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: holder\n    keys:\n      main: {}\nprune:\n  unknown_keys: report\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let holder = sb.user_by_name("holder").unwrap();
    let (status, extra) = sb.api(
        "POST",
        "/api_keys",
        Some(serde_json::json!({"owner_id": holder["id"]})),
    );
    assert!(status < 300, "{extra}");
    expect_code(
        &ws.keyward(&["plan", "--out", "plan.json"]),
        0,
        "plan --out",
    );
    // The hand-made key goes away before the plan is applied.
    let (status, body) = sb.api(
        "DELETE",
        &format!("/api_keys/{}", extra["id"].as_str().unwrap()),
        None,
    );
    assert!(status < 300, "{body}");
    let out = ws.keyward(&["apply", "plan.json"]);
    expect_code(&out, 1, "apply a plan whose observation changed");
    assert!(
        text(&out.stderr).contains("plan is stale"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: painted\n    keys:\n      main: {}\n",
    );
    // `script` gives the command a terminal.
    let run = |extra: &str, env_no_color: bool| {
        let cmd = format!(
            "{} plan -c {} {extra}",
            env!("CARGO_BIN_EXE_keyward"),
            ws.config_path().display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .env_remove("NO_COLOR")
            .current_dir(ws.dir.path());
        for (k, v) in &ws.env {
            c.env(k, v);
        }
        if env_no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c
            .output()
            .expect("script (util-linux) runs a command on a terminal");
        text(&out.stdout)
    };
    assert!(run("", false).contains('\u{1b}'), "a terminal gets colour");
    assert!(!run("--no-color", false).contains("\u{1b}["), "--no-color");
    assert!(!run("", true).contains("\u{1b}["), "NO_COLOR");
    // And a pipe never does.
    let out = ws.keyward(&["plan"]);
    assert!(!text(&out.stdout).contains('\u{1b}'));
}

#[test]
fn apply_shows_progress_on_a_terminal_and_never_on_a_pipe() {
    let sb = Sandbox::start(&["--latency", "50ms"]);
    let ws = Workspace::new(&sb);
    let mut users = String::from("users:\n");
    for i in 0..12 {
        users.push_str(&format!(
            "  - provider: ng\n    name: shown-{i:02}\n    keys:\n      main: {{}}\n"
        ));
    }
    ws.write_config("  concurrency: 2\n", &users);
    // On a terminal (`script`), the bar counts the changes and says what the budget leaves.
    let cmd = format!(
        "{} apply --auto-approve -c {}",
        env!("CARGO_BIN_EXE_keyward"),
        ws.config_path().display()
    );
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"])
        .current_dir(ws.dir.path());
    for (k, v) in &ws.env {
        c.env(k, v);
    }
    let out = c
        .output()
        .expect("script (util-linux) runs a command on a terminal");
    let screen = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    assert!(
        screen.contains("/24 changes") && screen.contains("left at the rate budget"),
        "progress on a terminal:\n{screen}"
    );
    assert!(screen.contains("Apply complete"), "{screen}");
    // On a pipe, nothing of it.
    ws.write_config("  concurrency: 2\n", &users.replace("shown-", "piped-"));
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 0, "apply on a pipe");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !all.contains("changes ·") && !all.contains("rate budget"),
        "no progress on a pipe:\n{all}"
    );
}

#[test]
fn a_key_an_exec_sink_received_is_kept_when_a_later_sink_fails() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // The exec sink hands the document to its consumer (a file it writes); the file sink after
    // it lives in a directory that can be made unusable.
    let handed = ws.path("handed.json");
    ws.write_config_with_sinks(
        "",
        &format!(
            "  hand:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"cat > {}\"]\n  later:\n    type: file\n    path: later/{{user}}.json\n    format: json\n",
            handed.display()
        ),
        "users:\n  - provider: ng\n    name: two-sinks\n    keys:\n      main: {sink: [hand, later], overlap: 1h}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let first: Value = serde_json::from_slice(&std::fs::read(&handed).unwrap()).unwrap();
    // The file sink's target becomes a directory: writing there fails, after the exec sink
    // ran.
    let target = ws.path("later/two-sinks.json");
    std::fs::remove_file(&target).unwrap();
    std::fs::create_dir(&target).unwrap();
    let out = ws.keyward(&["rotate", "two-sinks", "--auto-approve"]);
    expect_code(&out, 1, "rotate with the second sink failing");
    let err = text(&out.stderr);
    assert!(err.contains("kept (not revoked)"), "{err}");
    // The exec sink's consumer holds the new key: it must work, and so must the old one.
    let handed_now: Value = serde_json::from_slice(&std::fs::read(&handed).unwrap()).unwrap();
    assert_ne!(handed_now["key_id"], first["key_id"]);
    for doc in [&handed_now, &first] {
        assert!(
            sb.secret_works("api_key", doc["secret"].as_str().unwrap()),
            "{} was revoked while a consumer holds it",
            doc["key_id"]
        );
    }
    let status = ws.status_keys();
    assert!(
        status
            .iter()
            .any(|k| k["key_id"] == handed_now["key_id"] && k["state"] == "pending"),
        "status shows the kept key as pending: {status:?}"
    );
    // Once the sink is usable again, the next run gives every sink one new key; the key the
    // exec sink got retires for the overlap instead of being revoked.
    std::fs::remove_dir(&target).unwrap();
    let plan = ws.plan_json();
    assert!(
        plan["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"] == "rotate_key"),
        "{plan}"
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "the next run");
    let last: Value = serde_json::from_slice(&std::fs::read(&handed).unwrap()).unwrap();
    assert_ne!(last["key_id"], handed_now["key_id"]);
    assert!(sb.secret_works("api_key", handed_now["secret"].as_str().unwrap()));
    let status = ws.status_keys();
    assert!(
        status
            .iter()
            .any(|k| k["key_id"] == handed_now["key_id"] && k["state"] == "retiring"),
        "{status:?}"
    );
}

#[test]
fn an_exec_sink_program_and_what_it_forked_die_with_a_killed_keyward() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let started = ws.path("hook-started");
    let late = ws.path("late.json");
    let forked = ws.path("forked-late");
    // The program forks a child of its own that delivers later, and waits for it: killing the
    // program alone would leave the child running.
    let script = ws.path("push.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat > {late}.tmp\n(sleep 3; touch {forked}) &\ntouch {started}\nsleep 3\nmv {late}.tmp {late}\nwait\n",
            late = late.display(),
            forked = forked.display(),
            started = started.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    ws.write_config_with_sinks(
        "",
        &format!(
            "  slow:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"{}; exit $?\"]\n    timeout: 60s\n",
            script.display()
        ),
        "users:\n  - provider: ng\n    name: orphaned-hook\n    keys:\n      main: {sink: slow}\n",
    );
    let mut apply = spawn(&ws, &["apply", "--auto-approve"]);
    wait_for("the sink program started", || started.exists());
    let _ = apply.kill();
    let _ = apply.wait();
    // Had they lived on, they would hand over a key the next run revokes as never delivered.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !late.exists(),
        "the sink program outlived keyward and delivered after it died"
    );
    assert!(
        !forked.exists(),
        "a process the sink program forked outlived keyward"
    );
}

#[test]
fn a_sink_program_that_cannot_start_fails_at_once_and_its_key_is_revoked() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config_with_sinks(
        "",
        "  missing:\n    type: exec\n    command: [\"/nonexistent/push-secret\"]\n",
        "users:\n  - provider: ng\n    name: no-hook\n    keys:\n      main: {sink: missing}\n",
    );
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a sink program that does not exist");
    let err = text(&out.stderr);
    assert!(
        err.contains("starting /nonexistent/push-secret") && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("retrying"), "no retry can start it: {err}");
    // Never delivered: the key is gone again.
    assert!(sb.key_ids_of("no-hook").is_empty(), "{err}");
}
