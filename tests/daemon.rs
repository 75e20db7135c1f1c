//! The daemon, run for real against the sandbox: it converges at start; edits of the config
//! (in place, and by rename as editors save) are applied within seconds; an invalid edit is
//! reported with FILE:LINE:COL and the previous config keeps working; a 5s `rotate_every`
//! rotates on time and the old key is revoked after its overlap with no other trigger; SIGHUP
//! reloads and reconciles; SIGTERM during an apply exits 0 with nothing lost; `/metrics` shows
//! each key's creation, expiry and next rotation. Waits poll real state; nothing asserts a
//! duration.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, Workspace, expect_code};
use serde_json::json;

/// A running `keyward daemon`, its stderr going to a file the test can read.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ws: &Workspace) -> Daemon {
        Self::start_with(ws, &[("NOTIFY_SOCKET", None), ("WATCHDOG_USEC", None)])
    }

    /// Starts it with extra environment (`None` removes a variable).
    fn start_with(ws: &Workspace, extra: &[(&str, Option<&str>)]) -> Daemon {
        Self::start_at(ws, &ws.config_path(), extra)
    }

    /// Starts it on the config file `config` (its log stays in the workspace).
    fn start_at(ws: &Workspace, config: &Path, extra: &[(&str, Option<&str>)]) -> Daemon {
        let log = ws.path("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(["daemon", "-c"])
            .arg(config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .current_dir(ws.dir.path());
        for (k, v) in &ws.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for exit; `None` if it is still running after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds, failing with `what` and the daemon's log after `limit`.
fn eventually(d: &Daemon, limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}\n--- daemon log\n{}", d.log());
}

fn users(names: &[&str]) -> String {
    let mut y = String::from("users:\n");
    for n in names {
        y.push_str(&format!(
            "  - provider: ng\n    name: {n}\n    keys:\n      main: {{}}\n"
        ));
    }
    y
}

const QUIET: &str = "  interval: 10m\n";

#[test]
fn converges_at_start_and_applies_edits_in_place_and_by_rename() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["first"]));
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "converged at start", || {
        ws.path("secrets/ng/first/main.json").exists()
    });
    let secret = ws.sink("first", "main")["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(sb.secret_works("api_key", &secret));

    // In place.
    ws.write_config(QUIET, &users(&["first", "second"]));
    eventually(&d, Duration::from_secs(10), "in-place edit applied", || {
        sb.user_by_name("second").is_some() && ws.path("secrets/ng/second/main.json").exists()
    });
    // By rename, twice (a watch on the file itself would be lost after the first).
    for (i, set) in [
        ["first", "second", "third"].as_slice(),
        ["first", "second", "third", "fourth"].as_slice(),
    ]
    .into_iter()
    .enumerate()
    {
        let tmp = ws.path(".keyward.yaml.tmp");
        std::fs::copy(ws.config_path(), &tmp).unwrap();
        let text = std::fs::read_to_string(&tmp).unwrap();
        let users_at = text.find("users:").unwrap();
        std::fs::write(&tmp, format!("{}{}", &text[..users_at], users(set))).unwrap();
        std::fs::rename(&tmp, ws.config_path()).unwrap();
        let last = set[set.len() - 1];
        eventually(
            &d,
            Duration::from_secs(10),
            &format!("rename edit {i} applied"),
            || sb.user_by_name(last).is_some(),
        );
    }
    assert!(d.log().contains("config reloaded"), "{}", d.log());
}

#[test]
fn invalid_edit_is_reported_and_the_last_good_config_keeps_working() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let port = common::free_port();
    ws.write_config(
        &format!("  interval: 10m\n  metrics: 127.0.0.1:{port}\n"),
        &users(&["keep"]),
    );
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "converged", || {
        sb.user_by_name("keep").is_some()
    });
    let metrics = || {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
            .and_then(|r| r.text())
            .unwrap_or_default()
    };
    eventually(&d, Duration::from_secs(5), "metrics up", || {
        metrics().contains("keyward_config_valid 1")
    });

    let good = std::fs::read_to_string(ws.config_path()).unwrap();
    std::fs::write(ws.config_path(), format!("{good}bogus_field: 1\n")).unwrap();
    let line = good.lines().count() + 1;
    let expected = format!(
        "{}:{line}:1: unknown field `bogus_field`",
        ws.config_path().display()
    );
    eventually(&d, Duration::from_secs(10), "invalid edit reported", || {
        d.log().contains(&expected)
    });
    eventually(
        &d,
        Duration::from_secs(5),
        "config_valid drops to 0",
        || metrics().contains("keyward_config_valid 0"),
    );

    // The last good config is still in force: drift is still repaired (via SIGHUP here, which
    // reloads — still invalid — and reconciles with the last good config).
    let keep = sb.user_by_name("keep").unwrap();
    sb.api(
        "PATCH",
        &format!("/service_users/{}", keep["id"].as_str().unwrap()),
        Some(json!({"active": false})),
    );
    d.signal("HUP");
    eventually(
        &d,
        Duration::from_secs(10),
        "drift repaired under the last good config",
        || sb.user_by_name("keep").unwrap()["active"] == true,
    );

    // A valid edit is taken again.
    std::fs::write(
        ws.config_path(),
        good.replace("users:\n", "users:\n  - provider: ng\n    name: after\n"),
    )
    .unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "valid edit after an invalid one",
        || sb.user_by_name("after").is_some(),
    );
    eventually(&d, Duration::from_secs(5), "config_valid back to 1", || {
        metrics().contains("keyward_config_valid 1")
    });
}

