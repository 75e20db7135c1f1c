//! The crash test: rotations against a sandbox with latency, the `keyward` process killed with
//! SIGKILL at random moments, then a plain `keyward apply` to recover. After every kill the
//! secret in each sink must still authenticate (no slot ever loses its last working key); after
//! every recovery every current key's secret works, every key keyward created is recorded as
//! current or retiring (nothing orphaned), and no slot holds more keys than its overlap allows.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, Workspace, expect_code};
use rand::{Rng, SeedableRng};

const USERS: [(&str, &str); 3] = [("c0", "0s"), ("c1", "1s"), ("c2", "0s")];
const SLOTS: [(&str, &str); 2] = [("api", "api_key"), ("agent", "credential")];
const TRIALS: usize = 50;

fn config(ws: &Workspace) {
    let mut users = String::from("users:\n");
    for (name, overlap) in USERS {
        users.push_str(&format!("  - provider: ng\n    name: {name}\n    keys:\n"));
        for (slot, kind) in SLOTS {
            users.push_str(&format!(
                "      {slot}: {{kind: {kind}, overlap: {overlap}}}\n"
            ));
        }
    }
    ws.write_config("  max_deletions: 100\n", &users);
}

/// Every secret in a sink authenticates.
fn sinks_work(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    for (user, _) in USERS {
        for (slot, kind) in SLOTS {
            let doc = ws.sink(user, slot);
            let secret = doc["secret"].as_str().unwrap_or_default();
            if !sb.secret_works(kind, secret) {
                return Err(format!(
                    "{user}/{slot}: the sink's key {} does not authenticate",
                    doc["key_id"]
                ));
            }
        }
    }
    Ok(())
}

/// Invariants after a recovery run.
fn converged(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    sinks_work(sb, ws)?;
    let state: serde_json::Value =
        serde_json::from_str(&ws.state_text()).map_err(|e| e.to_string())?;
    let keys = sb.list("/api_keys", "keys");
    let creds = sb.list("/credentials", "credentials");
    for (user, overlap) in USERS {
        let remote_user = sb.user_by_name(user).ok_or(format!("{user} missing"))?;
        let uid = remote_user["id"].as_str().unwrap();
        let remote: BTreeSet<String> = keys
            .iter()
            .chain(creds.iter())
            .filter(|k| k["owner_id"] == uid)
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect();
        let rec = &state["accounts"]["ng"]["users"][user];
        let mut recorded = BTreeSet::new();
        for (slot, _) in SLOTS {
            let s = &rec["slots"][slot];
            let current = s["current"]["id"]
                .as_str()
                .ok_or(format!("{user}/{slot}: no current key recorded"))?;
            let sink = ws.sink(user, slot);
            if sink["key_id"] != current {
                return Err(format!(
                    "{user}/{slot}: sink holds {} but state says {current}",
                    sink["key_id"]
                ));
            }
            if !remote.contains(current) {
                return Err(format!(
                    "{user}/{slot}: current key {current} is gone remotely"
                ));
            }
            recorded.insert(current.to_string());
            let retiring = s["retiring"].as_array().cloned().unwrap_or_default();
            if overlap == "0s" && !retiring.is_empty() {
                return Err(format!(
                    "{user}/{slot}: overlap 0s but {} keys still retiring",
                    retiring.len()
                ));
            }
            // c1 (overlap 1s) keeps at most the keys of the last two rotations.
            if retiring.len() > 2 {
                return Err(format!(
                    "{user}/{slot}: {} retiring keys: duplicate rotations left behind",
                    retiring.len()
                ));
            }
            for r in retiring {
                recorded.insert(r["id"].as_str().unwrap().to_string());
            }
            if s.get("orphans")
                .is_some_and(|o| o.as_array().is_some_and(|a| !a.is_empty()))
            {
                return Err(format!(
                    "{user}/{slot}: orphans left after recovery: {}",
                    s["orphans"]
                ));
            }
        }
        if remote != recorded {
            return Err(format!(
                "{user}: remote keys {remote:?} differ from recorded {recorded:?}"
            ));
        }
    }
    Ok(())
}

#[test]
fn kill_9_at_random_moments_never_loses_a_secret() {
    let sb = Sandbox::start(&["--latency", "15ms"]);
    let ws = Workspace::new(&sb);
    config(&ws);
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "initial apply",
    );
    converged(&sb, &ws).unwrap();

    // How long an uninterrupted forced rotation of everything takes: kills land across it.
    let rotate_args = ["rotate", "c0", "c1", "c2", "--auto-approve"];
    let t0 = Instant::now();
    expect_code(&ws.keyward(&rotate_args), 0, "baseline rotation");
    let baseline = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1100));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "settle");
    converged(&sb, &ws).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_7977);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut recoveries: BTreeMap<&str, usize> = BTreeMap::new();
    let mut previous_log = String::new();
    for trial in 0..TRIALS {
        let delay = baseline.mul_f64(rng.random_range(0.0..1.1));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(rotate_args)
            .arg("-c")
            .arg(ws.config_path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(ws.dir.path());
        for (k, v) in &ws.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(delay);
        let killed = child.try_wait().unwrap().is_none();
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        *outcomes
            .entry(if killed {
                "killed mid-run"
            } else if status.success() {
                "finished first"
            } else {
                "failed"
            })
            .or_default() += 1;

        if let Err(e) = sinks_work(&sb, &ws) {
            panic!(
                "trial {trial} (killed after {delay:?}): a slot lost its working key: {e}\nstate: {}\njournal: {}\nprevious recovery: {}",
                ws.state_text(),
                std::fs::read_to_string(ws.path("state/journal.jsonl")).unwrap_or_default(),
                previous_log
            );
        }
        // Recovery: a plain apply finishes the job (a retiring key may need its overlap first).
        let mut last = None;
        for _ in 0..3 {
            let out = ws.keyward(&["apply", "--auto-approve"]);
            if out.status.success() {
                last = Some(out);
                break;
            }
            last = Some(out);
        }
        let last = last.unwrap();
        expect_code(&last, 0, &format!("trial {trial}: recovery apply"));
        let log = common::text(&last.stderr);
        previous_log = log.clone();
        for (what, needle) in [
            ("adopted a delivered key", "adopted key"),
            ("revoked an undelivered key", "never delivered"),
            ("forgot a revoked key", "dropped from the state"),
        ] {
            if log.contains(needle) {
                *recoveries.entry(what).or_default() += 1;
            }
        }
        if let Err(e) = converged(&sb, &ws) {
            panic!(
                "trial {trial} (killed after {delay:?}): {e}\nstate: {}\nrecovery run: {log}",
                ws.state_text()
            );
        }
    }
    eprintln!("crash trials: {outcomes:?}; recoveries: {recoveries:?} (baseline run {baseline:?})");
    assert!(
        !recoveries.is_empty(),
        "no kill ever left anything to recover: the test proves nothing"
    );
    assert!(
        outcomes.get("killed mid-run").copied().unwrap_or(0) >= TRIALS / 2,
        "too few kills landed inside a run: {outcomes:?}"
    );
    // Once every overlap has ended, a no-op plan: nothing left over.
    std::thread::sleep(Duration::from_millis(1100));
    expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "settle");
    converged(&sb, &ws).unwrap();
    expect_code(
        &ws.keyward(&["plan", "--detailed-exitcode"]),
        0,
        "final plan",
    );
}
