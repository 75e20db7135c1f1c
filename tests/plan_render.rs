//! Snapshot tests of the human plan output (what users read before they approve) and unit tests
//! of the planner's individual decisions, on hand-built inputs with a fixed `now`.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use keyward::config::*;
use keyward::model::*;
use keyward::plan::{Action, PlanOptions, plan, render};
use keyward::state::{KeyRecord, SlotRecord, State, UserRecord};
use secrecy::SecretString;

fn now() -> Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

fn slot(name: &str, kind: KeyKind, rotate_days: Option<i64>) -> SlotSpec {
    SlotSpec {
        name: name.into(),
        kind,
        description: None,
        acl: vec![],
        rotate_every: rotate_days.map(|d| SignedDuration::from_hours(24 * d)),
        schedule: None,
        timezone: "UTC".into(),
        overlap: SignedDuration::from_hours(48),
        spread: SignedDuration::ZERO,
        spread_offset: SignedDuration::ZERO,
        sinks: vec!["local".into()],
    }
}

fn user(provider: &str, name: &str, active: bool, slots: Vec<SlotSpec>) -> UserSpec {
    UserSpec {
        provider: provider.into(),
        name: name.into(),
        active,
        slots: std::sync::Arc::new(
            slots
                .into_iter()
                .map(|s| (s.name.clone(), Box::new(s)))
                .collect(),
        ),
        file: std::sync::Arc::from(std::path::Path::new("keyward.yaml")),
        line: 1,
    }
}

fn account(name: &str, kind: ProviderType) -> ProviderAccount {
    ProviderAccount {
        name: name.into(),
        kind,
        base_url: "http://127.0.0.1:1".into(),
        rate_limit: RateLimit {
            requests: 100,
            per: SignedDuration::from_secs(60),
        },
        auth: match kind {
            ProviderType::Ngrok => ProviderAuth::Ngrok {
                api_key: SecretString::from("k".to_string()),
            },
            ProviderType::OktaAsa => ProviderAuth::OktaAsa {
                team: "acme".into(),
                key_id: "id".into(),
                key_secret: SecretString::from("s".to_string()),
            },
        },
    }
}

fn config(users: Vec<UserSpec>, prune: Prune) -> Config {
    Config {
        path: "keyward.yaml".into(),
        digest: String::new(),
        included: Vec::new(),
        include_patterns: Vec::new(),
        include_unmatched: Vec::new(),
        settings: Settings {
            state_dir: "/tmp/unused".into(),
            state_url: None,
            interval: SignedDuration::from_mins(5),
            resync_share: 50,
            mode: Mode::Apply,
            concurrency: 8,
            max_deletions: 10,
            metrics: None,
            metrics_per_key: true,
            owner: "keyward".into(),
        },
        providers: BTreeMap::from([
            (
                "ngrok-prod".to_string(),
                account("ngrok-prod", ProviderType::Ngrok),
            ),
            ("asa".to_string(), account("asa", ProviderType::OktaAsa)),
        ]),
        sinks: BTreeMap::from([(
            "local".to_string(),
            SinkConfig {
                name: "local".into(),
                kind: SinkKind::File {
                    path: "/tmp/x/{user}".into(),
                    format: SinkFormat::Json,
                },
            },
        )]),
        users,
        prune,
        default_overlap: SignedDuration::from_hours(24),
        default_sinks: vec!["local".into()],
    }
}

fn key(id: &str, owner: &str, slot: Option<&str>, age_days: i64) -> RemoteKey {
    RemoteKey {
        id: id.into(),
        kind: KeyKind::ApiKey,
        owner_id: Some(owner.into()),
        description: String::new(),
        metadata: slot
            .map(|s| KeyTag::new("keyward", s).to_metadata())
            .unwrap_or_default(),
        created_at: now() - SignedDuration::from_hours(24 * age_days),
        expires_at: None,
        acl: Vec::new(),
    }
}

fn record(id: &str, age_days: i64, retire_after: Option<Timestamp>) -> KeyRecord {
    let created = now() - SignedDuration::from_hours(24 * age_days);
    KeyRecord {
        id: id.into(),
        kind: KeyKind::ApiKey,
        created_at: created,
        delivered_at: created,
        sinks: vec!["local".into()],
        retire_after,
        delivery: keyward::state::Delivery::Delivered,
    }
}

fn remote_user(id: &str, name: &str, active: bool) -> RemoteUser {
    RemoteUser {
        id: id.into(),
        name: name.into(),
        active,
        deleted: false,
        created_at: None,
    }
}

