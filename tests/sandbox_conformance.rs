//! Conformance of `keyward-sandbox` with the official ngrok Python client (`ngrok-api==0.19.0`),
//! with an independent suite for its Okta ASA half written from the provider documentation only
//! (`tests/conformance/asa_api.py`, plain Python 3), plus start-up and shutdown behaviour of the
//! real binary.
//!
//! The Python client is a hard requirement: if `import ngrok` fails the test fails and says how
//! to install it, rather than skipping silently (CI installs it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

const NGROK_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/conformance/ngrok_client.py"
);
const ASA_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/asa_api.py");

/// A running `keyward-sandbox` child, killed on drop.
struct SandboxProcess {
    child: Child,
    url: String,
    key: String,
    header: String,
    asa_team: String,
    asa_key_id: String,
    asa_key_secret: String,
}

impl SandboxProcess {
    fn spawn(args: &[&str]) -> SandboxProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyward-sandbox"))
            .args(args)
            // Keep test output readable; errors still reach stderr.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keyward-sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut next = || {
            lines
                .next()
                .expect("keyward-sandbox printed fewer than 6 start-up lines")
                .expect("read stdout")
        };
        let header = next();
        let mut value = |prefix: &str| {
            let line = next();
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected a line starting {prefix:?}, got {line:?}"))
                .to_owned()
        };
        let url = value("KEYWARD_SANDBOX_URL=");
        let key = value("NGROK_API_KEY=");
        let asa_team = value("ASA_TEAM=");
        let asa_key_id = value("ASA_KEY_ID=");
        let asa_key_secret = value("ASA_KEY_SECRET=");
        SandboxProcess {
            child,
            url,
            key,
            header,
            asa_team,
            asa_key_id,
            asa_key_secret,
        }
    }

    /// Runs `python3 ARGS` with the sandbox's start-up values (and `env`) in the environment.
    fn python(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("python3")
            .args(args)
            .env("KEYWARD_SANDBOX_URL", &self.url)
            .env("NGROK_API_KEY", &self.key)
            .env("ASA_TEAM", &self.asa_team)
            .env("ASA_KEY_ID", &self.asa_key_id)
            .env("ASA_KEY_SECRET", &self.asa_key_secret)
            // Only what a test asks for: an inherited switch must not change a run.
            .env_remove("KEYWARD_CONFORMANCE_SELF_TEST")
            .env_remove("ASA_KEY_GRACE_SECONDS")
            .envs(env.iter().copied())
            .output()
            .expect("run python3")
    }

    /// Runs `python3 ARGS` (see [`Self::python`]) and fails the test, showing the script's
    /// output, unless it succeeds.
    fn run_python(&self, args: &[&str]) {
        let out = self.python(args, &[]);
        assert!(
            out.status.success(),
            "python3 {args:?} failed ({})\n{}",
            out.status,
            show(&out)
        );
    }

    /// Sends SIGTERM and returns the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success());
        self.child.wait().expect("wait for keyward-sandbox")
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        // Already reaped after terminate(); otherwise make sure no server outlives the test.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn python_has_ngrok_client() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import ngrok, requests"])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn official_python_client_accepts_the_sandbox() {
    if let Err(e) = python_has_ngrok_client() {
        panic!(
            "the ngrok conformance test needs the official Python client: run `pip install ngrok-api==0.19.0`\n{e}"
        );
    }
    let sandbox = SandboxProcess::spawn(&["--listen", "127.0.0.1:0", "--rng-seed", "42"]);
    sandbox.run_python(&[NGROK_SCRIPT]);
    let status = sandbox.terminate();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
}

#[test]
fn startup_lines_are_shell_evaluable_and_honour_the_admin_key() {
    let key = "2gsqN2WBce1G43nvDIcQSk7fgvS_59G1nFjCYtpoGt8Fp41Fm";
    let sandbox = SandboxProcess::spawn(&["--admin-key", key, "--latency", "1ms"]);
    assert_eq!(
        sandbox.header,
        "# keyward-sandbox: ngrok emulator listening"
    );
    assert!(
        sandbox.url.starts_with("http://127.0.0.1:"),
        "{}",
        sandbox.url
    );
    assert!(!sandbox.url.ends_with('/'));
    assert_eq!(sandbox.key, key);
    let status = sandbox.terminate();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
}

