//! The configuration file (version 1): its resolved model, which the rest of keyward consumes,
//! and the loader that turns a YAML file into it with every problem reported as
//! `FILE:LINE:COL: message`. Parsing, `${VAR}` interpolation, `*_file` secrets, defaults and
//! validation live here; nothing here touches the network.

mod interp;
pub mod mask;
mod raw;
mod resolve;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use jiff::SignedDuration;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use raw::Pos;
use resolve::{Ctx, Diags};

pub use crate::model::{KeyKind, ProviderType};
pub use crate::rotation::{Policy, Schedule};

/// A problem found in a config file, located at a line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        // One line whatever the file holds: a message quotes names and values from it.
        write!(
            f,
            "{}:{}:{}: {}{}",
            crate::text::escape(&self.file.display().to_string()),
            self.line,
            self.column,
            sev,
            crate::text::escape(&self.message)
        )
    }
}

/// A fully loaded and validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes (hex): the daemon reloads only when this changes.
    pub digest: String,
    pub settings: Settings,
    /// Provider accounts by name.
    pub providers: BTreeMap<String, ProviderAccount>,
    /// Sinks by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Declared users in file order, defaults applied to every slot.
    pub users: Vec<UserSpec>,
    pub prune: Prune,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// `settings.state_dir`, else `$STATE_DIRECTORY`, else `./.keyward`.
    pub state_dir: PathBuf,
    /// Daemon full resync period (default 5m).
    pub interval: SignedDuration,
    pub mode: Mode,
    /// Max in-flight requests per provider account (default 8).
    pub concurrency: usize,
    /// An apply that would delete more objects than this is refused (default 10).
    pub max_deletions: usize,
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Observe,
}

/// A client-side request budget: at most `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: SignedDuration,
}

#[derive(Debug, Clone)]
pub struct ProviderAccount {
    pub name: String,
    pub kind: ProviderType,
    /// Without a trailing slash. Defaults: `https://api.ngrok.com`, `https://app.scaleft.com`.
    pub base_url: String,
    /// Default `100/60s` for ngrok (the account shares 120 requests a minute); ASA default
    /// `600/60s`.
    pub rate_limit: RateLimit,
    pub auth: ProviderAuth,
}

