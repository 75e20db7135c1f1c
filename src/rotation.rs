//! Due times: the one place that knows when a key slot must rotate and when a retiring key may
//! be revoked. `rotate_every` (age), `schedule` (cron in a time zone; croner handles DST),
//! provider expiry within `overlap`, and forced rotations all meet here. Pure: `now` is always
//! an argument, so the planner, `status` and the daemon's sleep agree to the second.
//!
//! Policy, in full:
//! - no current key, or one of the wrong kind: due at once;
//! - `rotate_every` only: due at `created_at + rotate_every`;
//! - `schedule` and `rotate_every`: due at the first cron time at or after
//!   `created_at + rotate_every` (a window that passed while keyward was not running is caught
//!   up once, at the next run);
//! - `schedule` only: due at the first cron time after `created_at` — every cron time rotates,
//!   exactly once;
//! - provider expiry: due at `expires_at - overlap`, whatever the schedule says (waiting for a
//!   window must never let a key expire);
//! - the earliest of these wins.
//!
//! `spread` (product contract §10.4): each slot has a fixed share of the window, its
//! `spread_offset` in `[0, spread)`, derived from provider, user and slot by a hash. The age due
//! time is pushed back by it (`created_at + rotate_every + offset`: never later than
//! `rotate_every + spread`), and the expiry due time is pulled forward by the rest of the window
//! (`expires_at - overlap - (spread - offset)`: spread, but never later than without it), so
//! slots whose keys were created, or expire, together come due spread over the window.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::duration;
use crate::model::KeyKind;

/// Parses a rotation schedule: 5 fields, or 6 with seconds first; no year field (a schedule
/// that ends would silently stop rotating).
pub fn parse_schedule(text: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| e.to_string())
}

/// A rotation schedule parsed once, at config load: the cron expression in its time zone.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    zone: String,
    cron: Cron,
    tz: TimeZone,
}

impl Schedule {
    /// Parses `text` (see [`parse_schedule`]) in the IANA time zone `zone`.
    pub fn parse(text: &str, zone: &str) -> Result<Schedule, String> {
        let cron = parse_schedule(text)?;
        let tz = TimeZone::get(zone).map_err(|e| format!("unknown time zone `{zone}`: {e}"))?;
        Ok(Schedule {
            text: text.to_string(),
            zone: zone.to_string(),
            cron,
            tz,
        })
    }

    /// The IANA name of its time zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The first cron time at or after (`inclusive`) / strictly after `from`.
    pub fn after(&self, from: Timestamp, inclusive: bool) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&from.to_zoned(self.tz.clone()), inclusive)
            .ok()
            .map(|z| z.timestamp())
    }
}

/// The expression as written.
impl std::ops::Deref for Schedule {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        (&self.text, &self.zone) == (&other.text, &other.zone)
    }
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} in {}", self.text, self.zone)
    }
}

/// A slot's rotation policy, as the due-time engine needs it.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The kind of key the slot wants (a key of another kind is due at once).
    pub kind: KeyKind,
    /// Rotate when the current key is older than this.
    pub rotate_every: Option<SignedDuration>,
    /// Rotate only at these cron times (in their time zone).
    pub schedule: Option<&'a Schedule>,
    /// How long a replaced key stays valid; a key that expires at the provider rotates this long
    /// before it does.
    pub overlap: SignedDuration,
    /// The window due times are spread over (`spread`; zero: none).
    pub spread: SignedDuration,
    /// This slot's share of `spread`, in `[0, spread)` ([`spread_offset`]).
    pub spread_offset: SignedDuration,
}

/// The fixed share of `spread` for one slot: `spread × h / 2^64`, where `h` is the first 8 bytes
/// of SHA-256 over provider, user and slot. Deterministic across runs, hosts and versions;
/// roughly uniform over `[0, spread)`; whole seconds.
pub fn spread_offset(
    spread: SignedDuration,
    provider: &str,
    user: &str,
    slot: &str,
) -> SignedDuration {
    use sha2::{Digest, Sha256};
    if spread <= SignedDuration::ZERO {
        return SignedDuration::ZERO;
    }
    let digest = Sha256::new()
        .chain_update(provider.as_bytes())
        .chain_update([0])
        .chain_update(user.as_bytes())
        .chain_update([0])
        .chain_update(slot.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let h = u64::from_be_bytes(first);
    let secs = spread.as_secs().max(0) as u128;
    SignedDuration::from_secs(((secs * h as u128) >> 64) as i64)
}

/// What the due-time engine knows about a slot's current key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFacts {
    /// API key or credential.
    pub kind: KeyKind,
    /// When the provider created it: the start of its age.
    pub created_at: Timestamp,
    /// When it expires at the provider (Okta ASA); `None`: never.
    pub expires_at: Option<Timestamp>,
}

