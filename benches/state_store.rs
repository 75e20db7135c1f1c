//! What recording one change costs as the state grows: the SQLite state store (one row per
//! service user, written in one transaction) side by side with the whole-file rewrite of
//! `state.json` that earlier versions did, at 3,000 and 300,000 keys (one key per user).
//!
//! Run: `cargo bench --bench state_store` (add `-- 30000` to choose other sizes). Prints
//! figures, asserts nothing. Real files, fsync included, in a temporary directory under
//! `target/` (the build's disk, not a tmpfs `/tmp` where fsync costs nothing).

use std::time::{Duration, Instant};

use jiff::Timestamp;
use keyward::model::KeyKind;
use keyward::state::{Delivery, KeyRecord, SlotRecord, State};
use keyward::store::{StateDir, Store};

/// A state of `n` users with one current key each.
fn state_of(n: usize) -> State {
    let mut state = State {
        format_version: keyward::state::FORMAT_VERSION,
        ..State::default()
    };
    let at = Timestamp::now();
    for i in 0..n {
        let name = format!("fleet-{i:06}");
        state.record_user("ng", &name, &format!("bot_{i:024}"), true, Some(at));
        if let Some(rec) = state.user_mut("ng", &name) {
            rec.slots.insert(
                "agent".into(),
                Box::new(SlotRecord::with_current(KeyRecord {
                    id: format!("cr_{i:024}"),
                    kind: KeyKind::Credential,
                    created_at: at,
                    delivered_at: at,
                    sinks: vec!["local".into()],
                    retire_after: None,
                    delivery: Delivery::Delivered,
                })),
            );
        }
    }
    state
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut(usize)) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![3_000, 300_000]
    } else {
        sizes
    };
    println!(
        "{:>9}  {:>22}  {:>26}",
        "keys", "SQLite: one change", "state.json: rewrite all"
    );
    let mut results = Vec::new();
    for n in sizes {
        std::fs::create_dir_all("target")?;
        let tmp = tempfile::tempdir_in("target")?;
        let mut state = state_of(n);
        let dir = StateDir::new(tmp.path().join("state"));
        dir.save(&mut state)?;
        // One user's record changes: a rotation recorded.
        let one = median(21, |i| {
            let name = format!("fleet-{:06}", i % n);
            let mut rec = state.user("ng", &name).cloned();
            if let Some(r) = rec.as_mut() {
                r.created_at = Some(Timestamp::now());
            }
            state.serial += 1;
            if let Err(e) = dir.record_users(state.serial, &[("ng".into(), name, rec)]) {
                panic!("record_users: {e:#}");
            }
        });
        // The baseline: the whole state serialised and written atomically and durably.
        let json = tmp.path().join("state.json");
        let all = median(if n > 100_000 { 5 } else { 21 }, |_| {
            let bytes = serde_json::to_vec_pretty(&state).unwrap_or_default();
            if let Err(e) = keyward::files::write_private_file(&json, &bytes) {
                panic!("write: {e:#}");
            }
        });
        println!("{n:>9}  {:>19.2} ms  {:>23.2} ms", ms(one), ms(all));
        results.push((n, one, all));
    }
    if let [(n0, one0, all0), .., (n1, one1, all1)] = results.as_slice() {
        println!(
            "from {n0} to {n1} keys: one change costs {:.2}x as much with SQLite, a rewrite {:.1}x",
            ms(*one1) / ms(*one0),
            ms(*all1) / ms(*all0)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
