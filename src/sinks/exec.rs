//! The exec sink: runs a program with placeholders filled in its argv, writes the JSON sink
//! document to its stdin, and counts exit status 0 within the timeout as delivered. The program
//! gets a cleared environment (only [`ALLOWED_ENV`] and the `KEYWARD_*` names of the delivery),
//! so no credential keyward holds reaches it; it runs in a process group of its own, killed
//! whole on timeout. Its stdout/stderr are kept for the error message, with the new secret and
//! every credential keyward holds masked, and control characters escaped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use jiff::SignedDuration;
use secrecy::zeroize::Zeroizing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{SinkDocument, SinkError};

/// At most this much of the program's output is quoted in an error.
const OUTPUT_LIMIT: usize = 2000;
/// At most this much of the program's output is kept at all.
const CAPTURE_LIMIT: u64 = 64 << 10;

/// The variables of keyward's environment a sink program inherits (when set): where to find
/// programs, the home directory, locale, time zone and temp directory. Nothing else: keyward's
/// environment holds credentials (`NGROK_API_KEY`, `${VAR}`s the config interpolates).
pub const ALLOWED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
];

/// Used when keyward itself runs without `PATH`.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Reads a pipe to its end, keeping the first [`CAPTURE_LIMIT`] bytes (zeroized when dropped:
/// a program may echo the secret) and discarding the rest, so a chatty program never blocks.
async fn capture(pipe: &mut (impl tokio::io::AsyncRead + Unpin)) -> Zeroizing<Vec<u8>> {
    let mut kept = Zeroizing::new(Vec::new());
    let mut buf = Zeroizing::new([0u8; 8192]);
    loop {
        match pipe.read(&mut buf[..]).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = (CAPTURE_LIMIT as usize).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The hidden subcommand that runs a sink program under the guard.
pub const GUARD_COMMAND: &str = "sink-guard";

/// The keyward executable to run sink programs under, when running as the keyward binary
/// (set once by [`crate::cli::main`]); unset (library use, unit tests), programs run directly.
static GUARD: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Runs every sink program from now on under `exe sink-guard`.
pub fn use_guard(exe: std::path::PathBuf) {
    let _ = GUARD.set(exe);
}

/// How the guard's stderr begins when the program cannot be started at all (missing, not
/// executable): a failure no retry can fix.
const GUARD_CANNOT_START: &str = "keyward sink-guard: cannot start";

/// Kills a process group when dropped.
struct KillGroup(Option<rustix::process::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// How often keyward tells a guard that its lead still holds, while a program runs for a
/// shared state store.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// How long a guard waits for word that the lead still holds before it kills the program's
/// group. Shorter than the least time another keyward can take the lead after this one went
/// quiet: the database ends a silent session after its 10 s timeout, counted from the last of
/// the pings keyward sends every 2 s, so no successor leads within 8 s of the silence (see
/// `pgstore`). A program is thus stopped before a successor can deliver a newer key, and can
/// never overwrite it later.
pub const HEARTBEAT_GAP: Duration = Duration::from_secs(3);

/// The descriptor the guard reads heartbeats from (keyward places the pipe there).
const HEARTBEAT_FD: i32 = 3;

/// `keyward sink-guard [--heartbeat-fd N --heartbeat-gap-ms MS] -- PROGRAM ARGS...`: runs the
/// sink program in the guard's own process group (keyward made the guard its leader) and exits
/// with the program's status. keyward set the guard's parent-death signal to SIGTERM: when
/// keyward dies, even by `kill -9`, the guard kills its whole group, so no program a sink
/// started, nor anything it forked, lives on to hand over a key after keyward has decided
/// about it. With a heartbeat descriptor (a shared state store), the guard also kills the
/// group when keyward stops saying, at least every `gap`, that it still leads: a keyward that
/// is paused (SIGSTOP, a stalled VM) or lost its lead cannot have a program finish a delivery
/// after a successor's. Stdin, stdout, stderr and the environment pass through untouched.
pub fn guard(argv: &[String], heartbeat: Option<(i32, Duration)>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let Some((program, args)) = argv.split_first() else {
        eprintln!("keyward sink-guard: no program given");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyward sink-guard: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Listening before the program starts: a SIGTERM from here on kills the group.
        let mut term = match signal(SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("keyward sink-guard: {e}");
                return ExitCode::from(1);
            }
        };
        let beats = match heartbeat.map(|(fd, gap)| heartbeats(fd).map(|r| (r, gap))) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => {
                eprintln!("keyward sink-guard: the heartbeat descriptor: {e}");
                return ExitCode::from(1);
            }
        };
        let mut child = match tokio::process::Command::new(program).args(args).spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{GUARD_CANNOT_START} {}: {e}", crate::text::escape(program));
                return ExitCode::from(127);
            }
        };
        let lapsed = async {
            match beats {
                Some((mut rx, gap)) => lapse(&mut rx, gap).await,
                None => std::future::pending().await,
            }
        };
        let kill_group = || {
            let _ = rustix::process::kill_process_group(
                rustix::process::getpgid(None).unwrap_or_else(|_| rustix::process::getpid()),
                rustix::process::Signal::KILL,
            );
        };
        tokio::select! {
            status = child.wait() => match status.ok().and_then(|s| s.code()) {
                Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                None => ExitCode::from(1),
            },
            _ = term.recv() => {
                kill_group();
                ExitCode::from(1)
            }
            why = lapsed => {
                eprintln!("{GUARD_LAPSED}: {why}; the program's process group was killed");
                kill_group();
                ExitCode::from(1)
            }
        }
    })
}