/// Why a slot is (or will be) due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DueReason {
    /// The slot has no current key: due at once.
    NoKey,
    /// The current key is of another kind than the slot wants: due at once.
    KindChanged {
        /// The current key's kind.
        have: KeyKind,
        /// The slot's kind.
        want: KeyKind,
    },
    /// The key reached `rotate_every` (plus the slot's share of `spread`).
    Age {
        /// The slot's `rotate_every`.
        every: SignedDuration,
        /// The slot's share of `spread`.
        spread: SignedDuration,
    },
    /// A `schedule` time came (with `rotate_every`: the first one at or after the key reached
    /// that age).
    Schedule {
        /// The slot's `rotate_every`, if it has one.
        every: Option<SignedDuration>,
        /// The cron expression as written.
        schedule: String,
    },
    /// The key expires at the provider within the slot's overlap.
    Expiry {
        /// When it expires.
        expires_at: Timestamp,
    },
}

/// When a slot becomes due, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// When it becomes due (`Timestamp::MIN`: at once).
    pub at: Timestamp,
    /// Why.
    pub reason: DueReason,
}

impl Due {
    /// Words for a plan line, e.g. `is 31d old (rotate_every 30d)`.
    pub fn describe(&self, created_at: Option<Timestamp>, now: Timestamp) -> String {
        match &self.reason {
            DueReason::NoKey => "no current key".to_string(),
            DueReason::KindChanged { have, want } => {
                format!("is a {have}, the slot now wants a {want}")
            }
            DueReason::Age { every, spread } => format!(
                "is {} old (rotate_every {}{})",
                created_at
                    .map(|c| duration::humanize(now.duration_since(c)))
                    .unwrap_or_else(|| "?".into()),
                duration::format(*every),
                if spread.is_zero() {
                    String::new()
                } else {
                    format!(" + {} spread", duration::humanize(*spread))
                }
            ),
            DueReason::Schedule {
                every: Some(every),
                schedule,
            } => format!(
                "is {} old (rotate_every {}, window `{schedule}` opened {})",
                created_at
                    .map(|c| duration::humanize(now.duration_since(c)))
                    .unwrap_or_else(|| "?".into()),
                duration::format(*every),
                self.at.strftime("%Y-%m-%d %H:%M UTC")
            ),
            DueReason::Schedule {
                every: None,
                schedule,
            } => {
                format!(
                    "schedule `{schedule}` fired {}",
                    self.at.strftime("%Y-%m-%d %H:%M UTC")
                )
            }
            DueReason::Expiry { expires_at } => {
                format!(
                    "expires {} (within overlap)",
                    expires_at.strftime("%Y-%m-%d %H:%M UTC")
                )
            }
        }
    }
}

/// When the slot holding `key` becomes due (possibly already in the past). `None`: never —
/// the slot has no rotation policy and the key does not expire.
pub fn next_due(slot: &Policy<'_>, key: Option<KeyFacts>) -> Option<Due> {
    let Some(key) = key else {
        return Some(Due {
            at: Timestamp::MIN,
            reason: DueReason::NoKey,
        });
    };
    if key.kind != slot.kind {
        return Some(Due {
            at: Timestamp::MIN,
            reason: DueReason::KindChanged {
                have: key.kind,
                want: slot.kind,
            },
        });
    }
    let mut candidates: Vec<Due> = Vec::new();
    match (slot.schedule, slot.rotate_every) {
        (None, Some(every)) => {
            if let Ok(at) = key
                .created_at
                .checked_add(every)
                .and_then(|t| t.checked_add(slot.spread_offset))
            {
                candidates.push(Due {
                    at,
                    reason: DueReason::Age {
                        every,
                        spread: slot.spread_offset,
                    },
                });
            }
        }
        (Some(schedule), Some(every)) => {
            if let Some(at) = key
                .created_at
                .checked_add(every)
                .and_then(|t| t.checked_add(slot.spread_offset))
                .ok()
                .and_then(|base| schedule.after(base, true))
            {
                candidates.push(Due {
                    at,
                    reason: DueReason::Schedule {
                        every: Some(every),
                        schedule: schedule.to_string(),
                    },
                });
            }
        }
        (Some(schedule), None) => {
            if let Some(at) = schedule.after(key.created_at, false) {
                candidates.push(Due {
                    at,
                    reason: DueReason::Schedule {
                        every: None,
                        schedule: schedule.to_string(),
                    },
                });
            }
        }
        (None, None) => {}
    }
    let early = (slot.spread - slot.spread_offset).max(SignedDuration::ZERO);
    if let Some(expires_at) = key.expires_at
        && let Ok(at) = expires_at
            .checked_sub(slot.overlap.max(SignedDuration::ZERO))
            .and_then(|t| t.checked_sub(early))
    {
        candidates.push(Due {
            at,
            reason: DueReason::Expiry { expires_at },
        });
    }
    candidates.into_iter().min_by_key(|d| d.at)
}

