//! The crash-trial harness shared by the crash tests: times one uninterrupted forced rotation,
//! then runs `keyward rotate …` again and again, killing it with SIGKILL after a random share of
//! that time; after each kill it checks the caller's "every sink still works" invariant, runs a
//! plain `keyward apply` to recover and checks the caller's "converged" invariants. It counts how
//! each trial ended and what the recovery runs reported, so a test can insist that kills really
//! landed mid-run and left something to recover.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::{Workspace, expect_code, text};

/// What a recovery run's log says it did: (label, text it logs).
pub const RECOVERY_NOTES: [(&str, &str); 4] = [
    ("adopted a delivered key", "adopted key"),
    ("revoked an undelivered key", "never delivered"),
    ("forgot a revoked key", "dropped from the state"),
    (
        "found a key whose creation was never journaled",
        "answer was lost",
    ),
];

/// Trials that kill at a chosen moment instead of a random one: just after the sandbox counted
/// a request (say, the POST that mints a key), so the kill lands while that request is applied
/// and its answer not yet received (given the sandbox's `answer_latency_ms`).
pub struct Targeted<'a> {
    /// Every `every`-th trial is targeted.
    pub every: usize,
    /// How many of the targeted requests the sandbox has counted so far.
    pub count: &'a dyn Fn() -> u64,
    /// How long after the request is counted to kill.
    pub after: Duration,
}

pub struct Trials<'a> {
    pub ws: &'a Workspace,
    /// The forced rotation to interrupt, e.g. `["rotate", "u0", "u1", "--auto-approve"]`.
    pub rotate_args: &'a [&'a str],
    pub trials: usize,
    pub seed: u64,
    /// Longer than every slot's overlap: after it, every retiring key may be revoked.
    pub settle: Duration,
    pub targeted: Option<Targeted<'a>>,
}

/// How the trials went.
#[derive(Debug, Default)]
pub struct Report {
    /// "killed mid-run" / "killed just after a targeted request" / "finished first" /
    /// "failed" → count.
    pub outcomes: BTreeMap<&'static str, usize>,
    /// Recovery note label (see [`RECOVERY_NOTES`]) → number of recovery runs that logged it.
    pub recoveries: BTreeMap<&'static str, usize>,
    pub baseline: Duration,
}

impl Trials<'_> {
    fn journal(&self) -> String {
        std::fs::read_to_string(self.ws.path("state/journal.jsonl")).unwrap_or_default()
    }

    /// Runs the trials; panics (with the state, journal and recovery log) on the first broken
    /// invariant. `sinks_work` is checked right after every kill, `converged` after every
    /// recovery; both also before the trials start and after the final settle.
    pub fn run(
        &self,
        sinks_work: impl Fn() -> Result<(), String>,
        converged: impl Fn() -> Result<(), String>,
    ) -> Report {
        let ws = self.ws;
        expect_code(
            &ws.keyward(&["apply", "--auto-approve"]),
            0,
            "initial apply",
        );
        converged().unwrap();

        // How long an uninterrupted forced rotation takes (the median of three, so that one
        // slow or quick run on a busy machine does not skew it): kills land across it.
        let mut times: Vec<Duration> = (0..3)
            .map(|_| {
                let t0 = Instant::now();
                expect_code(&ws.keyward(self.rotate_args), 0, "baseline rotation");
                let took = t0.elapsed();
                std::thread::sleep(self.settle);
                took
            })
            .collect();
        times.sort();
        let baseline = times[1];
        expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "settle");
        converged().unwrap();

        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut report = Report {
            baseline,
            ..Report::default()
        };
        let mut previous_log = String::new();
        for trial in 0..self.trials {
            let delay = baseline.mul_f64(rng.random_range(0.0..1.0));
            let target = self
                .targeted
                .as_ref()
                .filter(|t| trial % t.every == t.every - 1);
            let counted_before = target.map(|t| (t.count)());
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
            cmd.args(self.rotate_args)
                .arg("-c")
                .arg(ws.config_path())
                .env_remove("KEYWARD_CONFIG")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .current_dir(ws.dir.path());
            for (k, v) in &ws.env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().unwrap();
            match (target, counted_before) {
                (Some(t), Some(before)) => {
                    while (t.count)() == before && child.try_wait().unwrap().is_none() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    std::thread::sleep(t.after);
                }
                _ => std::thread::sleep(delay),
            }
            let killed = child.try_wait().unwrap().is_none();
            let _ = child.kill(); // SIGKILL
            let status = child.wait().unwrap();
            *report
                .outcomes
                .entry(if killed && target.is_some() {
                    "killed just after a targeted request"
                } else if killed {
                    "killed mid-run"
                } else if status.success() {
                    "finished first"
                } else {
                    "failed"
                })
                .or_default() += 1;

            if let Err(e) = sinks_work() {
                panic!(
                    "trial {trial} (killed after {delay:?}): a slot lost its working key: {e}\nstate: {}\njournal: {}\nprevious recovery: {previous_log}",
                    ws.state_text(),
                    self.journal(),
                );
            }
            // Recovery: the next run finishes the job (product contract §4): one apply, and it
            // must succeed.
            let journal = self.journal();
            let last = ws.keyward(&["apply", "--auto-approve"]);
            expect_code(&last, 0, &format!("trial {trial}: recovery apply"));
            let log = text(&last.stderr);
            for (what, needle) in RECOVERY_NOTES {
                if log.contains(needle) {
                    *report.recoveries.entry(what).or_default() += 1;
                }
            }
            if let Err(e) = converged() {
                panic!(
                    "trial {trial} (killed after {delay:?}): {e}\nstate: {}\njournal before recovery: {journal}\nrecovery run: {log}",
                    ws.state_text()
                );
            }
            previous_log = log;
        }
        assert!(
            !report.recoveries.is_empty(),
            "no kill ever left anything to recover: the test proves nothing"
        );
        assert!(
            report.outcomes.get("killed mid-run").copied().unwrap_or(0)
                + report
                    .outcomes
                    .get("killed just after a targeted request")
                    .copied()
                    .unwrap_or(0)
                >= self.trials / 2,
            "too few kills landed inside a run: {:?}",
            report.outcomes
        );
        // Once every overlap has ended, a no-op plan: nothing left over.
        std::thread::sleep(self.settle);
        expect_code(&ws.keyward(&["apply", "--auto-approve"]), 0, "settle");
        converged().unwrap();
        expect_code(
            &ws.keyward(&["plan", "--detailed-exitcode"]),
            0,
            "final plan",
        );
        report
    }
}
