//! The config loader against a corpus of files (`tests/config/*.yaml`), each declaring in its
//! header comments the diagnostics it must produce, exactly located:
//!
//! ```yaml
//! # expect: 10:5 unknown field `bogus`      (an error at line 10, column 5)
//! # warn: 4:14 api_key is written inline    (a warning)
//! ```
//!
//! A file without `expect` lines must load. Plus: secrets never appear in diagnostics, the
//! shipped example and sandbox configs load, and `${VAR}` / `$${` behave.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use keyward::config::{self, Diagnostic, Severity};
use secrecy::ExposeSecret;

const NGROK_SECRET: &str = "ngrok-env-secret-7f3a9c";
const ASA_SECRET: &str = "asa-env-secret-d41d8c";
const FILE_SECRET: &str = "file-secret-0cc175b9";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config")
}

/// The environment every corpus file is loaded with; `CREDENTIALS_DIRECTORY` points at `creds`.
fn env_with(creds: &Path) -> impl Fn(&str) -> Option<String> + use<> {
    let mut vars: HashMap<&'static str, String> = HashMap::new();
    vars.insert("NGROK_API_KEY", NGROK_SECRET.to_string());
    vars.insert("ASA_KEY_ID", "kid-123".to_string());
    vars.insert("ASA_KEY_SECRET", ASA_SECRET.to_string());
    vars.insert("KEYWARD_SANDBOX_URL", "http://127.0.0.1:4040".to_string());
    vars.insert(
        "CREDENTIALS_DIRECTORY",
        creds.to_string_lossy().into_owned(),
    );
    move |name| vars.get(name).cloned()
}

/// A credentials directory like systemd's, holding the files the example config reads.
fn credentials() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asa-secret"), format!("{FILE_SECRET}\n")).unwrap();
    std::fs::write(
        dir.path().join("ngrok-staging"),
        format!("{FILE_SECRET}\r\n"),
    )
    .unwrap();
    // As credential files should be: readable by their owner alone.
    for name in ["asa-secret", "ngrok-staging"] {
        std::fs::set_permissions(
            dir.path().join(name),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    dir
}

/// Loads `text` (written as keyward.yaml beside the files `files` names, each with its mode).
fn load_beside(text: &str, files: &[(&str, &str, u32)]) -> Vec<Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    for (name, content, mode) in files {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let path = dir.path().join("keyward.yaml");
    std::fs::write(&path, text).unwrap();
    match config::load_with_env(&path, &|_| None) {
        Ok(l) => l.warnings,
        Err(d) => d,
    }
}

#[test]
fn credential_files_that_others_can_read_or_that_hold_two_lines_are_said_once() {
    let ngrok = "version: 1\nproviders:\n  ng: {type: ngrok, api_key_file: key}\n";
    let pg = "version: 1\nsettings:\n  state_url_file: url\n";
    // Readable by every user: a warning naming the file and its mode, nothing else.
    let d = load_beside(ngrok, &[("key", "k-1\n", 0o644)]);
    assert_eq!(d.len(), 1, "{}", render(&d));
    assert_eq!(d[0].severity, Severity::Warning);
    assert!(d[0].message.contains("mode 0644"), "{}", render(&d));
    assert!(load_beside(ngrok, &[("key", "k-1\n", 0o640)]).is_empty());
    // Two lines are never joined or cut: an error, and the value is not shown.
    for text in [ngrok, pg] {
        let name = if text == ngrok { "key" } else { "url" };
        let d = load_beside(
            text,
            &[(name, "postgres://kw:pw-line-1@db/k\nsecond-line\n", 0o600)],
        );
        let errors: Vec<_> = d.iter().filter(|x| x.severity == Severity::Error).collect();
        assert_eq!(errors.len(), 1, "{}", render(&d));
        assert!(
            errors[0].message.contains("more than one line"),
            "{}",
            render(&d)
        );
        assert!(!render(&d).contains("pw-line-1"), "{}", render(&d));
    }
    // A state_url_file that is not there: one error, not also "state_url is empty".
    let d = load_beside(pg, &[]);
    assert_eq!(d.len(), 1, "{}", render(&d));
    assert!(
        d[0].message.contains("cannot read state_url_file"),
        "{}",
        render(&d)
    );
}

fn load(path: &Path) -> Result<config::Loaded, Vec<Diagnostic>> {
    let creds = credentials();
    config::load_with_env(path, &env_with(creds.path()))
}

struct Expectation {
    severity: Severity,
    line: usize,
    column: usize,
    text: String,
}

fn expectations(text: &str) -> Vec<Expectation> {
    let mut out = Vec::new();
    for line in text.lines() {
        let (severity, rest) = if let Some(r) = line.strip_prefix("# expect: ") {
            (Severity::Error, r)
        } else if let Some(r) = line.strip_prefix("# warn: ") {
            (Severity::Warning, r)
        } else {
            continue;
        };
        let (at, msg) = rest.split_once(' ').expect("`L:C message`");
        let (l, c) = at.split_once(':').expect("`L:C`");
        out.push(Expectation {
            severity,
            line: l.parse().unwrap(),
            column: c.parse().unwrap(),
            text: msg.to_string(),
        });
    }
    out
}

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("  {d}\n")).collect::<String>()
}