const REPORT: Prune = Prune {
    users: PruneUsers::Keep,
    unknown_keys: PruneKeys::Report,
};

/// The example of the product contract: an update, a rotation, a revoke, a new user with a key,
/// and an unknown key.
fn contract_example() -> keyward::plan::Plan {
    let cfg = config(
        vec![
            user(
                "ngrok-prod",
                "ci-deployer",
                true,
                vec![slot("deploy", KeyKind::ApiKey, Some(30))],
            ),
            user(
                "asa",
                "backup-bot",
                true,
                vec![slot("main", KeyKind::ApiKey, Some(90))],
            ),
            user("ngrok-prod", "old-bot", true, vec![]),
        ],
        REPORT,
    );
    let ngrok = AccountSnapshot {
        users: vec![
            remote_user("bot_1", "ci-deployer", false),
            remote_user("bot_2", "old-bot", true),
        ],
        keys: vec![
            key(
                "ak_2abcK1vQ9fX3mZpL0aB7cD4eFwxyz",
                "bot_1",
                Some("deploy"),
                31,
            ),
            key(
                "ak_2xyzR8tY2uI6oP0aS5dF9gH3jklm",
                "bot_1",
                Some("deploy"),
                62,
            ),
            key("ak_2qqqZ4xC8vB2nM6qW0eR4tY8uhij", "bot_2", None, 3),
        ],
    };
    let observed: Observed = BTreeMap::from([
        ("ngrok-prod".to_string(), ngrok),
        ("asa".to_string(), AccountSnapshot::default()),
    ]);
    let mut state = State::default();
    let mut rec = UserRecord {
        id: "bot_1".into(),
        created_by_keyward: true,
        imported: false,
        created_at: None,
        slots: BTreeMap::new(),
    };
    let s = rec.slots.entry("deploy".into()).or_default();
    **s = SlotRecord::with_current(record("ak_2abcK1vQ9fX3mZpL0aB7cD4eFwxyz", 31, None));
    s.push_retiring(record(
        "ak_2xyzR8tY2uI6oP0aS5dF9gH3jklm",
        62,
        Some("2026-11-20T09:00:00Z".parse().unwrap()),
    ));
    state
        .accounts
        .entry("ngrok-prod".into())
        .or_default()
        .users
        .insert("ci-deployer".into(), rec);
    plan(&cfg, &observed, &state, now(), &PlanOptions::default())
}

#[test]
fn human_plan_matches_contract_example() {
    let p = contract_example();
    insta::assert_snapshot!(render::text(&p, false));
}

#[test]
fn json_plan_has_contract_fields() {
    let p = contract_example();
    let v: serde_json::Value = serde_json::from_str(&render::json(&p)).unwrap();
    assert_eq!(v["format_version"], "1");
    assert!(v["observed"].as_str().unwrap().starts_with("sha256:"));
    let actions: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "update_user",
            "rotate_key",
            "revoke_key",
            "create_user",
            "create_key"
        ]
    );
    for c in v["changes"].as_array().unwrap() {
        for field in [
            "action", "provider", "user", "slot", "key_id", "reason", "before", "after",
        ] {
            assert!(c.get(field).is_some(), "change lacks {field}: {c}");
        }
    }
    let w = &v["warnings"][0];
    assert_eq!(w["kind"], "unknown_key");
    assert_eq!(w["key_id"], "ak_2qqqZ4xC8vB2nM6qW0eR4tY8uhij");
    for field in ["kind", "provider", "user", "key_id", "message"] {
        assert!(w.get(field).is_some());
    }
    assert_eq!(v["summary"]["create"], 2);
    assert_eq!(v["summary"]["rotate"], 1);
}

#[test]
fn no_changes_plan_says_so() {
    let cfg = config(vec![user("ngrok-prod", "ci", true, vec![])], REPORT);
    let observed: Observed = BTreeMap::from([(
        "ngrok-prod".to_string(),
        AccountSnapshot {
            users: vec![
                remote_user("bot_1", "ci", true),
                remote_user("bot_9", "human-made", true),
            ],
            keys: vec![],
        },
    )]);
    let p = plan(
        &cfg,
        &observed,
        &State::default(),
        now(),
        &PlanOptions::default(),
    );
    assert!(!p.has_changes());
    insta::assert_snapshot!(render::text(&p, false));
}

#[test]
fn colour_only_when_asked() {
    let p = contract_example();
    assert!(!render::text(&p, false).contains('\u{1b}'));
    assert!(render::text(&p, true).contains('\u{1b}'));
}

