//! The shipped systemd unit: `systemd-analyze verify` accepts it (with ExecStart pointed at the
//! binary under test), and `systemd-analyze security` rates its exposure as OK. On a machine
//! without systemd-analyze the test says so and checks the unit's essential lines instead.

use std::path::Path;
use std::process::Command;

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/keyward.service"))
        .unwrap()
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
        "ProtectHome=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(line), "unit lacks `{}`", line.trim());
    }
}

#[test]
fn systemd_analyze_verifies_and_rates_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "systemd-analyze not installed: verify skipped (the unit's lines are checked above)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("keyward.service");
    let text = unit_text().replace("/usr/local/bin/keyward", env!("CARGO_BIN_EXE_keyward"));
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Only problems with this unit count (the host's own units may have their own warnings).
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("keyward")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
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
    assert!(score <= 2.0, "exposure {score} is worse than 2.0: {line}");
}
