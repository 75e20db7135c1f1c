//! The crash test: rotations against a sandbox with latency, the `keyward` process killed with
//! SIGKILL at random moments, then a plain `keyward apply` to recover. After every kill the
//! secret in each sink must still authenticate (no slot ever loses its last working key); after
//! every recovery every current key's secret works, every key keyward created is recorded as
//! current or retiring (nothing orphaned), and no slot holds more keys than its overlap allows.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::crash::Trials;
use common::{Sandbox, Workspace};

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
    // 0: the revocations of rotations and recoveries are all this test makes, and
    // max_deletions does not count them.
    ws.write_config("  max_deletions: 0\n", &users);
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
            let retiring = s["retiring"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| panic!("a slot record without `retiring`: {s}"));
            if overlap == "0s" && !retiring.is_empty() {
                return Err(format!(
                    "{user}/{slot}: overlap 0s but {} keys still retiring",
                    retiring.len()
                ));
            }
            // c1 (overlap 1s) keeps at most the keys of the last two rotations and one whose
            // delivery a kill cut short (kept until a new key reached every sink, then retiring).
            if retiring.len() > 3 {
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
    let report = Trials {
        ws: &ws,
        rotate_args: &["rotate", "c0", "c1", "c2", "--auto-approve"],
        trials: TRIALS,
        seed: 0x6b65_7977,
        // c1's overlap is 1s.
        settle: Duration::from_millis(1100),
        targeted: None,
    }
    .run(|| sinks_work(&sb, &ws), || converged(&sb, &ws));
    eprintln!(
        "crash trials: {:?}; recoveries: {:?} (baseline run {:?})",
        report.outcomes, report.recoveries, report.baseline
    );
}