#[test]
fn rotates_on_time_and_revokes_after_overlap_without_other_triggers() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, "users:\n  - provider: ng\n    name: fast\n    keys:\n      k: {rotate_every: 5s, overlap: 2s}\n");
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "first key", || {
        ws.path("secrets/ng/fast/k.json").exists()
    });
    let first = ws.sink("fast", "k");
    let first_id = first["key_id"].as_str().unwrap().to_string();
    let first_secret = first["secret"].as_str().unwrap().to_string();
    eventually(&d, Duration::from_secs(15), "rotated by age", || {
        ws.sink("fast", "k")["key_id"] != first_id.as_str()
    });
    let second = ws.sink("fast", "k");
    assert!(sb.secret_works("api_key", second["secret"].as_str().unwrap()));
    eventually(
        &d,
        Duration::from_secs(10),
        "old key revoked after the overlap",
        || !sb.secret_works("api_key", &first_secret),
    );
    let keys = sb.list("/api_keys", "keys");
    assert!(
        !keys.iter().any(|k| k["id"] == first_id.as_str()),
        "old key still listed"
    );
    // The interval is 10m: only due times woke it.
    assert!(d.log().contains("rotate key k: done"), "{}", d.log());
}

#[test]
fn sigterm_during_an_apply_exits_0_and_loses_nothing() {
    let sb = Sandbox::start(&["--latency", "150ms"]);
    let ws = Workspace::new(&sb);
    let names: Vec<String> = (0..12).map(|i| format!("slow-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ws.write_config("  interval: 10m\n  concurrency: 4\n", &users(&refs));
    let mut d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(20), "apply under way", || {
        d.log().contains(": done")
    });
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("daemon exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(d.log().contains("SIGTERM"), "{}", d.log());
    // Whatever was minted was delivered and recorded: the next run finishes the rest, and every
    // sink then holds the recorded, working key.
    let after = ws.keyward(&["apply", "--auto-approve"]);
    expect_code(&after, 0, "apply after SIGTERM");
    // The signal landed mid-apply: the daemon left work undone rather than run on.
    assert!(
        common::text(&after.stdout).contains("Apply complete:")
            && !common::text(&after.stdout).contains("Apply complete: 0 created"),
        "SIGTERM did not interrupt anything:\n{}\n{}",
        common::text(&after.stdout),
        d.log()
    );
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "converged",
    );
    let state: serde_json::Value = serde_json::from_str(&ws.state_text()).unwrap();
    for n in &names {
        let doc = ws.sink(n, "main");
        assert_eq!(
            doc["key_id"], state["accounts"]["ng"]["users"][n]["slots"]["main"]["current"]["id"],
            "{n}"
        );
        assert!(
            sb.secret_works("api_key", doc["secret"].as_str().unwrap()),
            "{n}"
        );
        let uid = sb.user_by_name(n).unwrap()["id"].clone();
        let keys = sb
            .list("/api_keys", "keys")
            .into_iter()
            .filter(|k| k["owner_id"] == uid)
            .count();
        assert_eq!(keys, 1, "{n}: exactly the recorded key, no orphan");
    }
}

#[test]
fn metrics_show_each_keys_expiry_and_next_rotation() {
    let sb = Sandbox::start(&[]);
    let ws = common::asa::workspace(&sb);
    let port = common::free_port();
    common::asa::write_config(
        &ws,
        &format!("  interval: 10m\n  metrics: 127.0.0.1:{port}\n"),
        "users:\n  - provider: asa\n    name: robot\n    keys:\n      main: {rotate_every: 30d, overlap: 1h}\n  - provider: ng\n    name: tunnel\n    keys:\n      k: {rotate_every: 7d}\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "apply");
    // A rotation puts the old ASA key on the provider's 2-day expiry.
    expect_code(
        &ws.keyward(&["rotate", "robot", "--auto-approve"]),
        0,
        "rotate",
    );
    let d = Daemon::start(&ws);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    eventually(
        &d,
        Duration::from_secs(10),
        "metrics served after the first run",
        || {
            text = reqwest::blocking::get(&url)
                .and_then(|r| r.text())
                .unwrap_or_default();
            text.contains("keyward_reconcile_total")
        },
    );
    let current = common::asa::sink(&ws, "robot", "main")["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ng_key = ws.sink("tunnel", "k")["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    for (metric, key) in [
        ("keyward_key_created_timestamp_seconds", &current),
        ("keyward_key_next_rotation_timestamp_seconds", &current),
        ("keyward_key_next_rotation_timestamp_seconds", &ng_key),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(metric) && l.contains(&format!("key_id=\"{key}\""))),
            "{metric} for {key} missing:\n{text}"
        );
    }
    let expiry: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keyward_key_expiry_timestamp_seconds{"))
        .collect();
    assert_eq!(
        expiry.len(),
        1,
        "only the retiring ASA key expires:\n{text}"
    );
    assert!(expiry[0].contains("user=\"robot\"") && !expiry[0].contains(&current));
    let value: f64 = expiry[0].rsplit(' ').next().unwrap().parse().unwrap();
    let now = jiff::Timestamp::now().as_second() as f64;
    assert!(
        value > now + 86_400.0 && value < now + 3.0 * 86_400.0,
        "about two days ahead: {value}"
    );
    assert!(text.contains("keyward_config_valid 1"));
    assert!(text.contains("keyward_provider_requests_total{provider=\"asa\"}"));
    assert!(text.contains("keyward_last_success_timestamp_seconds"));
    // The aggregates: keys by state, the earliest expiry, the time until rotation.
    assert!(
        text.contains("keyward_keys{provider=\"asa\",state=\"retiring\"} 1")
            && text.contains("keyward_keys{provider=\"asa\",state=\"current\"} 1")
            && text.contains("keyward_keys{provider=\"ng\",state=\"current\"} 1"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l
            .starts_with("keyward_earliest_expiry_timestamp_seconds{provider=\"asa\"}")
            && l.ends_with(expiry[0].rsplit(' ').next().unwrap())),
        "{text}"
    );
    assert!(
        text.contains("keyward_key_seconds_until_rotation_count{provider=\"ng\"} 1"),
        "{text}"
    );
}

#[test]
fn metrics_per_key_false_keeps_only_the_aggregates() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let port = common::free_port();
    ws.write_config(
        &format!("  interval: 10m\n  metrics: 127.0.0.1:{port}\n  metrics_per_key: false\n"),
        &users(&["a", "b", "c"]).replace("main: {}", "main: {rotate_every: 30d}"),
    );
    let d = Daemon::start(&ws);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    eventually(&d, Duration::from_secs(10), "three keys counted", || {
        text = reqwest::blocking::get(&url)
            .and_then(|r| r.text())
            .unwrap_or_default();
        text.contains("keyward_keys{provider=\"ng\",state=\"current\"} 3")
    });
    assert!(
        !text.contains("keyward_key_created_timestamp_seconds{")
            && !text.contains("keyward_key_next_rotation_timestamp_seconds{"),
        "no per-key series:\n{text}"
    );
    assert!(
        text.contains("keyward_key_seconds_until_rotation_count{provider=\"ng\"} 3"),
        "{text}"
    );
    // All three come due in about 30 days: in the 90-day bucket, not in the 7-day one.
    assert!(
        text.contains(
            "keyward_key_seconds_until_rotation_bucket{le=\"7776000.0\",provider=\"ng\"} 3"
        ) && text.contains(
            "keyward_key_seconds_until_rotation_bucket{le=\"604800.0\",provider=\"ng\"} 0"
        ),
        "{text}"
    );
}

#[test]
fn idle_daemon_sends_no_request_and_observe_mode_never_writes() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["steady"]));
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "converged", || {
        ws.path("secrets/ng/steady/main.json").exists()
    });
    // Let the follow-up look after the changes finish, then count.
    eventually(&d, Duration::from_secs(10), "settled", || {
        d.log().matches("applying").count() == 1 && {
            let before = sb.stats()["requests"].as_u64().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            sb.stats()["requests"].as_u64().unwrap() == before
        }
    });
    sb.reset_stats();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sb.stats()["requests"],
        0,
        "nothing due, interval not elapsed: no request\n{}",
        d.log()
    );
    drop(d);

    // observe mode: plans and reports, never writes remotely.
    let ws2 = Workspace::new(&sb);
    let port = common::free_port();
    ws2.write_config(
        &format!("  interval: 10m\n  mode: observe\n  metrics: 127.0.0.1:{port}\n"),
        &users(&["watched-only"]),
    );
    let d2 = Daemon::start(&ws2);
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(
        &d2,
        Duration::from_secs(10),
        "observe-mode run reported",
        || {
            reqwest::blocking::get(&url)
                .and_then(|r| r.text())
                .unwrap_or_default()
                .contains("keyward_pending_changes 2")
        },
    );
    assert!(
        sb.user_by_name("watched-only").is_none(),
        "observe mode created a user"
    );
    assert!(
        d2.log().contains("observe mode: 2 change(s) pending"),
        "{}",
        d2.log()
    );
}

