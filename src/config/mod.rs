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
    /// The config file the problem is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Whether the problem stops the config from loading.
    pub severity: Severity,
    /// What is wrong, in one line.
    pub message: String,
}

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The config is refused.
    Error,
    /// The config loads; the problem is reported (e.g. a secret written literally in the file).
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
    /// SHA-256 over the file's bytes and every included file's path and bytes (hex): the daemon
    /// reloads only when this changes (see [`digest_of`]).
    pub digest: String,
    /// The files `include:` matched, in the order their users were read.
    pub included: Vec<PathBuf>,
    /// The `include:` patterns, absolute: what the daemon watches for new and edited files.
    pub include_patterns: Vec<String>,
    /// The `include:` patterns (as written) that match no file: while there is one, no user is
    /// pruned (a typo, or a directory emptied for a moment, must not delete a fleet).
    pub include_unmatched: Vec<String>,
    /// How keyward itself runs (`settings`).
    pub settings: Settings,
    /// Provider accounts by name.
    pub providers: BTreeMap<String, ProviderAccount>,
    /// Sinks by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Declared users in file order, defaults applied to every slot.
    pub users: Vec<UserSpec>,
    /// What to do with managed objects that left the file (`prune`).
    pub prune: Prune,
    /// `defaults.overlap` (default 24h): how long the keys of a slot that left the file stay
    /// valid before they are revoked.
    pub default_overlap: SignedDuration,
    /// `defaults.sink`: the sinks of a slot that names none (what `keyward import`'s slots get).
    pub default_sinks: Vec<String>,
}

/// How keyward itself runs: the `settings` section, defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `settings.state_dir`, else `$STATE_DIRECTORY`, else `./.keyward`. With a `state_url` it
    /// keeps only the page marks of listings (a cache).
    pub state_dir: PathBuf,
    /// `settings.state_url` (or the content of `state_url_file`): the PostgreSQL database that
    /// holds the state, the journal and the lock; `None`: the state directory does.
    pub state_url: Option<secrecy::SecretString>,
    /// Daemon full resync period (default 5m).
    pub interval: SignedDuration,
    /// Daemon: the share of each account's `rate_limit` (percent, 1–100; default 50) that the
    /// full listing at every `interval` may use.
    pub resync_share: u8,
    /// Daemon: whether a reconcile changes the providers or only plans and reports (default
    /// `apply`).
    pub mode: Mode,
    /// Max in-flight requests per provider account (default 8).
    pub concurrency: usize,
    /// An apply that would delete more objects than this is refused (default 10).
    pub max_deletions: usize,
    /// Daemon: the `IP:PORT` of the Prometheus `/metrics` listener; `None`: no listener.
    pub metrics: Option<SocketAddr>,
    /// `settings.metrics_per_key` (default true): one series per key besides the aggregates.
    pub metrics_per_key: bool,
    /// `settings.owner`: the installation's name in the tag of the ngrok keys it creates
    /// (default [`crate::model::KeyTag::DEFAULT_OWNER`]).
    pub owner: String,
}

/// What the daemon does with the plan of each reconcile (`settings.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Execute the plan: the providers are changed.
    Apply,
    /// Only plan and report; nothing is changed at a provider.
    Observe,
}

/// A client-side request budget: at most `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per period.
    pub requests: u32,
    /// The period.
    pub per: SignedDuration,
}

/// A provider account under `providers`: where keyward manages service users, and how it
/// authenticates there.
#[derive(Debug, Clone)]
pub struct ProviderAccount {
    /// The account's name in the file (referenced by `users[].provider`).
    pub name: String,
    /// Which provider API the account is at (`type`).
    pub kind: ProviderType,
    /// Without a trailing slash. Defaults: `https://api.ngrok.com`, `https://app.scaleft.com`.
    pub base_url: String,
    /// Default `100/60s` for ngrok (the account shares 120 requests a minute); ASA default
    /// `600/60s`.
    pub rate_limit: RateLimit,
    /// The credential keyward authenticates with.
    pub auth: ProviderAuth,
}