#[test]
fn corpus() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus went missing: {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        if text.is_empty() {
            continue; // empty.yaml has its own test
        }
        let expected = expectations(&text);
        let diags = match load(path) {
            Ok(loaded) => loaded.warnings,
            Err(all) => all,
        };
        let mut problems = Vec::new();
        for e in &expected {
            let prefix = format!("{}:{}:{}: ", path.display(), e.line, e.column);
            let found = diags.iter().any(|d| {
                d.severity == e.severity
                    && d.to_string().starts_with(&prefix)
                    && d.message.contains(&e.text)
            });
            if !found {
                problems.push(format!("missing {prefix}{}", e.text));
            }
        }
        for severity in [Severity::Error, Severity::Warning] {
            let want = expected.iter().filter(|e| e.severity == severity).count();
            let got = diags.iter().filter(|d| d.severity == severity).count();
            if want != got {
                problems.push(format!("{want} {severity:?}s expected, {got} reported"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n    {}\n  reported:\n{}",
                path.display(),
                problems.join("\n    "),
                render(&diags)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn empty_file() {
    let path = corpus_dir().join("empty.yaml");
    let errs = load(&path).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].to_string(),
        format!(
            "{}:1:1: the file is empty; a keyward config starts with `version: 1`",
            path.display()
        )
    );
}

#[test]
fn comments_only_file_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(&path, "# nothing yet\n\n   # still nothing\n").unwrap();
    let errs = load(&path).unwrap_err();
    assert!(errs[0].message.starts_with("the file is empty"), "{errs:?}");
}

#[test]
fn missing_config_file_is_a_diagnostic() {
    let errs = load(Path::new("/nonexistent/keyward.yaml")).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0]
            .to_string()
            .starts_with("/nonexistent/keyward.yaml:1:1: cannot read the config file"),
        "{errs:?}"
    );
}

