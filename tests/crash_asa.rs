//! The crash test for Okta ASA: forced rotations of ASA service users against a sandbox with
//! latency, the `keyward` process killed with SIGKILL at random moments (the shared harness in
//! `common/crash.rs`), then a plain `keyward apply` to recover. After every kill each sink's
//! key id + secret must still mint a service token (no slot ever loses its last working key);
//! after every recovery each sink holds the slot's recorded current key, which exists at ASA, and
//! every key on a managed user is recorded as current or retiring — including a key minted by a
//! `POST …/keys` whose answer died with the process. ASA keys carry no tag, so that last case
//! is only recoverable from the journal; and every ASA rotation puts the user's other keys on a
//! 2-day expiry, which must neither break the old key during the overlap nor confuse recovery.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::asa::{self, Asa};
use common::crash::{Targeted, Trials};
use common::{Sandbox, Workspace};

/// (user, overlap) — one slot each (ASA rotates a user's keys together).
const USERS: [(&str, &str); 3] = [("a0", "0s"), ("a1", "1s"), ("a2", "0s")];
const TRIALS: usize = 36;
const KEY_POST: &str = "POST /v1/teams/{team}/service_users/{user_name}/keys";

fn config(ws: &Workspace) {
    let mut users = String::from("users:\n");
    for (name, overlap) in USERS {
        users.push_str(&format!(
            "  - provider: asa\n    name: {name}\n    keys:\n      main: {{overlap: {overlap}}}\n"
        ));
    }
    // 0: the revocations of rotations and recoveries are all this test makes, and
    // max_deletions does not count them.
    asa::write_config(ws, "  max_deletions: 0\n", &users);
}

/// Every sink's key pair mints a token.
fn sinks_work(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    for (user, _) in USERS {
        let doc = asa::sink(ws, user, "main");
        if !asa::secret_works(sb, &doc) {
            return Err(format!(
                "{user}: the sink's key {} does not mint a token",
                doc["key_id"]
            ));
        }
    }
    Ok(())
}

/// Invariants after a recovery run.
fn converged(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    sinks_work(sb, ws)?;
    let api = Asa::new(sb);
    let state: serde_json::Value =
        serde_json::from_str(&ws.state_text()).map_err(|e| e.to_string())?;
    for (user, overlap) in USERS {
        let remote: BTreeSet<String> = api
            .keys(user)
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect();
        let s = &state["accounts"]["asa"]["users"][user]["slots"]["main"];
        let current = s["current"]["id"]
            .as_str()
            .ok_or(format!("{user}: no current key recorded"))?;
        let sink = asa::sink(ws, user, "main");
        if sink["key_id"] != current {
            return Err(format!(
                "{user}: sink holds {} but state says {current}",
                sink["key_id"]
            ));
        }
        if !remote.contains(current) {
            return Err(format!("{user}: current key {current} is gone at ASA"));
        }
        let mut recorded = BTreeSet::from([current.to_string()]);
        let retiring = s["retiring"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("a slot record without `retiring`: {s}"));
        if overlap == "0s" && !retiring.is_empty() {
            return Err(format!(
                "{user}: overlap 0s but {} keys still retiring",
                retiring.len()
            ));
        }
        if retiring.len() > 2 {
            return Err(format!(
                "{user}: {} retiring keys: duplicate rotations left behind",
                retiring.len()
            ));
        }
        for r in retiring {
            recorded.insert(r["id"].as_str().unwrap().to_string());
        }
        if s["orphans"].as_array().is_some_and(|a| !a.is_empty()) {
            return Err(format!(
                "{user}: orphans left after recovery: {}",
                s["orphans"]
            ));
        }
        if remote != recorded {
            return Err(format!(
                "{user}: keys at ASA {remote:?} differ from the recorded {recorded:?}"
            ));
        }
    }
    Ok(())
}

#[test]
fn kill_9_during_asa_rotations_never_loses_a_secret_nor_leaves_a_key_behind() {
    let sb = Sandbox::start(&["--latency", "10ms"]);
    // Each request is applied 40 ms before its answer leaves: a kill in that window comes after
    // ASA minted a key and before keyward (or its journal) heard of it. Every third trial aims
    // there: it kills 25 ms after the sandbox counted a `POST …/keys`.
    sb.set_faults(serde_json::json!({"answer_latency_ms": 40}));
    let ws = asa::workspace(&sb);
    config(&ws);
    let key_posts = || asa::route_count(&sb, KEY_POST);
    let report = Trials {
        ws: &ws,
        rotate_args: &["rotate", "a0", "a1", "a2", "--auto-approve"],
        trials: TRIALS,
        seed: 0x6173_6131,
        // a1's overlap is 1s.
        settle: Duration::from_millis(1100),
        targeted: Some(Targeted {
            every: 3,
            count: &key_posts,
            after: Duration::from_millis(25),
        }),
    }
    .run(|| sinks_work(&sb, &ws), || converged(&sb, &ws));
    eprintln!(
        "ASA crash trials: {:?}; recoveries: {:?} (baseline run {:?})",
        report.outcomes, report.recoveries, report.baseline
    );
    assert!(
        report
            .recoveries
            .contains_key("found a key whose creation was never journaled"),
        "no kill landed between ASA minting a key and keyward hearing of it: {:?}",
        report.recoveries
    );
}
