//! The `keyward` binary's own surface: `validate` on the broken-config corpus (exit 1, every
//! problem as `FILE:LINE:COL: message` on stderr, never a panic), `schema`, `completions`, and
//! `rotate` target resolution — all without a network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{expect_code, text};

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(name)
}

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env_remove("KEYWARD_CONFIG")
        .env("NGROK_API_KEY", "cli-test-ngrok-key-value")
        .env("ASA_KEY_ID", "kid")
        .env("ASA_KEY_SECRET", "cli-test-asa-secret-value")
        .env("KEYWARD_SANDBOX_URL", "http://127.0.0.1:9")
        .env("NO_COLOR", "1")
        .output()
        .expect("run keyward")
}

/// The `# expect: L:C message` lines at the top of a corpus file.
fn expected(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|rest| {
            let (at, msg) = rest.split_once(' ').unwrap();
            (at.to_string(), msg.to_string())
        })
        .collect()
}

/// The `# warn: L:C message` lines at the top of a corpus file.
fn warned(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# warn: "))
        .map(|rest| {
            let (at, msg) = rest.split_once(' ').unwrap();
            (at.to_string(), msg.to_string())
        })
        .collect()
}

#[test]
fn validate_reports_each_broken_file_with_position_and_exit_1() {
    // Every corpus file that declares errors, through the binary (the library test reads the
    // same files in-process).
    let mut names: Vec<String> = std::fs::read_dir(corpus(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .filter(|n| !expected(&corpus(n)).is_empty())
        .collect();
    names.sort();
    assert!(names.len() >= 15, "the corpus is there: {names:?}");
    for name in &names {
        let name = name.as_str();
        let path = corpus(name);
        let out = keyward(&["validate", "-c", path.to_str().unwrap()]);
        expect_code(&out, 1, name);
        for (at, msg) in warned(&path) {
            let prefix = format!("{}:{at}: warning: ", path.display());
            assert!(
                text(&out.stderr)
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(&msg)),
                "{name}: no warning {prefix}{msg}\n{}",
                text(&out.stderr)
            );
        }
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{name}: {err}");
        let want = expected(&path);
        assert!(!want.is_empty(), "{name} declares its expected errors");
        for (at, msg) in want {
            let prefix = format!("{}:{at}: ", path.display());
            let line = err.lines().find(|l| l.starts_with(&prefix));
            let line = line.unwrap_or_else(|| panic!("{name}: no line starting {prefix}\n{err}"));
            assert!(line.contains(&msg), "{name}: `{line}` lacks `{msg}`");
        }
        assert!(
            text(&out.stdout).is_empty(),
            "{name}: diagnostics belong on stderr"
        );
    }
}

#[test]
fn validate_empty_file_is_an_error_at_1_1() {
    let path = corpus("empty.yaml");
    let out = keyward(&["validate", "-c", path.to_str().unwrap()]);
    expect_code(&out, 1, "empty");
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:1:1: ", path.display())), "{err}");
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn validate_missing_env_var_names_it() {
    let path = corpus("missing-env.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["validate", "-c", path.to_str().unwrap()])
        .env_clear()
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    expect_code(&out, 1, "missing env");
    let err = text(&out.stderr);
    for (at, msg) in expected(&path) {
        assert!(err.contains(&format!("{}:{at}: ", path.display())), "{err}");
        assert!(err.contains(&msg), "{err}");
    }
}

#[test]
fn validate_accepts_a_good_file_and_warns_on_inline_secret() {
    let ok = keyward(&[
        "validate",
        "-c",
        corpus("ok-minimal.yaml").to_str().unwrap(),
    ]);
    expect_code(&ok, 0, "ok-minimal");
    // "invalid" contains "valid": match the whole verdict.
    let verdict = text(&ok.stdout);
    assert!(verdict.contains(": valid ("), "{verdict}");
    assert!(
        !verdict.contains("invalid") && !verdict.contains("not valid"),
        "{verdict}"
    );
    let inline = keyward(&[
        "validate",
        "-c",
        corpus("inline-secret.yaml").to_str().unwrap(),
    ]);
    expect_code(&inline, 0, "inline secret is only a warning");
    assert!(
        text(&inline.stderr).contains("warning:"),
        "{}",
        text(&inline.stderr)
    );
    assert!(
        text(&inline.stderr).contains("api_key"),
        "{}",
        text(&inline.stderr)
    );
}

#[test]
fn schema_is_json_and_completions_print() {
    let out = keyward(&["schema"]);
    expect_code(&out, 0, "schema");
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(schema["properties"]["users"].is_object(), "{schema}");
    let out = keyward(&["completions", "bash"]);
    expect_code(&out, 0, "completions");
    assert!(text(&out.stdout).contains("keyward"));
}

#[test]
fn rotate_targets_resolve_or_fail_without_rotating() {
    // A real account, so that a rotation that should not happen could happen.
    let sb = common::Sandbox::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.yaml");
    std::fs::write(
        &cfg,
        format!("version: 1\nsettings: {{state_dir: state}}\nproviders:\n  a: {{type: ngrok, api_key: '${{NGROK_API_KEY}}', base_url: '{url}', rate_limit: 1000/1s}}\n  b: {{type: ngrok, api_key: '${{NGROK_API_KEY}}', base_url: '{url}', rate_limit: 1000/1s}}\nsinks:\n  s: {{type: file, path: \"out/{{user}}\"}}\ndefaults: {{sink: s}}\nusers:\n  - {{provider: a, name: twin, keys: {{k: {{}}}}}}\n  - {{provider: b, name: twin2, keys: {{k: {{}}}}}}\n  - {{provider: a, name: solo, keys: {{k: {{}}}}}}\n", url = sb.url),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .args(["-c", c])
            .env_remove("KEYWARD_CONFIG")
            .env("NGROK_API_KEY", &sb.admin_key)
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .output()
            .expect("run keyward")
    };
    // Everything exists and is delivered first: a rotation would now mint a new key.
    expect_code(&run(&["apply", "--auto-approve"]), 0, "apply");
    let keys_before = sb.key_ids_of("solo");
    assert_eq!(keys_before.len(), 1);
    let delivered = std::fs::read_to_string(dir.path().join("out/solo")).unwrap();
    let out = run(&["rotate", "nobody", "--auto-approve"]);
    expect_code(&out, 1, "unknown user");
    assert!(text(&out.stderr).contains("no user nobody"));
    let out = run(&["rotate", "solo/nope", "--auto-approve"]);
    expect_code(&out, 1, "unknown slot");
    assert!(text(&out.stderr).contains("no slot nope"));
    let out = run(&["rotate", "solo", "nobody", "--auto-approve"]);
    expect_code(&out, 1, "one good and one unknown target");
    assert_eq!(sb.key_ids_of("solo"), keys_before, "nothing was rotated");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/solo")).unwrap(),
        delivered,
        "nothing was delivered"
    );
    // The same account and config do rotate when the target is right.
    expect_code(
        &run(&["rotate", "solo", "--auto-approve"]),
        0,
        "rotate solo",
    );
    assert_ne!(sb.key_ids_of("solo"), keys_before, "a good target rotates");
}

#[test]
fn rotate_an_ambiguous_user_lists_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.yaml");
    std::fs::write(
        &cfg,
        "version: 1\nproviders:\n  a: {type: ngrok, api_key: '${NGROK_API_KEY}', base_url: 'http://127.0.0.1:9'}\n  b: {type: ngrok, api_key: '${NGROK_API_KEY}', base_url: 'http://127.0.0.1:9'}\nsinks:\n  s: {type: file, path: \"out/{user}\"}\ndefaults: {sink: s}\nusers:\n  - {provider: a, name: twin, keys: {k: {}}}\n  - {provider: b, name: twin, keys: {k: {}}}\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let out = keyward(&["rotate", "twin", "-c", c, "--auto-approve"]);
    expect_code(&out, 1, "ambiguous user");
    let err = text(&out.stderr);
    assert!(err.contains("a:twin") && err.contains("b:twin"), "{err}");
}
