//! Sinks: where a newly minted secret is delivered before anything else happens to it. The
//! document (product contract §7) is built here; `file` writes it atomically and durably with
//! mode 0600, `exec` hands it to a program on stdin. Delivery either fully succeeds or returns an
//! error that never contains the secret.

pub mod exec;
pub mod file;

use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::{SinkConfig, SinkKind};
use crate::model::{KeyKind, ProviderType};

/// Everything a sink receives about a new key. `Debug` never shows the secret.
pub struct SinkDocument {
    /// The provider account's name in the config.
    pub provider: String,
    /// `ngrok` or `okta-asa`.
    pub provider_type: ProviderType,
    /// The Okta ASA team; `None` for ngrok.
    pub team: Option<String>,
    /// The service user's name.
    pub user: String,
    /// The service user's id at the provider.
    pub user_id: String,
    /// The key slot.
    pub slot: String,
    /// API key or credential.
    pub kind: KeyKind,
    /// The new key's id at the provider.
    pub key_id: String,
    /// The new key's secret.
    pub secret: SecretString,
    /// When the provider created the key.
    pub created_at: Timestamp,
    /// When the key expires at the provider (Okta ASA); `None`: never.
    pub expires_at: Option<Timestamp>,
    /// `created_at + rotate_every`, when the slot has `rotate_every`: when the key is next due by
    /// age.
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
    /// The JSON document (the one place the secret is exposed for serialization), zeroized
    /// when dropped. An error only if serialization failed (never delivered half-made).
    pub fn to_json(&self) -> Result<Zeroizing<String>, serde_json::Error> {
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
        let mut text = Zeroizing::new(serde_json::to_string_pretty(&doc)?);
        text.push('\n');
        Ok(text)
    }

    /// `KEYWARD_KEY_ID=…` and `KEYWARD_SECRET=…` lines, zeroized when dropped.
    pub fn to_env(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "KEYWARD_KEY_ID={}\nKEYWARD_SECRET={}\n",
            self.key_id,
            self.secret.expose_secret()
        ))
    }

    /// The secret alone and a newline (`format: raw`), zeroized when dropped.
    pub fn to_raw(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(self.secret.expose_secret().len() + 1));
        s.push_str(self.secret.expose_secret());
        s.push('\n');
        s
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

use crate::text::fits_placeholder;

/// Fills `{provider} {user} {slot} {key_id}` in a path or argument. A value that could escape
/// a directory (`/`, `..`, NUL) or holds a control character is refused rather than written
/// somewhere unexpected.
pub fn fill(
    template: &str,
    provider: &str,
    user: &str,
    slot: &str,
    key_id: &str,
) -> Result<String, String> {
    let values = [
        ("{provider}", provider),
        ("{user}", user),
        ("{slot}", slot),
        ("{key_id}", key_id),
    ];
    // One pass over the template: a value is never read again as a template, so a user named
    // `{slot}` is that name, not the slot's.
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    'scan: while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        for (name, value) in values {
            if rest[i..].starts_with(name) {
                if !fits_placeholder(value) {
                    return Err(format!(
                        "cannot put {name} = \"{}\" into a path or command: it is empty, `.` or `..`, or contains `/` or a control character",
                        crate::text::escape(value)
                    ));
                }
                out.push_str(value);
                rest = &rest[i + name.len()..];
                continue 'scan;
            }
        }
        out.push('{');
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a sink verifiably holds the secret of `key_id` now: a `json` or `env` file naming
/// it, that keyward could have written (a private regular file of keyward's user, not a link).
/// Raw files and programs cannot be asked, so they never count as holding it.
pub fn holds(sink: &SinkConfig, provider: &str, user: &str, slot: &str, key_id: &str) -> bool {
    let SinkKind::File { path, format } = &sink.kind else {
        return false;
    };
    let Ok(path) = fill(path, provider, user, slot, key_id) else {
        return false;
    };
    let Some(bytes) = crate::files::read_own_file(std::path::Path::new(&path)) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return false;
    };
    match format {
        crate::config::SinkFormat::Json => serde_json::from_str::<serde_json::Value>(text)
            .is_ok_and(|v| {
                v["key_id"] == key_id && v["secret"].as_str().is_some_and(|s| !s.is_empty())
            }),
        crate::config::SinkFormat::Env => text
            .lines()
            .any(|l| l.strip_prefix("KEYWARD_KEY_ID=") == Some(key_id)),
        crate::config::SinkFormat::Raw => false,
    }
}

/// Why a delivery failed, and whether trying again could help.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct SinkError {
    /// What went wrong; never contains the secret.
    pub error: anyhow::Error,
    /// True when no retry can succeed (a name a path cannot hold, a directory another user
    /// can write): the delivery fails at once instead of being retried.
    pub permanent: bool,
}

