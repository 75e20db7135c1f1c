//! systemd's notify protocol (sd-notify): READY, STATUS, RELOADING with MONOTONIC_USEC,
//! STOPPING, and watchdog pings. Every call is a no-op outside systemd (no NOTIFY_SOCKET).
//!
//! The watchdog pings come from a timer of their own ([`start_watchdog`]), so no amount of other
//! wake-ups (a busy config directory, signals) can delay them; but each ping vouches for the
//! daemon's main loop, which must have answered the watchdog's last question recently: a loop
//! that is wedged stops the pings, and systemd restarts the service as `WatchdogSec=` promises.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Tells systemd the daemon is up (again, after a reload), with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload started (Type=notify-reload needs MONOTONIC_USEC with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Tells systemd the daemon is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The main loop's side of the watchdog: the watchdog asks, the loop answers whenever it gets
/// round to it. Without a watchdog it is never asked.
#[derive(Clone, Default)]
pub struct Heartbeat {
    probe: Option<Arc<Probe>>,
}

struct Probe {
    asked: Notify,
    answered: AtomicBool,
}

impl Heartbeat {
    /// Resolves when the watchdog asks whether the loop is alive (never, without a watchdog).
    /// Cancel-safe: a question not yet taken stays pending for the next call.
    pub async fn asked(&self) {
        match &self.probe {
            Some(p) => p.asked.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The loop's answer: it is alive and turning.
    pub fn answer(&self) {
        if let Some(p) = &self.probe {
            p.answered.store(true, Ordering::Release);
        }
    }
}

/// Starts the watchdog when systemd asked for one (`WATCHDOG_USEC`): a task pings every quarter
/// of `WATCHDOG_USEC` as long as the main loop, asked at every ping, has answered within half of
/// it. A loop stuck for longer stops the pings, so systemd kills it at most about 1.75 ×
/// `WATCHDOG_USEC` after it stuck; a loop that is merely woken a lot never delays them.
pub fn start_watchdog() -> Heartbeat {
    match sd_notify::watchdog_enabled().filter(|d| !d.is_zero()) {
        Some(usec) => spawn_watchdog(usec, watchdog),
        None => Heartbeat::default(),
    }
}

/// [`start_watchdog`] with the watchdog's period and its ping given.
fn spawn_watchdog(usec: Duration, mut ping: impl FnMut() + Send + 'static) -> Heartbeat {
    let probe = Arc::new(Probe {
        asked: Notify::new(),
        answered: AtomicBool::new(true),
    });
    let heartbeat = Heartbeat {
        probe: Some(Arc::clone(&probe)),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(usec / 4);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut gate = Gate::new(usec / 2, Instant::now());
        loop {
            let now = tick.tick().await;
            match gate.tick(now, probe.answered.swap(false, Ordering::AcqRel)) {
                Verdict::Ping => ping(),
                Verdict::Resume => {
                    tracing::warn!("the main loop is turning again: watchdog pings resume");
                    ping();
                }
                Verdict::Withhold(stuck) => tracing::error!(
                    "the main loop has not turned for {}s: withholding watchdog pings (systemd will restart keyward)",
                    stuck.as_secs()
                ),
                Verdict::StillWithheld => {}
            }
            probe.asked.notify_one();
        }
    });
    heartbeat
}

/// What the watchdog does at a tick.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ping,
    /// Ping, after pings were withheld.
    Resume,
    /// Start withholding pings: the loop has not answered for this long.
    Withhold(Duration),
    StillWithheld,
}

/// The watchdog's decision: ping while the loop answered within `patience`.
struct Gate {
    patience: Duration,
    last_answer: Instant,
    withheld: bool,
}

impl Gate {
    fn new(patience: Duration, now: Instant) -> Gate {
        Gate {
            patience,
            last_answer: now,
            withheld: false,
        }
    }

    /// A tick at `now`; `answered`: the loop answered since the previous tick.
    fn tick(&mut self, now: Instant, answered: bool) -> Verdict {
        if answered {
            self.last_answer = now;
        }
        let silent = now.saturating_duration_since(self.last_answer);
        match (silent <= self.patience, self.withheld) {
            (true, false) => Verdict::Ping,
            (true, true) => {
                self.withheld = false;
                Verdict::Resume
            }
            (false, false) => {
                self.withheld = true;
                Verdict::Withhold(silent)
            }
            (false, true) => Verdict::StillWithheld,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_while_the_loop_answers_and_stops_when_it_is_stuck() {
        let usec = Duration::from_secs(8);
        let period = usec / 4;
        let t0 = Instant::now();
        let mut gate = Gate::new(usec / 2, t0);
        let at = |n: u32| t0 + period * n;
        // Answering at every tick, or at every other (a loop busy for a while): pings go on.
        for n in 0..8 {
            assert_eq!(gate.tick(at(n), n % 2 == 0), Verdict::Ping, "tick {n}");
        }
        // Stuck after tick 8: pings go on only while the last answer is within patience.
        assert_eq!(gate.tick(at(8), true), Verdict::Ping);
        assert_eq!(gate.tick(at(9), false), Verdict::Ping);
        assert_eq!(gate.tick(at(10), false), Verdict::Ping);
        assert_eq!(
            gate.tick(at(11), false),
            Verdict::Withhold(period * 3),
            "stuck for longer than half of WATCHDOG_USEC"
        );
        for n in 12..30 {
            assert_eq!(gate.tick(at(n), false), Verdict::StillWithheld);
        }
        // Turning again: pings resume.
        assert_eq!(gate.tick(at(30), true), Verdict::Resume);
        assert_eq!(gate.tick(at(31), true), Verdict::Ping);
    }

    #[tokio::test]
    async fn the_loop_is_asked_at_every_tick_and_answers() {
        let pings = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&pings);
        let heartbeat = spawn_watchdog(Duration::from_millis(40), move || {
            seen.store(true, Ordering::SeqCst);
        });
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), heartbeat.asked())
                .await
                .expect("asked");
            heartbeat.answer();
        }
        assert!(pings.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn without_a_watchdog_the_loop_is_never_asked() {
        let idle = Heartbeat::default();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), idle.asked())
                .await
                .is_err()
        );
        idle.answer();
    }
}