#[test]
fn speaks_the_systemd_notify_protocol() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["notified"]));
    let (mut d, sock) = start_notified(&ws, 300_000, Duration::from_millis(200));
    // Reads messages until `done` holds for what came so far, within a generous bound (the
    // bound only turns a missing message into a failure; it is not what is tested).
    let read_until = |what: &str, done: &dyn Fn(&[String]) -> bool| -> Vec<String> {
        let t = Instant::now();
        let mut messages = Vec::new();
        let mut buf = [0u8; 4096];
        while !done(&messages) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what}: not within 30 s; got {messages:?}"
            );
            if let Ok(n) = sock.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        messages
    };
    let has = |m: &[String], needle: &str| m.iter().any(|x| x.contains(needle));
    read_until("READY, a status and 3 watchdog pings", &|m| {
        has(m, "READY=1")
            && m.iter().any(|x| {
                x.lines()
                    .any(|l| l.starts_with("STATUS=") && l.contains("next run in"))
            })
            && m.iter().filter(|x| x.contains("WATCHDOG=1")).count() >= 3
    });

    d.signal("HUP");
    read_until("RELOADING with MONOTONIC_USEC, then READY", &|m| {
        let reloading = m
            .iter()
            .position(|x| x.contains("RELOADING=1") && x.contains("MONOTONIC_USEC="));
        reloading.is_some_and(|i| m[i..].iter().any(|x| x.contains("READY=1")))
    });

    d.signal("TERM");
    read_until("STOPPING", &|m| has(m, "STOPPING=1"));
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_failing_account_backs_off_without_stopping_the_others() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    std::fs::write(
        ws.config_path(),
        "version: 1
settings:
  state_dir: state
  interval: 10m
providers:
  good:
    type: ngrok
    api_key: ${NGROK_API_KEY}
    base_url: ${KEYWARD_SANDBOX_URL}
  broken:
    type: ngrok
    api_key_file: wrong-key
    base_url: ${KEYWARD_SANDBOX_URL}
sinks:
  local: {type: file, path: \"secrets/{provider}/{user}/{slot}.json\"}
defaults: {sink: local}
users:
  - {provider: good, name: fine, keys: {main: {}}}
  - {provider: broken, name: stuck, keys: {main: {}}}
",
    )
    .unwrap();
    std::fs::write(ws.path("wrong-key"), "not-a-valid-ngrok-key-at-all\n").unwrap();
    let d = Daemon::start(&ws);
    eventually(
        &d,
        Duration::from_secs(10),
        "the good account converged",
        || ws.path("secrets/good/fine/main.json").exists(),
    );
    eventually(
        &d,
        Duration::from_secs(10),
        "the broken account is reported and backs off",
        || {
            let log = d.log();
            log.contains("provider broken") && log.contains("retrying this account in")
        },
    );
    assert!(sb.user_by_name("stuck").is_none());
    assert!(
        !d.log().contains("not-a-valid-ngrok-key"),
        "the credential leaked into the log"
    );
    // Fixing the credential (an edit of the file it names is not a config edit; SIGHUP
    // reloads) lets the broken account converge too.
    std::fs::write(ws.path("wrong-key"), format!("{}\n", sb.admin_key)).unwrap();
    d.signal("HUP");
    eventually(
        &d,
        Duration::from_secs(10),
        "the repaired account converged",
        || ws.path("secrets/broken/stuck/main.json").exists(),
    );
}