#[test]
fn minimal_file_gets_every_default() {
    let loaded = load(&corpus_dir().join("ok-minimal.yaml")).unwrap();
    assert!(loaded.warnings.is_empty());
    let c = loaded.config;
    assert_eq!(c.settings.interval.as_secs(), 300);
    assert_eq!(c.settings.mode, config::Mode::Apply);
    assert_eq!(c.settings.concurrency, 8);
    assert_eq!(c.settings.max_deletions, 10);
    assert_eq!(c.settings.metrics, None);
    let p = &c.providers["ngrok"];
    assert_eq!(p.base_url, "https://api.ngrok.com");
    assert_eq!(p.rate_limit.requests, 100);
    assert_eq!(p.rate_limit.per.as_secs(), 60);
    match &p.auth {
        config::ProviderAuth::Ngrok { api_key } => {
            assert_eq!(api_key.expose_secret(), NGROK_SECRET)
        }
        other => panic!("{other:?}"),
    }
    let slot = &c.users[0].slots["main"];
    assert_eq!(slot.kind, config::KeyKind::ApiKey);
    assert_eq!(slot.overlap.as_secs(), 86_400);
    assert_eq!(slot.timezone, "UTC");
    assert_eq!(slot.rotate_every, None);
    assert_eq!(slot.schedule, None);
    assert_eq!(slot.sinks, vec!["s".to_string()]);
    assert!(c.users[0].active);
    assert_eq!(c.prune.users, config::PruneUsers::Keep);
    assert_eq!(c.prune.unknown_keys, config::PruneKeys::Report);
    // Relative sink paths are relative to the config file's directory.
    match &c.sinks["s"].kind {
        config::SinkKind::File { path, format } => {
            assert_eq!(*format, config::SinkFormat::Json);
            assert!(Path::new(path).is_absolute(), "{path}");
            assert!(
                path.ends_with("tests/config/out/{provider}/{user}/{slot}.json"),
                "{path}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.digest.len(), 64);
}

#[test]
fn example_config_loads_and_uses_every_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let loaded = match load(&path) {
        Ok(l) => l,
        Err(d) => panic!("example.yaml:\n{}", render(&d)),
    };
    assert!(loaded.warnings.is_empty(), "{}", render(&loaded.warnings));
    let c = loaded.config;
    assert_eq!(c.providers.len(), 3);
    assert_eq!(c.sinks.len(), 3);
    // Three users by `name`, three by one `names:` entry.
    assert_eq!(c.users.len(), 6);
    assert_eq!(c.settings.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    match &c.providers["asa"].auth {
        config::ProviderAuth::OktaAsa {
            team,
            key_id,
            key_secret,
        } => {
            assert_eq!(team, "acme");
            assert_eq!(key_id, "kid-123");
            // The file's trailing newline is not part of the secret.
            assert_eq!(key_secret.expose_secret(), FILE_SECRET);
        }
        other => panic!("{other:?}"),
    }
    match &c.providers["ngrok-staging"].auth {
        config::ProviderAuth::Ngrok { api_key } => assert_eq!(api_key.expose_secret(), FILE_SECRET),
        other => panic!("{other:?}"),
    }
    let deploy = &c.users[0].slots["deploy"];
    assert_eq!(
        deploy.sinks,
        vec!["local".to_string(), "hand-off".to_string()]
    );
    assert_eq!(deploy.schedule.as_deref(), Some("0 3 * * 1"));
    assert_eq!(deploy.timezone, "Europe/Berlin");
    assert_eq!(deploy.overlap.as_secs(), 48 * 3600);
    let tunnel = &c.users[0].slots["tunnel"];
    assert_eq!(tunnel.kind, config::KeyKind::Credential);
    assert_eq!(tunnel.acl, vec!["bind:*.example.com".to_string()]);
    assert_eq!(tunnel.rotate_every.map(|d| d.as_secs()), Some(30 * 86_400));
    assert!(!c.users[1].active);
}

#[test]
fn sandbox_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sandbox.yaml");
    let loaded = match load(&path) {
        Ok(l) => l,
        Err(d) => panic!("sandbox.yaml:\n{}", render(&d)),
    };
    assert!(loaded.warnings.is_empty(), "{}", render(&loaded.warnings));
    let c = loaded.config;
    assert_eq!(c.providers["sandbox"].base_url, "http://127.0.0.1:4040");
    // `../.keyward/sandbox` relative to config/: the repository's .keyward directory.
    let repo_state = Path::new(env!("CARGO_MANIFEST_DIR")).join(".keyward/sandbox");
    assert_eq!(
        std::path::absolute(&c.settings.state_dir)
            .unwrap()
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect::<PathBuf>()
            .to_string_lossy()
            .replace("config/../", ""),
        repo_state.to_string_lossy()
    );
    assert!(c.users.iter().all(|u| u.provider == "sandbox"));
    assert!(c.users.len() >= 2);
}

/// Every error and warning a file full of problems produces, for secrets that come from the
/// environment, from a file, and inline: none of them shows up anywhere in a diagnostic.
#[test]
fn secrets_never_appear_in_diagnostics() {
    let creds = credentials();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("key");
    std::fs::write(&secret_file, format!("{FILE_SECRET}\n")).unwrap();
    let inline = "inline-literal-secret-92eb5f";
    let text = format!(
        "version: 1\n\
         providers:\n\
         \x20 a: {{type: ngrok, api_key: \"${{NGROK_API_KEY}}\", base_url: \"http://example.com\", team: x}}\n\
         \x20 b: {{type: ngrok, api_key_file: \"{}\", rate_limit: nope}}\n\
         \x20 c: {{type: okta-asa, team: t, key_id: k, key_secret: \"${{ASA_KEY_SECRET}}\", key_secret_file: \"{}\"}}\n\
         \x20 d: {{type: ngrok, api_key: {inline}}}\n\
         \x20 e: {{type: okta-asa, team: t, key_id: k, key_secret: \"{inline}\", api_key: \"${{NGROK_API_KEY}}\"}}\n\
         \x20 f: {{type: ngrok, api_key: \"${{NGROK_API_KEY}}\", api_key_file: \"{}\"}}\n\
         users:\n\
         \x20 - {{provider: a, name: u, keys: {{k: {{kind: credential, acl: [x]}}}}}}\n",
        secret_file.display(),
        secret_file.display(),
        secret_file.display(),
    );
    let path = dir.path().join("keyward.yaml");
    std::fs::write(&path, &text).unwrap();
    let diags = config::load_with_env(&path, &env_with(creds.path())).unwrap_err();
    assert!(diags.len() >= 6, "{}", render(&diags));
    for d in &diags {
        let shown = format!("{d} {d:?}");
        for secret in [NGROK_SECRET, ASA_SECRET, FILE_SECRET, inline] {
            assert!(!shown.contains(secret), "{secret} leaked in: {shown}");
        }
    }
    // The inline secret is warned about by field name.
    assert!(
        diags.iter().any(|d| d.severity == Severity::Warning
            && d.message.starts_with("api_key is written inline")),
        "{}",
        render(&diags)
    );
    // And the resolved config's Debug never shows a secret either.
    let ok = dir.path().join("ok.yaml");
    std::fs::write(
        &ok,
        format!(
            "version: 1\nproviders:\n  a: {{type: ngrok, api_key: \"${{NGROK_API_KEY}}\"}}\n  b: {{type: okta-asa, team: t, key_id: k, key_secret_file: \"{}\"}}\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let loaded = config::load_with_env(&ok, &env_with(creds.path())).unwrap();
    let debug = format!("{:?}", loaded.config);
    assert!(
        !debug.contains(NGROK_SECRET) && !debug.contains(FILE_SECRET),
        "{debug}"
    );
}

#[test]
fn interpolation_and_escape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         providers:\n\
         \x20 p: {type: ngrok, api_key: \"${NGROK_API_KEY}\"}\n\
         sinks:\n\
         \x20 s: {type: exec, command: [\"/bin/echo\", \"$${NOT_A_VAR}\", \"cost: $5\", \"${ASA_KEY_ID}-{user}\"]}\n",
    )
    .unwrap();
    let creds = credentials();
    let loaded = config::load_with_env(&path, &env_with(creds.path())).unwrap();
    match &loaded.config.sinks["s"].kind {
        config::SinkKind::Exec { command, timeout } => {
            assert_eq!(
                command,
                &["/bin/echo", "${NOT_A_VAR}", "cost: $5", "kid-123-{user}"]
            );
            assert_eq!(timeout.as_secs(), 30);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn state_directory_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(&path, "version: 1\n").unwrap();
    let env = |name: &str| {
        (name == "STATE_DIRECTORY").then(|| "/var/lib/keyward:/var/lib/other".to_string())
    };
    let loaded = config::load_with_env(&path, &env).unwrap();
    assert_eq!(
        loaded.config.settings.state_dir,
        Path::new("/var/lib/keyward")
    );
    let none = |_: &str| None;
    let loaded = config::load_with_env(&path, &none).unwrap();
    assert_eq!(loaded.config.settings.state_dir, Path::new("./.keyward"));
}

#[test]
fn load_reads_the_process_environment() {
    // No variables needed: `load` itself, end to end.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(&path, "version: 1\nsettings: {mode: observe}\n").unwrap();
    let loaded = config::load(&path).unwrap();
    assert_eq!(loaded.config.settings.mode, config::Mode::Observe);
}

#[test]
fn schema_describes_the_file() {
    let schema = config::schema();
    let props = &schema["properties"];
    for key in [
        "version",
        "settings",
        "providers",
        "sinks",
        "defaults",
        "users",
        "prune",
    ] {
        assert!(props.get(key).is_some(), "{key} missing from {schema}");
    }
    assert_eq!(schema["required"], serde_json::json!(["version"]));
    let text = schema.to_string();
    assert!(text.contains("okta-asa"));
    assert!(text.contains("additionalProperties"));
    assert!(text.contains("Cron expression"));
}

/// Arbitrary input never panics, and a failure always comes with at least one error.
#[test]
fn never_panics_on_mangled_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    let base =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml"))
            .unwrap();
    let creds = credentials();
    let env = env_with(creds.path());
    let bytes = base.as_bytes();
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\xff\xfe".to_vec(),
        b"version: 1\n\xc3\x28\n".to_vec(),
        b"- a\n- b\n".to_vec(),
        b"42".to_vec(),
        b"---\n".to_vec(),
        b"version: 1\n---\nversion: 1\n".to_vec(),
        b"a: &x [*x]\n".to_vec(),
        b"version: 1\nusers: &u [{provider: p, name: *u}]\n".to_vec(),
        b"version: 1\nproviders: {a: *nope}\n".to_vec(),
        b"version: 1\nusers:\n  -\n  - ~\n  - 3\n".to_vec(),
        b"version: 1\nproviders:\n  ? [a]\n  : {type: ngrok}\n".to_vec(),
    ];
    // Truncations and single-byte corruptions of the example.
    for cut in (0..bytes.len()).step_by(97) {
        inputs.push(bytes[..cut].to_vec());
        let mut v = bytes.to_vec();
        v[cut] = b"\t:-[{\"'&*!|>#%@`"[cut % 16];
        inputs.push(v);
    }
    for input in inputs {
        std::fs::write(&path, &input).unwrap();
        if let Err(diags) = config::load_with_env(&path, &env) {
            assert!(
                diags.iter().any(|d| d.severity == Severity::Error),
                "failed without an error for {:?}",
                String::from_utf8_lossy(&input)
            );
            for d in &diags {
                assert!(d.line >= 1 && d.column >= 1, "{d}");
            }
        }
    }
}

#[test]
fn a_warning_about_a_default_names_the_config_file_where_it_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("keyward.yaml");
    std::fs::write(
        &main,
        "version: 1\ninclude: [\"users.d/*.yaml\"]\nproviders:\n  ng: {type: ngrok, api_key: \"${NGROK_API_KEY}\"}\nsinks:\n  s: {type: file, path: \"/tmp/kw/{user}/{slot}.json\"}\ndefaults:\n  sink: s\n  timezone: Europe/Berlin\n  spread: 7d\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("users.d")).unwrap();
    std::fs::write(
        dir.path().join("users.d/a.yaml"),
        "users:\n  - provider: ng\n    names: [a1, a2]\n    keys:\n      agent: {rotate_every: 1d}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("users.d/b.yaml"),
        "users:\n  - provider: ng\n    name: b1\n    keys:\n      agent: {rotate_every: 1d}\n",
    )
    .unwrap();
    let creds = tempfile::tempdir().unwrap();
    let loaded =
        config::load_with_env(&main, &env_with(creds.path())).unwrap_or_else(|d| panic!("{d:?}"));
    let warned: Vec<String> = loaded
        .warnings
        .iter()
        .map(|d| format!("{}:{}:{} {}", d.file.display(), d.line, d.column, d.message))
        .collect();
    let spread: Vec<&String> = warned.iter().filter(|w| w.contains("spread 7d")).collect();
    assert_eq!(spread.len(), 1, "{warned:#?}");
    assert!(
        spread[0].starts_with(&format!("{}:10:11 ", main.display())),
        "{warned:#?}"
    );
    let tz: Vec<&String> = warned.iter().filter(|w| w.contains("timezone")).collect();
    assert_eq!(tz.len(), 1, "{warned:#?}");
    assert!(
        tz[0].starts_with(&format!("{}:9:", main.display())),
        "{warned:#?}"
    );
}
