//! The config file exactly as written: serde structs that mirror the YAML (version 1), every
//! value carrying the line and column it came from so that later checks can point at it. These
//! structs are also the source of the JSON Schema (`keyward schema`), so their doc comments are
//! the descriptions editors show.
//!
//! Nothing here interprets values beyond their YAML type; `resolve` does that.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn new(line: usize, column: usize) -> Pos {
        Pos { line, column }
    }

    pub fn of(loc: &serde_saphyr::Location) -> Pos {
        // Locations are unknown (0:0) only for values buffered by serde; the schema avoids the
        // constructs that do that, but 1:1 is still a better answer than 0:0.
        Pos {
            line: usize::try_from(loc.line()).unwrap_or(1).max(1),
            column: usize::try_from(loc.column()).unwrap_or(1).max(1),
        }
    }
}

/// A value with the position it was written at. Deserialized through serde-saphyr's `Spanned`
/// but kept with only the line and column where the value is used (for an alias: the alias,
/// not the anchor): `Spanned` holds two full locations (spans, byte offsets, source ids) per
/// value, which made the tree of a 100,000-user config several times the file's size. Its JSON
/// Schema is that of the value, so the schema needs no per-field annotations.
#[derive(Debug, Clone)]
pub struct Sp<T> {
    value: T,
    line: u32,
    column: u32,
}

impl<T> Sp<T> {
    /// A value written at `pos`.
    pub fn new(value: T, pos: Pos) -> Sp<T> {
        Sp {
            value,
            line: u32::try_from(pos.line).unwrap_or(u32::MAX),
            column: u32::try_from(pos.column).unwrap_or(u32::MAX),
        }
    }

    pub fn v(&self) -> &T {
        &self.value
    }

    /// The value, without its position.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// Where the value is used (for an alias: the alias, not the anchor).
    pub fn pos(&self) -> Pos {
        Pos::new(self.line as usize, self.column as usize)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sp<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::<T>::deserialize(d).map(|s| {
            let pos = Pos::of(&s.referenced);
            Sp::new(s.value, pos)
        })
    }
}

impl<T: JsonSchema> JsonSchema for Sp<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A YAML mapping with free-form keys, kept in file order with each key's position (serde
/// maps would lose both, and `Spanned` keys are not `Ord`).
#[derive(Debug, Clone)]
pub struct Named<V>(pub Vec<Entry<V>>);

#[derive(Debug, Clone)]
pub struct Entry<V> {
    pub key: String,
    pub pos: Pos,
    pub value: V,
}

impl<V> Default for Named<V> {
    fn default() -> Self {
        Named(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Named<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Named<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Sp<String>>()? {
                    let value = map.next_value::<V>()?;
                    out.push(Entry {
                        pos: key.pos(),
                        key: key.into_inner(),
                        value,
                    });
                }
                Ok(Named(out))
            }
        }
        d.deserialize_map(V2(PhantomData))
    }
}

impl<V: JsonSchema> JsonSchema for Named<V> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        <BTreeMap<String, V>>::schema_name()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        <BTreeMap<String, V>>::json_schema(generator)
    }
}

/// One sink name or a list of them (`sink: local` or `sink: [local, hand-off]`). A hand-written
/// visitor instead of an untagged enum, which would lose the positions; a single name's
/// position is that of the enclosing `Sp`.
#[derive(Debug, Clone)]
pub enum SinkNames {
    One(String),
    Many(Vec<Sp<String>>),
}