/// The credential keyward holds for a provider account; the secret is never shown.
#[derive(Debug, Clone)]
pub enum ProviderAuth {
    /// An ngrok account.
    Ngrok {
        /// The ngrok API key (`api_key` or `api_key_file`).
        api_key: SecretString,
    },
    /// An Okta ASA team.
    OktaAsa {
        /// The ASA team name; the service token's `team_name` must match it.
        team: String,
        /// The API key id of the service user keyward authenticates as.
        key_id: String,
        /// That API key's secret (`key_secret` or `key_secret_file`).
        key_secret: SecretString,
    },
}

/// A sink under `sinks`: where a newly minted secret is delivered before the key it replaces is
/// revoked.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// The sink's name in the file (referenced by a slot's `sink`).
    pub name: String,
    /// How the secret is delivered.
    pub kind: SinkKind,
}

impl SinkConfig {
    /// Whether its path (file) or any argument (exec) holds `placeholder`, e.g. `{user}`.
    pub fn uses(&self, placeholder: &str) -> bool {
        match &self.kind {
            SinkKind::File { path, .. } => path.contains(placeholder),
            SinkKind::Exec { command, .. } => command.iter().any(|a| a.contains(placeholder)),
        }
    }
}

impl Config {
    /// The declared users by (provider account, name), indexed once: for work whose size
    /// follows something else than the config (a journal's operations, say).
    pub fn users_by_name(&self) -> std::collections::HashMap<(&str, &str), &UserSpec> {
        self.users
            .iter()
            .map(|u| ((u.provider.as_str(), u.name.as_str()), u))
            .collect()
    }
}

/// The two ways a sink delivers a secret.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// `path` may hold the placeholders `{provider} {user} {slot} {key_id}`.
    File {
        /// The file to write, with placeholders; absolute (a relative path in the file is
        /// resolved against the config file's directory).
        path: String,
        /// What is written.
        format: SinkFormat,
    },
    /// argv with the same placeholders; the JSON document goes to stdin.
    Exec {
        /// The program and its arguments (no shell).
        command: Vec<String>,
        /// How long the program may run before its process group is killed (default 30s).
        timeout: SignedDuration,
    },
}

/// What a file sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    /// The JSON sink document (the default).
    Json,
    /// `KEYWARD_KEY_ID=` and `KEYWARD_SECRET=` lines.
    Env,
    /// The secret alone.
    Raw,
}

/// A declared service user (an entry of `users`), with its key slots.
#[derive(Debug, Clone)]
pub struct UserSpec {
    /// The provider account it lives at (a key of [`Config::providers`]).
    pub provider: String,
    /// The user's name at the provider: unique per provider account.
    pub name: String,
    /// Default true.
    pub active: bool,
    /// Key slots by name, with `defaults` applied. Shared between users whose slots resolve
    /// alike (a `names:` entry's users, or a fleet's entries with one key layout): a fleet of
    /// 100,000 users holds a handful of maps, not one each.
    pub slots: Slots,
    /// The file the user is declared in (the config file, or an included one).
    pub file: std::sync::Arc<Path>,
    /// Where the user is declared (for messages).
    pub line: usize,
}

/// A user's key slots by name (see [`UserSpec::slots`]).
pub type Slots = std::sync::Arc<BTreeMap<String, Box<SlotSpec>>>;

/// A key slot of a declared user: one key kept current, rotated by its policy, its secret delivered
/// to its sinks.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSpec {
    /// The slot's name, unique on its user.
    pub name: String,
    /// Default `api_key`.
    pub kind: KeyKind,
    /// ngrok only; keyward's own default description when absent.
    pub description: Option<String>,
    /// ngrok credentials only.
    pub acl: Vec<String>,
    /// Rotate when the current key is older than this.
    pub rotate_every: Option<SignedDuration>,
    /// The cron schedule (5 or 6 fields), parsed once with its time zone.
    pub schedule: Option<Schedule>,
    /// IANA zone name for `schedule`; default `UTC`.
    pub timezone: String,
    /// Default 24h.
    pub overlap: SignedDuration,
    /// `spread` (default 0s): the window due times are spread over.
    pub spread: SignedDuration,
    /// This slot's fixed share of `spread` (0 ≤ offset < spread), derived from provider, user
    /// and slot: its due times are pushed back (provider expiry: pulled forward) by it.
    pub spread_offset: SignedDuration,
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
            spread: self.spread,
            spread_offset: self.spread_offset,
        }
    }
}

