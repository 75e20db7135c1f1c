//! Property tests of the planner, run together with the real executor against an in-memory
//! provider: applying a plan and planning again yields no changes; no plan revokes the current
//! delivered key of a declared slot; no plan changes or deletes a user keyward does not manage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use keyward::apply::Executor;
use keyward::config::*;
use keyward::model::*;
use keyward::plan::{Action, PlanOptions, plan};
use keyward::providers::{CreatedKey, NewKey, Provider, ProviderError};
use keyward::state::{KeyRecord, SlotRecord, State, UserRecord};
use keyward::store::StateDir;
use proptest::prelude::*;
use secrecy::SecretString;

/// An in-memory provider account.
struct Fake {
    snap: Mutex<AccountSnapshot>,
    next: AtomicU64,
    now: Timestamp,
}

impl Fake {
    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}_new{:05}",
            self.next.fetch_add(1, Ordering::SeqCst)
        )
    }
}

#[async_trait]
impl Provider for Fake {
    fn name(&self) -> &str {
        "ng"
    }
    async fn list(
        &self,
        _managed: Option<&std::collections::BTreeSet<String>>,
        listing: &mut keyward::providers::Listing,
        _pace: Option<&keyward::providers::http::Pace>,
    ) -> Result<(), ProviderError> {
        let snap = self.snap.lock().unwrap().clone();
        listing.users = snap.users;
        listing.keys = snap.keys;
        Ok(())
    }
    async fn create_user(&self, name: &str, active: bool) -> Result<RemoteUser, ProviderError> {
        let u = RemoteUser {
            id: self.id("bot"),
            name: name.into(),
            active,
            deleted: false,
            created_at: Some(self.now),
        };
        let mut s = self.snap.lock().unwrap();
        assert!(s.user_by_name(name).is_none(), "duplicate user {name}");
        s.users.push(u.clone());
        Ok(u)
    }
    async fn update_user(
        &self,
        user: &RemoteUser,
        active: bool,
    ) -> Result<RemoteUser, ProviderError> {
        let mut s = self.snap.lock().unwrap();
        let u = s
            .users
            .iter_mut()
            .find(|u| u.id == user.id)
            .expect("user exists");
        u.active = active;
        Ok(u.clone())
    }
    async fn delete_user(&self, user: &RemoteUser) -> Result<(), ProviderError> {
        let mut s = self.snap.lock().unwrap();
        s.users.retain(|u| u.id != user.id);
        s.keys.retain(|k| k.owner_id.as_deref() != Some(&user.id));
        Ok(())
    }
    async fn create_key(
        &self,
        user: &RemoteUser,
        key: &NewKey,
    ) -> Result<CreatedKey, ProviderError> {
        let k = RemoteKey {
            id: self.id("ak"),
            kind: key.kind,
            owner_id: Some(user.id.clone()),
            description: key.description.clone(),
            metadata: key.metadata.clone(),
            created_at: self.now,
            expires_at: None,
            acl: Vec::new(),
        };
        self.snap.lock().unwrap().keys.push(k.clone());
        Ok(CreatedKey {
            key: k,
            secret: SecretString::from("sekrit".to_string()),
        })
    }
    async fn update_key(
        &self,
        _user: &str,
        key: &RemoteKey,
        patch: &KeyAttrs,
    ) -> Result<RemoteKey, ProviderError> {
        let mut s = self.snap.lock().unwrap();
        let k = s
            .keys
            .iter_mut()
            .find(|k| k.id == key.id)
            .expect("key exists");
        if let Some(d) = &patch.description {
            k.description = d.clone();
        }
        if let Some(m) = &patch.metadata {
            k.metadata = m.clone();
        }
        if let Some(a) = &patch.acl {
            k.acl = a.clone();
        }
        Ok(k.clone())
    }
    async fn revoke_key(&self, _user: &str, key: &RemoteKey) -> Result<(), ProviderError> {
        self.snap.lock().unwrap().keys.retain(|k| k.id != key.id);
        Ok(())
    }
    fn requests_sent(&self) -> u64 {
        0
    }
    fn rate_limited(&self) -> u64 {
        0
    }
}

