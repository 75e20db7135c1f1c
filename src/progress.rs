//! Progress of a long apply, for people at a terminal (product contract §10.4): how many of the
//! plan's changes are done, and the time the rest needs at the providers' rate budgets. The
//! executor reports each change it ends to a [`Progress`]; the commands give it a bar drawn on
//! stderr when stderr is a terminal, and nothing at all on a pipe or in the daemon. Log lines
//! printed while a bar is drawn go above it ([`suspended`]), never through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::plan::Change;

/// Told of each change the executor ends.
pub trait Progress: Send + Sync {
    /// One change ended (done, failed or not attempted).
    fn ended(&self, change: &Change);
    /// The run is over: the bar goes.
    fn finish(&self);
}

/// The bar drawn now, if any: the log writer prints above it.
static ACTIVE: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Runs `write` with the bar (if one is drawn) cleared for the moment, so that a log line lands
/// above it instead of in the middle of it.
pub fn suspended<R>(write: impl FnOnce() -> R) -> R {
    let bar = ACTIVE.lock().ok().and_then(|b| b.clone());
    match bar {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// A bar on stderr: `done/total changes`, and the time the remaining changes take at each
/// provider account's `rate_limit` (the slowest account sets it).
pub struct TerminalBar {
    bar: indicatif::ProgressBar,
    /// Per provider account: requests still to send, and the seconds one request costs at its
    /// budget.
    left: Mutex<HashMap<String, (u64, f64)>>,
}

impl TerminalBar {
    /// A bar for `changes`, drawn only when stderr is a terminal (`None` otherwise).
    pub fn for_plan(changes: &[Change], config: &Config) -> Option<Arc<TerminalBar>> {
        use std::io::IsTerminal as _;
        if changes.is_empty() || !std::io::stderr().is_terminal() {
            return None;
        }
        let mut left: HashMap<String, (u64, f64)> = HashMap::new();
        for c in changes {
            let per_request = config
                .providers
                .get(&c.provider)
                .map(|p| p.rate_limit.per.as_secs_f64() / f64::from(p.rate_limit.requests.max(1)))
                .unwrap_or(0.0);
            let entry = left.entry(c.provider.clone()).or_insert((0, per_request));
            // At least one request per change: its write.
            entry.0 += 1;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(changes.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} changes · {msg} · {elapsed_precise} so far",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        let this = Arc::new(TerminalBar {
            bar,
            left: Mutex::new(left),
        });
        this.bar.set_message(this.budget_left());
        if let Ok(mut active) = ACTIVE.lock() {
            *active = Some(this.bar.clone());
        }
        Some(this)
    }

    /// `about 4m left at the rate budget`: the slowest account's remaining requests times the
    /// seconds one request costs there.
    fn budget_left(&self) -> String {
        let secs = self
            .left
            .lock()
            .map(|l| {
                l.values()
                    .map(|(n, per)| *n as f64 * per)
                    .fold(0.0, f64::max)
            })
            .unwrap_or(0.0);
        format!(
            "about {} left at the rate budget",
            crate::duration::humanize_two(jiff::SignedDuration::from_secs(secs.ceil() as i64))
        )
    }
}

impl Progress for TerminalBar {
    fn ended(&self, change: &Change) {
        if let Ok(mut left) = self.left.lock()
            && let Some(entry) = left.get_mut(&change.provider)
        {
            entry.0 = entry.0.saturating_sub(1);
        }
        self.bar.set_message(self.budget_left());
        self.bar.inc(1);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
        if let Ok(mut active) = ACTIVE.lock() {
            *active = None;
        }
    }
}