/// What to do with objects keyward manages that are no longer in the file (`prune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Users keyward created that left the file (default `keep`).
    pub users: PruneUsers,
    /// Keys on a managed user that keyward did not create (default `report`).
    pub unknown_keys: PruneKeys,
}

/// What happens to a user keyward created once it leaves the file (`prune.users`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneUsers {
    /// Leave it as it is (the default).
    Keep,
    /// Deactivate it (ngrok `active=false`, ASA status `DISABLED`).
    Disable,
    /// Delete it at the provider (ASA: soft and irreversible, the name stays reserved).
    Delete,
}

/// What happens to a key on a managed user that keyward did not create (`prune.unknown_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneKeys {
    /// Show it in the plan and `status`, and leave it (the default).
    Report,
    /// Revoke it.
    Revoke,
}

/// A config that loaded, with the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The resolved config.
    pub config: Config,
    /// Warnings found while loading (none is an error).
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
    let (patterns, unmatched, included, included_ok) = includes(&parsed.raw, &dir, path, env, d);
    let files: Vec<(&Path, &[u8])> = included
        .iter()
        .map(|i| (i.path.as_ref(), i.bytes.as_slice()))
        .collect();
    let digest = digest(&bytes, &files);
    let users: Vec<(std::sync::Arc<Path>, Vec<raw::Sp<raw::RawUser>>)> =
        included.into_iter().map(|i| (i.path, i.users)).collect();
    let mut ctx = Ctx {
        dir: &dir,
        env,
        broken: &parsed.broken,
        d,
    };
    let mut config = ctx.config(&parsed.raw, &users, patterns, path, digest);
    config.include_unmatched = unmatched;
    (!parsed.broken.any && included_ok).then_some(config)
}

/// The most files `include:` may bring in, all patterns together.
pub const MAX_INCLUDED_FILES: usize = 10_000;

/// One file an `include:` pattern matched: its users, and its bytes (for the digest).
struct Included {
    path: std::sync::Arc<Path>,
    bytes: Vec<u8>,
    users: Vec<raw::Sp<raw::RawUser>>,
}

/// The files matched by `raw.include`'s patterns (relative to `dir`), read and parsed, each
/// problem reported against the file that has it. Returns the absolute patterns, the patterns
/// (as written) that match no file, the files in order (the config file itself never includes
/// itself), and whether all of them parsed.
fn includes(
    raw: &raw::RawConfig,
    dir: &Path,
    main: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    d: &mut Diags,
) -> (Vec<String>, Vec<String>, Vec<Included>, bool) {
    let Some(list) = &raw.include else {
        return (Vec::new(), Vec::new(), Vec::new(), true);
    };
    let mut unmatched = Vec::new();
    let mut patterns = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut ok = true;
    for p in list.v() {
        let text = match interp::expand(p.v(), env) {
            Ok(e) => e.text,
            Err(msg) => {
                d.error(p.pos(), msg);
                ok = false;
                continue;
            }
        };
        if text.trim().is_empty() {
            d.error(p.pos(), "include pattern is empty");
            ok = false;
            continue;
        }
        let pattern = dir.join(&text).to_string_lossy().into_owned();
        match expand_pattern(&pattern, main) {
            Ok(found) if found.is_empty() => {
                let what = if std::path::Path::new(&pattern).is_dir() {
                    "matches only a directory (include the files in it, e.g. `DIR/*.yaml`)"
                } else {
                    "matches no file"
                };
                d.warn(
                    p.pos(),
                    format!("include `{text}` {what}: no user is pruned while it does"),
                );
                unmatched.push(text.clone());
            }
            Ok(found) => files.extend(found),
            Err(e) => {
                d.error(p.pos(), format!("include `{text}`: {e}"));
                ok = false;
            }
        }
        patterns.push(pattern);
    }
    if files.len() > MAX_INCLUDED_FILES {
        d.error(
            list.pos(),
            format!(
                "include matches {} files, more than {MAX_INCLUDED_FILES}",
                files.len()
            ),
        );
        return (patterns, unmatched, Vec::new(), false);
    }
    let main_file = d.file().to_path_buf();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for file in files {
        // Two patterns may match the same file: it is read once.
        if !seen.insert(file.clone()) {
            continue;
        }
        d.set_file(&file);
        match include_one(&file, d) {
            Some((bytes, users)) => out.push(Included {
                path: std::sync::Arc::from(file.as_path()),
                bytes,
                users,
            }),
            None => ok = false,
        }
        d.set_file(&main_file);
    }
    (patterns, unmatched, out, ok)
}