/// How the guard's stderr begins when it stopped the program because keyward's lead lapsed.
const GUARD_LAPSED: &str = "keyward sink-guard: the lead lapsed";

/// The guard's end of the heartbeat pipe, closed on exec (the program never sees it).
fn heartbeats(fd: i32) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: keyward placed the pipe's read end at this descriptor for this process alone;
    // nothing else in the guard owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    tokio::net::unix::pipe::Receiver::from_owned_fd(owned)
}

/// Resolves once no heartbeat came for `gap`, or keyward closed its end: why, in words.
async fn lapse(rx: &mut tokio::net::unix::pipe::Receiver, gap: Duration) -> String {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(gap, rx.read(&mut buf)).await {
            Ok(Ok(0)) => return "keyward closed the heartbeat".to_string(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("reading the heartbeat: {e}"),
            Err(_) => {
                return format!(
                    "no word from keyward for {:.1}s (paused, or its lead is gone)",
                    gap.as_secs_f64()
                );
            }
        }
    }
}

/// Runs the program of an exec sink with `doc` on its stdin. With `lease` (the lead of a shared
/// state store), the program runs only while the lease holds: it is checked every
/// [`HEARTBEAT_EVERY`], and the program's process group is killed once it fails; under the
/// guard, a keyward that stops checking (paused) has its program killed by the guard after
/// [`HEARTBEAT_GAP`]. A program that already handed the key on cannot be called back; one
/// killed before it finished counts as not delivered.
pub async fn deliver(
    command: &[String],
    timeout: SignedDuration,
    doc: &SinkDocument,
    lease: Option<&crate::files::Fence>,
) -> Result<(), SinkError> {
    let argv: Vec<String> = command
        .iter()
        .map(|a| doc.fill(a))
        .collect::<Result<_, _>>()
        .map_err(|e| SinkError::permanent(anyhow::Error::msg(e)))?;
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| SinkError::permanent(anyhow::anyhow!("exec sink has an empty command")))?;
    let shown = crate::text::escape(program).into_owned();
    // Through the guard when keyward runs as its binary: the guard dies with keyward and takes
    // the program's whole process group with it (see [`guard`]).
    // The heartbeat pipe to the guard, when there is a lease to watch: keyward keeps the
    // write end, the guard gets the read end at [`HEARTBEAT_FD`].
    let pipe = match (GUARD.get(), lease) {
        (Some(_), Some(_)) => Some(
            rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )
            .context("exec sink: a heartbeat pipe")
            .map_err(SinkError::transient)?,
        ),
        _ => None,
    };
    let mut cmd = match GUARD.get() {
        Some(exe) => {
            let mut c = tokio::process::Command::new(exe);
            c.arg(GUARD_COMMAND);
            if pipe.is_some() {
                c.arg("--heartbeat-fd")
                    .arg(HEARTBEAT_FD.to_string())
                    .arg("--heartbeat-gap-ms")
                    .arg(HEARTBEAT_GAP.as_millis().to_string());
            }
            c.arg("--").arg(program).args(args);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(program);
            c.args(args);
            c
        }
    };
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a timeout kills whatever it started, too.
        .process_group(0);
    for name in ALLOWED_ENV {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    // If keyward dies (kill -9), the sink program dies with it: left running, it could deliver
    // a key the next run has already decided about (product contract §4: a key is revoked at
    // once only if no sink can hold it).
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing and takes no lock.
    let death_signal = if GUARD.get().is_some() {
        // The guard catches it and kills the group.
        rustix::process::Signal::TERM
    } else {
        rustix::process::Signal::KILL
    };
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(death_signal))?;
            // The parent may have died before the line above took effect.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other(
                    "keyward exited before the sink program started",
                ));
            }
            Ok(())
        });
    }
    if let Some((read, _)) = &pipe {
        use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
        let raw = read.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (dup2, fcntl) on descriptors the child owns; the
        // descriptor it wraps is forgotten, never closed by the closure.
        unsafe {
            cmd.pre_exec(move || {
                let read = BorrowedFd::borrow_raw(raw);
                if raw == HEARTBEAT_FD {
                    // Already in place: only keep it open across exec.
                    rustix::io::fcntl_setfd(read, rustix::io::FdFlags::empty())?;
                } else {
                    let mut target = OwnedFd::from_raw_fd(HEARTBEAT_FD);
                    let placed = rustix::io::dup2(read, &mut target);
                    std::mem::forget(target);
                    placed?;
                }
                Ok(())
            });
        }
    }
    cmd.env("KEYWARD_PROVIDER", &doc.provider)
        .env("KEYWARD_USER", &doc.user)
        .env("KEYWARD_SLOT", &doc.slot)
        .env("KEYWARD_KEY_ID", &doc.key_id);
    let mut child = cmd.spawn().map_err(|e| {
        let permanent = matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        );
        SinkError {
            error: anyhow::Error::new(e).context(format!("exec sink: starting {shown}")),
            permanent,
        }
    })?;
    // The guard holds the read end now; keyward's copy goes.
    let beat = pipe.map(|(_, write)| write);
    let group = child.id();
    // Whatever happens from here (an error, a timeout, the future dropped), the program's
    // group goes when this function ends.
    let _reaper = KillGroup(group.and_then(|p| rustix::process::Pid::from_raw(p as i32)));
    let input = doc.to_json().map_err(SinkError::permanent)?;
    let mut stdin = child
        .stdin
        .take()
        .context("exec sink: no stdin")
        .map_err(SinkError::transient)?;
    let mut stdout = child
        .stdout
        .take()
        .context("exec sink: no stdout")
        .map_err(SinkError::transient)?;
    let mut stderr = child
        .stderr
        .take()
        .context("exec sink: no stderr")
        .map_err(SinkError::transient)?;
    let limit = Duration::from_millis(u64::try_from(timeout.as_millis()).unwrap_or(0));
    let run = async {
        // A program that exits without reading stdin is not an error in itself: its exit
        // status decides.
        let _ = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        let (out, err, status) =
            tokio::join!(capture(&mut stdout), capture(&mut stderr), child.wait());
        (status, out, err)
    };
    // While the program runs: the lease is checked, and the guard told it holds.
    let watch = async {
        let Some(fence) = lease else {
            return std::future::pending::<anyhow::Error>().await;
        };
        loop {
            if let Err(e) = fence() {
                return e;
            }
            if let Some(w) = &beat {
                // A full pipe (a guard that stopped reading) only means beats are waiting.
                let _ = rustix::io::write(w, &[1]);
            }
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    };
    let outcome = tokio::time::timeout(limit, async {
        tokio::select! {
            r = run => Ok(r),
            lost = watch => Err(lost),
        }
    })
    .await;
    // Whatever the program left running in its group goes with it (on success too: the
    // delivery is over, and a straggler would hold the secret for no one).
    drop(_reaper);
    drop(beat);
    let (status, out, err) = match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(lost)) => {
            return Err(SinkError::permanent(lost.context(format!(
                "exec sink {shown}: stopped while it ran (its process group was killed): the lead may be gone"
            ))));
        }
        Err(_) => {
            return Err(SinkError::transient(anyhow::anyhow!(
                "exec sink {shown}: did not finish within {}; its process group was killed",
                crate::duration::format(timeout)
            )));
        }
    };
    let status = status
        .with_context(|| format!("exec sink {shown}: waiting for it"))
        .map_err(SinkError::transient)?;
    if status.success() {
        return Ok(());
    }
    let mask = |bytes: &[u8]| {
        let lossy = Zeroizing::new(String::from_utf8_lossy(bytes).into_owned());
        let masked = crate::redact::mask(&lossy, Some(&doc.secret)).into_owned();
        let text = crate::text::escape(masked.trim()).into_owned();
        if text.len() > OUTPUT_LIMIT {
            let cut = (0..=OUTPUT_LIMIT)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            format!("{}…", &text[..cut])
        } else {
            text
        }
    };
    // The guard could not start the program: as permanent as a failed spawn without it.
    if status.code() == Some(127) && err.starts_with(GUARD_CANNOT_START.as_bytes()) {
        return Err(SinkError::permanent(anyhow::anyhow!(
            "exec sink: starting {}",
            mask(&err[GUARD_CANNOT_START.len()..])
        )));
    }
    let mut message = format!("exec sink {shown}: {status}");
    let (o, e) = (mask(&out), mask(&err));
    if !e.is_empty() {
        message.push_str(&format!("; stderr: {e}"));
    }
    if !o.is_empty() {
        message.push_str(&format!("; stdout: {o}"));
    }
    Err(SinkError::transient(anyhow::Error::msg(message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sink".into(),
            "{user}".into(),
        ]
    }

    #[tokio::test]
    async fn exit_zero_is_delivered_and_gets_stdin_and_placeholders() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("got");
        let script = format!(
            "cat > {} && echo \"$1\" >> {}",
            out.display(),
            out.display()
        );
        deliver(
            &sh(&script),
            SignedDuration::from_secs(10),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap();
        let got = std::fs::read_to_string(out).unwrap();
        assert!(got.contains("\"secret\": \"s3cr3t-value\""));
        assert!(got.trim_end().ends_with("ci-deployer"));
    }

    #[tokio::test]
    async fn failure_reports_output_without_secret() {
        let err = deliver(
            &sh("cat; echo boom >&2; exit 3"),
            SignedDuration::from_secs(10),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[tokio::test]
    async fn the_program_sees_no_credential_in_its_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("env");
        // cargo gives the test process variables of its own: they stand in for keyward's
        // environment (where credentials live).
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "run under cargo"
        );
        crate::redact::remember(
            "test.exec",
            &secrecy::SecretString::from("credential-held".to_string()),
        );
        let script = format!(
            "env > {}; env; cat; echo credential-held; exit 1",
            out.display()
        );
        let err = deliver(
            &sh(&script),
            SignedDuration::from_secs(10),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(!env.contains("CARGO_MANIFEST_DIR"), "{env}");
        assert!(env.contains("PATH="), "{env}");
        assert!(env.contains("KEYWARD_USER=ci-deployer"), "{env}");
        // What it printed is quoted with every credential and the new secret masked, and on
        // one line.
        assert!(!err.contains("credential-held"), "{err}");
        assert!(err.contains("[REDACTED]"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_program_started() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
        let err = deliver(
            &sh(&script),
            SignedDuration::from_millis(500),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(!err.permanent);
        assert_killed(&pidfile);
    }

    /// The process whose pid `pidfile` holds is gone (killed at once; it may linger a moment
    /// as a zombie until it is reaped).
    fn assert_killed(pidfile: &std::path::Path) {
        let pid = std::fs::read_to_string(pidfile).unwrap();
        let proc = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
        let gone = (0..100).any(|_| {
            let state = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
            let alive = !state.is_empty() && !state.contains(") Z");
            if alive {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            !alive
        });
        assert!(gone, "the background child {} still runs", pid.trim());
    }

    #[tokio::test]
    async fn a_lease_lost_while_the_program_runs_stops_it_and_all_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let done = tmp.path().join("done");
        let script = format!(
            "sleep 300 & echo $! > {}; sleep 3; touch {}",
            pidfile.display(),
            done.display()
        );
        let since = std::time::Instant::now();
        let lease: crate::files::Fence = std::sync::Arc::new(move || {
            if since.elapsed() < Duration::from_millis(800) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("lost the lead: a newer term began"))
            }
        });
        let err = deliver(
            &sh(&script),
            SignedDuration::from_secs(60),
            &crate::sinks::tests::doc(),
            Some(&lease),
        )
        .await
        .unwrap_err();
        let text = format!("{:#}", err.error);
        assert!(text.contains("stopped while it ran"), "{text}");
        assert!(text.contains("a newer term began"), "{text}");
        assert!(err.permanent, "{text}");
        assert_killed(&pidfile);
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !done.exists(),
            "the program finished its delivery after all"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_permanent_failure() {
        let err = deliver(
            &["/nonexistent/keyward-sink".to_string()],
            SignedDuration::from_secs(5),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.permanent, "{err}");
    }

    #[tokio::test]
    async fn timeout_is_an_error() {
        let err = deliver(
            &sh("sleep 5"),
            SignedDuration::from_millis(200),
            &crate::sinks::tests::doc(),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not finish"), "{err}");
    }
}