#[test]
fn sigterm_does_not_wait_out_a_long_retry_after() {
    // Two requests a minute: the third list of the first observation is answered 429 with a
    // Retry-After of about a minute.
    let sb = Sandbox::start(&["--rate-limit", "2/60s"]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["patient"]));
    let mut d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "rate limited", || {
        sb.stats()["rate_limited"].as_u64().unwrap_or(0) > 0
    });
    d.signal("TERM");
    // A minute-long wait would still be running at the bound: exiting within it means the
    // wait was cut short.
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("daemon exits after SIGTERM, without waiting out the Retry-After");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    sb.set_faults(json!({"rate_limit": null}));
    assert!(
        sb.user_by_name("patient").is_none(),
        "nothing was sent after the signal"
    );
}

#[test]
fn reload_diff_never_shows_an_inline_secret_in_flow_style() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // The admin key written inline, in a flow mapping (validate warns about it; it works).
    let config = |rate: &str, users: &str| {
        format!(
            "version: 1\nsettings: {{state_dir: state, interval: 10m}}\nproviders:\n  ng: {{type: ngrok, api_key: {}, base_url: \"{}\", rate_limit: {rate}}}\nsinks:\n  local: {{type: file, path: \"secrets/{{provider}}/{{user}}/{{slot}}.json\"}}\ndefaults: {{sink: local}}\n{users}",
            sb.admin_key, sb.url
        )
    };
    std::fs::write(ws.config_path(), config("100000/1s", &users(&["inline"]))).unwrap();
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "converged", || {
        ws.path("secrets/ng/inline/main.json").exists()
    });
    // The edit touches the line that holds the secret, so that line is part of the diff.
    std::fs::write(
        ws.config_path(),
        config("99999/1s", &users(&["inline", "edited"])),
    )
    .unwrap();
    eventually(&d, Duration::from_secs(10), "edit applied", || {
        sb.user_by_name("edited").is_some() && d.log().contains("config reloaded")
    });
    let log = d.log();
    assert!(
        log.contains("+    name: edited"),
        "the diff is logged:\n{log}"
    );
    assert!(
        log.contains("rate_limit: 99999/1s"),
        "the diff is logged:\n{log}"
    );
    assert!(
        !log.contains(&sb.admin_key),
        "the inline api_key is in the daemon's log:\n{log}"
    );
}

/// Starts the daemon with a notify socket of the test's own (read with `read_timeout`) and a
/// watchdog of `watchdog_usec`.
fn start_notified(
    ws: &Workspace,
    watchdog_usec: u64,
    read_timeout: Duration,
) -> (Daemon, std::os::unix::net::UnixDatagram) {
    let sock_path = ws.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(read_timeout)).unwrap();
    let sock_text = sock_path.to_string_lossy().into_owned();
    let usec_text = watchdog_usec.to_string();
    let d = Daemon::start_with(
        ws,
        &[
            ("NOTIFY_SOCKET", Some(sock_text.as_str())),
            ("WATCHDOG_USEC", Some(usec_text.as_str())),
            ("WATCHDOG_PID", None),
        ],
    );
    (d, sock)
}

