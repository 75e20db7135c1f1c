//! Sinks: where a newly minted secret is delivered before anything else happens to it. The
//! document (product contract §7) is built here; `file` writes it atomically and durably with
//! mode 0600, `exec` hands it to a program on stdin. Delivery either fully succeeds or returns an
//! error that never contains the secret.

pub mod exec;
pub mod file;

use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::{SinkConfig, SinkKind};
use crate::model::{KeyKind, ProviderType};

/// Everything a sink receives about a new key. `Debug` never shows the secret.
pub struct SinkDocument {
    pub provider: String,
    pub provider_type: ProviderType,
    pub team: Option<String>,
    pub user: String,
    pub user_id: String,
    pub slot: String,
    pub kind: KeyKind,
    pub key_id: String,
    pub secret: SecretString,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub rotate_after: Option<Timestamp>,
}

impl std::fmt::Debug for SinkDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkDocument")
            .field("provider", &self.provider)
            .field("user", &self.user)
            .field("slot", &self.slot)
            .field("key_id", &self.key_id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

#[derive(Serialize)]
struct JsonDocument<'a> {
    provider: &'a str,
    provider_type: ProviderType,
    #[serde(skip_serializing_if = "Option::is_none")]
    team: Option<&'a str>,
    user: &'a str,
    user_id: &'a str,
    slot: &'a str,
    kind: KeyKind,
    key_id: &'a str,
    secret: &'a str,
    created_at: Timestamp,
    expires_at: Option<Timestamp>,
    rotate_after: Option<Timestamp>,
}

impl SinkDocument {
    /// The JSON document (the one place the secret is exposed for serialization).
    pub fn to_json(&self) -> String {
        let doc = JsonDocument {
            provider: &self.provider,
            provider_type: self.provider_type,
            team: self.team.as_deref(),
            user: &self.user,
            user_id: &self.user_id,
            slot: &self.slot,
            kind: self.kind,
            key_id: &self.key_id,
            secret: self.secret.expose_secret(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            rotate_after: self.rotate_after,
        };
        let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        text.push('\n');
        text
    }

    /// `KEYWARD_KEY_ID=…` and `KEYWARD_SECRET=…` lines.
    pub fn to_env(&self) -> String {
        format!(
            "KEYWARD_KEY_ID={}\nKEYWARD_SECRET={}\n",
            self.key_id,
            self.secret.expose_secret()
        )
    }

    /// Fills `{provider} {user} {slot} {key_id}` in a path or argument.
    pub fn fill(&self, template: &str) -> Result<String, String> {
        fill(
            template,
            &self.provider,
            &self.user,
            &self.slot,
            &self.key_id,
        )
    }
}

/// Fills `{provider} {user} {slot} {key_id}` in a path or argument. A value that could escape
/// a directory (`/`, `..`, NUL) is refused rather than written somewhere unexpected.
pub fn fill(
    template: &str,
    provider: &str,
    user: &str,
    slot: &str,
    key_id: &str,
) -> Result<String, String> {
    let mut out = template.to_string();
    for (name, value) in [
        ("{provider}", provider),
        ("{user}", user),
        ("{slot}", slot),
        ("{key_id}", key_id),
    ] {
        if out.contains(name) {
            if value.is_empty() || value == "." || value == ".." || value.contains(['/', '\0']) {
                return Err(format!(
                    "cannot put {name} = {value:?} into a path: it is empty or contains `/`, `..` or NUL"
                ));
            }
            out = out.replace(name, value);
        }
    }
    Ok(out)
}

/// Whether a sink verifiably holds the secret of `key_id` now: a `json` or `env` file naming
/// it. Raw files and programs cannot be asked, so they never count as holding it.
pub fn holds(sink: &SinkConfig, provider: &str, user: &str, slot: &str, key_id: &str) -> bool {
    let SinkKind::File { path, format } = &sink.kind else {
        return false;
    };
    let Ok(path) = fill(path, provider, user, slot, key_id) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    match format {
        crate::config::SinkFormat::Json => serde_json::from_str::<serde_json::Value>(&text)
            .is_ok_and(|v| {
                v["key_id"] == key_id && v["secret"].as_str().is_some_and(|s| !s.is_empty())
            }),
        crate::config::SinkFormat::Env => text
            .lines()
            .any(|l| l == format!("KEYWARD_KEY_ID={key_id}")),
        crate::config::SinkFormat::Raw => false,
    }
}

/// Delivers `doc` to one sink.
pub async fn deliver(sink: &SinkConfig, doc: &SinkDocument) -> anyhow::Result<()> {
    match &sink.kind {
        SinkKind::File { path, format } => file::deliver(path, *format, doc).await,
        SinkKind::Exec { command, timeout } => exec::deliver(command, *timeout, doc).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn doc() -> SinkDocument {
        SinkDocument {
            provider: "ngrok-prod".into(),
            provider_type: ProviderType::Ngrok,
            team: None,
            user: "ci-deployer".into(),
            user_id: "bot_1".into(),
            slot: "deploy".into(),
            kind: KeyKind::ApiKey,
            key_id: "ak_1".into(),
            secret: SecretString::from("s3cr3t-value".to_string()),
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            expires_at: None,
            rotate_after: Some("2026-12-22T10:00:00Z".parse().unwrap()),
        }
    }

    #[test]
    fn json_document_has_every_field() {
        let v: serde_json::Value = serde_json::from_str(&doc().to_json()).unwrap();
        assert_eq!(v["provider"], "ngrok-prod");
        assert_eq!(v["provider_type"], "ngrok");
        assert_eq!(v["secret"], "s3cr3t-value");
        assert_eq!(v["kind"], "api_key");
        assert!(v["expires_at"].is_null());
        assert_eq!(v["rotate_after"], "2026-12-22T10:00:00Z");
        assert!(v.get("team").is_none());
    }

    #[test]
    fn debug_hides_secret() {
        assert!(!format!("{:?}", doc()).contains("s3cr3t"));
    }

    #[test]
    fn fill_refuses_traversal() {
        let mut d = doc();
        assert_eq!(
            d.fill("/x/{provider}/{user}/{slot}.json").unwrap(),
            "/x/ngrok-prod/ci-deployer/deploy.json"
        );
        d.user = "../etc".into();
        assert!(d.fill("/x/{user}").is_err());
        d.user = "..".into();
        assert!(d.fill("/x/{user}").is_err());
    }
}