impl SinkError {
    /// A failure that retrying cannot fix.
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        SinkError {
            error: error.into(),
            permanent: true,
        }
    }

    /// A failure that may pass (a full disk, a program that failed this time).
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        SinkError {
            error: error.into(),
            permanent: false,
        }
    }
}

/// Checks, before a key is created, that `sink` can take a key of this provider, user and slot:
/// every placeholder of its path or command can be filled, and a file sink's directory, if it
/// exists, is one only keyward's user can write. Key ids are checked again at delivery (a
/// provider's id is not known before the key exists).
pub fn precheck(sink: &SinkConfig, provider: &str, user: &str, slot: &str) -> Result<(), String> {
    // A stand-in id: providers' ids are letters, digits, `_` and `-`.
    let id = "key_id";
    let checked = match &sink.kind {
        SinkKind::File { path, .. } => fill(path, provider, user, slot, id).and_then(|p| {
            match std::path::Path::new(&p).parent() {
                Some(dir) if dir.is_dir() => crate::files::check_private_dir(dir, "sink directory")
                    .map_err(|e| format!("{e:#}")),
                _ => Ok(()),
            }
        }),
        SinkKind::Exec { command, .. } => command
            .iter()
            .try_for_each(|a| fill(a, provider, user, slot, id).map(drop)),
    };
    checked.map_err(|e| format!("sink {}: {e}", sink.name))
}

/// The file a file sink writes for `doc` (`None` for an exec sink, or a path that cannot be
/// filled).
pub fn file_path(sink: &SinkConfig, doc: &SinkDocument) -> Option<std::path::PathBuf> {
    match &sink.kind {
        SinkKind::File { path, .. } => doc.fill(path).ok().map(std::path::PathBuf::from),
        SinkKind::Exec { .. } => None,
    }
}

/// Delivers `doc` to one sink, fenced by `fence` (the state lock's lease). A file is replaced
/// only if the fence passes right before; a program starts only if it passes, and with `watch`
/// (a lease that can lapse while the program runs: a shared store) is stopped once it fails
/// (see [`exec::deliver`]).
pub async fn deliver(
    sink: &SinkConfig,
    doc: &SinkDocument,
    fence: &crate::files::Fence,
    watch: bool,
) -> Result<(), SinkError> {
    match &sink.kind {
        SinkKind::File { path, format } => file::deliver(path, *format, doc, fence).await,
        SinkKind::Exec { command, timeout } => {
            fence().map_err(SinkError::permanent)?;
            exec::deliver(command, *timeout, doc, watch.then_some(fence)).await
        }
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
        let v: serde_json::Value = serde_json::from_str(&doc().to_json().unwrap()).unwrap();
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
    fn documents_are_zeroized_when_dropped() {
        // The type says it: every serialized form of a sink document wipes itself.
        fn zeroizing(_: &Zeroizing<String>) {}
        let d = doc();
        zeroizing(&d.to_json().unwrap());
        zeroizing(&d.to_env());
        zeroizing(&d.to_raw());
    }

    #[test]
    fn holds_reads_only_files_keyward_could_have_written() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let sink = SinkConfig {
            name: "local".into(),
            kind: SinkKind::File {
                path: format!("{}/{{user}}.json", tmp.path().display()),
                format: crate::config::SinkFormat::Json,
            },
        };
        let planted = tmp.path().join("elsewhere.json");
        std::fs::write(&planted, r#"{"key_id":"ak_1","secret":"x"}"#).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A link planted where the sink file goes does not count as holding the key.
        std::os::unix::fs::symlink(&planted, tmp.path().join("u.json")).unwrap();
        assert!(!holds(&sink, "ng", "u", "s", "ak_1"));
        // Nor does a file others can read or write.
        let open = tmp.path().join("v.json");
        std::fs::write(&open, r#"{"key_id":"ak_1","secret":"x"}"#).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!holds(&sink, "ng", "v", "s", "ak_1"));
        // The file keyward writes does.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(holds(&sink, "ng", "v", "s", "ak_1"));
        assert!(!holds(&sink, "ng", "v", "s", "ak_2"));
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
        d.user = "a\nb".into();
        assert!(d.fill("/x/{user}").is_err());
        // A value is never read again as a template: a user named `{slot}` stays that name.
        d.user = "{slot}".into();
        assert_eq!(d.fill("/x/{user}/{slot}").unwrap(), "/x/{slot}/deploy");
        d.user = "{key_id}{".into();
        assert_eq!(d.fill("{{user}}").unwrap(), "{{key_id}{}");
    }
}