/// The times at which `WATCHDOG=1` arrived on `sock` while `act` ran every `every`, for `total`.
fn watchdog_pings(
    sock: &std::os::unix::net::UnixDatagram,
    total: Duration,
    every: Duration,
    mut act: impl FnMut(),
) -> Vec<Instant> {
    let mut pings = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let mut next_act = start;
    while start.elapsed() < total {
        if Instant::now() >= next_act {
            act();
            next_act += every;
        }
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1")
        {
            pings.push(Instant::now());
        }
    }
    pings
}

#[test]
fn a_busy_config_directory_does_not_starve_the_watchdog() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["watched"]));
    let watchdog_usec = 2_000_000u64;
    let (d, sock) = start_notified(&ws, watchdog_usec, Duration::from_millis(20));
    eventually(&d, Duration::from_secs(10), "converged", || {
        ws.path("secrets/ng/watched/main.json").exists()
    });
    // Unrelated files in the config directory, touched every 0.3 s for 8 s.
    let mut n = 0u32;
    let pings = watchdog_pings(
        &sock,
        Duration::from_secs(8),
        Duration::from_millis(300),
        || {
            n += 1;
            std::fs::write(ws.path("unrelated.txt"), n.to_string()).unwrap();
        },
    );
    let bound = Duration::from_micros(watchdog_usec);
    assert!(
        pings.len() >= 2,
        "{} watchdog ping(s) in 8 s with WATCHDOG_USEC=2s\n{}",
        pings.len(),
        d.log()
    );
    let worst = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        worst <= bound,
        "a {worst:?} gap between watchdog pings (WATCHDOG_USEC=2s): systemd would kill the daemon\n{}",
        d.log()
    );
}

#[test]
fn follows_a_symlinked_config_and_a_repointed_link() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // The config lives elsewhere; keyward.yaml in the workspace is a symlink to it. Relative
    // paths are avoided: where they resolve against is not what this test is about.
    // The link sits in a directory of its own, where nothing else is written (the daemon's log
    // is elsewhere): no unrelated event there can stand in for the edit.
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("keyward.yaml");
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let root = ws.dir.path().display().to_string();
    let config = |users: &str| {
        format!(
            "version: 1\nsettings:\n  state_dir: {root}/state\n  interval: 10m\nproviders:\n  ng:\n    type: ngrok\n    api_key: ${{NGROK_API_KEY}}\n    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: 100000/1s\nsinks:\n  local:\n    type: file\n    path: {root}/secrets/{{provider}}/{{user}}/{{slot}}.json\ndefaults:\n  sink: local\n{users}"
        )
    };
    let first = first_dir.path().join("real.yaml");
    std::fs::write(&first, config(&users(&["linked"]))).unwrap();
    std::os::unix::fs::symlink(&first, &link).unwrap();
    let d = Daemon::start_at(
        &ws,
        &link,
        &[("NOTIFY_SOCKET", None), ("WATCHDOG_USEC", None)],
    );
    eventually(&d, Duration::from_secs(10), "converged", || {
        sb.user_by_name("linked").is_some()
    });

    // An in-place edit of the file the link points to, in its own directory.
    std::fs::write(&first, config(&users(&["linked", "target-edit"]))).unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "edit of the link's target applied without SIGHUP",
        || sb.user_by_name("target-edit").is_some(),
    );

    // The link re-pointed (by rename, as `ln -sfn` and Kubernetes do) to a file in a third
    // directory.
    let second = second_dir.path().join("other.yaml");
    std::fs::write(
        &second,
        config(&users(&["linked", "target-edit", "repointed"])),
    )
    .unwrap();
    let tmp_link = link_dir.path().join(".keyward.yaml.new");
    std::os::unix::fs::symlink(&second, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "re-pointed link followed",
        || sb.user_by_name("repointed").is_some(),
    );

    // And the new target's directory is watched now.
    std::fs::write(
        &second,
        config(&users(&[
            "linked",
            "target-edit",
            "repointed",
            "new-target-edit",
        ])),
    )
    .unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "edit of the new target applied without SIGHUP",
        || sb.user_by_name("new-target-edit").is_some(),
    );
    assert!(!d.log().contains("SIGHUP"), "{}", d.log());
}