#[test]
fn refuses_non_loopback_without_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyward-sandbox"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .expect("run keyward-sandbox");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout when refusing");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-non-loopback"));
}

#[test]
fn seed_file_is_loaded_at_startup() {
    if let Err(e) = python_has_ngrok_client() {
        panic!("this test needs `pip install ngrok-api==0.19.0`\n{e}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seed.json");
    std::fs::write(
        &path,
        r#"{"service_users":[{"name":"seeded","active":false,"created_at":"2024-01-02T03:04:05Z"}],
            "api_keys":[{"owner_name":"seeded","description":"old","created_at":"2024-01-03T00:00:00Z"}]}"#,
    )
    .expect("write seed");
    let sandbox = SandboxProcess::spawn(&["--seed", path.to_str().expect("utf-8 path")]);
    sandbox.run_python(&[
        "-c",
        // Explicit checks, not `assert`, so that PYTHONOPTIMIZE cannot turn them off.
        "import os, sys, ngrok\n\
         c = ngrok.Client(os.environ['NGROK_API_KEY'], base_url=os.environ['KEYWARD_SANDBOX_URL'])\n\
         users = list(c.service_users.list())\n\
         if [(u.name, u.active, u.created_at) for u in users] != [('seeded', False, '2024-01-02T03:04:05Z')]: sys.exit(f'unexpected users {users}')\n\
         keys = [k for k in c.api_keys.list() if k.owner_id == users[0].id]\n\
         if [(k.description, k.created_at) for k in keys] != [('old', '2024-01-03T00:00:00Z')]: sys.exit(f'unexpected keys {keys}')\n",
    ]);
}

/// The ASA half of the sandbox against a suite written from the Okta ASA documentation alone
/// (`/work/shared/spec/asa-api.md` and the raw docs), not from keyward's code. A full pass needs two
/// sandboxes: the documented 2-day key grace with a 2 s token lifetime (so token expiry can be
/// waited out), and a 5 s key grace (so key expiry can be waited out); they run side by side.
#[test]
fn asa_api_matches_the_documentation() {
    let documented = SandboxProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--asa-token-lifetime",
        "2s",
        "--asa-key-grace",
        "48h",
    ]);
    let short_grace = SandboxProcess::spawn(&["--listen", "127.0.0.1:0", "--asa-key-grace", "5s"]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| documented.python(&[ASA_SCRIPT], &[]));
        let b = s.spawn(|| short_grace.python(&[ASA_SCRIPT], &[("ASA_KEY_GRACE_SECONDS", "5")]));
        (
            a.join().expect("documented-grace run"),
            b.join().expect("short-grace run"),
        )
    });
    for (what, out) in [("2-day grace, 2s tokens", a), ("5s grace", b)] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(" passed, 0 failed"),
            "asa_api.py ({what}) failed ({})\n{}",
            out.status,
            show(&out)
        );
    }
    for sandbox in [documented, short_grace] {
        let status = sandbox.terminate();
        assert!(status.success(), "SIGTERM should exit 0, got {status}");
    }
}

/// Both conformance scripts use explicit checks, not `assert`: with `PYTHONOPTIMIZE=2` (which
/// strips asserts) and one deliberately broken expectation, each must still report that check
/// as failed and exit non-zero.
#[test]
fn conformance_checks_survive_pythonoptimize() {
    if let Err(e) = python_has_ngrok_client() {
        panic!("this test needs `pip install ngrok-api==0.19.0`\n{e}");
    }
    let sandbox = SandboxProcess::spawn(&["--listen", "127.0.0.1:0", "--rng-seed", "42"]);
    let env = [
        ("PYTHONOPTIMIZE", "2"),
        ("KEYWARD_CONFORMANCE_SELF_TEST", "1"),
    ];
    for script in [NGROK_SCRIPT, ASA_SCRIPT] {
        let out = sandbox.python(&[script], &env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        assert!(
            !out.status.success()
                && stdout.contains("self_test.must_fail")
                && last.ends_with(" passed, 1 failed"),
            "{script} under PYTHONOPTIMIZE=2 with KEYWARD_CONFORMANCE_SELF_TEST=1 should fail exactly \
             the self-test check and exit non-zero ({})\n{}",
            out.status,
            show(&out)
        );
    }
    let status = sandbox.terminate();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
}