impl<'de> Deserialize<'de> for SinkNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SinkNames;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sink name or a list of sink names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SinkNames, E> {
                Ok(SinkNames::One(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SinkNames, E> {
                Ok(SinkNames::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SinkNames, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<Sp<String>>()? {
                    out.push(s);
                }
                Ok(SinkNames::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One sink name or a list of sink names.
#[derive(JsonSchema)]
#[allow(dead_code)] // only its schema is used
#[serde(untagged)]
enum SinkNamesSchema {
    One(String),
    Many(Vec<String>),
}

impl JsonSchema for SinkNames {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "SinkNames".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        SinkNamesSchema::json_schema(generator)
    }
}

/// A keyward configuration file (format version 1).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "keyward configuration", extend("required" = ["version"]))]
pub struct RawConfig {
    /// Format version of this file. Must be `1`.
    pub version: Option<Sp<u64>>,
    /// More files whose `users:` lists join this one's: glob patterns relative to this file
    /// (e.g. `users.d/*.yaml`), matched in name order. Each included file holds only `users:`.
    pub include: Option<Sp<Vec<Sp<String>>>>,
    /// How keyward itself runs. Every field is optional.
    pub settings: Option<RawSettings>,
    /// Provider accounts by name (the names are free-form and referenced by `users[].provider`).
    pub providers: Option<Named<RawProvider>>,
    /// Where newly minted secrets are delivered, by name (referenced by `sink`).
    pub sinks: Option<Named<RawSink>>,
    /// Key policy for every slot that does not set a field itself.
    pub defaults: Option<RawPolicy>,
    /// The service users keyward manages, and their key slots.
    pub users: Option<Vec<Sp<RawUser>>>,
    /// What to do with objects keyward manages that are no longer in the file.
    pub prune: Option<RawPrune>,
}

/// How keyward itself runs.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Settings")]
pub struct RawSettings {
    /// Directory for keyward's state and journal. Default: `$STATE_DIRECTORY` (set by systemd's
    /// `StateDirectory=`), else `./.keyward`. A relative path is relative to this file.
    pub state_dir: Option<Sp<String>>,
    /// A PostgreSQL database for the state, the journal and the lock instead of `state_dir`
    /// (`postgres://user:${PASSWORD}@host:5432/db?sslmode=verify-full`): several keyward
    /// daemons sharing it elect one leader, the others wait. Tables are created on first use.
    /// `${VAR}` is expanded; the password is never shown.
    pub state_url: Option<Sp<String>>,
    /// A file holding the `state_url` (e.g. a systemd credential); a trailing newline is
    /// ignored. Instead of `state_url`.
    pub state_url_file: Option<Sp<String>>,
    /// Daemon: full resync period, e.g. `5m` (default). Durations are an integer and a unit
    /// `s`, `m`, `h` or `d`.
    pub interval: Option<Sp<String>>,
    /// Daemon: the share of each account's `rate_limit`, in percent (1–100, default 50), that
    /// the full listing at every `interval` may use: it reads its pages no faster, leaving the
    /// rest to the work that comes due. A listing someone waits for (at start, after a config
    /// edit or SIGHUP) goes at the whole budget.
    pub resync_share: Option<Sp<i64>>,
    /// Daemon: `apply` (default) changes the providers; `observe` only plans and reports.
    pub mode: Option<Sp<RawMode>>,
    /// Maximum in-flight requests per provider account (default 8, at least 1).
    pub concurrency: Option<Sp<i64>>,
    /// An apply that would delete more objects than this is refused (default 10).
    pub max_deletions: Option<Sp<i64>>,
    /// Daemon: `IP:PORT` for the Prometheus `/metrics` listener, e.g. `127.0.0.1:9464`.
    /// Absent: no listener.
    pub metrics: Option<Sp<String>>,
    /// Daemon: export one series per key (`keyward_key_*`) as well as the aggregates (default
    /// `true`). `false` for fleets: the aggregates stay (`keyward_keys{provider,state}`, the
    /// earliest expiry and rotation per provider, a histogram of the time until rotation).
    pub metrics_per_key: Option<Sp<bool>>,
    /// The name of this installation, written into the metadata tag of every ngrok key keyward
    /// creates (default `keyward`). Installations that share an account with different owners
    /// never touch each other's keys. Letters, digits, `.`, `_` and `-`, at most 64.
    pub owner: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "Mode")]
pub enum RawMode {
    Apply,
    Observe,
}

/// A provider account. Which fields apply depends on `type`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Provider")]
pub struct RawProvider {
    /// `ngrok` or `okta-asa` (Okta Advanced Server Access / Privileged Access).
    #[serde(rename = "type")]
    pub kind: Sp<RawProviderType>,
    /// ngrok: the API key, normally `${VAR}` from the environment. Written literally it is
    /// accepted with a warning.
    pub api_key: Option<Sp<String>>,
    /// ngrok: a file holding the API key (e.g. a systemd credential); a trailing newline is
    /// ignored. Instead of `api_key`.
    pub api_key_file: Option<Sp<String>>,
    /// API base URL. Defaults: `https://api.ngrok.com`, `https://app.scaleft.com`. `http://` is
    /// accepted only for a loopback host (the sandbox, tests).
    pub base_url: Option<Sp<String>>,
    /// Client-side request budget, `REQUESTS/DURATION`. Defaults: ngrok `100/60s`, okta-asa
    /// `600/60s`.
    pub rate_limit: Option<Sp<String>>,
    /// okta-asa: the team name.
    pub team: Option<Sp<String>>,
    /// okta-asa: the API key id of the service user keyward authenticates as.
    pub key_id: Option<Sp<String>>,
    /// okta-asa: the API key secret, normally `${VAR}`. Written literally it is accepted with
    /// a warning.
    pub key_secret: Option<Sp<String>>,
    /// okta-asa: a file holding the key secret; a trailing newline is ignored. Instead of
    /// `key_secret`.
    pub key_secret_file: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(rename = "ProviderType")]
pub enum RawProviderType {
    #[serde(rename = "ngrok")]
    Ngrok,
    #[serde(rename = "okta-asa")]
    OktaAsa,
}

/// A sink: where a new secret is delivered before the key it replaces is revoked.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Sink")]
pub struct RawSink {
    /// `file` (write a file, atomically, mode 0600) or `exec` (run a command, the document on
    /// its stdin).
    #[serde(rename = "type")]
    pub kind: Sp<RawSinkType>,
    /// file: the path to write; may hold `{provider}`, `{user}`, `{slot}`, `{key_id}`. A
    /// relative path is relative to this file.
    pub path: Option<Sp<String>>,
    /// file: `json` (default; the sink document), `env` (`KEYWARD_KEY_ID=` and
    /// `KEYWARD_SECRET=` lines) or `raw` (the secret alone).
    pub format: Option<Sp<RawSinkFormat>>,
    /// exec: the command and its arguments (no shell); may hold the same placeholders. It gets
    /// the JSON document on stdin; exit status 0 means delivered.
    pub command: Option<Sp<Vec<Sp<String>>>>,
    /// exec: how long the command may run (default `30s`).
    pub timeout: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "SinkType")]
pub enum RawSinkType {
    File,
    Exec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "SinkFormat")]
pub enum RawSinkFormat {
    Json,
    Env,
    Raw,
}

/// Key policy fields shared by `defaults` and every slot.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Policy")]
pub struct RawPolicy {
    /// Rotate when the current key is older than this (e.g. `30d`). Absent: rotate only when
    /// forced, or at every `schedule` time.
    pub rotate_every: Option<Sp<String>>,
    /// Cron expression (5 fields, or 6 with seconds first): rotations happen only at these
    /// times.
    pub schedule: Option<Sp<String>>,
    /// IANA time zone for `schedule` (default `UTC`).
    pub timezone: Option<Sp<String>>,
    /// How long the replaced key stays valid after the new one is delivered (default `24h`).
    pub overlap: Option<Sp<String>>,
    /// Spread due times over this window (default `0s`): each slot's due time is pushed back by
    /// a fixed share of it, derived from provider, user and slot, so that keys created together
    /// do not come due together.
    pub spread: Option<Sp<String>>,
    /// One sink name or a list of them.
    pub sink: Option<Sp<SinkNames>>,
}

/// A service user.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "User")]
pub struct RawUser {
    /// The provider account (a name under `providers`).
    pub provider: Sp<String>,
    /// The user's name at the provider: unique per provider account.
    pub name: Option<Sp<String>>,
    /// Instead of `name`: one user per name, all with this entry's provider, `active` and
    /// `keys` (fleets of agents or devices that share a key layout).
    pub names: Option<Sp<Vec<Sp<String>>>>,
    /// `false` deactivates the user (ngrok `active=false`, ASA status `DISABLED`); default
    /// `true`. Its keys are still created and rotated.
    pub active: Option<Sp<bool>>,
    /// Key slots by slot name. An okta-asa user holds at most one.
    pub keys: Option<Named<Option<RawSlot>>>,
}

/// A key slot: one key kept current, rotated by its policy.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Slot")]
pub struct RawSlot {
    /// ngrok: `api_key` (default) or `credential` (agent authtoken); okta-asa: `api_key`.
    pub kind: Option<Sp<RawKeyKind>>,
    /// ngrok only: the key's description (keyward writes its own when absent).
    pub description: Option<Sp<String>>,
    /// ngrok credentials only: ACL rules, e.g. `bind:*.example.com`.
    pub acl: Option<Sp<Vec<Sp<String>>>>,
    /// Rotate when the current key is older than this (e.g. `30d`).
    pub rotate_every: Option<Sp<String>>,
    /// Cron expression (5 fields, or 6 with seconds first): rotations happen only at these
    /// times.
    pub schedule: Option<Sp<String>>,
    /// IANA time zone for `schedule` (default `UTC`).
    pub timezone: Option<Sp<String>>,
    /// How long the replaced key stays valid after the new one is delivered (default `24h`).
    pub overlap: Option<Sp<String>>,
    /// Spread due times over this window (default `0s`; see `defaults.spread`).
    pub spread: Option<Sp<String>>,
    /// One sink name or a list of them (default: `defaults.sink`).
    pub sink: Option<Sp<SinkNames>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "KeyKind")]
pub enum RawKeyKind {
    ApiKey,
    Credential,
}

/// What to do with objects keyward manages that are no longer in the file.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Prune")]
pub struct RawPrune {
    /// Users keyward created that left the file: `keep` (default), `disable` or `delete`.
    pub users: Option<Sp<RawPruneUsers>>,
    /// Keys on a managed user that keyward did not create: `report` (default) or `revoke`.
    pub unknown_keys: Option<Sp<RawPruneKeys>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "PruneUsers")]
pub enum RawPruneUsers {
    Keep,
    Disable,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "PruneKeys")]
pub enum RawPruneKeys {
    Report,
    Revoke,
}
