//! Hostile input and a hostile environment, through the real binary: a sink program that prints
//! its environment, a provider host that redirects, a proxy, a state directory others can
//! write, symlinks planted in it, a corrupt journal, a FIFO for a config, values that validate
//! but cannot work, names that forge lines, an edited saved plan. Each test fails on a build
//! without the matching defence.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Sandbox, Workspace, expect_code, text};
use serde_json::{Value, json};

/// A loopback HTTP server that records every request it gets (head and body) and answers each
/// with `response`. Runs until the test process ends.
fn recording_server(response: String) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            log.lock()
                .unwrap()
                .push(format!("{head}{}", String::from_utf8_lossy(&body)));
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (url, seen)
}

/// A sandbox and a workspace whose config declares the user `bot` with one slot.
fn with_bot() -> (Sandbox, Workspace) {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
    );
    (sb, ws)
}

/// Makes the workspace's state directory with `mode`.
fn state_dir(ws: &Workspace, mode: u32) -> std::path::PathBuf {
    let state = ws.path("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
    state
}

fn write(ws: &Workspace, name: &str, text: &str) -> std::path::PathBuf {
    let p = ws.path(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs keyward with `args` and a 60 s bound; a hang is a failure, not a stuck suite.
fn keyward_bounded(ws: &Workspace, args: &[&str]) -> std::process::Output {
    let mut child = ws
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("keyward {args:?} did not finish within 60 s (it hangs)");
}

#[test]
fn exec_sink_sees_no_credential_and_its_output_is_masked() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // A sink program that writes its environment to a file, then echoes its environment and
    // its stdin (the new secret) and fails.
    let dump = ws.path("sink-env");
    ws.write_config_with_sinks(
        "",
        &format!(
            "  leaky:\n    type: exec\n    command: [\"/bin/sh\", \"-c\", \"env > {}; env; cat; exit 1\"]\n    timeout: 10s\n",
            dump.display()
        ),
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {sink: [local, leaky]}\n",
    );
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a failing exec sink");
    let env = std::fs::read_to_string(&dump).expect("the sink program ran");
    assert!(
        !env.contains(&sb.admin_key),
        "the sink program saw NGROK_API_KEY"
    );
    assert!(!env.contains("NGROK_API_KEY"), "{env}");
    assert!(!env.contains("KEYWARD_SANDBOX_URL"), "{env}");
    assert!(env.contains("PATH="), "{env}");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("exec sink"), "{all}");
    assert!(
        !all.contains(&sb.admin_key),
        "the credential was quoted: {all}"
    );
    // The new key was revoked, and its secret (echoed by the program) was masked.
    assert!(all.contains("[REDACTED]"), "{all}");
    for (path, content) in ws.non_sink_files() {
        if path == dump {
            continue;
        }
        assert!(
            !content.contains(&sb.admin_key),
            "{} holds the credential",
            path.display()
        );
    }
}

#[test]
fn a_redirecting_provider_never_gets_the_key_secret_elsewhere() {
    let (elsewhere, seen_elsewhere) = recording_server(
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".into(),
    );
    let (asa, seen_asa) = recording_server(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {elsewhere}/v1/teams/acme/service_token\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    ));
    let sb = Sandbox::start(&[]);
    let mut ws = Workspace::new(&sb);
    ws.env
        .push(("ASA_SECRET".into(), "asa-key-secret-value".into()));
    write(
        &ws,
        "keyward.yaml",
        &format!(
            "version: 1\nsettings: {{state_dir: state}}\nproviders:\n  asa:\n    type: okta-asa\n    team: acme\n    key_id: kid\n    key_secret: ${{ASA_SECRET}}\n    base_url: {asa}\nsinks:\n  local: {{type: file, path: \"secrets/{{user}}.json\"}}\nusers:\n  - provider: asa\n    name: bot\n    keys:\n      main: {{sink: local}}\n"
        ),
    );
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 1, "plan against a redirecting host");
    let err = text(&out.stderr);
    assert!(err.contains("redirect"), "{err}");
    assert!(err.contains("asa"), "{err}");
    assert!(!err.contains("asa-key-secret-value"), "{err}");
    assert!(
        !seen_asa.lock().unwrap().is_empty(),
        "the provider was asked"
    );
    assert!(
        seen_elsewhere.lock().unwrap().is_empty(),
        "the request followed the redirect: {:?}",
        seen_elsewhere.lock().unwrap()
    );
}

#[test]
fn a_loopback_provider_is_never_reached_through_a_proxy() {
    let (proxy, seen) = recording_server(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(),
    );
    let sb = Sandbox::start(&[]);
    let mut ws = Workspace::new(&sb);
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"] {
        ws.env.push((var.into(), proxy.clone()));
    }
    ws.env.push(("NO_PROXY".into(), String::new()));
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 0, "plan with a proxy set");
    let got = seen.lock().unwrap();
    assert!(got.is_empty(), "requests went through the proxy: {got:?}");
}