#[test]
fn unknown_key_is_revoked_only_with_prune_revoke() {
    // The user also holds its slot's current key: the unknown key is not its last (that one
    // is never revoked, see `the_last_key_of_a_user_is_never_revoked`).
    let mk = |unknown_keys| {
        let cfg = config(
            vec![user(
                "ngrok-prod",
                "ci",
                true,
                vec![slot("deploy", KeyKind::ApiKey, None)],
            )],
            Prune {
                users: PruneUsers::Keep,
                unknown_keys,
            },
        );
        let observed: Observed = BTreeMap::from([(
            "ngrok-prod".to_string(),
            AccountSnapshot {
                users: vec![remote_user("bot_1", "ci", true)],
                keys: vec![
                    key("ak_x", "bot_1", None, 1),
                    key("ak_cur", "bot_1", Some("deploy"), 2),
                ],
            },
        )]);
        let mut state = State::default();
        let mut rec = UserRecord {
            id: "bot_1".into(),
            created_by_keyward: true,
            imported: false,
            created_at: None,
            slots: BTreeMap::new(),
        };
        rec.slots.insert(
            "deploy".into(),
            Box::new(SlotRecord::with_current(record("ak_cur", 2, None))),
        );
        state
            .accounts
            .entry("ngrok-prod".into())
            .or_default()
            .users
            .insert("ci".into(), rec);
        plan(&cfg, &observed, &state, now(), &PlanOptions::default())
    };
    let report = mk(PruneKeys::Report);
    assert!(report.changes.is_empty());
    assert_eq!(report.warnings.len(), 1);
    let revoke = mk(PruneKeys::Revoke);
    assert_eq!(revoke.changes.len(), 1);
    assert_eq!(revoke.changes[0].action(), Action::RevokeKey);
    assert_eq!(revoke.warnings[0].key_id.as_deref(), Some("ak_x"));
}

#[test]
fn the_last_key_of_a_user_is_never_revoked() {
    let cfg = config(
        vec![user("ngrok-prod", "ci", true, vec![])],
        Prune {
            users: PruneUsers::Keep,
            unknown_keys: PruneKeys::Revoke,
        },
    );
    let observed: Observed = BTreeMap::from([(
        "ngrok-prod".to_string(),
        AccountSnapshot {
            users: vec![remote_user("bot_1", "ci", true)],
            keys: vec![
                key("ak_old", "bot_1", None, 5),
                key("ak_new", "bot_1", None, 1),
            ],
        },
    )]);
    let p = plan(
        &cfg,
        &observed,
        &State::default(),
        now(),
        &PlanOptions::default(),
    );
    let revoked: Vec<&str> = p
        .changes
        .iter()
        .filter(|c| c.action() == Action::RevokeKey)
        .filter_map(|c| c.key_id())
        .collect();
    assert_eq!(revoked, ["ak_old"], "{p:?}");
    let kept = p
        .warnings
        .iter()
        .find(|w| w.kind == "last_key_kept")
        .expect("a warning says why");
    assert_eq!(kept.key_id.as_deref(), Some("ak_new"));
}

#[test]
fn only_limits_to_named_users_and_skips_prune() {
    let cfg = config(
        vec![
            user("ngrok-prod", "a", true, vec![]),
            user("ngrok-prod", "b", true, vec![]),
        ],
        Prune {
            users: PruneUsers::Delete,
            unknown_keys: PruneKeys::Report,
        },
    );
    let observed: Observed = BTreeMap::from([(
        "ngrok-prod".to_string(),
        AccountSnapshot {
            users: vec![remote_user("bot_x", "left", true)],
            keys: vec![],
        },
    )]);
    let mut state = State::default();
    state.record_user("ngrok-prod", "left", "bot_x", true, None);
    let opts = PlanOptions {
        only: vec!["b".into()],
        force: vec![],
    };
    let p = plan(&cfg, &observed, &state, now(), &opts);
    assert_eq!(p.changes.len(), 1);
    assert_eq!(
        (p.changes[0].action(), p.changes[0].user.as_str()),
        (Action::CreateUser, "b")
    );
    let all = plan(&cfg, &observed, &state, now(), &PlanOptions::default());
    assert!(
        all.changes
            .iter()
            .any(|c| c.action() == Action::DeleteUser && c.user == "left")
    );
}

