//! The `keyward-sandbox` command line: serves local emulations of the provider APIs keyward
//! manages, for the quick start and the integration tests. The binary is a target of the
//! `keyward` package (its tests start it by path) whose `main` is [`main`].
//!
//! On start-up it prints shell-evaluable lines to stdout (tests parse them) and then serves until
//! SIGINT or SIGTERM. Logs go to stderr.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::{Sandbox, SandboxOptions, parse_latency, parse_rate_limit};
use anyhow::Context as _;
use clap::Parser;

/// Local emulator of the ngrok API (service users, API keys, credentials) and the Okta ASA API
/// (service users and their API keys) with fault injection.
#[derive(Debug, Parser)]
#[command(name = "keyward-sandbox", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Allow listening on a non-loopback address (the sandbox has no real security).
    #[arg(long)]
    allow_non_loopback: bool,
    /// Delay before answering each API request, e.g. 20ms or 1s.
    #[arg(long, value_parser = parse_latency, default_value = "0")]
    latency: Duration,
    /// Probability (0..1) of answering an API request 500/503 without applying it.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Account-wide rate limit N/WINDOW over a rolling window, e.g. 120/60s.
    #[arg(long, value_parser = parse_rate_limit)]
    rate_limit: Option<(u32, Duration)>,
    /// JSON file in the format of POST /_sandbox/ngrok/seed, loaded at start-up.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Seed for the random number generator, for reproducible IDs, tokens and faults.
    #[arg(long)]
    rng_seed: Option<u64>,
    /// Use this bootstrap ngrok admin API key instead of generating one.
    #[arg(long)]
    admin_key: Option<String>,
    /// Name of the emulated Okta ASA team.
    #[arg(long, default_value = "keyward-sandbox")]
    asa_team: String,
    /// Lifetime of ASA bearer tokens from service_token, e.g. 10m or 2s (at least 1s).
    #[arg(long, value_parser = parse_latency, default_value = "10m")]
    asa_token_lifetime: Duration,
    /// How long ASA keeps a user's older keys valid after a key rotation, e.g. 48h.
    #[arg(long, value_parser = parse_latency, default_value = "48h")]
    asa_key_grace: Duration,
}

/// Entry point of the `keyward-sandbox` binary: parses the arguments, serves until SIGINT or
/// SIGTERM.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyward-sandbox: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward-sandbox: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() && !args.allow_non_loopback {
        anyhow::bail!(
            "refusing to listen on non-loopback address {} (the sandbox accepts well-known test keys); pass --allow-non-loopback to insist",
            args.listen
        );
    }
    let sandbox = Sandbox::start(
        args.listen,
        SandboxOptions {
            latency: args.latency,
            error_rate: args.error_rate,
            rate_limit: args.rate_limit,
            rng_seed: args.rng_seed,
            seed_file: args.seed,
            admin_key: args.admin_key,
            asa_team: Some(args.asa_team),
            asa_token_lifetime: Some(args.asa_token_lifetime),
            asa_key_grace: Some(args.asa_key_grace),
        },
    )
    .await?;

    // Watch SIGTERM before announcing the address: whoever starts us may stop us right after.
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    // One write, so a reader that stops after the lines it needs still gets them all at once.
    let lines = format!(
        "# keyward-sandbox: ngrok emulator listening\nKEYWARD_SANDBOX_URL={}\nNGROK_API_KEY={}\nASA_TEAM={}\nASA_KEY_ID={}\nASA_KEY_SECRET={}\n",
        sandbox.url(),
        sandbox.ngrok_admin_key(),
        sandbox.asa_team(),
        sandbox.asa_key_id(),
        sandbox.asa_key_secret(),
    );
    let mut out = std::io::stdout().lock();
    // Whoever reads these lines through a pipe must see them now, not at exit.
    match out.write_all(lines.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        // A reader that closed its end after reading is no reason to stop serving.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::debug!("stdout closed before the start-up lines were written");
        }
        Err(e) => return Err(e).context("cannot write the start-up lines to stdout"),
    }
    drop(out);

    #[cfg(unix)]
    wait_for_signal(term).await?;
    #[cfg(not(unix))]
    wait_for_signal().await?;
    tracing::info!("shutting down");
    sandbox.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
#[cfg(unix)]
async fn wait_for_signal(mut term: tokio::signal::unix::Signal) -> anyhow::Result<()> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot watch Ctrl-C")?;
    Ok(())
}