/// When a key retired at `delivered_at` of its replacement may be revoked.
pub fn revoke_after(delivered_at: Timestamp, overlap: SignedDuration) -> Timestamp {
    delivered_at
        .checked_add(overlap.max(SignedDuration::ZERO))
        .unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slot's policy in the tests' terms; its schedule lives as long as the test.
    struct Slot {
        kind: KeyKind,
        rotate_every: Option<SignedDuration>,
        schedule: Option<Schedule>,
        overlap: SignedDuration,
        spread: SignedDuration,
        spread_offset: SignedDuration,
    }

    impl Slot {
        fn policy(&self) -> Policy<'_> {
            Policy {
                kind: self.kind,
                rotate_every: self.rotate_every,
                schedule: self.schedule.as_ref(),
                overlap: self.overlap,
                spread: self.spread,
                spread_offset: self.spread_offset,
            }
        }
    }

    fn slot(every: Option<&str>, schedule: Option<&str>, tz: &str, overlap: &str) -> Slot {
        Slot {
            kind: KeyKind::ApiKey,
            rotate_every: every.map(|e| duration::parse(e).unwrap()),
            schedule: schedule.map(|s| Schedule::parse(s, tz).unwrap()),
            overlap: duration::parse(overlap).unwrap(),
            spread: SignedDuration::ZERO,
            spread_offset: SignedDuration::ZERO,
        }
    }

    fn next_due(s: &Slot, key: Option<KeyFacts>) -> Option<Due> {
        super::next_due(&s.policy(), key)
    }

    fn key(created: &str) -> Option<KeyFacts> {
        Some(KeyFacts {
            kind: KeyKind::ApiKey,
            created_at: created.parse().unwrap(),
            expires_at: None,
        })
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn age_only() {
        let d = next_due(
            &slot(Some("30d"), None, "UTC", "1h"),
            key("2026-11-01T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(d.at, ts("2026-12-01T10:00:00Z"));
        assert!(matches!(d.reason, DueReason::Age { .. }));
    }

    #[test]
    fn no_key_or_wrong_kind_is_due_at_once() {
        let s = slot(Some("30d"), None, "UTC", "1h");
        assert_eq!(next_due(&s, None).unwrap().reason, DueReason::NoKey);
        let k = KeyFacts {
            kind: KeyKind::Credential,
            ..key("2026-11-01T10:00:00Z").unwrap()
        };
        assert!(matches!(
            next_due(&s, Some(k)).unwrap().reason,
            DueReason::KindChanged { .. }
        ));
    }

    #[test]
    fn no_policy_never_due() {
        assert_eq!(
            next_due(&slot(None, None, "UTC", "1h"), key("2026-11-01T10:00:00Z")),
            None
        );
    }

    #[test]
    fn cron_window_delays_a_due_rotation() {
        // Due by age on Wednesday 2026-12-02 10:00; the window is Mondays 03:00 Berlin.
        let s = slot(Some("30d"), Some("0 3 * * 1"), "Europe/Berlin", "1h");
        let d = next_due(&s, key("2026-11-02T10:00:00Z")).unwrap();
        assert_eq!(
            d.at,
            ts("2026-12-07T02:00:00Z"),
            "Monday 03:00 CET = 02:00 UTC"
        );
    }

    #[test]
    fn schedule_only_rotates_at_each_cron_time() {
        let s = slot(None, Some("0 3 * * *"), "UTC", "1h");
        let d = next_due(&s, key("2026-11-02T03:00:00Z")).unwrap();
        assert_eq!(
            d.at,
            ts("2026-11-03T03:00:00Z"),
            "not the cron time the key was made at"
        );
        let d = next_due(&s, key("2026-11-02T03:00:01Z")).unwrap();
        assert_eq!(d.at, ts("2026-11-03T03:00:00Z"));
    }

    #[test]
    fn dst_gap_runs_at_first_valid_time() {
        // 02:30 does not exist in Berlin on 2026-03-29.
        let s = slot(None, Some("30 2 * * *"), "Europe/Berlin", "1h");
        let d = next_due(&s, key("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(d.at, ts("2026-03-29T01:00:00Z"), "03:00 CEST");
    }

    #[test]
    fn expiry_beats_the_schedule() {
        let s = slot(Some("90d"), Some("0 3 1 * *"), "UTC", "48h");
        let k = KeyFacts {
            expires_at: Some(ts("2026-11-10T00:00:00Z")),
            ..key("2026-11-01T00:00:00Z").unwrap()
        };
        let d = next_due(&s, Some(k)).unwrap();
        assert_eq!(d.at, ts("2026-11-08T00:00:00Z"));
        assert!(matches!(d.reason, DueReason::Expiry { .. }));
    }

    #[test]
    fn six_field_cron_with_seconds() {
        let s = slot(None, Some("*/10 * * * * *"), "UTC", "0s");
        let d = next_due(&s, key("2026-11-01T00:00:03Z")).unwrap();
        assert_eq!(d.at, ts("2026-11-01T00:00:10Z"));
    }

    const SCHEDULES: &[&str] = &[
        "0 3 * * 1",
        "*/15 * * * *",
        "0 0 1 * *",
        "30 2 * * *",
        "0 */6 * * *",
    ];
    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
    ];

    #[test]
    fn dst_gap_in_new_york_shifts_to_the_first_valid_time() {
        // The case proptest found: 02:30 does not exist in New York on 2024-03-10.
        let s = slot(None, Some("30 2 * * *"), "America/New_York", "1h");
        let d = next_due(&s, key("2024-03-09T07:30:00Z")).unwrap();
        assert_eq!(d.at, ts("2024-03-10T07:00:00Z"), "03:00 EDT");
    }

    #[test]
    fn spread_offsets_are_deterministic_and_roughly_uniform() {
        let spread = SignedDuration::from_hours(24);
        let offsets: Vec<SignedDuration> = (0..10_000)
            .map(|i| spread_offset(spread, "ng", &format!("fleet-{i:05}"), "agent"))
            .collect();
        // The same slot always gets the same share; another slot of the user another one.
        assert_eq!(
            offsets[42],
            spread_offset(spread, "ng", "fleet-00042", "agent")
        );
        assert_ne!(
            offsets[42],
            spread_offset(spread, "ng", "fleet-00042", "api")
        );
        assert!(
            offsets
                .iter()
                .all(|o| *o >= SignedDuration::ZERO && *o < spread)
        );
        // Ten buckets of 2.4 h each hold about a thousand slots (a uniform spread: within 15%).
        let mut buckets = [0usize; 10];
        for o in &offsets {
            buckets[(o.as_secs() * 10 / spread.as_secs()) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (850..=1150).contains(n),
                "bucket {i}: {n} of 10000 ({buckets:?})"
            );
        }
        assert_eq!(
            spread_offset(SignedDuration::ZERO, "ng", "a", "b"),
            SignedDuration::ZERO
        );
    }

    proptest! {
        #[test]
        fn spread_pushes_age_back_within_the_window_and_expiry_only_earlier(
            created in 1_700_000_000i64..1_900_000_000,
            every in 1i64..10_000_000,
            spread in 0i64..2_000_000,
            sched in proptest::option::of(0usize..SCHEDULES.len()),
            expires_in in proptest::option::of(1i64..20_000_000),
            user in "[a-z]{1,8}",
        ) {
            let created = Timestamp::from_second(created).unwrap();
            let expires_at = expires_in.map(|e| created + SignedDuration::from_secs(e));
            let k = Some(KeyFacts { kind: KeyKind::ApiKey, created_at: created, expires_at });
            let mut plain = slot(None, None, "UTC", "1h");
            plain.rotate_every = Some(SignedDuration::from_secs(every));
            plain.schedule = sched.map(|i| Schedule::parse(SCHEDULES[i], "UTC").unwrap());
            let spread = SignedDuration::from_secs(spread);
            let spread_slot = Slot {
                spread,
                spread_offset: spread_offset(spread, "ng", &user, "main"),
                schedule: plain.schedule.clone(),
                ..slot(None, None, "UTC", "1h")
            };
            let spread_slot = Slot { rotate_every: plain.rotate_every, ..spread_slot };
            let without = next_due(&plain, k).map(|d| d.at);
            let with = next_due(&spread_slot, k).map(|d| d.at);
            prop_assert_eq!(with.is_some(), without.is_some());
            let (Some(with), Some(_)) = (with, without) else { return Ok(()); };
            // Never later than rotate_every + spread (with a schedule: the first window after
            // it), and never later than the expiry due time without the spread.
            let age_bound = created + SignedDuration::from_secs(every) + spread;
            let age_bound = match &spread_slot.schedule {
                Some(s) => s.after(age_bound, true).unwrap_or(age_bound),
                None => age_bound,
            };
            prop_assert!(with <= age_bound, "due {with} after rotate_every + spread {age_bound}");
            if let Some(e) = expires_at {
                prop_assert!(with <= e - SignedDuration::from_hours(1), "due {with} after expiry - overlap");
            }
            // Deterministic per slot.
            prop_assert_eq!(next_due(&spread_slot, k).map(|d| d.at), Some(with));
        }

        #[test]
        fn due_time_is_never_before_the_last_rotation(
            created in 1_700_000_000i64..1_900_000_000,
            every in proptest::option::of(1i64..10_000_000),
            sched in proptest::option::of(0usize..SCHEDULES.len()),
            zone in 0usize..ZONES.len(),
        ) {
            let mut s = slot(None, None, ZONES[zone], "1h");
            s.rotate_every = every.map(SignedDuration::from_secs);
            s.schedule = sched.map(|i| Schedule::parse(SCHEDULES[i], ZONES[zone]).unwrap());
            let created = Timestamp::from_second(created).unwrap();
            let k = Some(KeyFacts { kind: KeyKind::ApiKey, created_at: created, expires_at: None });
            if let Some(d) = next_due(&s, k) {
                prop_assert!(d.at >= created, "due {} before created {}", d.at, created);
                if let Some(e) = s.rotate_every {
                    prop_assert!(d.at >= created + e, "due before rotate_every elapsed");
                }
            } else {
                prop_assert!(s.rotate_every.is_none() && s.schedule.is_none());
            }
        }

        #[test]
        fn schedule_without_age_fires_at_each_cron_time_exactly_once(
            created in 1_700_000_000i64..1_900_000_000,
            sched in 0usize..SCHEDULES.len(),
            zone in 0usize..ZONES.len(),
        ) {
            let s = slot(None, Some(SCHEDULES[sched]), ZONES[zone], "1h");
            let created = Timestamp::from_second(created).unwrap();
            let facts = |c| Some(KeyFacts { kind: KeyKind::ApiKey, created_at: c, expires_at: None });
            let first = next_due(&s, facts(created)).unwrap().at;
            prop_assert!(first > created);
            let cron = parse_schedule(SCHEDULES[sched]).unwrap();
            let tz = TimeZone::get(ZONES[zone]).unwrap();
            // `first` is a cron time — or, when the cron time fell into a DST gap, the first
            // valid instant after it (croner's documented rule) — and no cron time lies
            // strictly between created and first.
            let in_gap = tz.to_offset(first) != tz.to_offset(first - SignedDuration::from_hours(1));
            prop_assert!(
                cron.is_time_matching(&first.to_zoned(tz.clone())).unwrap() || in_gap,
                "{first} is not a cron time of `{}` in {}", SCHEDULES[sched], ZONES[zone]
            );
            let prev = cron.find_previous_occurrence(&first.to_zoned(tz.clone()), false).unwrap().timestamp();
            prop_assert!(prev <= created, "skipped cron time {prev}");
            // A key minted at that cron time (or just after) is due at the next one, never again at `first`.
            for lag in [0i64, 1, 59] {
                let second = next_due(&s, facts(first + SignedDuration::from_secs(lag))).unwrap().at;
                prop_assert!(second > first);
            }
        }
    }
}
