//! From the raw, positioned config to the resolved [`Config`]: `${VAR}` interpolation, `*_file`
//! secrets, defaults, and every semantic check, each problem recorded at the line and column
//! of the value it is about. Checks never stop at the first problem: each one records what it
//! found and carries on with a fallback value, so one run reports everything; the resolved
//! config is only handed out when no error was recorded.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::SignedDuration;
use secrecy::SecretString;

use super::raw::{
    Named, Pos, RawConfig, RawKeyKind, RawMode, RawPolicy, RawProvider, RawProviderType,
    RawPruneKeys, RawPruneUsers, RawSettings, RawSink, RawSinkFormat, RawSinkType, RawSlot,
    RawUser, SinkNames, Sp,
};
use super::yaml::Broken;
use super::{
    Config, Diagnostic, KeyKind, Mode, ProviderAccount, ProviderAuth, ProviderType, Prune,
    PruneKeys, PruneUsers, RateLimit, Schedule, Settings, Severity, SinkConfig, SinkFormat,
    SinkKind, SlotSpec, Slots, UserSpec,
};
use crate::duration;

/// ASA expires the keys a rotation replaced two days after it: an overlap longer than this
/// cannot be honoured.
const ASA_MAX_OVERLAP: SignedDuration = SignedDuration::from_hours(48);

/// The most requests in flight per account `concurrency` may ask for (providers throttle far
/// below this).
const MAX_CONCURRENCY: usize = 1024;

/// The placeholders sink paths and commands may hold.
const PLACEHOLDERS: &[&str] = &["provider", "user", "slot", "key_id"];

/// Collects diagnostics for one file.
pub struct Diags {
    file: PathBuf,
    /// The config file itself (where `defaults` are written).
    main: PathBuf,
    pub list: Vec<Diagnostic>,
    /// The warnings given so far: one written in `defaults` or a `names:` entry and met by
    /// every user it covers is given once.
    warned: std::collections::HashSet<(PathBuf, usize, usize, String)>,
}

impl Diags {
    pub fn new(file: &Path) -> Diags {
        Diags {
            file: file.to_path_buf(),
            main: file.to_path_buf(),
            list: Vec::new(),
            warned: std::collections::HashSet::new(),
        }
    }

    fn push(&mut self, pos: Pos, severity: Severity, message: String) {
        self.list.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            severity,
            message,
        });
    }

    /// The file diagnostics name now.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Names `file` in the diagnostics from now on (an included file's problems).
    pub fn set_file(&mut self, file: &Path) {
        self.file = file.to_path_buf();
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(pos, Severity::Error, message.into());
    }

    /// A warning about a value that may come from `defaults`: given in the config file itself
    /// when it does (`own` false), else in the file being read.
    pub fn warn_where(&mut self, own: bool, pos: Pos, message: impl Into<String>) {
        if own {
            return self.warn(pos, message);
        }
        let here = std::mem::replace(&mut self.file, self.main.clone());
        self.warn(pos, message);
        self.file = here;
    }

    pub fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        let message = message.into();
        if self
            .warned
            .insert((self.file.clone(), pos.line, pos.column, message.clone()))
        {
            self.push(pos, Severity::Warning, message);
        }
    }
}

/// Everything resolution needs besides the raw config.
pub struct Ctx<'a> {
    /// The config file's directory: relative paths in the file are relative to it.
    pub dir: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub broken: &'a Broken,
    pub d: &'a mut Diags,
}

/// A policy field's value and where it was written (slot or `defaults`).
#[derive(Clone)]
struct At<T> {
    value: T,
    pos: Pos,
}

/// A key policy (of `defaults` or a slot) with each present field checked. A field that was
/// present but invalid is `None`; its error is already recorded.
#[derive(Clone, Default)]
struct Policy {
    rotate_every: Option<At<SignedDuration>>,
    schedule: Option<At<String>>,
    timezone: Option<At<String>>,
    overlap: Option<At<SignedDuration>>,
    spread: Option<At<SignedDuration>>,
    /// Present (even if some names are undefined): the slot does not fall back to defaults.
    sinks: Option<At<Vec<String>>>,
}

