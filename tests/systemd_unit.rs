//! The shipped systemd unit and the README's install steps for it: `systemd-analyze verify`
//! accepts the unit (with ExecStart pointed at the binary under test), `systemd-analyze security`
//! rates its exposure at 1.2 or better, secrets stay out of core dumps, and the documented
//! install leaves the config readable by the unit's dynamic user while the credentials stay
//! root-only (systemd hands them over through `LoadCredential=`). systemd-analyze is required:
//! without it these tests fail rather than pass unchecked.

use std::path::Path;
use std::process::Command;

/// The worst `systemd-analyze security` exposure the unit may have.
const MAX_EXPOSURE: f64 = 1.2;

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn unit_text() -> String {
    repo_file("systemd/keyward.service")
}

/// The unit's `[Service]` settings named `key`, in order.
fn settings<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// `systemd-analyze` with `args`; a missing tool fails the test.
fn systemd_analyze(args: &[&str], unit: &Path) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze cannot be run ({e}): install systemd (Debian: apt-get install systemd) to check the unit"
            )
        })
}

/// The unit with ExecStart pointed at the binary under test, in a temporary directory.
fn unit_under_test() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("keyward.service");
    let text = unit_text().replace("/usr/local/bin/keyward", env!("CARGO_BIN_EXE_keyward"));
    std::fs::write(&unit, text).unwrap();
    (dir, unit)
}

#[test]
fn unit_has_the_essentials() {
    let unit = unit_text();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=keyward",
        "ConfigurationDirectory=keyward",
        "LoadCredential=",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        // Secrets pass through keyward's memory: none of it may land in a core dump.
        "LimitCORE=0\n",
    ] {
        assert!(unit.contains(line), "unit lacks `{}`", line.trim());
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let (_dir, unit) = unit_under_test();
    let out = systemd_analyze(&["verify"], &unit);
    let err = String::from_utf8_lossy(&out.stderr);
    // Only problems with this unit count (the host's own units may have their own warnings).
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("keyward")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

#[test]
fn systemd_analyze_rates_the_exposure_at_most_1_2() {
    let (_dir, unit) = unit_under_test();
    let out = systemd_analyze(&["security", "--offline=true", "--threshold=20"], &unit);
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{report}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in `{line}`"));
    eprintln!("systemd-analyze security: {}", line.trim());
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} is worse than {MAX_EXPOSURE}: {line}\n{report}"
    );
    for setting in ["PrivateMounts=", "NoNewPrivileges=", "ProtectSystem="] {
        let row = report
            .lines()
            .find(|l| l.contains(setting))
            .unwrap_or_else(|| panic!("{setting} not rated:\n{report}"));
        assert!(!row.trim_start().starts_with('✗'), "{row}");
    }
}

/// An `install` command of the README's service install steps: its mode and target.
#[derive(Debug)]
struct Install {
    mode: u32,
    directory: bool,
    targets: Vec<String>,
}