#[test]
fn digest_changes_with_any_managed_remote_change() {
    let p1 = contract_example();
    let cfg = config(
        vec![user("ngrok-prod", "ci-deployer", true, vec![])],
        REPORT,
    );
    let base = AccountSnapshot {
        users: vec![remote_user("bot_1", "ci-deployer", true)],
        keys: vec![key("ak_1", "bot_1", None, 1)],
    };
    let d = |snap: AccountSnapshot| {
        keyward::plan::observed_digest(
            &cfg,
            &BTreeMap::from([("ngrok-prod".to_string(), snap)]),
            &State::default(),
        )
    };
    let d0 = d(base.clone());
    assert_eq!(d0, d(base.clone()), "digest is deterministic");
    let mut flag = base.clone();
    flag.users[0].active = false;
    assert_ne!(d0, d(flag));
    let mut more = base.clone();
    more.keys.push(key("ak_2", "bot_1", None, 1));
    assert_ne!(d0, d(more));
    let mut unmanaged = base.clone();
    unmanaged
        .users
        .push(remote_user("bot_9", "someone-else", true));
    assert_eq!(
        d0,
        d(unmanaged),
        "unmanaged users are not part of the digest"
    );
    let mut fewer = base.clone();
    fewer.keys.clear();
    assert_ne!(d0, d(fewer), "a key removed changes the digest");
    // The contract example's plan carries the digest of what it observed.
    assert!(p1.observed.starts_with("sha256:"), "{}", p1.observed);
}

#[test]
fn upcoming_work_is_shown_when_nothing_is_due() {
    let cfg = config(
        vec![user(
            "ngrok-prod",
            "ci",
            true,
            vec![slot("deploy", KeyKind::ApiKey, Some(30))],
        )],
        REPORT,
    );
    let observed: Observed = BTreeMap::from([(
        "ngrok-prod".to_string(),
        AccountSnapshot {
            users: vec![remote_user("bot_1", "ci", true)],
            keys: vec![
                key(
                    "ak_2curK1vQ9fX3mZpL0aB7cD4eFaaaa",
                    "bot_1",
                    Some("deploy"),
                    18,
                ),
                key(
                    "ak_2oldK1vQ9fX3mZpL0aB7cD4eFbbbb",
                    "bot_1",
                    Some("deploy"),
                    49,
                ),
            ],
        },
    )]);
    let mut state = State::default();
    let mut rec = UserRecord {
        id: "bot_1".into(),
        created_by_keyward: true,
        imported: false,
        created_at: None,
        slots: BTreeMap::new(),
    };
    let s = rec.slots.entry("deploy".into()).or_default();
    **s = SlotRecord::with_current(record("ak_2curK1vQ9fX3mZpL0aB7cD4eFaaaa", 18, None));
    s.push_retiring(record(
        "ak_2oldK1vQ9fX3mZpL0aB7cD4eFbbbb",
        49,
        Some(now() + SignedDuration::from_hours(20)),
    ));
    state
        .accounts
        .entry("ngrok-prod".into())
        .or_default()
        .users
        .insert("ci".into(), rec);
    let p = plan(&cfg, &observed, &state, now(), &PlanOptions::default());
    assert!(!p.has_changes(), "{:?}", p.changes);
    assert_eq!(p.upcoming.len(), 2);
    assert_eq!(p.upcoming[0].action, Action::RevokeKey, "soonest first");
    assert_eq!(
        p.upcoming[1].at,
        now() + SignedDuration::from_hours(24 * 12)
    );
    insta::assert_snapshot!(render::text(&p, false));
}

#[test]
fn the_asa_user_keyward_logs_in_as_is_left_alone() {
    // `account("asa", ..)` authenticates with key id "id".
    let cfg = config(
        vec![user(
            "asa",
            "keyward-admin",
            false,
            vec![slot("main", KeyKind::ApiKey, Some(1))],
        )],
        Prune {
            users: PruneUsers::Delete,
            unknown_keys: PruneKeys::Revoke,
        },
    );
    let observed: Observed = BTreeMap::from([(
        "asa".to_string(),
        AccountSnapshot {
            users: vec![
                remote_user("u1", "keyward-admin", true),
                remote_user("u2", "other-admin", true),
            ],
            keys: vec![key("id", "u1", None, 400), key("id2", "u2", None, 1)],
        },
    )]);
    let mut state = State::default();
    state.record_user("asa", "other-admin", "u2", true, None);
    let p = plan(&cfg, &observed, &state, now(), &PlanOptions::default());
    assert!(
        p.changes.iter().all(|c| c.user != "keyward-admin"),
        "{:?}",
        p.changes
    );
    let w = p
        .warnings
        .iter()
        .find(|w| w.kind == "own_credential")
        .expect("warned");
    assert_eq!(w.key_id.as_deref(), Some("id"));
    // Another (pruned) user is still handled as usual.
    assert!(
        p.changes
            .iter()
            .any(|c| c.user == "other-admin" && c.action() == Action::DeleteUser)
    );
}