#[test]
fn the_longest_durations_a_config_may_hold_run_without_a_panic() {
    // 36500d is the longest duration that validates; the daemon adds it to now, to a key's
    // creation and to an instant, and must neither panic nor crash-loop.
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "  interval: 36500d\n",
        "users:\n  - provider: ng\n    name: longlived\n    keys:\n      main: {rotate_every: 36500d, overlap: 36500d}\n",
    );
    let mut d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(20), "the first reconcile", || {
        !sb.key_ids_of("longlived").is_empty()
    });
    // Still up after the run: no panic in computing the next wake-up.
    assert!(d.wait_exit(Duration::from_secs(2)).is_none(), "{}", d.log());
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("daemon exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn the_interval_resync_repairs_drift_without_an_edit_or_a_signal() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config("  interval: 2s\n", &users(&["drifter"]));
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(20), "converged", || {
        sb.key_ids_of("drifter").len() == 1
    });
    // Someone deactivates the user and revokes its key at the provider; nothing else happens:
    // no edit, no SIGHUP, nothing due.
    let user = sb.user_by_name("drifter").unwrap();
    let id = user["id"].as_str().unwrap();
    let (status, body) = sb.api(
        "PATCH",
        &format!("/service_users/{id}"),
        Some(json!({"active": false})),
    );
    assert!(status < 300, "{body}");
    let old: Vec<String> = sb.key_ids_of("drifter").into_iter().collect();
    let (status, body) = sb.api("DELETE", &format!("/api_keys/{}", old[0]), None);
    assert!(status < 300, "{body}");
    eventually(
        &d,
        Duration::from_secs(30),
        "drift repaired by the resync",
        || {
            let user = sb.user_by_name("drifter").unwrap();
            let keys = sb.key_ids_of("drifter");
            user["active"] == true && keys.len() == 1 && !keys.contains(&old[0])
        },
    );
    // The repaired key is the one delivered.
    let doc = ws.sink("drifter", "main");
    assert!(sb.secret_works("api_key", doc["secret"].as_str().unwrap()));
}

#[test]
fn the_daemon_never_revokes_every_key_of_a_user_either() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(
        "  interval: 1s\n",
        "users:\n  - provider: ng\n    name: holder\nprune:\n  unknown_keys: revoke\n",
    );
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(20), "holder created", || {
        sb.user_by_name("holder").is_some()
    });
    let holder = sb.user_by_name("holder").unwrap();
    for _ in 0..2 {
        let (status, body) = sb.api("POST", "/api_keys", Some(json!({"owner_id": holder["id"]})));
        assert!(status < 300, "{body}");
    }
    eventually(
        &d,
        Duration::from_secs(20),
        "one unknown key revoked",
        || sb.key_ids_of("holder").len() == 1,
    );
    // Several more resyncs: the last key stays.
    sb.reset_stats();
    eventually(&d, Duration::from_secs(30), "three more resyncs", || {
        sb.stats()["by_route"]["GET /service_users"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    assert_eq!(sb.key_ids_of("holder").len(), 1, "{}", d.log());
}

#[test]
fn sigint_stops_the_daemon_with_exit_0() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["interrupted"]));
    let mut d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(20), "converged", || {
        ws.path("secrets/ng/interrupted/main.json").exists()
    });
    d.signal("INT");
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("daemon exits after SIGINT");
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

#[test]
fn the_daemon_refuses_more_deletions_than_max_deletions_and_counts_it() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let port = common::free_port();
    ws.write_config(
        &format!("  interval: 1s\n  max_deletions: 1\n  metrics: 127.0.0.1:{port}\n"),
        "users:\n  - provider: ng\n    name: holder\n    keys:\n      main: {}\nprune:\n  unknown_keys: revoke\n",
    );
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "first apply");
    let holder = sb.user_by_name("holder").unwrap();
    for _ in 0..2 {
        let (status, body) = sb.api("POST", "/api_keys", Some(json!({"owner_id": holder["id"]})));
        assert!(status < 300, "{body}");
    }
    let before = sb.key_ids_of("holder");
    assert_eq!(before.len(), 3);
    let d = Daemon::start(&ws);
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(&d, Duration::from_secs(30), "a refused run counted", || {
        reqwest::blocking::get(&url)
            .and_then(|r| r.text())
            .is_ok_and(|t| t.contains("keyward_reconcile_total{outcome=\"refused\"}"))
    });
    assert!(d.log().contains("max_deletions"), "{}", d.log());
    assert_eq!(sb.key_ids_of("holder"), before, "nothing was revoked");
}

#[test]
fn a_new_or_edited_included_file_is_applied_without_a_signal() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    std::fs::create_dir(ws.path("users.d")).unwrap();
    ws.write_config(QUIET, "include: [\"users.d/*.yaml\"]\nusers: []\n");
    std::fs::write(ws.path("users.d/a.yaml"), users(&["from-a"])).unwrap();
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(10), "converged at start", || {
        sb.user_by_name("from-a").is_some()
    });
    // An edit of an included file.
    std::fs::write(ws.path("users.d/a.yaml"), users(&["from-a", "edited-a"])).unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "edit of an included file applied",
        || sb.user_by_name("edited-a").is_some(),
    );
    // A new file the pattern matches, saved by rename as editors do.
    let tmp = ws.path("users.d/.b.tmp");
    std::fs::write(&tmp, users(&["from-b"])).unwrap();
    std::fs::rename(&tmp, ws.path("users.d/b.yaml")).unwrap();
    eventually(
        &d,
        Duration::from_secs(10),
        "new included file applied",
        || sb.user_by_name("from-b").is_some(),
    );
    assert!(d.log().contains("config reloaded"), "{}", d.log());
}

