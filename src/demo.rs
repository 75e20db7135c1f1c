//! `keyward demo` (cargo feature `demo`): the quick start. Starts the provider emulators of the
//! `keyward-sandbox` crate in-process on a loopback port, then runs this same binary's plan →
//! apply → status → rotate → status → plan against them with `config/sandbox.yaml`, printing
//! each step, so anyone can watch keyward work without a provider account.
//!
//! Each step is a child `keyward` process, exactly the command a user would type; the sandbox's
//! address and admin key reach the steps through their environment (this process's own
//! environment is never changed).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use keyward_sandbox::{Sandbox, SandboxOptions};

use crate::config::{self, Loaded, SinkKind};

/// What the demo is run with: the config it uses, and the global flags each step gets.
pub struct Options {
    /// `-c`, if given; else `config/sandbox.yaml`.
    pub config: Option<PathBuf>,
    /// The global flags (`--log-format`, `-v`, `-q`, `--no-color`) to pass on to each step.
    pub step_flags: Vec<OsString>,
}

/// Runs the demo.
pub async fn run(opts: &Options) -> anyhow::Result<ExitCode> {
    let config = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config/sandbox.yaml"));
    if !config.is_file() {
        anyhow::bail!(
            "{} not found: run the demo from the keyward source directory, or pass -c FILE",
            config.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the keyward binary to run the steps")?;
    let sandbox = Sandbox::start(([127, 0, 0, 1], 0).into(), SandboxOptions::default()).await?;
    eprintln!("keyward demo: sandbox running at {}", sandbox.url());
    let env = [
        ("KEYWARD_SANDBOX_URL", sandbox.url()),
        ("NGROK_API_KEY", sandbox.ngrok_admin_key()),
    ];
    let code = steps(opts, &exe, &config, &env).await;
    sandbox.shutdown().await;
    code
}

/// Runs the steps against the sandbox `env` describes; stops at the first that fails.
async fn steps(
    opts: &Options,
    exe: &Path,
    config: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<ExitCode> {
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    };
    let loaded = config::load_with_env(config, &lookup).ok();
    // The sandbox is new, so any state from an earlier demo describes keys that are gone.
    if let Some(loaded) = &loaded {
        for file in ["state.json", "state.db", "state.db-wal", "state.db-shm"] {
            let stale = loaded.config.settings.state_dir.join(file);
            if stale.exists() {
                std::fs::remove_file(&stale)
                    .with_context(|| format!("cannot remove {}", stale.display()))?;
            }
        }
    }
    let first_user = loaded
        .as_ref()
        .and_then(|l| l.config.users.first().map(|u| u.name.clone()));

    let mut steps: Vec<Vec<String>> = vec![
        vec!["plan".into()],
        vec!["apply".into(), "--auto-approve".into()],
        vec!["status".into()],
    ];
    if let Some(user) = first_user {
        steps.push(vec!["rotate".into(), user, "--auto-approve".into()]);
        steps.push(vec!["status".into()]);
    }
    steps.push(vec!["plan".into(), "--detailed-exitcode".into()]);

    for step in steps {
        println!("\n$ keyward {}", step.join(" "));
        let status = tokio::process::Command::new(exe)
            .arg("--config")
            .arg(config)
            .args(&opts.step_flags)
            .args(&step)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .status()
            .await
            .with_context(|| format!("cannot run {}", exe.display()))?;
        if !status.success() {
            let code = status.code().and_then(|c| u8::try_from(c).ok());
            return Ok(ExitCode::from(code.filter(|&c| c != 0).unwrap_or(1)));
        }
    }
    if let Some(loaded) = &loaded {
        print_where(loaded);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_where(loaded: &Loaded) {
    let secrets = loaded
        .config
        .sinks
        .values()
        .find_map(|s| match &s.kind {
            SinkKind::File { path, .. } => Some(path.clone()),
            _ => None,
        })
        .unwrap_or_default();
    println!(
        "\nThe secrets were delivered under {secrets} (mode 0600); keyward's state is in {}.",
        loaded.config.settings.state_dir.display()
    );
}
