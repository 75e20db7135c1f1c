//! `keyward demo` (built with the `demo` feature): the quick start runs every step against its
//! in-process sandbox and ends with nothing left to do, whatever sandbox address and key the
//! caller's environment holds.

#![cfg(feature = "demo")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_runs_every_step_against_its_own_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped config, where its relative state and secret paths land inside `dir`.
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let config = dir.path().join("config/sandbox.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/sandbox.yaml"),
        &config,
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("demo")
        .arg("-c")
        .arg(&config)
        .current_dir(dir.path())
        // A sandbox that does not exist: the steps must use the demo's own.
        .env("KEYWARD_SANDBOX_URL", "http://127.0.0.1:9")
        .env("NGROK_API_KEY", "not-the-demo-key")
        .env("NO_COLOR", "1")
        .env_remove("KEYWARD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("keyward demo did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "$ keyward plan\n",
        "$ keyward apply --auto-approve\n",
        "$ keyward status\n",
        "$ keyward rotate ci-deployer --auto-approve\n",
        "$ keyward plan --detailed-exitcode\n",
    ] {
        assert!(stdout.contains(step), "{step:?} missing:\n{stdout}");
    }
    assert!(stdout.contains("No changes."), "{stdout}");
    assert!(!stderr.contains("not-the-demo-key"), "{stderr}");
    let secret = dir
        .path()
        .join(".keyward/sandbox/secrets/sandbox/ci-deployer/deploy.json");
    assert!(
        secret.is_file(),
        "no secret delivered at {}",
        secret.display()
    );
}