#[derive(Debug, Clone)]
struct KeyGen {
    /// 0 = untagged, 1 = tagged slot a, 2 = tagged slot b, 3 = tagged slot gone, 4 = tagged
    /// slot a by another installation
    tag: u8,
    /// A credential's ACL was widened at the provider (declared: none).
    acl_widened: bool,
    /// 0 = not recorded, 1 = current, 2 = retiring (due), 3 = retiring (not due)
    recorded: u8,
    credential: bool,
    age_days: i64,
}

#[derive(Debug, Clone)]
struct UserGen {
    declared: Option<(bool, Vec<(bool, bool)>)>, // (active, [(slot a?, credential?)...]) slot b
    remote: Option<(bool, Vec<KeyGen>)>,
    created_by_keyward: bool,
}

fn key_gen() -> impl Strategy<Value = KeyGen> {
    (0u8..5, 0u8..4, any::<bool>(), 0i64..90, any::<bool>()).prop_map(
        |(tag, recorded, credential, age_days, acl_widened)| KeyGen {
            tag,
            acl_widened,
            recorded,
            credential,
            age_days,
        },
    )
}

fn user_gen() -> impl Strategy<Value = UserGen> {
    (
        proptest::option::of((
            any::<bool>(),
            proptest::collection::vec((any::<bool>(), any::<bool>()), 0..3),
        )),
        proptest::option::of((any::<bool>(), proptest::collection::vec(key_gen(), 0..4))),
        any::<bool>(),
    )
        .prop_map(|(declared, remote, created_by_keyward)| UserGen {
            declared,
            remote,
            created_by_keyward,
        })
}

#[derive(Debug, Clone)]
struct World {
    users: Vec<UserGen>,
    rotate_every: Option<i64>,
    overlap_zero: bool,
    prune_users: u8,
    revoke_unknown: bool,
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(user_gen(), 0..6),
        proptest::option::of(1i64..60),
        any::<bool>(),
        0u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(users, rotate_every, overlap_zero, prune_users, revoke_unknown)| World {
                users,
                rotate_every,
                overlap_zero,
                prune_users,
                revoke_unknown,
            },
        )
}