#[test]
fn a_state_directory_others_can_write_is_refused() {
    let (sb, ws) = with_bot();
    state_dir(&ws, 0o777);
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a world-writable state directory");
    let err = text(&out.stderr);
    assert!(err.contains("refusing the state directory"), "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    assert!(sb.user_by_name("bot").is_none(), "nothing may be changed");
}

#[test]
fn links_planted_in_the_state_directory_are_never_followed() {
    let (_sb, ws) = with_bot();
    let state = state_dir(&ws, 0o700);
    let victim_lock = write(&ws, "victim-lock", "precious lock target\n");
    let victim_journal = write(&ws, "victim-journal", "precious journal target\n");
    std::os::unix::fs::symlink(&victim_lock, state.join("lock")).unwrap();
    std::os::unix::fs::symlink(&victim_journal, state.join("journal.jsonl")).unwrap();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with planted links");
    assert_eq!(
        std::fs::read_to_string(&victim_lock).unwrap(),
        "precious lock target\n"
    );
    assert_eq!(
        std::fs::read_to_string(&victim_journal).unwrap(),
        "precious journal target\n"
    );
    assert!(text(&out.stderr).contains("lock"), "{}", text(&out.stderr));
}

#[test]
fn a_sink_directory_others_can_write_is_refused_before_a_key_is_minted() {
    let (sb, ws) = with_bot();
    let dir = ws.path("secrets/ng/bot");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    sb.reset_stats();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply into a world-writable sink directory");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("sink directory"), "{all}");
    assert!(all.contains("no key was created"), "{all}");
    assert!(
        !all.contains("retrying"),
        "a permanent failure was retried: {all}"
    );
    let user = sb.user_by_name("bot").expect("the user itself was created");
    assert!(sb.key_ids_of("bot").is_empty(), "a key was minted: {user}");
}

#[test]
fn a_corrupt_journal_line_stops_apply_and_names_file_and_line() {
    let (sb, ws) = with_bot();
    let state = state_dir(&ws, 0o700);
    let done = |seq: u32| {
        format!("{{\"seq\":{seq},\"at\":\"2026-01-01T00:00:00Z\",\"event\":\"done\"}}\n")
    };
    let journal = state.join("journal.jsonl");
    std::fs::write(&journal, format!("{}garbage\n{}", done(1), done(2))).unwrap();
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 1, "apply with a corrupt journal");
    let err = text(&out.stderr);
    assert!(err.contains("journal.jsonl"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(sb.user_by_name("bot").is_none(), "nothing may be applied");
    // A torn last line alone is what a crash leaves: the run goes on.
    std::fs::write(&journal, format!("{}{{\"seq\":2,\"at\"", done(1))).unwrap();
    let out = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&out, 0, "apply with a torn last journal line");
}

#[test]
fn special_files_as_inputs_are_clear_errors_not_hangs() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let fifo = ws.path("fifo.yaml");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let fifo_arg = fifo.display().to_string();
    let out = keyward_bounded(&ws, &["validate", "-c", &fifo_arg]);
    expect_code(&out, 1, "validate a FIFO");
    assert!(text(&out.stderr).contains("FIFO"), "{}", text(&out.stderr));

    let cfg = write(
        &ws,
        "zero.yaml",
        "version: 1\nproviders:\n  ng:\n    type: ngrok\n    api_key_file: /dev/zero\n",
    );
    let cfg_arg = cfg.display().to_string();
    let out = keyward_bounded(&ws, &["validate", "-c", &cfg_arg]);
    expect_code(&out, 1, "validate with /dev/zero as a secret file");
    let err = text(&out.stderr);
    assert!(err.contains("zero.yaml:5:19"), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn values_that_could_never_work_fail_validation_at_their_position() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let cases: &[(&str, &str, &str)] = &[
        ("settings:\n  interval: 2940000d\n", "3:13", "too long"),
        (
            "defaults:\n  rotate_every: 99999999d\n  sink: s\n",
            "3:17",
            "too long",
        ),
        (
            "settings:\n  concurrency: 4611686018427387904\n",
            "3:16",
            "concurrency",
        ),
        ("settings:\n  metrics: 127.0.0.1:0\n", "3:12", "port 0"),
        (
            "defaults:\n  schedule: \"0 0 30 2 *\"\n  sink: s\n",
            "3:13",
            "never fires",
        ),
    ];
    for (i, (yaml, at, what)) in cases.iter().enumerate() {
        let name = format!("case{i}.yaml");
        let cfg = write(
            &ws,
            &name,
            &format!("version: 1\n{yaml}sinks:\n  s: {{type: file, path: \"x/{{user}}\"}}\n"),
        );
        let arg = cfg.display().to_string();
        let out = keyward_bounded(&ws, &["validate", "-c", &arg]);
        expect_code(&out, 1, yaml);
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{name}:{at}:")), "{yaml}: {err}");
        assert!(err.contains(what), "{yaml}: {err}");
    }
    // A rate budget of less than one request a minute would hang every run.
    let cfg = write(
        &ws,
        "rate.yaml",
        "version: 1\nproviders:\n  ng:\n    type: ngrok\n    api_key: ${NGROK_API_KEY}\n    rate_limit: 1/3650d\n",
    );
    let arg = cfg.display().to_string();
    let out = keyward_bounded(&ws, &["validate", "-c", &arg]);
    expect_code(&out, 1, "rate_limit 1/3650d");
    assert!(
        text(&out.stderr).contains("rate.yaml:6:17:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn names_a_sink_path_cannot_hold_fail_validation_at_the_name() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: team/bot\n    keys:\n      main: {}\n  - provider: ng\n    name: ok\n    keys:\n      \"..\": {}\n",
    );
    let out = ws.keyward(&["validate"]);
    expect_code(&out, 1, "validate names with / and ..");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("cannot stand in"))
        .collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("keyward.yaml:19:11:"), "{err}");
    assert!(lines[0].contains("{user}"), "{err}");
    assert!(lines[1].contains("keyward.yaml:25:7:"), "{err}");
    assert!(lines[1].contains("{slot}"), "{err}");
}

