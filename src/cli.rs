//! The `keyward` command line: argument parsing (global flags work before or after the
//! subcommand), logging setup, and the commands: `plan`, `apply`, `rotate` and a saved-plan
//! apply are each one [`Engine::run`] with a terminal operator that prints the plan and asks for
//! confirmation; `status` observes and prints the key table. stdout carries only a command's
//! result; logs, progress and prompts go to stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, Diagnostic};
use crate::engine::{Engine, Operator, RunMode, RunOutcome, RunReport, RunRequest};
use crate::files::write_private_file;
use crate::model::Observed;
use crate::plan::{self, Plan, PlanOptions};
use crate::state::State;

/// The `keyward` command line: global flags and one subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Keeps service users and their API keys at ngrok and Okta ASA as one YAML file declares, and rotates the keys."
)]
pub struct Cli {
    /// Config file [default: $KEYWARD_CONFIG, else /etc/keyward/keyward.yaml]
    #[arg(
        short,
        long,
        global = true,
        env = "KEYWARD_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (repeatable).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// No colour (also: the NO_COLOR environment variable).
    #[arg(long, global = true)]
    pub no_color: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines on stderr are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes to stdout. A reader that went away (`keyward status | head -1`) ends the output
/// quietly, as a pipe's reader expects, instead of a panic.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing to stdout: {e}");
    }
}

/// `print!` through [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `println!` through [`write_stdout`].
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `--lock-timeout`: a duration as the config writes them (`0s`, `30s`, `5m`).
fn lock_timeout(text: &str) -> Result<std::time::Duration, String> {
    let d = crate::duration::parse(text)?;
    std::time::Duration::try_from(d).map_err(|e| format!("--lock-timeout {text}: {e}"))
}

