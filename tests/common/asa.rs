//! Okta ASA helpers for the integration tests: a config with an `asa` provider (and the ngrok
//! `ng` one) at the sandbox, the ASA sinks, and direct calls to the emulated ASA API (service
//! tokens, users, keys following `Link` headers) and its `/_sandbox/asa/` support endpoints.

use serde_json::{Value, json};

use super::{Sandbox, Workspace};

/// Adds the ASA credentials the config refers to (`ASA_TEAM`, `ASA_KEY_ID`, `ASA_KEY_SECRET`).
pub fn workspace(sb: &Sandbox) -> Workspace {
    let mut ws = Workspace::new(sb);
    ws.env.push(("ASA_TEAM".into(), sb.asa_team.clone()));
    ws.env.push(("ASA_KEY_ID".into(), sb.asa_key_id.clone()));
    ws.env
        .push(("ASA_KEY_SECRET".into(), sb.asa_key_secret.clone()));
    ws
}

/// Writes `keyward.yaml` with the providers `asa` (okta-asa) and `ng` (ngrok) at the sandbox,
/// the json file sink `local`, state under `state/`, then `users_yaml`.
pub fn write_config(ws: &Workspace, settings_extra: &str, users_yaml: &str) {
    let text = format!(
        "version: 1
settings:
  state_dir: state
{settings_extra}providers:
  asa:
    type: okta-asa
    team: ${{ASA_TEAM}}
    key_id: ${{ASA_KEY_ID}}
    key_secret: ${{ASA_KEY_SECRET}}
    base_url: ${{KEYWARD_SANDBOX_URL}}
    rate_limit: 100000/1s
  ng:
    type: ngrok
    api_key: ${{NGROK_API_KEY}}
    base_url: ${{KEYWARD_SANDBOX_URL}}
    rate_limit: 100000/1s
sinks:
  local:
    type: file
    path: secrets/{{provider}}/{{user}}/{{slot}}.json
    format: json
defaults:
  sink: local
{users_yaml}"
    );
    std::fs::write(ws.config_path(), text).unwrap();
}

/// The JSON document the `local` sink holds for an ASA slot.
pub fn sink(ws: &Workspace, user: &str, slot: &str) -> Value {
    let p = ws.path(&format!("secrets/asa/{user}/{slot}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn agent() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// A client of the emulated ASA team, authenticated as the bootstrap admin.
pub struct Asa<'a> {
    pub sb: &'a Sandbox,
    token: String,
}

impl<'a> Asa<'a> {
    pub fn new(sb: &'a Sandbox) -> Asa<'a> {
        let (status, body) = service_token(sb, &sb.asa_key_id, &sb.asa_key_secret);
        assert_eq!(status, 200, "admin service_token: {body}");
        Asa {
            sb,
            token: body["bearer_token"].as_str().unwrap().to_string(),
        }
    }

    fn team_url(&self, rest: &str) -> String {
        format!("{}/v1/teams/{}{rest}", self.sb.url, self.sb.asa_team)
    }

    /// (status, Link header, JSON body) of an authenticated call; `path` is below the team or a
    /// full URL.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else if path.starts_with("/v1/") {
            format!("{}{path}", self.sb.url)
        } else {
            self.team_url(path)
        };
        let mut rb = agent()
            .request(method.parse().unwrap(), url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().expect("ASA request");
        let status = resp.status().as_u16();
        let link = resp
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().unwrap_or_default();
        (
            status,
            link,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    /// Every item of a list, following `rel="next"` links.
    pub fn list(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(p) = next {
            let (status, link, body) = self.call("GET", &p, None);
            assert_eq!(status, 200, "list {p}: {body}");
            let items = body["list"]
                .as_array()
                .unwrap_or_else(|| panic!("ASA list has no `list` array: {body}"));
            out.extend(items.iter().cloned());
            next = link.and_then(|l| {
                l.split(',')
                    .find(|part| part.contains("rel=\"next\""))
                    .and_then(|part| {
                        let start = part.find('<')? + 1;
                        let end = part.find('>')?;
                        Some(part[start..end].to_string())
                    })
            });
        }
        out
    }

    pub fn user(&self, name: &str) -> Option<Value> {
        let (status, _, body) = self.call("GET", &format!("/service_users/{name}"), None);
        (status == 200).then_some(body)
    }

    pub fn users(&self) -> Vec<Value> {
        self.list("/service_users")
    }

    pub fn keys(&self, user: &str) -> Vec<Value> {
        self.list(&format!("/service_users/{user}/keys"))
    }
}

/// `POST service_token` with a key pair: (status, body).
pub fn service_token(sb: &Sandbox, key_id: &str, secret: &str) -> (u16, Value) {
    let resp = agent()
        .post(format!("{}/v1/teams/{}/service_token", sb.url, sb.asa_team))
        .json(&json!({"key_id": key_id, "key_secret": secret}))
        .send()
        .expect("service_token");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// Whether a sink document's `key_id` + `secret` mint a token.
pub fn secret_works(sb: &Sandbox, doc: &Value) -> bool {
    service_token(
        sb,
        doc["key_id"].as_str().unwrap(),
        doc["secret"].as_str().unwrap(),
    )
    .0 == 200
}

fn support(sb: &Sandbox, method: &str, path: &str, body: Value) -> Value {
    let resp = agent()
        .request(method.parse().unwrap(), format!("{}{path}", sb.url))
        .json(&body)
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().unwrap()
}

/// `POST /_sandbox/asa/seed`.
pub fn seed(sb: &Sandbox, doc: Value) -> Value {
    support(sb, "POST", "/_sandbox/asa/seed", doc)
}

/// `PUT /_sandbox/asa/settings`.
pub fn settings(sb: &Sandbox, doc: Value) -> Value {
    support(sb, "PUT", "/_sandbox/asa/settings", doc)
}

/// `POST /_sandbox/asa/expire`: the key expires now.
pub fn expire(sb: &Sandbox, key_id: &str) {
    support(
        sb,
        "POST",
        "/_sandbox/asa/expire",
        json!({"key_id": key_id}),
    );
}

/// Requests the sandbox counted for one ASA route template, e.g. `POST /v1/teams/{team}/service_token`.
pub fn route_count(sb: &Sandbox, route: &str) -> u64 {
    sb.stats()["by_route"][route].as_u64().unwrap_or(0)
}
