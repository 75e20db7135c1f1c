//! A seeded mutation run of the config loader over the shipped configs and the test corpus:
//! byte flips, truncations, duplicated and deleted lines, huge numbers, deep nesting, anchors
//! and alias bombs, a BOM, CRLF line ends, control bytes. Every load must finish (no hang, no
//! panic) and every diagnostic must be one line starting `FILE:LINE:COL: `.
//!
//! The CI run is a few seconds. Run it longer with
//! `KEYWARD_FUZZ_CASES=20000 KEYWARD_FUZZ_SEED=7 cargo test --release --test config_fuzz`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long one load may take before it counts as a hang (generous: CI machines are busy).
const HANG: Duration = Duration::from_secs(20);

fn inputs() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["config", "tests/config"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("read the corpus")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            out.push((
                f.display().to_string(),
                std::fs::read(&f).expect("read corpus file"),
            ));
        }
    }
    assert!(out.len() >= 10, "the corpus is missing: {}", out.len());
    out
}

/// One mutation of `text`, chosen and shaped by `rng`; returns its name too.
fn mutate(rng: &mut StdRng, text: &[u8]) -> (&'static str, Vec<u8>) {
    let mut t = text.to_vec();
    let at = |rng: &mut StdRng, t: &[u8]| rng.random_range(0..=t.len());
    let lines =
        |t: &[u8]| -> Vec<Vec<u8>> { t.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect() };
    let join = |l: Vec<Vec<u8>>| l.join(&b'\n');
    match rng.random_range(0..12) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                if !t.is_empty() {
                    let i = rng.random_range(0..t.len());
                    t[i] ^= 1 << rng.random_range(0..8);
                }
            }
            ("byte flips", t)
        }
        1 => {
            let i = at(rng, &t);
            t.truncate(i);
            ("truncation", t)
        }
        2 => {
            let mut l = lines(&t);
            let i = rng.random_range(0..l.len());
            let dup = l[i].clone();
            l.insert(i, dup);
            ("duplicated line", join(l))
        }
        3 => {
            let mut l = lines(&t);
            let i = rng.random_range(0..l.len());
            l.remove(i);
            ("deleted line", join(l))
        }
        4 => {
            let huge = [
                "99999999999999999999999999",
                "18446744073709551616",
                "-9223372036854775809",
                "2940000d",
                "9223372036854775807s",
                "1e400",
            ];
            // A number in a value (a comment's digits would change nothing), else anywhere.
            let starts: Vec<usize> = t
                .split(|&b| b == b'\n')
                .scan(0usize, |at, line| {
                    let start = *at;
                    *at += line.len() + 1;
                    Some((start, line))
                })
                .filter(|(_, line)| !line.trim_ascii_start().starts_with(b"#"))
                .filter_map(|(start, line)| {
                    let colon = line.iter().position(|&b| b == b':')?;
                    let d = line[colon..].iter().position(u8::is_ascii_digit)?;
                    Some(start + colon + d)
                })
                .collect();
            let digit = if starts.is_empty() {
                t.iter().position(u8::is_ascii_digit).unwrap_or(0)
            } else {
                starts[rng.random_range(0..starts.len())]
            };
            let end = t[digit..]
                .iter()
                .position(|b| !b.is_ascii_alphanumeric())
                .map_or(t.len(), |e| digit + e);
            let n = huge[rng.random_range(0..huge.len())];
            t.splice(digit..end, n.bytes());
            ("huge number", t)
        }
        5 => {
            let depth = rng.random_range(100..20_000);
            let mut s = b"version: 1\nsettings: ".to_vec();
            s.extend(std::iter::repeat_n(b'[', depth));
            s.extend(std::iter::repeat_n(b']', depth));
            s.push(b'\n');
            ("deep nesting", s)
        }
        6 => {
            // The billion laughs: each level refers to the one before ten times.
            let mut s = String::from("version: 1\nx0: &a0 [lol]\n");
            for i in 1..rng.random_range(5..12) {
                let refs = vec![format!("*a{}", i - 1); 10].join(", ");
                s.push_str(&format!("x{i}: &a{i} [{refs}]\n"));
            }
            s.push_str("users: *a4\n");
            ("alias bomb", s.into_bytes())
        }
        7 => {
            let mut s = vec![0xEF, 0xBB, 0xBF];
            s.extend(t);
            ("BOM", s)
        }
        8 => {
            let mut s = Vec::with_capacity(t.len() * 2);
            for b in t {
                if b == b'\n' {
                    s.push(b'\r');
                }
                s.push(b);
            }
            ("CRLF", s)
        }
        9 => {
            let controls = [0u8, 7, 8, 0x1b, 0x7f, b'\r', 0x0c, 0x0b];
            for _ in 0..rng.random_range(1..5) {
                let i = at(rng, &t);
                t.insert(i, controls[rng.random_range(0..controls.len())]);
            }
            ("control bytes", t)
        }
        10 => {
            // An anchor on one section, aliased where another kind of value belongs.
            let mut s = t;
            s.extend_from_slice(b"\nextra: &anchor {a: 1}\ndefaults: *anchor\n");
            ("anchor misuse", s)
        }
        _ => {
            let mut l = lines(&t);
            let i = rng.random_range(0..l.len());
            let indent = rng.random_range(0..12);
            let mut line = vec![b' '; indent];
            line.extend(l[i].iter().skip_while(|b| **b == b' '));
            l[i] = line;
            ("re-indented line", join(l))
        }
    }
}