/// The files `pattern` (absolute) matches, in name order, without `main` and without
/// directories.
fn expand_pattern(pattern: &str, main: &Path) -> Result<Vec<PathBuf>, String> {
    let main = std::fs::canonicalize(main).ok();
    let paths = glob::glob(pattern).map_err(|e| format!("invalid pattern: {}", e.msg))?;
    let mut out = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| e.to_string())?;
        if path.is_dir() || std::fs::canonicalize(&path).ok() == main {
            continue;
        }
        out.push(path);
    }
    Ok(out)
}

/// Reads and parses one included file; problems are reported against it. `None` when it cannot
/// be used.
fn include_one(file: &Path, d: &mut Diags) -> Option<(Vec<u8>, Vec<raw::Sp<raw::RawUser>>)> {
    let bytes = match crate::files::read_bounded(file, crate::files::MAX_CONFIG_BYTES, true) {
        Ok(b) => b,
        Err(e) => {
            d.error(
                Pos::new(1, 1),
                format!("cannot read the included file: {e}"),
            );
            return None;
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        d.error(Pos::new(1, 1), "the included file is not valid UTF-8");
        return None;
    };
    let (parsed, problems) = yaml::parse(text);
    let broken = !problems.is_empty();
    for p in problems {
        d.error(p.pos, p.message);
    }
    let parsed = parsed?;
    let r = &parsed.raw;
    let extra: Vec<&str> = [
        ("version", r.version.is_some()),
        ("include", r.include.is_some()),
        ("settings", r.settings.is_some()),
        ("providers", r.providers.is_some()),
        ("sinks", r.sinks.is_some()),
        ("defaults", r.defaults.is_some()),
        ("prune", r.prune.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if !extra.is_empty() {
        d.error(
            Pos::new(1, 1),
            format!(
                "an included file holds only `users:`; `{}` belongs in the config file",
                extra.join("`, `")
            ),
        );
        return None;
    }
    if broken || parsed.broken.any {
        return None;
    }
    Some((bytes, parsed.raw.users.unwrap_or_default()))
}

/// The config's digest: SHA-256 over its bytes, then each included file's path and bytes.
fn digest(main: &[u8], included: &[(&Path, &[u8])]) -> String {
    let mut h = Sha256::new();
    h.update(main);
    for (path, bytes) in included {
        h.update(b"\0include\0");
        h.update(path.as_os_str().as_encoded_bytes());
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

/// The digest [`load`] would give the config at `path` now, with the `include:` patterns of its
/// last good load, without parsing anything: the daemon compares it after every event in a
/// watched directory. `None` when the file cannot be read.
pub fn digest_of(path: &Path, patterns: &[String]) -> Option<String> {
    let main = crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, true).ok()?;
    let mut files = Vec::new();
    for p in patterns {
        for f in expand_pattern(p, path).unwrap_or_default() {
            let bytes = crate::files::read_bounded(&f, crate::files::MAX_CONFIG_BYTES, true)
                .unwrap_or_default();
            files.push((f, bytes));
        }
    }
    let refs: Vec<(&Path, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_path(), b.as_slice()))
        .collect();
    Some(digest(&main, &refs))
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
    fn digest_of_gives_the_digest_load_gives_included_files_and_all() {
        let (dir, path) = write("version: 1\ninclude: [\"users.d/*.yaml\"]\nusers: []\n");
        std::fs::create_dir(dir.path().join("users.d")).unwrap();
        std::fs::write(dir.path().join("users.d/a.yaml"), "users: []\n").unwrap();
        let loaded = load_with_env(&path, &|_| None).expect("valid");
        let patterns = &loaded.config.include_patterns;
        assert_eq!(
            digest_of(&path, patterns).as_deref(),
            Some(loaded.config.digest.as_str())
        );
        // An edit of the included file alone changes it.
        std::fs::write(dir.path().join("users.d/a.yaml"), "users: [] # edited\n").unwrap();
        assert_ne!(
            digest_of(&path, patterns).as_deref(),
            Some(loaded.config.digest.as_str())
        );
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