/// The `keyward` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and check the config; no network.
    Validate,
    /// Observe the providers and show what apply would change; changes nothing.
    Plan {
        /// Print the plan as one JSON document.
        #[arg(long)]
        json: bool,
        /// Save the plan to this file, for `keyward apply FILE`.
        #[arg(long, value_name = "PLANFILE")]
        out: Option<PathBuf>,
        /// Exit 0 when there are no changes, 2 when there are, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Limit the plan to these users (NAME or PROVIDER:NAME); repeatable.
        #[arg(long, value_name = "USER")]
        only: Vec<String>,
    },
    /// Plan, confirm, and make the changes.
    Apply {
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Limit the run to these users (NAME or PROVIDER:NAME); repeatable.
        #[arg(long, value_name = "USER")]
        only: Vec<String>,
        /// How long to wait for the state lock another keyward process holds (e.g. `30s`,
        /// `5m`); default `0s`: fail at once, naming the holder.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = lock_timeout)]
        lock_timeout: std::time::Duration,
        /// A plan saved by `keyward plan --out`: executes exactly that plan, refused if stale.
        planfile: Option<PathBuf>,
    },
    /// Rotate keys now, with the same safety steps as a scheduled rotation.
    Rotate {
        /// USER, USER/SLOT, or PROVIDER:USER[/SLOT].
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// How long to wait for the state lock another keyward process holds (e.g. `30s`,
        /// `5m`); default `0s`: fail at once, naming the holder.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = lock_timeout)]
        lock_timeout: std::time::Duration,
    },
    /// Every managed key: age, expiry, next rotation, state.
    Status {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Take over what exists: print the config for the remote service users the file does not
    /// declare and record their keys as adopted (nothing remote changes); or, with
    /// TARGET and KEY_ID, adopt one existing key as the current key of a declared slot.
    Import {
        /// Only the users of this provider account; repeatable.
        #[arg(long = "provider", value_name = "NAME", conflicts_with = "target")]
        providers: Vec<String>,
        /// Only the service user of this name; repeatable.
        #[arg(long = "user", value_name = "NAME", conflicts_with = "target")]
        users: Vec<String>,
        /// Write the document to this new file (an existing file is never overwritten).
        #[arg(long, value_name = "FILE", conflicts_with = "target")]
        out: Option<PathBuf>,
        /// `[PROVIDER:]USER/SLOT`: the declared slot that adopts KEY_ID.
        #[arg(value_name = "TARGET", requires = "key_id")]
        target: Option<String>,
        /// The id of the existing key to adopt.
        #[arg(value_name = "KEY_ID")]
        key_id: Option<String>,
        /// How long to wait for the state lock another keyward process holds (e.g. `30s`,
        /// `5m`); default `0s`: fail at once, naming the holder.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = lock_timeout)]
        lock_timeout: std::time::Duration,
    },
    /// Look inside keyward's state (what it created and adopted: ids and times, never a
    /// secret).
    State {
        /// What to do with it.
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Keep every account in the declared state: reconcile at start, on the interval, when a
    /// key comes due, on config edits and on SIGHUP. Stops on SIGTERM/SIGINT.
    Daemon,
    /// Print the config file's JSON Schema (for editors).
    Schema,
    /// Print shell completions.
    Completions {
        /// The shell to print completions for.
        shell: clap_complete::Shell,
    },
    /// Runs an exec sink's program so that it dies with keyward (internal).
    #[command(name = "sink-guard", hide = true)]
    SinkGuard {
        /// The descriptor keyward's heartbeats arrive on (a shared state store's lease).
        #[arg(long, requires = "heartbeat_gap_ms")]
        heartbeat_fd: Option<i32>,
        /// How long without a heartbeat before the program's group is killed, in ms.
        #[arg(long, requires = "heartbeat_fd")]
        heartbeat_gap_ms: Option<u64>,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Run plan, apply and status against a built-in sandbox: no account needed.
    #[cfg_attr(not(feature = "demo"), command(hide = true))]
    Demo,
}

/// `keyward state` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum StateCommand {
    /// Print the whole state as one JSON document (service users by provider account, each
    /// with its slots' current, retiring and orphaned keys). Reads without taking the lock.
    Show,
}

/// `keyward sink-guard`, its heartbeat given as descriptor and gap in ms (both or neither).
fn sink_guard(argv: &[String], fd: Option<i32>, gap_ms: Option<u64>) -> ExitCode {
    let heartbeat = fd.zip(gap_ms.map(std::time::Duration::from_millis));
    crate::sinks::exec::guard(argv, heartbeat)
}

/// Entry point of the `keyward` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::SinkGuard {
        argv,
        heartbeat_fd,
        heartbeat_gap_ms,
    } = &cli.command
    {
        return sink_guard(argv, *heartbeat_fd, *heartbeat_gap_ms);
    }
    if let Ok(exe) = std::env::current_exe() {
        crate::sinks::exec::use_guard(exe);
    }
    if cli.no_color || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        anstream::ColorChoice::Never.write_global();
    }
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // One shutdown for the whole process: the signal handler cancels it; the providers, the
    // executor, the daemon and the metrics server all watch it.
    let shutdown = CancellationToken::new();
    runtime.block_on(async {
        if let Err(e) = watch_signals(shutdown.clone()) {
            eprintln!("error: cannot watch signals: {e}");
            return ExitCode::from(1);
        }
        run_until(&cli, &shutdown).await
    })
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},hyper=warn,reqwest=warn")));
    let ansi =
        std::io::stderr().is_terminal() && !cli.no_color && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLine(std::io::stderr()));
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(ansi)
            .with_target(false)
            .without_time()
            .init(),
    }
}

/// stderr for log lines: each event is one line. tracing's text format escapes terminal escape
/// codes in what it logs but keeps line breaks, so a name holding a newline could forge a log
/// line; here every line break inside an event is written as `\n` or `\r`. (The formatter
/// hands over each event in one write.)
struct OneLine(std::io::Stderr);

impl Write for OneLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (buf, false),
        };
        if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
            // Above a progress bar, if one is drawn.
            crate::progress::suspended(|| self.0.write_all(buf))?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
        if newline {
            out.push(b'\n');
        }
        crate::progress::suspended(|| self.0.write_all(&out))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Runs a command and maps its result to the exit code, with no signal handling of its own
/// (the demo, and callers that drive the library).
pub async fn run(cli: &Cli) -> ExitCode {
    run_until(cli, &CancellationToken::new()).await
}