#[test]
fn keys_that_come_due_are_read_alone_not_with_a_full_listing() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // 250 users whose keys never come due, and one that rotates every 5 s (2 s overlap, so that no wake for
    // its revocation falls on a look-again after its rotation).
    let mut fleet = String::from("users:\n");
    for i in 0..250 {
        fleet.push_str(&format!(
            "  - provider: ng\n    name: still-{i:03}\n    keys:\n      main: {{}}\n"
        ));
    }
    fleet.push_str(
        "  - provider: ng\n    name: busy\n    keys:\n      main: {rotate_every: 5s, overlap: 2s}\n",
    );
    ws.write_config(QUIET, &fleet);
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(60), "converged at start", || {
        ws.path("secrets/ng/busy/main.json").exists()
            && ws.path("secrets/ng/still-249/main.json").exists()
    });
    // Let the start-up's follow-up run pass, then count what the due work costs.
    std::thread::sleep(Duration::from_millis(1500));
    let first = ws.sink("busy", "main")["key_id"].clone();
    sb.reset_stats();
    let runs_before = d.log().matches("applying ").count();
    // Watched through the sink and the log only: the test's own calls to the sandbox would
    // count too. Two rotations and the first revocation: at least three runs with changes.
    let revoked = format!("revoke key {}: done", first.as_str().unwrap());
    let mut delivered = vec![first.clone()];
    eventually(
        &d,
        Duration::from_secs(30),
        "two rotations and the first revocation",
        || {
            let now = ws.sink("busy", "main")["key_id"].clone();
            if delivered.last() != Some(&now) {
                delivered.push(now);
            }
            delivered.len() >= 3 && d.log().contains(&revoked)
        },
    );
    let stats = sb.stats();
    let runs = d.log().matches("applying ").count() - runs_before;
    assert!(!sb.key_ids_of("busy").contains(first.as_str().unwrap()));
    let routes = &stats["by_route"];
    assert!(
        routes.get("GET /service_users").is_none(),
        "due work listed every user: {stats}"
    );
    assert!(
        routes["GET /service_users/{id}"].as_u64().unwrap_or(0) >= 1,
        "due work reads the user by id: {stats}"
    );
    // A full listing of this account is 3 + 3 + 3 pages; each targeted read is 3 requests.
    let sent = stats["requests"].as_u64().unwrap();
    let listed_keys = routes["GET /api_keys"].as_u64().unwrap_or(0);
    let reads = routes["GET /service_users/{id}"].as_u64().unwrap_or(0);
    assert_eq!(
        listed_keys, reads,
        "one filtered key list per read: {stats}"
    );
    // One read per wake: what a run changed is known from the provider's answers, not read
    // again after it (a wake may find nothing to do: one spare).
    assert!(
        runs >= 3 && reads <= runs as u64 + 1,
        "{reads} reads for {runs} runs with changes: {stats}"
    );
    assert!(
        sent < 60,
        "{sent} requests for a few rotations and revocations of one user: {stats}"
    );
}

/// Seeds `n` service users without keys, `{prefix}-00000` on.
fn seed_users(sb: &Sandbox, prefix: &str, n: usize) {
    let users: Vec<_> = (0..n)
        .map(|i| json!({"name": format!("{prefix}-{i:05}")}))
        .collect();
    sb.seed(json!({"service_users": users}));
}

/// Sets the account's `rate_limit` in the workspace's config.
fn set_rate_limit(ws: &Workspace, limit: &str) {
    let text = std::fs::read_to_string(ws.config_path()).unwrap();
    assert!(text.contains("rate_limit: 100000/1s"));
    let text = text.replace("rate_limit: 100000/1s", &format!("rate_limit: {limit}"));
    std::fs::write(ws.config_path(), text).unwrap();
}

#[test]
fn the_interval_listing_keeps_to_its_share_of_the_budget() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // 2,000 users keyward does not manage: a full listing is about 22 pages.
    seed_users(&sb, "other", 2000);
    ws.write_config("  interval: 2s\n  resync_share: 25\n", &users(&["anchor"]));
    // keyward's budget is 40 requests per 2 s; the listing at every interval may take a
    // quarter of it (10 per 2 s, with a burst of 3).
    set_rate_limit(&ws, "40/2s");
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(60), "converged at start", || {
        ws.path("secrets/ng/anchor/main.json").exists()
    });
    // From now on the account answers 429 past 16 requests in any 2 s: a listing at the
    // whole budget would draw them; one at its share never does.
    sb.set_faults(json!({"rate_limit": "16/2s"}));
    sb.reset_stats();
    let done_before = d.log().matches("full listing complete").count();
    eventually(&d, Duration::from_secs(90), "two interval listings", || {
        d.log().matches("full listing complete").count() >= done_before + 2
    });
    let stats = sb.stats();
    let listed = stats["by_route"]["GET /service_users"]
        .as_u64()
        .unwrap_or(0);
    assert!(listed >= 20, "the listings read the users: {stats}");
    assert_eq!(
        stats["rate_limited"],
        0,
        "the interval listing went past its share of the budget: {stats}\n{}",
        d.log()
    );
}