fn build(
    w: &World,
    now: Timestamp,
    state_dir: &std::path::Path,
) -> (Config, AccountSnapshot, State) {
    let mut users = Vec::new();
    let mut snap = AccountSnapshot::default();
    let mut state = State::default();
    let overlap = if w.overlap_zero {
        SignedDuration::ZERO
    } else {
        SignedDuration::from_hours(24)
    };
    let slot_names = ["a", "b"];
    for (i, u) in w.users.iter().enumerate() {
        let name = format!("u{i}");
        if let Some((active, slots)) = &u.declared {
            let mut map = BTreeMap::new();
            for (j, (_, cred)) in slots.iter().enumerate() {
                let s = slot_names[j];
                map.insert(
                    s.to_string(),
                    Box::new(SlotSpec {
                        name: s.to_string(),
                        kind: if *cred {
                            KeyKind::Credential
                        } else {
                            KeyKind::ApiKey
                        },
                        description: None,
                        acl: vec![],
                        rotate_every: w.rotate_every.map(|d| SignedDuration::from_hours(24 * d)),
                        schedule: None,
                        timezone: "UTC".into(),
                        overlap,
                        spread: SignedDuration::ZERO,
                        spread_offset: SignedDuration::ZERO,
                        sinks: vec!["local".into()],
                    }),
                );
            }
            users.push(UserSpec {
                provider: "ng".into(),
                name: name.clone(),
                active: *active,
                slots: std::sync::Arc::new(map),
                file: std::sync::Arc::from(std::path::Path::new("keyward.yaml")),
                line: 1,
            });
        }
        if let Some((active, keys)) = &u.remote {
            let uid = format!("bot_{i:03}");
            snap.users.push(RemoteUser {
                id: uid.clone(),
                name: name.clone(),
                active: *active,
                deleted: false,
                created_at: Some(now),
            });
            let mut rec = UserRecord {
                id: uid.clone(),
                created_by_keyward: u.created_by_keyward,
                imported: false,
                created_at: Some(now),
                slots: BTreeMap::new(),
            };
            for (j, k) in keys.iter().enumerate() {
                let kid = format!("ak_{i:03}{j:02}");
                let slot = match k.tag {
                    1 => Some("a"),
                    2 => Some("b"),
                    3 => Some("gone"),
                    _ => None,
                };
                let metadata = match k.tag {
                    4 => KeyTag::new("elsewhere", "a").to_metadata(),
                    _ => slot
                        .map(|s| KeyTag::new("keyward", s).to_metadata())
                        .unwrap_or_default(),
                };
                let created_at = now - SignedDuration::from_hours(24 * k.age_days);
                snap.keys.push(RemoteKey {
                    id: kid.clone(),
                    kind: if k.credential {
                        KeyKind::Credential
                    } else {
                        KeyKind::ApiKey
                    },
                    owner_id: Some(uid.clone()),
                    description: String::new(),
                    metadata,
                    created_at,
                    expires_at: None,
                    acl: if k.credential && k.acl_widened {
                        vec!["bind:*".to_string()]
                    } else {
                        Vec::new()
                    },
                });
                if let Some(s) = slot {
                    let kr = KeyRecord {
                        id: kid.clone(),
                        kind: if k.credential {
                            KeyKind::Credential
                        } else {
                            KeyKind::ApiKey
                        },
                        created_at,
                        delivered_at: created_at,
                        sinks: vec!["local".into()],
                        retire_after: None,
                        delivery: keyward::state::Delivery::Delivered,
                    };
                    let srec: &mut SlotRecord = rec.slots.entry(s.to_string()).or_default();
                    match k.recorded {
                        1 if srec.current().is_none() => {
                            let retiring = srec.retiring().to_vec();
                            *srec = SlotRecord::with_current(kr);
                            for r in retiring {
                                srec.push_retiring(r);
                            }
                        }
                        2 => srec.push_retiring(KeyRecord {
                            retire_after: Some(now - SignedDuration::from_hours(1)),
                            ..kr
                        }),
                        3 => srec.push_retiring(KeyRecord {
                            retire_after: Some(now + SignedDuration::from_hours(1)),
                            ..kr
                        }),
                        _ => {}
                    }
                }
            }
            state
                .accounts
                .entry("ng".into())
                .or_default()
                .users
                .insert(name.clone(), rec);
        } else if u.created_by_keyward {
            // Recorded earlier, deleted out of band since.
            state.accounts.entry("ng".into()).or_default().users.insert(
                name.clone(),
                UserRecord {
                    id: format!("bot_gone{i}"),
                    created_by_keyward: true,
                    imported: false,
                    created_at: None,
                    slots: BTreeMap::new(),
                },
            );
        }
    }
    let config = Config {
        path: "test.yaml".into(),
        digest: String::new(),
        included: Vec::new(),
        include_patterns: Vec::new(),
        include_unmatched: Vec::new(),
        settings: Settings {
            state_dir: state_dir.to_path_buf(),
            state_url: None,
            interval: SignedDuration::from_mins(5),
            resync_share: 50,
            mode: Mode::Apply,
            concurrency: 4,
            max_deletions: 1000,
            metrics: None,
            metrics_per_key: true,
            owner: "keyward".into(),
        },
        providers: BTreeMap::from([(
            "ng".to_string(),
            ProviderAccount {
                name: "ng".into(),
                kind: ProviderType::Ngrok,
                base_url: "http://127.0.0.1:1".into(),
                rate_limit: RateLimit {
                    requests: 100,
                    per: SignedDuration::from_secs(60),
                },
                auth: ProviderAuth::Ngrok {
                    api_key: SecretString::from("x".to_string()),
                },
            },
        )]),
        sinks: BTreeMap::from([(
            "local".to_string(),
            SinkConfig {
                name: "local".into(),
                kind: SinkKind::File {
                    path: format!("{}/secrets/{{user}}/{{slot}}.json", state_dir.display()),
                    format: SinkFormat::Json,
                },
            },
        )]),
        users,
        default_overlap: SignedDuration::from_hours(24),
        default_sinks: vec!["local".into()],
        prune: Prune {
            users: [PruneUsers::Keep, PruneUsers::Disable, PruneUsers::Delete]
                [w.prune_users as usize],
            unknown_keys: if w.revoke_unknown {
                PruneKeys::Revoke
            } else {
                PruneKeys::Report
            },
        },
    };
    (config, snap, state)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn plan_invariants_and_idempotence(w in world()) {
        let now = Timestamp::now();
        let tmp = tempfile::tempdir().unwrap();
        let (config, snap, state) = build(&w, now, tmp.path());
        let observed: Observed = BTreeMap::from([("ng".to_string(), snap.clone())]);
        let p1 = plan(&config, &observed, &state, now, &PlanOptions::default());

        // Never touch a user keyward does not manage.
        for c in &p1.changes {
            let declared = config.users.iter().any(|u| u.name == c.user);
            let ours = state.user("ng", &c.user).is_some_and(|r| r.created_by_keyward
                && snap.user_by_name(&c.user).is_some_and(|ru| ru.id == r.id));
            prop_assert!(declared || ours, "change on unmanaged user: {c:?}");
            if c.action() == Action::DeleteUser {
                prop_assert!(!declared && ours, "deleting a user that is declared or not ours: {c:?}");
            }
        }
        // Never revoke the current delivered key of a declared slot unless the same plan
        // replaces it first (rotation) — and then only after its overlap, i.e. not in this plan.
        for u in &config.users {
            for slot in u.slots.keys() {
                if let Some(cur) = state.slot("ng", &u.name, slot).and_then(|s| s.current()) {
                    prop_assert!(
                        !p1.changes.iter().any(|c| c.action() == Action::RevokeKey && c.key_id() == Some(cur.id.as_str())),
                        "plan revokes the current key {} of {}/{}", cur.id, u.name, slot
                    );
                }
            }
        }

        // Keys another installation tagged, and keys this one tagged that no state records, are
        // never changed or revoked by a plan.
        let recorded: std::collections::BTreeSet<String> = state
            .accounts
            .values()
            .flat_map(|a| a.users.values())
            .flat_map(|u| u.slots.values())
            .flat_map(|s| s.current().into_iter().chain(s.retiring()).map(|k| k.id.clone()))
            .collect();
        for k in &snap.keys {
            let foreign = KeyTag::parse(&k.metadata).is_some_and(|t| t.owner != "keyward");
            let untracked = KeyTag::parse(&k.metadata).is_some() && !recorded.contains(&k.id);
            if foreign || untracked {
                prop_assert!(
                    !p1.changes.iter().any(|c| c.key_id() == Some(k.id.as_str())),
                    "plan touches {} key {}: {:#?}", if foreign { "foreign" } else { "untracked" }, k.id, p1.changes
                );
            }
        }
        // A declared slot's current key keeps the declared ACL: a widened one is put back.
        for c in &p1.changes {
            if let keyward::plan::Op::UpdateKey { after, .. } = &c.op {
                prop_assert_eq!(after.acl.as_deref(), Some(&[][..]), "update_key puts the declared (empty) ACL back");
            }
        }

        // Apply with the real executor, then plan again: nothing left to do.
        let fake = Arc::new(Fake { snap: Mutex::new(snap), next: AtomicU64::new(0), now });
        let sd = StateDir::new(tmp.path());
        let mut st = state.clone();
        sd.save(&mut st).unwrap();
        let executor = Executor::new(
            Arc::new(config.clone()),
            BTreeMap::from([("ng".to_string(), fake.clone() as Arc<dyn Provider>)]),
            Arc::new(sd.clone()),
            st,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let report = rt.block_on(executor.run(&p1, &observed));
        prop_assert!(report.ok(), "apply failed: {}", report.summary());
        let observed2: Observed = BTreeMap::from([("ng".to_string(), fake.snap.lock().unwrap().clone())]);
        let state2 = sd.load().unwrap();
        let p2 = plan(&config, &observed2, &state2, now, &PlanOptions::default());
        prop_assert!(p2.changes.is_empty(), "second plan not empty: {:#?}\nfirst: {:#?}", p2.changes, p1.changes);
        // Every declared slot now has a current key whose secret reached the sink.
        for u in &config.users {
            for slot in u.slots.keys() {
                let rec = state2.slot("ng", &u.name, slot).and_then(|s| s.current());
                prop_assert!(rec.is_some(), "{}/{} has no current key after apply", u.name, slot);
            }
        }
    }
}