/// The `install` commands in the README's "Running as a service" section.
fn documented_installs() -> Vec<Install> {
    let readme = repo_file("README.md");
    let section = readme
        .split("## Running as a service")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a `Running as a service` section");
    let mut installs = Vec::new();
    for line in section.lines() {
        let command = line.split(" #").next().unwrap_or_default();
        let Some(rest) = command.trim().strip_prefix("sudo install ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let mode = words
            .iter()
            .position(|w| *w == "-m")
            .and_then(|i| words.get(i + 1))
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or_else(|| panic!("README: `{line}` sets no octal mode with -m"));
        let directory = words.contains(&"-d");
        let operands: Vec<String> = words
            .iter()
            .enumerate()
            .filter(|(i, w)| !w.starts_with('-') && (*i == 0 || words[i - 1] != "-m"))
            .map(|(_, w)| w.to_string())
            .collect();
        let targets = if directory {
            operands
        } else {
            operands.last().cloned().into_iter().collect()
        };
        installs.push(Install {
            mode,
            directory,
            targets,
        });
    }
    installs
}

fn installed(installs: &[Install], path: &str) -> Option<u32> {
    installs
        .iter()
        .find(|i| i.targets.iter().any(|t| t == path))
        .map(|i| i.mode)
}

#[test]
fn documented_install_lets_the_dynamic_user_read_its_config_and_only_root_the_credentials() {
    let unit = unit_text();
    let installs = documented_installs();
    // The unit runs as a dynamic user that owns nothing under /etc (PrivateUsers= maps root
    // away too): only the "other" permission bits apply to it.
    let exec_start = settings(&unit, "ExecStart").join(" ");
    let config = exec_start
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("ExecStart names the config with --config");
    let config_dir = Path::new(config).parent().unwrap().to_str().unwrap();
    assert_eq!(
        settings(&unit, "ConfigurationDirectory"),
        [Path::new(config_dir).file_name().unwrap().to_str().unwrap()],
        "ConfigurationDirectory= is the config's directory"
    );
    // The directory must be searchable and listable (keyward watches it for edits).
    let dir_mode = installed(&installs, config_dir)
        .unwrap_or_else(|| panic!("README does not install {config_dir}: {installs:?}"));
    assert_eq!(dir_mode & 0o005, 0o005, "{config_dir} is {dir_mode:o}");
    // systemd applies ConfigurationDirectoryMode= only when it creates the directory: it must
    // agree with the documented mode.
    for m in settings(&unit, "ConfigurationDirectoryMode") {
        let m = u32::from_str_radix(m.trim(), 8).unwrap();
        assert_eq!(m & 0o005, 0o005, "ConfigurationDirectoryMode={m:o}");
    }
    let file_mode = installed(&installs, config)
        .unwrap_or_else(|| panic!("README does not install {config}: {installs:?}"));
    assert!(
        file_mode & 0o004 != 0,
        "{config} is {file_mode:o}: the dynamic user cannot read it"
    );

    // Every credential the unit loads is installed, for root alone; systemd (as root) copies it
    // into $CREDENTIALS_DIRECTORY for the service.
    let credentials: Vec<&str> = settings(&unit, "LoadCredential")
        .into_iter()
        .filter_map(|c| c.split_once(':').map(|(_, path)| path))
        .collect();
    assert!(!credentials.is_empty(), "the unit loads no credential");
    for path in credentials {
        let mode = installed(&installs, path)
            .unwrap_or_else(|| panic!("README does not install the credential {path}"));
        assert_eq!(mode & 0o077, 0, "{path} is {mode:o}: readable beyond root");
        let dir = Path::new(path).parent().unwrap().to_str().unwrap();
        let dir_mode = installs
            .iter()
            .find(|i| i.directory && i.targets.iter().any(|t| t == dir))
            .map(|i| i.mode)
            .unwrap_or_else(|| panic!("README does not create {dir}"));
        assert_eq!(
            dir_mode & 0o077,
            0,
            "{dir} is {dir_mode:o}: open beyond root"
        );
    }
    // The config names its secrets through the credentials directory, never inline.
    let readme = repo_file("README.md");
    let section = readme.split("## Running as a service").nth(1).unwrap();
    assert!(
        section.contains("api_key_file: ${CREDENTIALS_DIRECTORY}/"),
        "the service section shows how the config reads a credential"
    );
}

/// The unit and the HA drop-in in a temporary unit directory (ExecStart pointed at the binary
/// under test); `extra` is appended to the drop-in.
fn unit_with_drop_in(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, unit) = unit_under_test();
    let drop_ins = dir.path().join("keyward.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    std::fs::write(
        drop_ins.join("ha.conf"),
        repo_file("systemd/keyward.service.d/ha.conf") + extra,
    )
    .unwrap();
    (dir, unit)
}

/// `systemd-analyze` with `args` on `unit`, whose directory is searched for drop-ins.
fn systemd_analyze_in_dir(args: &[&str], unit: &Path) -> std::process::Output {
    let dir = unit.parent().unwrap();
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .expect("systemd-analyze")
}

#[test]
fn the_ha_drop_in_verifies_waits_for_network_and_database_and_keeps_the_exposure() {
    let drop_in = repo_file("systemd/keyward.service.d/ha.conf");
    for line in [
        "Wants=network-online.target",
        "After=network-online.target postgresql.service",
        "Restart=always",
        "StartLimitIntervalSec=0",
        "LoadCredential=state-url:/etc/keyward/credentials/state-url",
        "state_url_file: ${CREDENTIALS_DIRECTORY}/state-url",
    ] {
        assert!(drop_in.contains(line), "ha.conf lacks `{line}`");
    }
    // The drop-in is read: a bad line in it is reported ...
    let (_d, unit) = unit_with_drop_in("\n[Service]\nNoSuchSetting=1\n");
    let out = systemd_analyze_in_dir(&["verify"], &unit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ha.conf"), "the drop-in was not read:\n{err}");
    // ... and as shipped it is clean.
    let (_d, unit) = unit_with_drop_in("");
    let out = systemd_analyze_in_dir(&["verify"], &unit);
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("keyward") || l.contains("ha.conf"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "verify:\n{err}");
    let out = systemd_analyze_in_dir(&["security", "--offline=true", "--threshold=20"], &unit);
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(score <= MAX_EXPOSURE, "exposure {score} with the drop-in");
}