#[test]
fn a_listing_cut_short_goes_on_from_where_it_stopped() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    seed_users(&sb, "other", 3000);
    ws.write_config(QUIET, &users(&["anchor"]));
    // 10 requests a second: the start-up listing of about 33 pages takes a few seconds.
    set_rate_limit(&ws, "10/1s");
    let d = Daemon::start(&ws);
    let user_pages = || {
        sb.stats()["by_route"]["GET /service_users"]
            .as_u64()
            .unwrap_or(0)
    };
    eventually(&d, Duration::from_secs(30), "the listing under way", || {
        user_pages() >= 4
    });
    // The account's credential stops working mid-listing (a 401 is not retried): the listing
    // stops, and goes on once the account answers again.
    sb.set_faults(json!({"refuse_credentials": true}));
    eventually(&d, Duration::from_secs(30), "the listing cut short", || {
        d.log().contains("the full listing stopped after page")
    });
    sb.set_faults(json!({"refuse_credentials": false}));
    eventually(&d, Duration::from_secs(60), "the listing completed", || {
        ws.path("secrets/ng/anchor/main.json").exists()
    });
    assert!(
        d.log().contains("the full listing goes on from page"),
        "{}",
        d.log()
    );
    let by_daemon = user_pages();
    drop(d);
    // What one whole listing of the users costs, as `keyward plan` reads it.
    sb.reset_stats();
    let out = ws.keyward(&["plan"]);
    expect_code(&out, 0, "plan");
    let whole = user_pages();
    // Every page once, plus the one request the account refused; a listing that started over
    // would have read the first pages twice.
    assert!(
        by_daemon <= whole + 1,
        "the daemon read {by_daemon} pages of users for a listing of {whole}"
    );
    assert!(by_daemon >= whole, "{by_daemon} < {whole}");
}

#[test]
fn due_work_goes_on_while_a_paced_listing_is_under_way() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // About 50 pages of users keyward does not manage; the listing at every interval may take
    // a tenth of 20 requests a second: it reads for many seconds.
    seed_users(&sb, "other", 5000);
    ws.write_config(
        "  interval: 2s\n  resync_share: 10\n",
        "users:\n  - provider: ng\n    name: busy\n    keys:\n      main: {rotate_every: 3s, overlap: 1s}\n",
    );
    set_rate_limit(&ws, "20/1s");
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(60), "converged at start", || {
        ws.path("secrets/ng/busy/main.json").exists()
    });
    let completed = |d: &Daemon| d.log().matches("full listing complete").count();
    let listings_at_start = completed(&d);
    // Two rotations (each a new key delivered) while the next listing is still reading.
    let mut delivered = vec![ws.sink("busy", "main")["key_id"].clone()];
    eventually(&d, Duration::from_secs(60), "two rotations", || {
        let now = ws.sink("busy", "main")["key_id"].clone();
        if delivered.last() != Some(&now) {
            delivered.push(now);
        }
        delivered.len() >= 3
    });
    assert_eq!(
        completed(&d),
        listings_at_start,
        "the rotations waited for the listing:\n{}",
        d.log()
    );
    // When the listing completes, its plan takes what the rotations changed from their own
    // reads: no replacement key is minted for a key the listing never saw.
    eventually(
        &d,
        Duration::from_secs(90),
        "the paced listing completed",
        || completed(&d) > listings_at_start,
    );
    std::thread::sleep(Duration::from_millis(500));
    let keys = sb.key_ids_of("busy");
    assert!(
        keys.len() <= 2,
        "current and retiring keys only: {keys:?}\n{}",
        d.log()
    );
    // Nor does a key revoked meanwhile, still in the listing's pages, come back as one the
    // state does not record.
    assert!(
        !d.log().contains("recovery:"),
        "the listing's older view of the rotated user was planned over:\n{}",
        d.log()
    );
    let doc = ws.sink("busy", "main");
    assert!(sb.secret_works("api_key", doc["secret"].as_str().unwrap()));
}

#[test]
fn one_daemon_per_state_directory_and_no_apply_beside_it() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    ws.write_config(QUIET, &users(&["solo"]));
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(30), "converged", || {
        ws.path("secrets/ng/solo/main.json").exists()
    });
    // A second daemon on the same state directory does not start.
    let config = ws.config_path();
    let mut second = ws
        .command(&["daemon", "-c", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = second.kill();
            panic!("a second daemon kept running on the same state directory");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("not starting") && err.contains("locked"),
        "{err}"
    );
    // A one-shot rotate is refused at once, naming the daemon; a plan reads as usual.
    let out = ws.keyward(&["rotate", "solo", "--auto-approve"]);
    expect_code(&out, 1, "rotate beside the daemon");
    let stderr = common::text(&out.stderr);
    assert!(
        stderr.contains(&format!("pid {}", d.child.id())),
        "{stderr}"
    );
    expect_code(&ws.keyward(&["plan"]), 0, "plan beside the daemon");
}

#[test]
fn a_failed_apply_in_the_daemon_says_the_next_run_finishes_it() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    std::fs::write(
        ws.config_path(),
        "version: 1
settings:
  state_dir: state
  interval: 10m
providers:
  ng:
    type: ngrok
    api_key: ${NGROK_API_KEY}
    base_url: ${KEYWARD_SANDBOX_URL}
sinks:
  refusing: {type: exec, command: [/bin/sh, -c, \"exit 3\"], timeout: 5s}
defaults: {sink: refusing}
users:
  - {provider: ng, name: fine, keys: {main: {}}}
",
    )
    .unwrap();
    let d = Daemon::start(&ws);
    eventually(&d, Duration::from_secs(30), "a failed apply", || {
        d.log().contains("Apply failed")
    });
    let log = d.log();
    // A daemon has no command to run again: it says who finishes the rest.
    assert!(log.contains("the next run finishes the rest"), "{log}");
    assert!(!log.contains("run the same command again"), "{log}");
}