#[derive(Debug, Clone)]
pub enum ProviderAuth {
    Ngrok {
        api_key: SecretString,
    },
    OktaAsa {
        team: String,
        key_id: String,
        key_secret: SecretString,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// `path` may hold the placeholders `{provider} {user} {slot} {key_id}`.
    File { path: String, format: SinkFormat },
    /// argv with the same placeholders; the JSON document goes to stdin.
    Exec {
        command: Vec<String>,
        timeout: SignedDuration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    Json,
    Env,
    Raw,
}

#[derive(Debug, Clone)]
pub struct UserSpec {
    pub provider: String,
    pub name: String,
    /// Default true.
    pub active: bool,
    /// Key slots by name, with `defaults` applied.
    pub slots: BTreeMap<String, SlotSpec>,
    /// Where the user is declared (for messages).
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlotSpec {
    pub name: String,
    /// Default `api_key`.
    pub kind: KeyKind,
    /// ngrok only; keyward's own default description when absent.
    pub description: Option<String>,
    /// ngrok credentials only.
    pub acl: Vec<String>,
    pub rotate_every: Option<SignedDuration>,
    /// The cron schedule (5 or 6 fields), parsed once with its time zone.
    pub schedule: Option<Schedule>,
    /// IANA zone name for `schedule`; default `UTC`.
    pub timezone: String,
    /// Default 24h.
    pub overlap: SignedDuration,
    /// Sink names, at least one, all defined.
    pub sinks: Vec<String>,
}

impl SlotSpec {
    /// The slot's rotation policy, for the due-time engine.
    pub fn policy(&self) -> Policy<'_> {
        Policy {
            kind: self.kind,
            rotate_every: self.rotate_every,
            schedule: self.schedule.as_ref(),
            overlap: self.overlap,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    pub users: PruneUsers,
    pub unknown_keys: PruneKeys,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneUsers {
    Keep,
    Disable,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneKeys {
    Report,
    Revoke,
}

/// A config that loaded, with the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Diagnostic>,
}

/// Reads, interpolates and validates the file at `path`, taking `${VAR}` and
/// `$STATE_DIRECTORY` from the process environment. On failure returns every diagnostic found
/// (errors and warnings), not just the first.
pub fn load(path: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// [`load`] with the environment given as a lookup function (tests, and callers that must not
/// read the process environment).
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let mut d = Diags::new(path);
    let config = load_into(path, env, &mut d);
    let mut list = d.list;
    list.sort_by_key(|x| (x.line, x.column));
    // The same warning can be reached from several slots (a `defaults` field they share).
    list.dedup();
    match config {
        Some(config) if !list.iter().any(|x| x.severity == Severity::Error) => Ok(Loaded {
            config,
            warnings: list,
        }),
        _ => Err(list),
    }
}

fn load_into(path: &Path, env: &dyn Fn(&str) -> Option<String>, d: &mut Diags) -> Option<Config> {
    let bytes = match crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, true) {
        Ok(b) => b,
        Err(e) => {
            d.error(Pos::new(1, 1), format!("cannot read the config file: {e}"));
            return None;
        }
    };
    let digest = hex::encode(Sha256::digest(&bytes));
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            d.error(Pos::new(line, column), "the file is not valid UTF-8");
            return None;
        }
    };
    let blank = text
        .trim_start_matches('\u{feff}')
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        d.error(
            Pos::new(1, 1),
            "the file is empty; a keyward config starts with `version: 1`",
        );
        return None;
    }

    let (parsed, problems) = yaml::parse(text);
    for p in problems {
        d.error(p.pos, p.message);
    }
    let parsed = parsed?;
    // Absolute, so that the resolved paths stay right whatever the working directory is
    // later (std::path::absolute touches no file system).
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
    let mut ctx = Ctx {
        dir: &dir,
        env,
        broken: &parsed.broken,
        d,
    };
    let config = ctx.config(&parsed.raw, path, digest);
    (!parsed.broken.any).then_some(config)
}

/// The JSON Schema of the config file, for editors.
pub fn schema() -> serde_json::Value {
    let schema = schemars::schema_for!(raw::RawConfig);
    serde_json::to_value(&schema).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(line: usize, column: usize, severity: Severity, message: &str) -> Diagnostic {
        Diagnostic {
            file: PathBuf::from("etc/keyward.yaml"),
            line,
            column,
            severity,
            message: message.to_string(),
        }
    }

    #[test]
    fn diagnostics_render_as_file_line_col() {
        assert_eq!(
            diag(3, 7, Severity::Error, "bad").to_string(),
            "etc/keyward.yaml:3:7: bad"
        );
        assert_eq!(
            diag(1, 1, Severity::Warning, "hm").to_string(),
            "etc/keyward.yaml:1:1: warning: hm"
        );
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keyward.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn diagnostics_come_sorted_by_position() {
        let (_dir, path) = write(
            "version: 1\nsinks:\n  s: {type: exec, command: [x], timeout: 1x}\nsettings: {interval: 2y, concurrency: 0}\n",
        );
        let errs = load_with_env(&path, &|_| None).expect_err("invalid");
        let at: Vec<(usize, usize)> = errs.iter().map(|d| (d.line, d.column)).collect();
        let mut sorted = at.clone();
        sorted.sort();
        assert_eq!(at, sorted);
        assert_eq!(at.len(), 3, "{errs:?}");
    }

    #[test]
    fn missing_version_is_reported_at_the_top() {
        let (_dir, path) = write("settings: {mode: observe}\n");
        let errs = load_with_env(&path, &|_| None).expect_err("invalid");
        assert_eq!((errs[0].line, errs[0].column), (1, 1));
        assert!(errs[0].message.contains("version: 1"), "{errs:?}");
    }

    #[test]
    fn provider_defaults_and_trailing_slash() {
        let (_dir, path) = write(
            "version: 1\nproviders:\n  asa: {type: okta-asa, team: t, key_id: k, key_secret: \"${S}\", base_url: \"https://acme.pam.okta.com/\"}\n",
        );
        let env = |n: &str| (n == "S").then(|| "x".to_string());
        let loaded = load_with_env(&path, &env).expect("valid");
        let p = &loaded.config.providers["asa"];
        assert_eq!(p.base_url, "https://acme.pam.okta.com");
        assert_eq!(p.rate_limit.requests, 600);
        assert_eq!(p.kind, ProviderType::OktaAsa);
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn digest_is_sha256_of_the_bytes() {
        let (_dir, path) = write("version: 1\n");
        let loaded = load_with_env(&path, &|_| None).expect("valid");
        assert_eq!(
            loaded.config.digest,
            hex::encode(Sha256::digest(b"version: 1\n"))
        );
    }
}