/// Loads `bytes` as a config in a thread of its own; `Err` says what went wrong.
fn check(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join("fuzz.yaml");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| {
            let env = |v: &str| match v {
                "NGROK_API_KEY" | "ASA_KEY_SECRET" | "ASA_KEY_ID" => Some("value-123456".into()),
                "KEYWARD_SANDBOX_URL" => Some("http://127.0.0.1:4040".into()),
                _ => None,
            };
            match keyward::config::load_with_env(&p, &env) {
                Ok(l) => l.warnings,
                Err(d) => d,
            }
        });
        let _ = tx.send(result);
    });
    let diags = match rx.recv_timeout(HANG) {
        Ok(Ok(d)) => d,
        Ok(Err(_)) => return Err(format!("{name}: the loader panicked")),
        Err(_) => return Err(format!("{name}: the loader did not finish within {HANG:?}")),
    };
    let prefix = format!("{}:", path.display());
    for d in diags {
        let line = d.to_string();
        let rest = line
            .strip_prefix(&prefix)
            .ok_or_else(|| format!("{name}: not FILE:LINE:COL: {line:?}"))?;
        let mut parts = rest.splitn(3, ':');
        let (l, c) = (parts.next(), parts.next());
        let located = l.is_some_and(|l| l.parse::<usize>().is_ok_and(|n| n >= 1))
            && c.is_some_and(|c| c.parse::<usize>().is_ok_and(|n| n >= 1))
            && parts.next().is_some_and(|m| m.starts_with(' '));
        if !located {
            return Err(format!("{name}: not FILE:LINE:COL: {line:?}"));
        }
        if line.contains(['\n', '\r']) {
            return Err(format!("{name}: a diagnostic over several lines: {line:?}"));
        }
    }
    Ok(())
}

#[test]
fn mutated_configs_never_panic_hang_or_lose_their_position() {
    let cases: usize = std::env::var("KEYWARD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("KEYWARD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b65_7977);
    let corpus = inputs();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for case in 0..cases {
        let (file, text) = &corpus[rng.random_range(0..corpus.len())];
        let (kind, mutated) = mutate(&mut rng, text);
        *kinds.entry(kind).or_default() += 1;
        if let Err(e) = check(
            dir.path(),
            &format!("case {case} ({kind} of {file})"),
            &mutated,
        ) {
            let keep = dir.path().join(format!("failing-{case}.yaml"));
            let _ = std::fs::write(&keep, &mutated);
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    eprintln!("config fuzz: {cases} cases, seed {seed}, {kinds:?}");
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(kinds.len() >= 10, "every mutation ran: {kinds:?}");
}
