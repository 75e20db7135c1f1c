//! Shared harness for the integration tests: starts the real `keyward-sandbox` binary on a
//! loopback port, writes config files into a temporary directory, runs the real `keyward`
//! binary against them, and talks to the sandbox's API directly to check what happened.
#![allow(dead_code)]

pub mod asa;
pub mod crash;
pub mod pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::{Value, json};

/// A running `keyward-sandbox` process, killed on drop.
pub struct Sandbox {
    child: Child,
    pub url: String,
    pub admin_key: String,
    /// The emulated Okta ASA team and its bootstrap admin key (`ASA_*` start-up lines).
    pub asa_team: String,
    pub asa_key_id: String,
    pub asa_key_secret: String,
}

impl Sandbox {
    pub fn start(args: &[&str]) -> Sandbox {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyward-sandbox"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start keyward-sandbox");
        let stdout = child.stdout.take().expect("sandbox stdout");
        let mut url = None;
        let mut key = None;
        let (mut asa_team, mut asa_key_id, mut asa_key_secret) = (None, None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read sandbox stdout");
            if let Some(v) = line.strip_prefix("KEYWARD_SANDBOX_URL=") {
                url = Some(v.to_string());
            }
            if let Some(v) = line.strip_prefix("NGROK_API_KEY=") {
                key = Some(v.to_string());
            }
            if let Some(v) = line.strip_prefix("ASA_TEAM=") {
                asa_team = Some(v.to_string());
            }
            if let Some(v) = line.strip_prefix("ASA_KEY_ID=") {
                asa_key_id = Some(v.to_string());
            }
            if let Some(v) = line.strip_prefix("ASA_KEY_SECRET=") {
                asa_key_secret = Some(v.to_string());
            }
            if url.is_some() && key.is_some() && asa_key_secret.is_some() {
                break;
            }
        }
        Sandbox {
            child,
            url: url.expect("sandbox printed its URL"),
            admin_key: key.expect("sandbox printed its admin key"),
            asa_team: asa_team.expect("sandbox printed ASA_TEAM"),
            asa_key_id: asa_key_id.expect("sandbox printed ASA_KEY_ID"),
            asa_key_secret: asa_key_secret.expect("sandbox printed ASA_KEY_SECRET"),
        }
    }

    fn agent() -> reqwest::blocking::Client {
        reqwest::blocking::Client::new()
    }

    /// Calls the ngrok API with `token`; returns (status, body).
    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.url, path)
        };
        let mut rb = Self::agent()
            .request(method.parse().unwrap(), url)
            .bearer_auth(token)
            .header("ngrok-version", "2");
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().expect("sandbox request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(&self.admin_key, method, path, body)
    }

    /// Every item of a list endpoint, following `next_page_uri`.
    pub fn list(&self, path: &str, key: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = format!("{}{}", self.url, path);
        loop {
            let (status, page) = self.api("GET", &next, None);
            assert_eq!(status, 200, "list {path}: {page}");
            let items = page[key]
                .as_array()
                .unwrap_or_else(|| panic!("list {path}: no `{key}` array in {page}"));
            out.extend(items.iter().cloned());
            match page["next_page_uri"].as_str() {
                Some(n) => next = n.to_string(),
                None => break,
            }
        }
        out
    }

    pub fn user_by_name(&self, name: &str) -> Option<Value> {
        self.list("/service_users", "service_users")
            .into_iter()
            .find(|u| u["name"] == name)
    }

    /// Whether a secret from a sink works: API keys call the API, authtokens are checked by
    /// the sandbox's verifier.
    pub fn secret_works(&self, kind: &str, secret: &str) -> bool {
        if kind == "api_key" {
            self.api_as(secret, "GET", "/api_keys?limit=1", None).0 == 200
        } else {
            let resp = Self::agent()
                .post(format!("{}/_sandbox/verify", self.url))
                .json(&json!({"token": secret}))
                .send()
                .expect("verify");
            resp.status().as_u16() == 200
        }
    }

    pub fn stats(&self) -> Value {
        Self::agent()
            .get(format!("{}/_sandbox/stats", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn reset_stats(&self) {
        Self::agent()
            .post(format!("{}/_sandbox/stats/reset", self.url))
            .send()
            .unwrap();
    }

    pub fn set_faults(&self, faults: Value) {
        let r = Self::agent()
            .put(format!("{}/_sandbox/faults", self.url))
            .json(&faults)
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }

    pub fn seed(&self, doc: Value) -> Value {
        let r = Self::agent()
            .post(format!("{}/_sandbox/ngrok/seed", self.url))
            .json(&doc)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "seed failed: {}", r.status());
        r.json().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A sandbox that died under a test shows up as "connection refused"; say why it died.
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!("keyward-sandbox had exited before the test ended: {status}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory holding a config file, its state and its sinks.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Workspace {
    pub fn new(sandbox: &Sandbox) -> Workspace {
        Workspace {
            dir: tempfile::tempdir().unwrap(),
            env: vec![
                ("KEYWARD_SANDBOX_URL".into(), sandbox.url.clone()),
                ("NGROK_API_KEY".into(), sandbox.admin_key.clone()),
            ],
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("keyward.yaml")
    }

    /// Writes `keyward.yaml`: the ngrok provider `ng` at the sandbox, a json file sink
    /// `local` under `secrets/`, state under `state/`, then `users_yaml` (the `users:` list and
    /// anything after it).
    pub fn write_config(&self, settings_extra: &str, users_yaml: &str) {
        let text = format!(
            "version: 1\nsettings:\n  state_dir: state\n{settings_extra}providers:\n  ng:\n    type: ngrok\n    api_key: ${{NGROK_API_KEY}}\n    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: 100000/1s\nsinks:\n  local:\n    type: file\n    path: secrets/{{provider}}/{{user}}/{{slot}}.json\n    format: json\ndefaults:\n  sink: local\n{users_yaml}"
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn keyward(&self, args: &[&str]) -> Output {
        self.keyward_stdin(args, Stdio::null())
    }

    pub fn keyward_stdin(&self, args: &[&str], stdin: Stdio) -> Output {
        let mut cmd = self.command(args);
        cmd.arg("-c").arg(self.config_path()).stdin(stdin);
        cmd.output().expect("run keyward")
    }

    /// The `keyward` command with `args`, run in the workspace with its environment (no
    /// `KEYWARD_CONFIG`, no colour) and no `-c`: the caller adds what it needs.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(args)
            .env_remove("KEYWARD_CONFIG")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn sink(&self, user: &str, slot: &str) -> Value {
        let p = self.path(&format!("secrets/ng/{user}/{slot}.json"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// The state as one JSON document (`keyward state show`); empty when it cannot be read.
    pub fn state_text(&self) -> String {
        let out = self.keyward(&["state", "show"]);
        if out.status.success() {
            text(&out.stdout)
        } else {
            String::new()
        }
    }

    /// Every file under the workspace except the sinks, for leak checks.
    pub fn non_sink_files(&self) -> Vec<(PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    if p.file_name().is_some_and(|n| n == "secrets") {
                        continue;
                    }
                    walk(&p, out);
                } else if let Ok(t) = std::fs::read_to_string(&p) {
                    out.push((p, t));
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a command exited with `code`, showing its output otherwise.
pub fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}\n--- stdout\n{}\n--- stderr\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

impl Workspace {
    /// Like [`Workspace::write_config`], with `sinks_extra` (indented sink definitions, e.g. an
    /// exec sink) added under `sinks:` after `local`.
    pub fn write_config_with_sinks(
        &self,
        settings_extra: &str,
        sinks_extra: &str,
        users_yaml: &str,
    ) {
        let text = format!(
            "version: 1\nsettings:\n  state_dir: state\n{settings_extra}providers:\n  ng:\n    type: ngrok\n    api_key: ${{NGROK_API_KEY}}\n    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: 100000/1s\nsinks:\n  local:\n    type: file\n    path: secrets/{{provider}}/{{user}}/{{slot}}.json\n    format: json\n{sinks_extra}defaults:\n  sink: local\n{users_yaml}"
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// `status --json`'s `keys` entries.
    pub fn status_keys(&self) -> Vec<Value> {
        let out = self.keyward(&["status", "--json"]);
        expect_code(&out, 0, "status --json");
        let doc: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
        doc["keys"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("status --json has no `keys` array: {doc}"))
    }

    /// `plan --json` as a document (exit 0 required: no `--detailed-exitcode`).
    pub fn plan_json(&self) -> Value {
        let out = self.keyward(&["plan", "--json"]);
        expect_code(&out, 0, "plan --json");
        serde_json::from_slice(&out.stdout).expect("plan --json is one JSON document")
    }
}

impl Sandbox {
    /// Ids of every ngrok API key and credential owned by the service user `name` (empty when
    /// the user does not exist).
    pub fn key_ids_of(&self, name: &str) -> std::collections::BTreeSet<String> {
        let Some(user) = self.user_by_name(name) else {
            return Default::default();
        };
        self.list("/api_keys", "keys")
            .into_iter()
            .chain(self.list("/credentials", "credentials"))
            .filter(|k| k["owner_id"] == user["id"])
            .filter_map(|k| k["id"].as_str().map(str::to_string))
            .collect()
    }
}

/// A plan document's `changes`.
pub fn changes(plan: &Value) -> Vec<Value> {
    plan["changes"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("the plan has no `changes` array: {plan}"))
}

/// A plan document's `warnings`.
pub fn warnings(plan: &Value) -> Vec<Value> {
    plan["warnings"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("the plan has no `warnings` array: {plan}"))
}

/// A loopback port nobody listens on now (for a metrics listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