impl Ctx<'_> {
    /// A string value with `${VAR}` expanded; `None` (error recorded) when a variable is unset.
    fn string(&mut self, s: &Sp<String>) -> Option<String> {
        self.expand(s).map(|(text, _)| text)
    }

    /// Like [`Ctx::string`], also saying whether a variable was substituted.
    fn expand(&mut self, s: &Sp<String>) -> Option<(String, bool)> {
        match super::interp::expand(s.v(), self.env) {
            Ok(e) => Some((e.text, e.substituted)),
            Err(msg) => {
                self.d.error(s.pos(), msg);
                None
            }
        }
    }

    /// A path written in the file: expanded, and relative to the file's directory.
    fn path(&mut self, s: &Sp<String>, field: &str) -> Option<PathBuf> {
        let text = self.string(s)?;
        if text.is_empty() {
            self.d.error(s.pos(), format!("{field} is empty"));
            return None;
        }
        Some(normalize(&self.dir.join(text)))
    }

    fn duration(&mut self, s: &Sp<String>, field: &str) -> Option<SignedDuration> {
        let text = self.string(s)?;
        match duration::parse(&text) {
            Ok(d) => Some(d),
            Err(msg) => {
                self.d.error(s.pos(), format!("{field}: {msg}"));
                None
            }
        }
    }

    /// A duration that must be longer than zero (a zero period would spin).
    fn positive_duration(&mut self, s: &Sp<String>, field: &str) -> Option<SignedDuration> {
        let d = self.duration(s, field)?;
        if d.is_zero() {
            self.d
                .error(s.pos(), format!("{field} must be longer than 0s"));
            return None;
        }
        Some(d)
    }

    /// The resolved config: `raw` is the file at `path`; `included` the users of each file its
    /// `include:` patterns matched (`patterns`, absolute, for the daemon to watch), in order.
    pub fn config(
        &mut self,
        raw: &RawConfig,
        included: &[(Arc<Path>, Vec<Sp<RawUser>>)],
        patterns: Vec<String>,
        path: &Path,
        digest: String,
    ) -> Config {
        self.version(raw);
        let settings = self.settings(raw);
        let providers = self.providers(raw.providers.as_ref());
        let sinks = self.sinks(raw.sinks.as_ref());
        let defaults = match &raw.defaults {
            Some(p) => self.policy(p, &sinks),
            None => Policy::default(),
        };
        let main: Arc<Path> = Arc::from(path);
        let mut sources: Vec<(Arc<Path>, &[Sp<RawUser>])> =
            vec![(main, raw.users.as_deref().unwrap_or(&[]))];
        sources.extend(included.iter().map(|(f, u)| (Arc::clone(f), u.as_slice())));
        let users = self.users(&sources, &providers, &sinks, &defaults);
        let prune = Prune {
            users: match raw
                .prune
                .as_ref()
                .and_then(|p| p.users.as_ref())
                .map(|s| *s.v())
            {
                None | Some(RawPruneUsers::Keep) => PruneUsers::Keep,
                Some(RawPruneUsers::Disable) => PruneUsers::Disable,
                Some(RawPruneUsers::Delete) => PruneUsers::Delete,
            },
            unknown_keys: match raw
                .prune
                .as_ref()
                .and_then(|p| p.unknown_keys.as_ref())
                .map(|s| *s.v())
            {
                None | Some(RawPruneKeys::Report) => PruneKeys::Report,
                Some(RawPruneKeys::Revoke) => PruneKeys::Revoke,
            },
        };
        Config {
            default_sinks: defaults
                .sinks
                .as_ref()
                .map(|s| s.value.clone())
                .unwrap_or_default(),
            default_overlap: defaults
                .overlap
                .as_ref()
                .map(|o| o.value)
                .unwrap_or(SignedDuration::from_hours(24)),
            path: path.to_path_buf(),
            digest,
            included: included.iter().map(|(f, _)| f.to_path_buf()).collect(),
            include_patterns: patterns,
            include_unmatched: Vec::new(),
            settings,
            providers,
            sinks,
            users,
            prune,
        }
    }

    fn version(&mut self, raw: &RawConfig) {
        match &raw.version {
            None if self.broken.any => {}
            None => self.d.error(
                Pos::new(1, 1),
                "missing `version: 1`: a keyward config starts with `version: 1`",
            ),
            Some(v) if *v.v() == 1 => {}
            Some(v) => self.d.error(
                v.pos(),
                format!(
                    "unsupported version {}: this keyward reads version 1",
                    v.v()
                ),
            ),
        }
    }

    fn settings(&mut self, raw: &RawConfig) -> Settings {
        let s = raw.settings.clone().unwrap_or_default();
        let state_dir = match &s.state_dir {
            Some(p) => self.path(p, "state_dir"),
            None => None,
        }
        .or_else(|| {
            // systemd's StateDirectory= may list several directories separated by `:`;
            // keyward's is the first.
            (self.env)("STATE_DIRECTORY")
                .and_then(|v| v.split(':').next().map(str::to_string))
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("./.keyward"));
        let interval = s
            .interval
            .as_ref()
            .and_then(|i| self.positive_duration(i, "interval"))
            .unwrap_or(SignedDuration::from_mins(5));
        let resync_share = match &s.resync_share {
            None => 50,
            Some(p) => match u8::try_from(*p.v()) {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    self.d.error(
                        p.pos(),
                        format!(
                            "resync_share must be a percentage from 1 to 100 (got {})",
                            p.v()
                        ),
                    );
                    50
                }
            },
        };
        let mode = match s.mode.as_ref().map(|m| *m.v()) {
            None | Some(RawMode::Apply) => Mode::Apply,
            Some(RawMode::Observe) => Mode::Observe,
        };
        let concurrency = match &s.concurrency {
            None => 8,
            Some(c) => match usize::try_from(*c.v()) {
                Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => n,
                Ok(n) if n > MAX_CONCURRENCY => {
                    self.d.error(
                        c.pos(),
                        format!("concurrency must be at most {MAX_CONCURRENCY} (got {n})"),
                    );
                    8
                }
                _ => {
                    self.d.error(
                        c.pos(),
                        format!("concurrency must be at least 1 (got {})", c.v()),
                    );
                    8
                }
            },
        };
        let max_deletions = match &s.max_deletions {
            None => 10,
            Some(c) => match usize::try_from(*c.v()) {
                Ok(n) => n,
                Err(_) => {
                    self.d.error(
                        c.pos(),
                        format!("max_deletions must be 0 or more (got {})", c.v()),
                    );
                    10
                }
            },
        };
        let metrics = s.metrics.as_ref().and_then(|m| {
            let text = self.string(m)?;
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                // `localhost:PORT` is what people write; it means the IPv4 loopback.
                let port = text.strip_prefix("localhost:")?.parse::<u16>().ok()?;
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
            });
            if parsed.is_none() {
                self.d.error(
                    m.pos(),
                    format!(
                        "invalid metrics address `{text}`: expected IP:PORT, e.g. 127.0.0.1:9464"
                    ),
                );
            }
            if parsed.is_some_and(|a| a.port() == 0) {
                self.d.error(
                    m.pos(),
                    format!("metrics address `{text}` has port 0: Prometheus needs a fixed port to scrape"),
                );
                return None;
            }
            parsed
        });
        let owner = match &s.owner {
            None => crate::model::KeyTag::DEFAULT_OWNER.to_string(),
            Some(o) => match self.string(o) {
                Some(text) if crate::model::KeyTag::valid_owner(&text) => text,
                Some(text) => {
                    let shown: String = text.chars().take(64).collect();
                    let more = if text.chars().count() > 64 { "…" } else { "" };
                    self.d.error(
                        o.pos(),
                        format!(
                            "invalid owner `{shown}{more}`: use 1 to 64 letters, digits, `.`, `_` or `-`"
                        ),
                    );
                    crate::model::KeyTag::DEFAULT_OWNER.to_string()
                }
                None => crate::model::KeyTag::DEFAULT_OWNER.to_string(),
            },
        };
        let state_url = self.state_url(&s);
        Settings {
            state_dir,
            state_url,
            interval,
            resync_share,
            mode,
            concurrency,
            max_deletions,
            metrics,
            metrics_per_key: s.metrics_per_key.as_ref().is_none_or(|b| *b.v()),
            owner,
        }
    }

    /// `settings.state_url` or `state_url_file`, checked as a PostgreSQL URL. Diagnostics
    /// name the field (and the file), never the value: it may hold a password.
    fn state_url(&mut self, s: &RawSettings) -> Option<secrecy::SecretString> {
        use secrecy::ExposeSecret as _;
        let (inline, file) = (s.state_url.as_ref(), s.state_url_file.as_ref());
        let (url, pos) = match (inline, file) {
            (None, None) => return None,
            (Some(_), Some(f)) => {
                self.d
                    .error(f.pos(), "set either state_url or state_url_file, not both");
                return None;
            }
            (Some(v), None) => {
                let (text, substituted) = self.expand(v)?;
                let has_password = crate::pgstore::check_url(&text).is_ok()
                    && url::Url::parse(&text).is_ok_and(|u| {
                        u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password")
                    });
                if !substituted && has_password {
                    self.d.warn(
                        v.pos(),
                        "state_url holds a password written inline in the file; use ${VAR} or state_url_file",
                    );
                }
                (secrecy::SecretString::from(text), v.pos())
            }
            (None, Some(f)) => {
                let before = self.d.list.len();
                let url = self.secret(
                    "settings",
                    f.pos(),
                    ("state_url", None),
                    ("state_url_file", Some(f)),
                );
                // The file's own problem (missing, empty, unreadable) was said: once.
                if self.d.list[before..]
                    .iter()
                    .any(|d| d.severity == Severity::Error)
                {
                    return None;
                }
                (url, f.pos())
            }
        };
        if url.expose_secret().is_empty() {
            self.d.error(pos, "state_url is empty");
            return None;
        }
        if let Err(e) = crate::pgstore::check_url(url.expose_secret()) {
            self.d.error(pos, e);
            return None;
        }
        Some(url)
    }

    fn providers(&mut self, raw: Option<&Named<RawProvider>>) -> BTreeMap<String, ProviderAccount> {
        let mut out = BTreeMap::new();
        for entry in raw.map(|n| n.0.as_slice()).unwrap_or(&[]) {
            if entry.key.trim().is_empty() {
                self.d.error(entry.pos, "provider name is empty");
                continue;
            }
            if crate::text::has_control(&entry.key) {
                self.d.error(
                    entry.pos,
                    format!(
                        "provider name `{}` contains a control character",
                        crate::text::escape(&entry.key)
                    ),
                );
            }
            let account = self.provider(&entry.key, entry.pos, &entry.value);
            out.insert(entry.key.clone(), account);
        }
        out
    }

    fn provider(&mut self, name: &str, pos: Pos, p: &RawProvider) -> ProviderAccount {
        let kind = match p.kind.v() {
            RawProviderType::Ngrok => ProviderType::Ngrok,
            RawProviderType::OktaAsa => ProviderType::OktaAsa,
        };
        // A flat struct serves both types; a field of the other type is an error here, where
        // the type is known.
        let foreign: &[(&str, &Option<Sp<String>>)] = match kind {
            ProviderType::Ngrok => &[
                ("team", &p.team),
                ("key_id", &p.key_id),
                ("key_secret", &p.key_secret),
                ("key_secret_file", &p.key_secret_file),
            ],
            ProviderType::OktaAsa => &[("api_key", &p.api_key), ("api_key_file", &p.api_key_file)],
        };
        for (field, value) in foreign {
            if let Some(v) = value {
                let other = match kind {
                    ProviderType::Ngrok => "okta-asa",
                    ProviderType::OktaAsa => "ngrok",
                };
                self.d.error(
                    v.pos(),
                    format!("`{field}` does not apply to a provider of type {kind} (it is an {other} field)"),
                );
            }
        }

        let (default_url, default_limit) = match kind {
            ProviderType::Ngrok => ("https://api.ngrok.com", 100),
            ProviderType::OktaAsa => ("https://app.scaleft.com", 600),
        };
        let base_url = match &p.base_url {
            Some(u) => self.base_url(u).unwrap_or_else(|| default_url.to_string()),
            None => default_url.to_string(),
        };
        let rate_limit = p
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit(r))
            .unwrap_or(RateLimit {
                requests: default_limit,
                per: SignedDuration::from_secs(60),
            });

        let auth = match kind {
            ProviderType::Ngrok => ProviderAuth::Ngrok {
                api_key: self.secret(
                    name,
                    pos,
                    ("api_key", p.api_key.as_ref()),
                    ("api_key_file", p.api_key_file.as_ref()),
                ),
            },
            ProviderType::OktaAsa => {
                let team = self.required(name, pos, "team", p.team.as_ref());
                let key_id = self.required(name, pos, "key_id", p.key_id.as_ref());
                let key_secret = self.secret(
                    name,
                    pos,
                    ("key_secret", p.key_secret.as_ref()),
                    ("key_secret_file", p.key_secret_file.as_ref()),
                );
                ProviderAuth::OktaAsa {
                    team,
                    key_id,
                    key_secret,
                }
            }
        };
        ProviderAccount {
            name: name.to_string(),
            kind,
            base_url,
            rate_limit,
            auth,
        }
    }

    /// A required, non-empty string field of a provider.
    fn required(
        &mut self,
        provider: &str,
        pos: Pos,
        field: &str,
        v: Option<&Sp<String>>,
    ) -> String {
        let Some(v) = v else {
            self.d.error(
                pos,
                format!("provider `{provider}` (okta-asa) needs `{field}`"),
            );
            return String::new();
        };
        let text = self.string(v).unwrap_or_default();
        if text.trim().is_empty() && self.expand_ok(v) {
            self.d.error(v.pos(), format!("{field} is empty"));
        }
        text
    }

    /// Whether `v` expands without error (so that an empty result is worth its own message).
    fn expand_ok(&self, v: &Sp<String>) -> bool {
        super::interp::expand(v.v(), self.env).is_ok()
    }

    /// A credential given inline (`api_key`) or in a file (`api_key_file`). Diagnostics name
    /// the field and the file's path, never the value.
    fn secret(
        &mut self,
        provider: &str,
        pos: Pos,
        (inline_name, inline): (&str, Option<&Sp<String>>),
        (file_name, file): (&str, Option<&Sp<String>>),
    ) -> SecretString {
        let empty = || SecretString::from(String::new());
        match (inline, file) {
            (None, None) => {
                self.d.error(
                    pos,
                    format!("provider `{provider}` needs `{inline_name}` (e.g. ${{VAR}}) or `{file_name}`"),
                );
                empty()
            }
            (Some(_), Some(f)) => {
                self.d.error(
                    f.pos(),
                    format!("set either {inline_name} or {file_name}, not both"),
                );
                empty()
            }
            (Some(v), None) => {
                let Some((text, substituted)) = self.expand(v) else {
                    return empty();
                };
                if !substituted {
                    self.d.warn(
                        v.pos(),
                        format!("{inline_name} is written inline in the file; use ${{VAR}} or {file_name}"),
                    );
                }
                if text.is_empty() {
                    self.d.error(v.pos(), format!("{inline_name} is empty"));
                }
                SecretString::from(text)
            }
            (None, Some(f)) => {
                let Some(path) = self.path(f, file_name) else {
                    return empty();
                };
                let read =
                    crate::files::read_bounded(&path, crate::files::MAX_SECRET_FILE_BYTES, true)
                        .map_err(|e| e.to_string())
                        .and_then(|bytes| {
                            String::from_utf8(bytes)
                                .map(secrecy::zeroize::Zeroizing::new)
                                .map_err(|_| "it is not UTF-8 text".to_string())
                        });
                match read {
                    Ok(content) => {
                        // Files written with `echo` or an editor end in a newline that is
                        // not part of the credential.
                        let trimmed = content.trim_end_matches(['\n', '\r']);
                        if trimmed.is_empty() {
                            self.d.error(
                                f.pos(),
                                format!("{file_name} `{}` is empty", path.display()),
                            );
                        } else if trimmed.contains(['\n', '\r']) {
                            // Never joined or cut silently: which line would be meant?
                            self.d.error(
                                f.pos(),
                                format!(
                                    "{file_name} `{}` holds more than one line; it must hold the value alone, on one line",
                                    path.display()
                                ),
                            );
                        }
                        if let Some(mode) = readable_by_others(&path) {
                            self.d.warn(
                                f.pos(),
                                format!(
                                    "{file_name} `{}` can be read by every user of this host (mode {mode:04o}); `chmod 600` it (or `chmod o-r`)",
                                    path.display()
                                ),
                            );
                        }
                        SecretString::from(trimmed.to_string())
                    }
                    Err(e) => {
                        // io::Error's text never contains file content.
                        self.d.error(
                            f.pos(),
                            format!("cannot read {file_name} `{}`: {e}", path.display()),
                        );
                        empty()
                    }
                }
            }
        }
    }

    fn base_url(&mut self, u: &Sp<String>) -> Option<String> {
        let raw = self.string(u)?;
        // Messages show the URL without a password it may carry.
        let text = crate::text::hide_url_password(&raw).into_owned();
        let url = match url::Url::parse(&raw) {
            Ok(url) => url,
            Err(e) => {
                self.d
                    .error(u.pos(), format!("invalid base_url `{text}`: {e}"));
                return None;
            }
        };
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = match url.host() {
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if !loopback {
                    self.d.error(
                        u.pos(),
                        format!("base_url `{text}` uses http:// with a host that is not loopback: credentials would cross the network in clear text; use https://"),
                    );
                    return None;
                }
            }
            other => {
                self.d.error(
                    u.pos(),
                    format!("base_url `{text}` has scheme `{other}`: expected https:// (or http:// to a loopback host)"),
                );
                return None;
            }
        }
        if url.host().is_none() {
            self.d
                .error(u.pos(), format!("base_url `{text}` has no host"));
            return None;
        }
        Some(raw.trim_end_matches('/').to_string())
    }

    fn rate_limit(&mut self, r: &Sp<String>) -> Option<RateLimit> {
        let text = self.string(r)?;
        let parsed = text.split_once('/').and_then(|(n, per)| {
            let requests = n.trim().parse::<u32>().ok().filter(|n| *n >= 1)?;
            let per = duration::parse(per).ok().filter(|d| !d.is_zero())?;
            Some(RateLimit { requests, per })
        });
        // Fewer than one request a minute could never finish a listing: every run would hang
        // for hours holding the state lock.
        if let Some(limit) = parsed
            && limit.per.as_secs() / i64::from(limit.requests) > 60
        {
            self.d.error(
                r.pos(),
                format!("rate_limit `{text}` allows fewer than one request a minute: keyward could not finish even one listing; the provider's own limit is far higher (ngrok: 120/60s)"),
            );
            return None;
        }
        if parsed.is_none() {
            self.d.error(
                r.pos(),
                format!("invalid rate_limit `{text}`: expected REQUESTS/DURATION with both above zero, e.g. 100/60s"),
            );
        }
        parsed
    }

    fn sinks(&mut self, raw: Option<&Named<RawSink>>) -> BTreeMap<String, SinkConfig> {
        let mut out = BTreeMap::new();
        for entry in raw.map(|n| n.0.as_slice()).unwrap_or(&[]) {
            if entry.key.trim().is_empty() {
                self.d.error(entry.pos, "sink name is empty");
                continue;
            }
            if crate::text::has_control(&entry.key) {
                self.d.error(
                    entry.pos,
                    format!(
                        "sink name `{}` contains a control character",
                        crate::text::escape(&entry.key)
                    ),
                );
            }
            let kind = self.sink(&entry.key, entry.pos, &entry.value);
            out.insert(
                entry.key.clone(),
                SinkConfig {
                    name: entry.key.clone(),
                    kind,
                },
            );
        }
        out
    }

    fn sink(&mut self, name: &str, pos: Pos, s: &RawSink) -> SinkKind {
        match s.kind.v() {
            RawSinkType::File => {
                for (field, p) in [
                    ("command", s.command.as_ref().map(Sp::pos)),
                    ("timeout", s.timeout.as_ref().map(Sp::pos)),
                ] {
                    if let Some(p) = p {
                        self.d.error(
                            p,
                            format!(
                                "`{field}` does not apply to a file sink (it is an exec sink field)"
                            ),
                        );
                    }
                }
                let path = match &s.path {
                    None => {
                        self.d
                            .error(pos, format!("file sink `{name}` needs `path`"));
                        String::new()
                    }
                    Some(p) => match self.path(p, "path") {
                        Some(resolved) => {
                            let text = resolved.to_string_lossy().into_owned();
                            self.placeholders(p, &text, "path");
                            text
                        }
                        None => String::new(),
                    },
                };
                let format = match s.format.as_ref().map(|f| *f.v()) {
                    None | Some(RawSinkFormat::Json) => SinkFormat::Json,
                    Some(RawSinkFormat::Env) => SinkFormat::Env,
                    Some(RawSinkFormat::Raw) => SinkFormat::Raw,
                };
                SinkKind::File { path, format }
            }
            RawSinkType::Exec => {
                for (field, p) in [
                    ("path", s.path.as_ref().map(Sp::pos)),
                    ("format", s.format.as_ref().map(Sp::pos)),
                ] {
                    if let Some(p) = p {
                        self.d.error(
                            p,
                            format!("`{field}` does not apply to an exec sink (it is a file sink field; an exec sink always gets the JSON document)"),
                        );
                    }
                }
                let mut command = Vec::new();
                match &s.command {
                    None => self
                        .d
                        .error(pos, format!("exec sink `{name}` needs `command`")),
                    Some(c) if c.v().is_empty() => self.d.error(
                        c.pos(),
                        "command is empty: it needs at least the program to run",
                    ),
                    Some(c) => {
                        for (i, arg) in c.v().iter().enumerate() {
                            let Some(text) = self.string(arg) else {
                                continue;
                            };
                            if i == 0 && text.trim().is_empty() {
                                self.d.error(arg.pos(), "the program to run is empty");
                            }
                            self.placeholders(arg, &text, "command");
                            command.push(text);
                        }
                    }
                }
                let timeout = s
                    .timeout
                    .as_ref()
                    .and_then(|t| self.positive_duration(t, "timeout"))
                    .unwrap_or(SignedDuration::from_secs(30));
                SinkKind::Exec { command, timeout }
            }
        }
    }

    /// Reports each name that a placeholder of `sink`'s path or command cannot hold (a `/`,
    /// `..`): every delivery to it would fail, after a key was minted for nothing.
    fn names_fit<const N: usize>(
        &mut self,
        sink: &SinkConfig,
        names: [(&str, &str, &str, Pos); N],
    ) {
        for (placeholder, what, value, pos) in names {
            // Empty names have their own error.
            if value.is_empty() || crate::text::fits_placeholder(value) {
                continue;
            }
            if sink.uses(placeholder) {
                self.d.error(
                    pos,
                    format!(
                        "{what} `{}` cannot stand in for {placeholder} in sink `{}`: a name there must not be `.` or `..` nor contain `/` or a control character; rename it, or take {placeholder} out of the sink's {}",
                        crate::text::escape(value),
                        sink.name,
                        match sink.kind {
                            SinkKind::File { .. } => "path",
                            SinkKind::Exec { .. } => "command",
                        }
                    ),
                );
            }
        }
    }

    /// Rejects `{name}` placeholders keyward would not fill in (a typo would otherwise end up
    /// in a file name verbatim).
    fn placeholders(&mut self, at: &Sp<String>, text: &str, field: &str) {
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let tail = &rest[open + 1..];
            let Some(close) = tail.find('}') else { break };
            let name = &tail[..close];
            // Only lower-case words count: `${X}` left by a `$${` escape, or JSON in an
            // argument, are not meant as placeholders.
            let after_dollar = rest[..open].ends_with('$');
            let looks_like_placeholder = !after_dollar
                && !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if looks_like_placeholder && !PLACEHOLDERS.contains(&name) {
                self.d.error(
                    at.pos(),
                    format!("unknown placeholder `{{{name}}}` in {field}: use {{provider}}, {{user}}, {{slot}} or {{key_id}}"),
                );
            }
            rest = &tail[close + 1..];
        }
    }

    /// Checks the policy fields of `defaults` or a slot.
    fn policy(&mut self, p: &RawPolicy, sinks: &BTreeMap<String, SinkConfig>) -> Policy {
        Policy {
            rotate_every: p.rotate_every.as_ref().and_then(|s| {
                Some(At {
                    value: self.positive_duration(s, "rotate_every")?,
                    pos: s.pos(),
                })
            }),
            schedule: p.schedule.as_ref().and_then(|s| {
                Some(At {
                    value: self.schedule(s)?,
                    pos: s.pos(),
                })
            }),
            timezone: p.timezone.as_ref().and_then(|s| {
                Some(At {
                    value: self.timezone(s)?,
                    pos: s.pos(),
                })
            }),
            overlap: p.overlap.as_ref().and_then(|s| {
                Some(At {
                    value: self.duration(s, "overlap")?,
                    pos: s.pos(),
                })
            }),
            spread: p.spread.as_ref().and_then(|s| {
                Some(At {
                    value: self.duration(s, "spread")?,
                    pos: s.pos(),
                })
            }),
            sinks: p.sink.as_ref().map(|s| At {
                value: self.sink_names(s, sinks),
                pos: s.pos(),
            }),
        }
    }

    fn schedule(&mut self, s: &Sp<String>) -> Option<String> {
        let text = self.string(s)?;
        match crate::rotation::parse_schedule(&text) {
            Ok(cron) => {
                let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
                if cron.find_next_occurrence(&now, false).is_err() {
                    self.d.error(
                        s.pos(),
                        format!("cron expression `{text}` never fires (no such date): a slot with it would never rotate"),
                    );
                    return None;
                }
                Some(text)
            }
            Err(e) => {
                self.d.error(
                    s.pos(),
                    format!("invalid cron expression `{text}` (expected 5 fields, or 6 with seconds first): {e}"),
                );
                None
            }
        }
    }

    fn timezone(&mut self, s: &Sp<String>) -> Option<String> {
        let text = self.string(s)?;
        match jiff::tz::TimeZone::get(&text) {
            Ok(_) => Some(text),
            Err(_) => {
                self.d.error(
                    s.pos(),
                    format!("unknown time zone `{text}`: expected an IANA name such as UTC or Europe/Berlin"),
                );
                None
            }
        }
    }

    /// Sink names, each checked against `sinks`.
    fn sink_names(
        &mut self,
        s: &Sp<SinkNames>,
        sinks: &BTreeMap<String, SinkConfig>,
    ) -> Vec<String> {
        let items: Vec<(String, Pos)> = match s.v() {
            SinkNames::One(name) => {
                let sp = Sp::new(name.clone(), s.pos());
                match self.string(&sp) {
                    Some(n) => vec![(n, s.pos())],
                    None => return Vec::new(),
                }
            }
            SinkNames::Many(list) => {
                if list.is_empty() {
                    self.d.error(s.pos(), "sink list is empty");
                }
                list.iter()
                    .filter_map(|n| Some((self.string(n)?, n.pos())))
                    .collect()
            }
        };
        for (name, pos) in &items {
            let known = sinks.contains_key(name)
                || self.broken.all_sinks
                || self.broken.sinks.contains(name);
            if !known {
                self.d
                    .error(*pos, undefined("sink", name, "sinks", sinks.keys()));
            }
        }
        items.into_iter().map(|(n, _)| n).collect()
    }

    /// Resolves the users of every source (the config file's own `users:`, then each included
    /// file's), diagnostics naming the file each came from. Names are unique per provider
    /// across all of them.
    fn users(
        &mut self,
        sources: &[(Arc<Path>, &[Sp<RawUser>])],
        providers: &BTreeMap<String, ProviderAccount>,
        sinks: &BTreeMap<String, SinkConfig>,
        defaults: &Policy,
    ) -> Vec<UserSpec> {
        let main = self.d.file().to_path_buf();
        let mut seen = Seen::default();
        let mut shared = SharedSlots::default();
        let mut out = Vec::new();
        for (file, raw) in sources {
            self.d.set_file(file);
            for u in raw.iter() {
                self.user(
                    u,
                    file,
                    (&mut seen, &mut shared),
                    (providers, sinks, defaults),
                    &mut out,
                );
            }
        }
        self.d.set_file(&main);
        out
    }

    fn user(
        &mut self,
        entry: &Sp<RawUser>,
        file: &Arc<Path>,
        (seen, shared): (&mut Seen, &mut SharedSlots),
        (providers, sinks, defaults): (
            &BTreeMap<String, ProviderAccount>,
            &BTreeMap<String, SinkConfig>,
            &Policy,
        ),
        out: &mut Vec<UserSpec>,
    ) {
        let pos = entry.pos();
        let u = entry.v();
        let provider = self.string(&u.provider).unwrap_or_default();
        let kind = providers.get(&provider).map(|p| p.kind);
        let provider_broken =
            self.broken.all_providers || self.broken.providers.contains(&provider);
        if kind.is_none() && !provider_broken && self.expand_ok(&u.provider) {
            self.d.error(
                u.provider.pos(),
                undefined("provider", &provider, "providers", providers.keys()),
            );
        }
        let names: Vec<&Sp<String>> = match (&u.name, &u.names) {
            (Some(n), None) => vec![n],
            (None, Some(list)) => {
                if list.v().is_empty() {
                    self.d
                        .error(list.pos(), "`names` is empty: list at least one user name");
                }
                list.v().iter().collect()
            }
            (Some(n), Some(_)) => {
                self.d
                    .error(n.pos(), "a user entry has `name` or `names`, not both");
                vec![n]
            }
            (None, None) => {
                self.d.error(
                    pos,
                    "a user entry needs `name` (one user) or `names` (one user per name)",
                );
                return;
            }
        };
        let mut template: Option<Slots> = None;
        for n in names {
            let Some(name) = self.user_name(n, &provider, file, seen) else {
                continue;
            };
            let slots = match &template {
                None => {
                    let slots = shared.get(self.slots(
                        u,
                        (&provider, &name, n.pos()),
                        kind,
                        sinks,
                        defaults,
                    ));
                    template = Some(Arc::clone(&slots));
                    slots
                }
                Some(first) => {
                    for slot in first.values() {
                        for sink in slot.sinks.iter().filter_map(|s| sinks.get(s)) {
                            self.names_fit(sink, [("{user}", "user name", &name, n.pos())]);
                        }
                    }
                    // Only the spread offset depends on the user's name; without a spread
                    // every user of the entry has the first one's slots.
                    if first.values().all(|s| s.spread.is_zero()) {
                        Arc::clone(first)
                    } else {
                        let mut slots = BTreeMap::clone(first);
                        for slot in slots.values_mut() {
                            slot.spread_offset = crate::rotation::spread_offset(
                                slot.spread,
                                &provider,
                                &name,
                                &slot.name,
                            );
                        }
                        shared.get(slots)
                    }
                }
            };
            out.push(UserSpec {
                provider: provider.clone(),
                name,
                active: u.active.as_ref().map(|a| *a.v()).unwrap_or(true),
                slots,
                file: Arc::clone(file),
                line: n.pos().line,
            });
        }
    }

    fn user_name(
        &mut self,
        n: &Sp<String>,
        provider: &str,
        file: &Arc<Path>,
        seen: &mut Seen,
    ) -> Option<String> {
        let name = self.string(n)?;
        if name.trim().is_empty() {
            self.d.error(n.pos(), "user name is empty");
            return None;
        }
        if crate::text::has_control(&name) {
            self.d.error(
                n.pos(),
                format!(
                    "user name `{}` contains a control character",
                    crate::text::escape(&name)
                ),
            );
        }
        // One map per provider, keyed by name: a lookup allocates nothing.
        let names = seen.names(provider);
        match names.get(name.as_str()) {
            Some((first_file, first_line)) => {
                let at = if first_file == file {
                    format!("line {first_line}")
                } else {
                    format!("{}:{first_line}", first_file.display())
                };
                self.d.error(
                    n.pos(),
                    format!("user `{name}` is declared twice for provider `{provider}` (first at {at}): names are unique per provider account"),
                );
                None
            }
            None => {
                names.insert(name.clone(), (Arc::clone(file), n.pos().line));
                Some(name)
            }
        }
    }

    fn slots(
        &mut self,
        u: &RawUser,
        (provider, user, user_pos): (&str, &str, Pos),
        kind: Option<ProviderType>,
        sinks: &BTreeMap<String, SinkConfig>,
        defaults: &Policy,
    ) -> BTreeMap<String, Box<SlotSpec>> {
        let mut out = BTreeMap::new();
        let entries = u.keys.as_ref().map(|k| k.0.as_slice()).unwrap_or(&[]);
        let empty = RawSlot::default();
        for (i, entry) in entries.iter().enumerate() {
            let slot_name = &entry.key;
            let raw = entry.value.as_ref().unwrap_or(&empty);
            if slot_name.trim().is_empty() {
                self.d.error(entry.pos, "slot name is empty");
            } else if crate::text::has_control(slot_name) {
                self.d.error(
                    entry.pos,
                    format!(
                        "slot name `{}` contains a control character",
                        crate::text::escape(slot_name)
                    ),
                );
            }
            if kind == Some(ProviderType::OktaAsa) && i > 0 {
                self.d.error(
                    entry.pos,
                    format!("an okta-asa user holds at most one key slot (ASA rotates all keys of a user at once); `{user}` already has `{}`", entries[0].key),
                );
            }
            let key_kind = match raw.kind.as_ref().map(|k| *k.v()) {
                None | Some(RawKeyKind::ApiKey) => KeyKind::ApiKey,
                Some(RawKeyKind::Credential) => KeyKind::Credential,
            };
            if let (Some(ProviderType::OktaAsa), KeyKind::Credential, Some(k)) =
                (kind, key_kind, raw.kind.as_ref())
            {
                self.d.error(
                    k.pos(),
                    "an okta-asa provider has no `credential` keys; its slots are `api_key`",
                );
            }
            if let (Some(ProviderType::OktaAsa), Some(d)) = (kind, raw.description.as_ref()) {
                self.d.error(
                    d.pos(),
                    "`description` applies only to ngrok keys (ASA keys have none)",
                );
            }
            if let (Some(acl), false) = (raw.acl.as_ref(), key_kind == KeyKind::Credential) {
                self.d.error(
                    acl.pos(),
                    "`acl` applies only to `kind: credential` slots (ngrok agent authtokens)",
                );
            }
            let description = raw.description.as_ref().and_then(|d| self.string(d));
            // ngrok refuses a description over 255 bytes (ERR_NGROK_604) and any ACL rule but
            // `bind:` (ngrok-api.md, "API keys" and "Credentials"): said here, with the line,
            // rather than by a 400 on every apply.
            if let (Some(d), Some(text)) = (raw.description.as_ref(), description.as_ref())
                && text.len() > 255
            {
                self.d.error(
                    d.pos(),
                    format!(
                        "description is {} bytes; ngrok allows at most 255",
                        text.len()
                    ),
                );
            }
            let acl: Vec<String> = raw
                .acl
                .as_ref()
                .map(|a| {
                    a.v()
                        .iter()
                        .filter_map(|r| {
                            let rule = self.string(r)?;
                            let bound = rule.strip_prefix("bind:").is_some_and(|t| !t.is_empty());
                            if !bound {
                                self.d.error(
                                    r.pos(),
                                    format!(
                                        "ACL rule `{}` is not `bind:<hostname pattern>`: ngrok allows only bind rules (e.g. `bind:*.example.com`)",
                                        crate::text::escape(&rule)
                                    ),
                                );
                            }
                            Some(rule)
                        })
                        .collect()
                })
                .unwrap_or_default();

            let own = self.policy(
                &RawPolicy {
                    rotate_every: raw.rotate_every.clone(),
                    schedule: raw.schedule.clone(),
                    timezone: raw.timezone.clone(),
                    overlap: raw.overlap.clone(),
                    spread: raw.spread.clone(),
                    sink: raw.sink.clone(),
                },
                sinks,
            );
            // A present-but-invalid slot field must not fall back to defaults silently; its
            // error is recorded, and the config will not be used.
            // Where each value is written: the slot (this file), or `defaults` (the config file).
            let (tz_own, overlap_own, spread_own) = (
                own.timezone.is_some(),
                own.overlap.is_some(),
                own.spread.is_some(),
            );
            let rotate_every = own.rotate_every.or(defaults.rotate_every.clone());
            let schedule = own.schedule.or(defaults.schedule.clone());
            let timezone = own.timezone.or(defaults.timezone.clone());
            let overlap = own.overlap.or(defaults.overlap.clone());
            let spread_at = own.spread.or(defaults.spread.clone());
            let spread = spread_at
                .as_ref()
                .map(|s| s.value)
                .unwrap_or(SignedDuration::ZERO);
            let slot_sinks = match own.sinks.or(defaults.sinks.clone()) {
                Some(s) => s.value,
                None => {
                    let sink_set = raw.sink.is_some() || self.broken.defaults;
                    if !sink_set {
                        self.d.error(
                            entry.pos,
                            format!("slot `{slot_name}` of user `{user}` has no sink: set `sink` on the slot or under `defaults`"),
                        );
                    }
                    Vec::new()
                }
            };
            for sink in slot_sinks.iter().filter_map(|n| sinks.get(n)) {
                self.names_fit(
                    sink,
                    [
                        ("{provider}", "provider name", provider, u.provider.pos()),
                        ("{user}", "user name", user, user_pos),
                        ("{slot}", "slot name", slot_name, entry.pos),
                    ],
                );
            }
            if let (Some(tz), None) = (&timezone, &schedule) {
                self.d
                    .warn_where(tz_own, tz.pos, "timezone has no effect without a schedule");
            }
            if let (Some(every), Some(s)) = (&rotate_every, &spread_at)
                && s.value > every.value
            {
                self.d.warn_where(
                    spread_own,
                    s.pos,
                    format!(
                        "spread {} is longer than rotate_every {} (slot `{slot_name}`): its rotations come up to {} late",
                        duration::format(s.value),
                        duration::format(every.value),
                        duration::format(s.value),
                    ),
                );
            }
            let overlap_value = overlap
                .as_ref()
                .map(|o| o.value)
                .unwrap_or(SignedDuration::from_hours(24));
            if let (Some(ProviderType::OktaAsa), Some(o)) = (kind, &overlap)
                && o.value > ASA_MAX_OVERLAP
            {
                self.d.warn_where(
                    overlap_own,
                    o.pos,
                    format!("overlap {} is longer than 48h: ASA expires the replaced key 2 days after a rotation, so it stops working before the overlap ends", duration::format(o.value)),
                );
            }
            let zone = timezone
                .as_ref()
                .map(|t| t.value.clone())
                .unwrap_or_else(|| "UTC".to_string());
            out.insert(
                slot_name.clone(),
                Box::new(SlotSpec {
                    name: slot_name.clone(),
                    kind: key_kind,
                    description,
                    acl,
                    rotate_every: rotate_every.map(|r| r.value),
                    schedule: schedule.and_then(|s| {
                        // Both halves were checked on their own; together they parse.
                        match Schedule::parse(&s.value, &zone) {
                            Ok(parsed) => Some(parsed),
                            Err(e) => {
                                self.d.error(s.pos, e);
                                None
                            }
                        }
                    }),
                    timezone: zone,
                    overlap: overlap_value,
                    spread,
                    spread_offset: crate::rotation::spread_offset(
                        spread, provider, user, slot_name,
                    ),
                    sinks: slot_sinks,
                }),
            );
        }
        out
    }
}