/// Runs a command until it finishes or `shutdown` is cancelled: then the change in flight
/// finishes (a minted secret is delivered and recorded), nothing new starts, and the command
/// exits with its report.
pub async fn run_until(cli: &Cli, shutdown: &CancellationToken) -> ExitCode {
    match dispatch(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM. A second signal does not cut the step in flight
/// short either: a sink program may be delivering the new key right then, and stopping now
/// would leave a key a consumer holds for recovery to revoke. (`kill -9` abandons it; crash
/// recovery then takes over.)
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for n in 0u32.. {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if n == 0 {
                tracing::warn!("{which}: finishing the step in flight, starting nothing new");
                shutdown.cancel();
            } else {
                tracing::warn!(
                    "{which}: already stopping; a step in flight (a minted key being delivered) is still finished; kill -9 abandons it to crash recovery"
                );
            }
        }
    });
    Ok(())
}

async fn dispatch(cli: &Cli, shutdown: &CancellationToken) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Validate => Ok(validate(cli)),
        Command::Schema => {
            outln!("{}", serde_json::to_string_pretty(&config::schema())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "keyward",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            json,
            out,
            detailed_exitcode,
            only,
        } => {
            let ctx = Context_::load(cli, shutdown)?;
            check_only(ctx.config(), only)?;
            let opts = PlanOptions {
                only: only.clone(),
                force: Vec::new(),
            };
            let mut operator = Terminal {
                confirm: false,
                progress: None,
                saved: None,
                json: *json,
            };
            let report = ctx.run(RunMode::Plan, opts, &mut operator).await?;
            let plan = ctx.keep_until_exit(report);
            if let Some(path) = out {
                write_private_file(path, plan::render::json(&plan).as_bytes())
                    .with_context(|| format!("saving the plan to {}", path.display()))?;
                tracing::info!(
                    "plan saved to {}; apply it with `keyward apply {}`",
                    path.display(),
                    path.display()
                );
            }
            if let Some(code) = plan_errors(&plan) {
                return Ok(code);
            }
            Ok(if *detailed_exitcode && plan.has_changes() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Apply {
            auto_approve,
            only,
            planfile,
            lock_timeout,
        } => {
            let mut ctx = Context_::load(cli, shutdown)?;
            ctx.engine.lock_timeout = *lock_timeout;
            check_only(ctx.config(), only)?;
            match planfile {
                Some(path) => {
                    if !only.is_empty() {
                        anyhow::bail!(
                            "--only cannot be combined with a saved plan: the plan file already says what to do"
                        );
                    }
                    ctx.apply_saved(path).await
                }
                None => {
                    let opts = PlanOptions {
                        only: only.clone(),
                        force: Vec::new(),
                    };
                    ctx.apply(opts, *auto_approve).await
                }
            }
        }
        Command::Rotate {
            targets,
            auto_approve,
            lock_timeout,
        } => {
            let mut ctx = Context_::load(cli, shutdown)?;
            ctx.engine.lock_timeout = *lock_timeout;
            let force = resolve_targets(ctx.config(), targets)?;
            let only = force
                .iter()
                .map(|f| format!("{}:{}", f.provider, f.user))
                .collect();
            ctx.apply(PlanOptions { only, force }, *auto_approve).await
        }
        Command::Status { json } => {
            let ctx = Context_::load(cli, shutdown)?;
            let (observed, state) = ctx.observe().await?;
            let now = Timestamp::now();
            let entries = crate::status::entries(ctx.config(), &observed, &state, now);
            if *json {
                let doc = serde_json::json!({"keys": entries});
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                out!("{}", crate::status::table(&entries, now));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            providers,
            users,
            out,
            target,
            key_id,
            lock_timeout,
        } => {
            let mut ctx = Context_::load(cli, shutdown)?;
            ctx.engine.lock_timeout = *lock_timeout;
            if let (Some(t), Some(key_id)) = (target, key_id) {
                let resolved = resolve_target(ctx.config(), t, "import")?;
                let slot = resolved.slot.ok_or_else(|| {
                    anyhow::anyhow!("import {t}: name the slot, as USER/SLOT; nothing was imported")
                })?;
                ctx.engine
                    .import_key((&resolved.provider, &resolved.user, &slot), key_id)
                    .await?;
                eprintln!(
                    "{}",
                    crate::text::escape(&format!(
                        "adopted {key_id} as the current key of {} / {} slot {slot}; it rotates when its policy says so",
                        resolved.provider, resolved.user
                    ))
                );
                return Ok(ExitCode::SUCCESS);
            }
            // The file is made first (never over an existing one): if it cannot be, nothing is
            // recorded; if the import fails, it goes again.
            let reserved = match out {
                Some(path) => Some(
                    crate::files::reserve_new_file(path)
                        .map_err(|e| e.context("import: nothing was imported"))?,
                ),
                None => None,
            };
            let selection = crate::import::Selection {
                providers: providers.clone(),
                users: users.clone(),
            };
            let (doc, n_users, n_keys) = match ctx.engine.import(&selection).await {
                Ok(done) => done,
                Err(e) => {
                    if let Some(path) = out {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e);
                }
            };
            match (out, reserved) {
                (Some(path), Some(file)) => crate::files::fill_new_file(file, path, doc.as_bytes())
                    .with_context(|| {
                        format!(
                            "writing {} (the users are recorded in the state; `keyward import` again prints the document)",
                            path.display()
                        )
                    })?,
                _ => out!("{doc}"),
            }
            eprintln!(
                "imported {n_users} service user(s); {n_keys} key(s) recorded as adopted. Add the document to the config{}: `keyward plan` then leaves them as they are until their policy rotates them.",
                out.as_ref()
                    .map(|p| format!(" ({})", p.display()))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::State {
            command: StateCommand::Show,
        } => {
            let ctx = Context_::load(cli, shutdown)?;
            let state = ctx.engine.store.load()?;
            outln!("{}", serde_json::to_string_pretty(&state)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon => {
            crate::daemon::run(config_path(cli), shutdown.clone()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(cli).await,
        Command::SinkGuard {
            argv,
            heartbeat_fd,
            heartbeat_gap_ms,
        } => Ok(sink_guard(argv, *heartbeat_fd, *heartbeat_gap_ms)),
    }
}

/// An error and its causes on one line, as `{:#}` shows them, with control characters escaped
/// (names from the config or a provider cannot forge lines) and every credential keyward holds
/// masked.
pub fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| {
            let text = cause.to_string();
            crate::text::escape(&crate::redact::mask(&text, None)).into_owned()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// `keyward demo`: the sandbox in-process, each step a child `keyward` with this run's global
/// flags (only in a build with the `demo` feature).
#[cfg(feature = "demo")]
async fn demo(cli: &Cli) -> anyhow::Result<ExitCode> {
    use std::ffi::OsString;
    let mut step_flags: Vec<OsString> = Vec::new();
    if cli.log_format == LogFormat::Json {
        step_flags.extend(["--log-format".into(), "json".into()]);
    }
    step_flags.extend((0..cli.verbose).map(|_| OsString::from("--verbose")));
    if cli.quiet {
        step_flags.push("--quiet".into());
    }
    if cli.no_color {
        step_flags.push("--no-color".into());
    }
    crate::demo::run(&crate::demo::Options {
        config: cli.config.clone(),
        step_flags,
    })
    .await
}

/// Without the `demo` feature: say how to get it.
#[cfg(not(feature = "demo"))]
async fn demo(_cli: &Cli) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this keyward is built without the demo (the sandbox is not in the product); in the source directory run `cargo run --release --features demo -- demo`"
    )
}

/// The config path the flags, environment and default choose.
pub fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/keyward/keyward.yaml"))
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}

fn validate(cli: &Cli) -> ExitCode {
    let path = config_path(cli);
    match config::load(&path) {
        Ok(loaded) => {
            print_diagnostics(&loaded.warnings);
            outln!(
                "{}: valid ({} provider(s), {} user(s), {} sink(s))",
                path.display(),
                loaded.config.providers.len(),
                loaded.config.users.len(),
                loaded.config.sinks.len()
            );
            ExitCode::SUCCESS
        }
        Err(diags) => {
            print_diagnostics(&diags);
            let errors = diags
                .iter()
                .filter(|d| d.severity == config::Severity::Error)
                .count();
            eprintln!(
                "{}: {errors} error(s); the file is not valid",
                path.display()
            );
            ExitCode::from(1)
        }
    }
}

fn check_only(config: &Config, only: &[String]) -> anyhow::Result<()> {
    for o in only {
        let found = config.users.iter().any(|u| match o.split_once(':') {
            Some((p, n)) => u.provider == p && u.name == n,
            None => u.name == *o,
        });
        if !found {
            anyhow::bail!("--only {o}: no such user in the config");
        }
    }
    Ok(())
}

/// Resolves `rotate` targets (product contract §9): USER, USER/SLOT, PROVIDER:USER[/SLOT].
pub fn resolve_targets(
    config: &Config,
    targets: &[String],
) -> anyhow::Result<Vec<plan::ForceTarget>> {
    targets
        .iter()
        .map(|t| resolve_target(config, t, "rotate"))
        .collect()
}

/// Resolves one `USER`, `USER/SLOT` or `PROVIDER:USER[/SLOT]` for the command `verb`
/// (`rotate`, `import`); errors say that nothing was done.
pub fn resolve_target(config: &Config, t: &str, verb: &str) -> anyhow::Result<plan::ForceTarget> {
    let nothing = if verb == "rotate" {
        "nothing was rotated"
    } else {
        "nothing was imported"
    };
    let (provider, rest) = match t.split_once(':') {
        Some((p, r)) => (Some(p), r),
        None => (None, t),
    };
    let (user, slot) = match rest.split_once('/') {
        Some((u, s)) => (u, Some(s.to_string())),
        None => (rest, None),
    };
    let matches: Vec<_> = config
        .users
        .iter()
        .filter(|u| u.name == user && provider.is_none_or(|p| u.provider == p))
        .collect();
    let spec = match matches.as_slice() {
        [] => anyhow::bail!(
            "{verb} {t}: no user {user} in the config{}; {nothing}",
            provider
                .map(|p| format!(" under provider {p}"))
                .unwrap_or_default()
        ),
        [one] => *one,
        many => anyhow::bail!(
            "{verb} {t}: user {user} is declared under several providers; pick one of: {}; {nothing}",
            many.iter()
                .map(|u| format!("{}:{}", u.provider, u.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if let Some(s) = &slot
        && !spec.slots.contains_key(s)
    {
        anyhow::bail!("{verb} {t}: user {user} has no slot {s}; {nothing}");
    }
    if spec.slots.is_empty() {
        anyhow::bail!("{verb} {t}: user {user} declares no key slots; {nothing}");
    }
    Ok(plan::ForceTarget {
        provider: spec.provider.clone(),
        user: spec.name.clone(),
        slot,
    })
}

fn print_plan(plan: &Plan, json: bool) {
    let rendering = std::time::Instant::now();
    print_plan_now(plan, json);
    tracing::debug!(
        "plan rendered in {:.1} ms",
        rendering.elapsed().as_secs_f64() * 1000.0
    );
}

fn print_plan_now(plan: &Plan, json: bool) {
    if json {
        out!("{}", plan::render::json(plan));
    } else {
        let colored = anstream::stdout().is_terminal()
            && anstream::ColorChoice::global() != anstream::ColorChoice::Never;
        let text = plan::render::text(plan, colored);
        let mut out = anstream::stdout();
        let _ = out.write_all(text.as_bytes());
    }
}

/// The engine for one command, with the command-line's printing around it.
struct Context_ {
    engine: Engine,
    /// `-q`: no progress bar either.
    quiet: bool,
}

/// How the commands take part in a run: print the plan, ask for `yes`, hold a saved plan.
struct Terminal<'a> {
    /// Ask for confirmation (apply without `--auto-approve`).
    confirm: bool,
    /// Show progress on a terminal while the plan runs (apply and rotate, not with `-q`).
    progress: Option<&'a Config>,
    /// A saved plan the computed one is held against.
    saved: Option<(&'a Path, &'a plan::view::PlanDocument)>,
    /// Print the plan as JSON instead of text (`plan --json`).
    json: bool,
}

impl Operator for Terminal<'_> {
    fn review(&mut self, plan: Plan) -> anyhow::Result<Plan> {
        let plan = match self.saved {
            None => plan,
            Some((path, saved)) => {
                if plan.observed != saved.observed {
                    anyhow::bail!(
                        "plan is stale: the remote objects it was made from have changed since; nothing was changed. Run `keyward plan` again"
                    );
                }
                // The file says what was approved; what runs is recomputed from the config, the
                // state and the remote, and only where the two agree.
                let checked = check_saved(saved, plan);
                if !checked.refused.is_empty() {
                    for c in &checked.refused {
                        eprintln!("refused: {}", c.describe());
                    }
                    anyhow::bail!(
                        "refusing the saved plan {}: {} of its changes (listed above) are not what keyward would do now (edited, or made under another config or state); nothing was changed",
                        path.display(),
                        checked.refused.len()
                    );
                }
                for c in &checked.left {
                    tracing::info!(
                        "not in the saved plan, left for the next run: {}",
                        crate::apply::describe(c)
                    );
                }
                checked.plan
            }
        };
        print_plan(&plan, self.json);
        Ok(plan)
    }

    fn approve(&mut self, _plan: &Plan) -> anyhow::Result<()> {
        if self.confirm { confirm() } else { Ok(()) }
    }

    fn progress(&mut self, plan: &Plan) -> Option<std::sync::Arc<dyn crate::progress::Progress>> {
        let config = self.progress?;
        crate::progress::TerminalBar::for_plan(&plan.changes, config)
            .map(|b| b as std::sync::Arc<dyn crate::progress::Progress>)
    }
}

impl Context_ {
    fn load(cli: &Cli, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let path = config_path(cli);
        let loaded = match config::load(&path) {
            Ok(l) => l,
            Err(diags) => {
                print_diagnostics(&diags);
                anyhow::bail!("{}: the config is not valid (see above)", path.display());
            }
        };
        print_diagnostics(&loaded.warnings);
        Ok(Context_ {
            engine: Engine::new(loaded, shutdown.clone())?,
            quiet: cli.quiet,
        })
    }

    fn config(&self) -> &Config {
        &self.engine.config
    }

    /// The plan of a one-shot command's last run, the listing and state it was made from left
    /// allocated: the process exits next, and freeing a fleet's (100,000 users, their records
    /// and keys) piece by piece costs a large share of a quarter of a second. Plain data only,
    /// none of it secret: the config (which may hold a credential, zeroized when dropped), the
    /// state store and the provider clients are dropped as usual.
    fn keep_until_exit(&self, report: RunReport) -> Plan {
        std::mem::forget(report.observed);
        std::mem::forget(report.state);
        report.plan
    }

    /// Observes for `status`; any account that does not answer fails the command.
    async fn observe(&self) -> anyhow::Result<(Observed, State)> {
        let obs = self.engine.observe().await?;
        crate::engine::every_account_answered(&obs.failures)?;
        Ok((obs.observed, obs.state))
    }

    /// One run of the engine for a command.
    async fn run(
        &self,
        mode: RunMode,
        opts: PlanOptions,
        operator: &mut Terminal<'_>,
    ) -> anyhow::Result<RunReport> {
        self.engine
            .run(
                RunRequest {
                    mode,
                    opts,
                    include: &|_| true,
                    every_account: true,
                    scope: None,
                    listed: None,
                },
                operator,
            )
            .await
    }

    async fn apply(&self, opts: PlanOptions, auto_approve: bool) -> anyhow::Result<ExitCode> {
        let mut operator = Terminal {
            confirm: !auto_approve,
            progress: (!self.quiet).then_some(self.config()),
            saved: None,
            json: false,
        };
        let run = self.run(RunMode::Apply, opts, &mut operator).await?;
        finish(run)
    }

    async fn apply_saved(&self, path: &Path) -> anyhow::Result<ExitCode> {
        let bytes = crate::files::read_bounded(path, crate::files::MAX_STATE_BYTES, true)
            .map_err(|e| anyhow::anyhow!("cannot read the plan file {}: {e}", path.display()))?;
        let saved = plan::view::parse(&bytes)
            .with_context(|| format!("{} is not a keyward plan file", path.display()))?;
        if saved.format_version != plan::FORMAT_VERSION {
            anyhow::bail!(
                "{}: plan format version {} is not supported (expected {})",
                path.display(),
                saved.format_version,
                plan::FORMAT_VERSION
            );
        }
        let mut operator = Terminal {
            confirm: false,
            progress: (!self.quiet).then_some(self.config()),
            saved: Some((path, &saved)),
            json: false,
        };
        let run = self
            .run(RunMode::Apply, PlanOptions::default(), &mut operator)
            .await?;
        finish(run)
    }
}

/// The exit of `apply`, `rotate` and a saved-plan apply: the report on stdout, 1 unless every
/// change was done (a refusal, a failure, or changes not attempted because of a signal).
fn finish(run: RunReport) -> anyhow::Result<ExitCode> {
    let errors = plan_errors(&run.plan);
    let code = finish_run(run)?;
    Ok(errors.unwrap_or(code))
}

/// Exit 1, with each error on stderr, when the plan holds users nothing could be planned for.
fn plan_errors(plan: &Plan) -> Option<ExitCode> {
    if plan.errors.is_empty() {
        return None;
    }
    for e in &plan.errors {
        eprintln!("error: {e}");
    }
    Some(ExitCode::from(1))
}

fn finish_run(run: RunReport) -> anyhow::Result<ExitCode> {
    match run.outcome {
        RunOutcome::Refused(why) => anyhow::bail!("{why}"),
        RunOutcome::Unchanged | RunOutcome::Planned => Ok(ExitCode::SUCCESS),
        RunOutcome::Executed => {
            let report = run.report.unwrap_or_default();
            out!("\n{}", report.summary());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// A saved plan held against the plan keyward computes now.
struct CheckedPlan {
    /// The computed changes the saved plan also holds: what runs.
    plan: Plan,
    /// Saved changes keyward would not make now.
    refused: Vec<plan::view::ChangeView>,
    /// Computed changes the saved plan does not hold (work that came due since): not run.
    left: Vec<plan::Change>,
}

/// Matches each saved change with a computed one (same action, provider, user, slot, key and
/// target attributes; the reason may differ, it holds ages). One pass over each list.
fn check_saved(saved: &plan::view::PlanDocument, current: Plan) -> CheckedPlan {
    type Identity<'a> = (
        plan::Action,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        String,
    );
    let views: Vec<plan::view::ChangeView> = current
        .changes
        .iter()
        .map(|c| plan::view::ChangeView::of(c, current.planned_at))
        .collect();
    let mut available: std::collections::HashMap<Identity, usize> =
        std::collections::HashMap::new();
    for v in &views {
        *available.entry(v.decision()).or_default() += 1;
    }
    let mut wanted: std::collections::HashMap<Identity, usize> = std::collections::HashMap::new();
    let mut refused = Vec::new();
    for c in &saved.changes {
        let id = c.decision();
        let there = available.get(&id).copied().unwrap_or(0);
        let taken = wanted.entry(id).or_default();
        if *taken < there {
            *taken += 1;
        } else {
            refused.push(c.clone());
        }
    }
    let mut run = Vec::new();
    let mut left = Vec::new();
    for (c, v) in current.changes.into_iter().zip(&views) {
        match wanted.get_mut(&v.decision()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                run.push(c);
            }
            _ => left.push(c),
        }
    }
    CheckedPlan {
        plan: Plan {
            changes: run,
            warnings: current.warnings,
            observed: current.observed,
            planned_at: current.planned_at,
            upcoming: current.upcoming,
            errors: current.errors,
        },
        refused,
        left,
    }
}

/// Asks for `yes` on a terminal; refuses without one.
fn confirm() -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "apply needs confirmation, but stdin is not a terminal; run with --auto-approve (or apply a saved plan file)"
        );
    }
    eprint!(
        "\nDo you want to perform these actions?\n  Only 'yes' will be accepted to approve.\n\n  Enter a value: "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        anyhow::bail!("apply cancelled; nothing was changed");
    }
    Ok(())
}
