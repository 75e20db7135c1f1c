//! Conformance of `keyward-sandbox` with the official ngrok Python client (`ngrok-api==0.19.0`),
//! plus start-up and shutdown behaviour of the real binary.
//!
//! The Python client is a hard requirement: if `import ngrok` fails the test fails and says how
//! to install it, rather than skipping silently (CI installs it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `keyward-sandbox` child, killed on drop.
struct SandboxProcess {
    child: Child,
    url: String,
    key: String,
    header: String,
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
                .expect("keyward-sandbox printed fewer than 3 start-up lines")
                .expect("read stdout")
        };
        let header = next();
        let url_line = next();
        let key_line = next();
        let url = url_line
            .strip_prefix("KEYWARD_SANDBOX_URL=")
            .unwrap_or_else(|| panic!("unexpected line {url_line:?}"))
            .to_owned();
        let key = key_line
            .strip_prefix("NGROK_API_KEY=")
            .unwrap_or_else(|| panic!("unexpected line {key_line:?}"))
            .to_owned();
        SandboxProcess {
            child,
            url,
            key,
            header,
        }
    }

    /// Runs `python3 ARGS` with the sandbox's URL and key in the environment and fails the test,
    /// showing the script's output, unless it succeeds.
    fn run_python(&self, args: &[&str]) {
        let out = Command::new("python3")
            .args(args)
            .env("KEYWARD_SANDBOX_URL", &self.url)
            .env("NGROK_API_KEY", &self.key)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python3 {args:?} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
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
    sandbox.run_python(&[concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/ngrok_client.py"
    )]);
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
        "import os, ngrok\n\
         c = ngrok.Client(os.environ['NGROK_API_KEY'], base_url=os.environ['KEYWARD_SANDBOX_URL'])\n\
         users = list(c.service_users.list())\n\
         assert [(u.name, u.active, u.created_at) for u in users] == [('seeded', False, '2024-01-02T03:04:05Z')], users\n\
         keys = [k for k in c.api_keys.list() if k.owner_id == users[0].id]\n\
         assert [(k.description, k.created_at) for k in keys] == [('old', '2024-01-03T00:00:00Z')], keys\n",
    ]);
}