/// The users declared so far: by provider, each name with the file and line declaring it.
#[derive(Default)]
struct Seen {
    /// Provider → its place in `names`.
    providers: HashMap<String, usize>,
    names: Vec<crate::model::FastMap<String, (Arc<Path>, usize)>>,
}

impl Seen {
    /// The names declared for `provider` so far.
    fn names(&mut self, provider: &str) -> &mut crate::model::FastMap<String, (Arc<Path>, usize)> {
        let i = match self.providers.get(provider) {
            Some(&i) => i,
            None => {
                self.providers
                    .insert(provider.to_string(), self.names.len());
                self.names.push(Default::default());
                self.names.len() - 1
            }
        };
        &mut self.names[i]
    }
}

/// The slot maps resolved so far, by a hash of their contents: users whose slots resolve alike
/// share one map.
#[derive(Default)]
struct SharedSlots(HashMap<u64, Vec<Slots>>);

impl SharedSlots {
    /// The shared map equal to `slots`, or `slots` itself, kept for the users to come.
    fn get(&mut self, slots: BTreeMap<String, Box<SlotSpec>>) -> Slots {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, s) in &slots {
            (name, &s.name, s.kind, &s.description, &s.acl).hash(&mut h);
            (s.rotate_every, s.overlap, s.spread, s.spread_offset).hash(&mut h);
            (&s.timezone, &s.sinks, s.schedule.is_some()).hash(&mut h);
        }
        let same = self.0.entry(h.finish()).or_default();
        if let Some(found) = same.iter().find(|m| ***m == slots) {
            return Arc::clone(found);
        }
        let slots = Arc::new(slots);
        same.push(Arc::clone(&slots));
        slots
    }
}

/// "provider `x` is not defined under `providers` (defined: a, b)".
fn undefined<'a>(
    what: &str,
    name: &str,
    section: &str,
    defined: impl Iterator<Item = &'a String>,
) -> String {
    let list: Vec<&str> = defined.map(String::as_str).collect();
    if list.is_empty() {
        format!("{what} `{name}` is not defined: `{section}` is empty")
    } else {
        format!(
            "{what} `{name}` is not defined under `{section}` (defined: {})",
            list.join(", ")
        )
    }
}

/// Removes `.` and `..` components lexically, so messages show `/etc/keyward/x`, not
/// `/etc/keyward/conf/../x` (no symlink is resolved: the path means what the user wrote).
fn normalize(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The mode of the file at `path` when every user of the host may read it (a credential file
/// left at the umask's 0644), else `None`.
fn readable_by_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o004 != 0).then_some(mode)
}