#[test]
fn names_from_the_provider_cannot_forge_plan_lines() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let evil = "evil\n    + create key forged\u{1b}[31m";
    let (status, body) = sb.api("POST", "/service_users", Some(json!({"name": evil})));
    assert!(status < 300, "{status} {body}");
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 0, "plan");
    let plan = text(&out.stdout);
    assert!(!plan.contains('\u{1b}'), "{plan}");
    assert!(
        !plan
            .lines()
            .any(|l| l.trim_start().starts_with("+ create key forged")),
        "a forged line: {plan}"
    );
    assert!(plan.contains("evil\\n"), "{plan}");
    // Status and the JSON plan stay parseable, the name intact in JSON.
    let doc: Value = ws.plan_json();
    let names: Vec<&str> = doc["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(|w| w["user"].as_str())
        .collect();
    assert!(names.contains(&evil), "{names:?}");
}

#[test]
fn an_edited_saved_plan_is_refused_and_changes_nothing() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let (status, body) = sb.api("POST", "/service_users", Some(json!({"name": "bystander"})));
    assert!(status < 300, "{status} {body}");
    ws.write_config(
        "",
        "users:\n  - provider: ng\n    name: bot\n    keys:\n      main: {}\n",
    );
    let out = ws.keyward(&["plan", "--out", "plan.json"]);
    expect_code(&out, 0, "plan --out");
    let mut saved: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("plan.json")).unwrap()).unwrap();
    let changes = saved["changes"].as_array_mut().expect("changes");
    assert_eq!(changes.len(), 2, "create user and key: {changes:?}");
    changes.push(json!({
        "action": "delete_user", "provider": "ng", "user": "bystander", "slot": null,
        "key_id": null, "reason": "cleanup", "before": null, "after": null
    }));
    saved["summary"]["delete"] = json!(0);
    std::fs::write(ws.path("plan.json"), saved.to_string()).unwrap();
    let out = ws.keyward(&["apply", "plan.json"]);
    expect_code(&out, 1, "apply an edited plan");
    let err = text(&out.stderr);
    assert!(err.contains("refusing the saved plan"), "{err}");
    assert!(err.contains("delete service user"), "{err}");
    assert!(
        sb.user_by_name("bystander").is_some(),
        "the bystander was deleted"
    );
    assert!(sb.user_by_name("bot").is_none(), "nothing may be changed");

    // The file's own words are not printed: the summary is counted from what runs.
    let mut saved: Value =
        serde_json::from_str(&text(&ws.keyward(&["plan", "--json"]).stdout)).unwrap();
    saved["summary"]["create"] = json!(99);
    std::fs::write(ws.path("plan.json"), saved.to_string()).unwrap();
    let out = ws.keyward(&["apply", "plan.json"]);
    expect_code(&out, 0, "apply the genuine plan");
    let shown = text(&out.stdout);
    assert!(shown.contains("Plan: 2 to create"), "{shown}");
    assert!(!shown.contains("99"), "{shown}");
    assert!(sb.user_by_name("bot").is_some());
}
