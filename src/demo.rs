//! `keyward demo`: the quick start. Starts the bundled ngrok sandbox in-process on a loopback
//! port, points `config/sandbox.yaml` at it, and runs plan → apply → status → rotate → status →
//! plan, printing each step, so anyone can watch keyward work without a provider account.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{Cli, Command, run};
use crate::sandbox::{Sandbox, SandboxOptions};

/// Runs the demo. Called before any runtime or thread exists (the environment is set here).
pub fn main(cli: &Cli) -> ExitCode {
    match demo(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn demo(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config/sandbox.yaml"));
    if !config.is_file() {
        anyhow::bail!(
            "{} not found: run the demo from the keyward source directory, or pass -c FILE",
            config.display()
        );
    }
    // A port that was free a moment ago, and a fresh admin key for this sandbox only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let admin_key = format!("demo_{}", random_token());
    let url = format!("http://127.0.0.1:{port}");
    // SAFETY: no other thread exists yet (the async runtime starts below), so nothing can read
    // the environment concurrently.
    unsafe {
        std::env::set_var("KEYWARD_SANDBOX_URL", &url);
        std::env::set_var("NGROK_API_KEY", &admin_key);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let sandbox = Sandbox::start(
            ([127, 0, 0, 1], port).into(),
            SandboxOptions {
                admin_key: Some(admin_key),
                ..SandboxOptions::default()
            },
        )
        .await?;
        eprintln!("keyward demo: sandbox running at {}", sandbox.url());

        // The sandbox is new, so any state from an earlier demo describes keys that are gone.
        if let Ok(loaded) = crate::config::load(&config) {
            let stale = loaded.config.settings.state_dir.join("state.json");
            if stale.exists() {
                std::fs::remove_file(&stale)?;
            }
        }
        let first_user = crate::config::load(&config)
            .ok()
            .and_then(|l| l.config.users.first().map(|u| u.name.clone()));

        let mut steps: Vec<(&str, Command)> = vec![
            (
                "keyward plan",
                Command::Plan {
                    json: false,
                    out: None,
                    detailed_exitcode: false,
                    only: vec![],
                },
            ),
            (
                "keyward apply --auto-approve",
                Command::Apply {
                    auto_approve: true,
                    only: vec![],
                    planfile: None,
                },
            ),
            ("keyward status", Command::Status { json: false }),
        ];
        if let Some(user) = first_user {
            steps.push((
                "keyward rotate (first user) --auto-approve",
                Command::Rotate {
                    targets: vec![user],
                    auto_approve: true,
                },
            ));
            steps.push(("keyward status", Command::Status { json: false }));
        }
        steps.push((
            "keyward plan --detailed-exitcode",
            Command::Plan {
                json: false,
                out: None,
                detailed_exitcode: true,
                only: vec![],
            },
        ));
        let mut code = ExitCode::SUCCESS;
        for (title, command) in steps {
            println!("\n$ {title}");
            let step = Cli {
                config: Some(config.clone()),
                log_format: cli.log_format,
                verbose: cli.verbose,
                quiet: cli.quiet,
                no_color: cli.no_color,
                command,
            };
            let c = run(&step).await;
            if c != ExitCode::SUCCESS {
                code = c;
                break;
            }
        }
        if code == ExitCode::SUCCESS
            && let Ok(loaded) = crate::config::load(&config)
        {
            println!(
                "\nThe secrets were delivered under {} (mode 0600); keyward's state is in {}.",
                loaded
                    .config
                    .sinks
                    .values()
                    .find_map(|s| match &s.kind {
                        crate::config::SinkKind::File { path, .. } => Some(path.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                loaded.config.settings.state_dir.display()
            );
        }
        sandbox.shutdown().await;
        Ok(code)
    })
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| {
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    [rng.random_range(0..62)],
            )
        })
        .collect()
}
