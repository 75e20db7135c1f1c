//! High availability on PostgreSQL, for real: two `keyward daemon` processes share one
//! database (`settings.state_url`) and one set of sinks, with rotations due every few seconds.
//! One leads, the other waits. The trials kill the leader with SIGKILL at random moments (and
//! just after it asked the provider for a new key), stop it with SIGSTOP past its session
//! timeout, and terminate its database backend mid-rotation. After each: the other leads within
//! 10 s, every sink's secret authenticates (no key was revoked before its replacement was
//! delivered), and the superseded leader completed no write after the next term began (the
//! database's record of every term's writes says so). At the end: nothing orphaned, the state
//! matches the provider, the final plan is a no-op. `KEYWARD_HA_TRIALS` asks for more trials.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::Pg;
use common::{Sandbox, Workspace, expect_code};
use rand::{Rng, SeedableRng};

const USERS: [&str; 3] = ["edge-0", "edge-1", "edge-2"];
const ROTATE: &str = "4s";
const OVERLAP: &str = "5s";

/// The config of one daemon: the shared database and sinks, its own metrics port and cache.
/// `max_deletions: 0`: the revocations of rotations and recoveries are all these trials make,
/// and that limit does not count them (rapid failovers leave many at once).
fn config_text(pg: &Pg, metrics: u16, cache: &str, rotate: &str) -> String {
    let mut users = String::from("users:\n");
    for u in USERS {
        users.push_str(&format!(
            "  - provider: ng\n    name: {u}\n    keys:\n      agent: {{kind: credential, rotate_every: {rotate}, overlap: {OVERLAP}}}\n"
        ));
    }
    format!(
        "version: 1\nsettings:\n  state_dir: {cache}\n  state_url: {}?sslmode=disable\n  metrics: 127.0.0.1:{metrics}\n  interval: 10m\n  max_deletions: 0\nproviders:\n  ng:\n    type: ngrok\n    api_key: ${{NGROK_API_KEY}}\n    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: 100000/1s\nsinks:\n  local:\n    type: file\n    path: secrets/{{provider}}/{{user}}/{{slot}}.json\n    format: json\ndefaults:\n  sink: local\n{users}",
        pg.url
    )
}

/// The sink program of [`slow_sink_config`]: reads the document, waits as many seconds as the
/// workspace's `delay` file says, then hands the key to `consumer/USER.json` and notes its id
/// in `finished` (`started` notes it once the wait begins).
const SLOW_SINK: &str = r#"doc=$(cat)
cd "$(dirname "$0")"
d=$(cat delay 2>/dev/null || echo 0)
echo "$KEYWARD_KEY_ID" >> started
sleep "$d"
mkdir -p consumer
printf '%s' "$doc" > "consumer/.$KEYWARD_USER.tmp" && mv "consumer/.$KEYWARD_USER.tmp" "consumer/$KEYWARD_USER.json"
echo "$KEYWARD_KEY_ID" >> finished
"#;

/// [`config_text`] with a second sink after the file sink: an exec sink running [`SLOW_SINK`].
fn slow_sink_config(pg: &Pg, metrics: u16, cache: &str, dir: &std::path::Path) -> String {
    let script = dir.join("slow-sink.sh");
    std::fs::write(&script, SLOW_SINK).unwrap();
    config_text(pg, metrics, cache, ROTATE)
        .replace(
            "sinks:\n",
            &format!(
                "sinks:\n  slow:\n    type: exec\n    command: [/bin/sh, \"{}\"]\n    timeout: 60s\n",
                script.display()
            ),
        )
        .replace("  sink: local\n", "  sink: [local, slow]\n")
}

/// One of the two daemons: its config, metrics port, and the process while it runs.
struct Node {
    name: &'static str,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: usize,
    ws_dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Node {
    fn new(name: &'static str, ws: &Workspace, pg: &Pg) -> Node {
        Node::with_config(name, ws, |port, cache| config_text(pg, port, cache, ROTATE))
    }

    /// A daemon whose config `text` writes, given its metrics port and cache directory.
    fn with_config(name: &'static str, ws: &Workspace, text: impl Fn(u16, &str) -> String) -> Node {
        let port = common::free_port();
        let config = if name == "a" {
            ws.config_path()
        } else {
            ws.path(&format!("{name}.yaml"))
        };
        std::fs::write(&config, text(port, &format!("cache-{name}"))).unwrap();
        Node {
            name,
            config,
            port,
            child: None,
            starts: 0,
            ws_dir: ws.dir.path().to_path_buf(),
            env: ws.env.clone(),
        }
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.ws_dir
            .join(format!("daemon-{}-{start}.log", self.name))
    }

    fn start(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(["daemon", "-c"])
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path(self.starts)).unwrap())
            .current_dir(&self.ws_dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn metrics(&self) -> String {
        reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .timeout(Duration::from_secs(1))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
    }

    fn leads(&self) -> bool {
        self.child.is_some() && self.metrics().lines().any(|l| l == "keyward_leader 1")
    }

    /// Every log this node wrote, oldest first.
    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restarted\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process would not die of SIGKILL's delivery until continued.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn logs_of(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("=== daemon {}\n{}", n.name, n.logs()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits for `check`, up to `limit`; how long it took, or `None`.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if check() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Every sink's secret authenticates.
fn sinks_work(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    for u in USERS {
        if !ws.path(&format!("secrets/ng/{u}/agent.json")).exists() {
            continue;
        }
        let doc = ws.sink(u, "agent");
        let secret = doc["secret"].as_str().unwrap_or_default();
        if !sb.secret_works("credential", secret) {
            return Err(format!(
                "{u}/agent: the sink's key {} does not authenticate",
                doc["key_id"]
            ));
        }
    }
    Ok(())
}

/// The end state: every sink works and holds the recorded current key, the provider has
/// exactly the keys the state records (nothing orphaned), and a plan changes nothing.
fn converged(sb: &Sandbox, ws: &Workspace) -> Result<(), String> {
    sinks_work(sb, ws)?;
    let state: serde_json::Value =
        serde_json::from_str(&ws.state_text()).map_err(|e| format!("state show: {e}"))?;
    let creds = sb.list("/credentials", "credentials");
    for u in USERS {
        let remote_user = sb.user_by_name(u).ok_or(format!("{u} missing"))?;
        let uid = remote_user["id"].as_str().unwrap_or_default();
        let remote: BTreeSet<String> = creds
            .iter()
            .filter(|k| k["owner_id"] == uid)
            .map(|k| k["id"].as_str().unwrap_or_default().to_string())
            .collect();
        let slot = &state["accounts"]["ng"]["users"][u]["slots"]["agent"];
        let current = slot["current"]["id"]
            .as_str()
            .ok_or(format!("{u}: no current key recorded"))?;
        if ws.sink(u, "agent")["key_id"] != current {
            return Err(format!(
                "{u}: the sink does not hold the current key {current}"
            ));
        }
        let mut recorded: BTreeSet<String> = BTreeSet::from([current.to_string()]);
        for r in slot["retiring"].as_array().cloned().unwrap_or_default() {
            recorded.insert(r["id"].as_str().unwrap_or_default().to_string());
        }
        if slot
            .get("orphans")
            .is_some_and(|o| o.as_array().is_some_and(|a| !a.is_empty()))
        {
            return Err(format!("{u}: orphans left: {}", slot["orphans"]));
        }
        if remote != recorded {
            return Err(format!(
                "{u}: the provider has {remote:?}, the state records {recorded:?}"
            ));
        }
    }
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    if plan.status.code() != Some(0) {
        return Err(format!(
            "the final plan is not a no-op:\n{}{}",
            common::text(&plan.stdout),
            common::text(&plan.stderr)
        ));
    }
    Ok(())
}

/// Each term's writes ended before the next term began (the database's own record).
fn terms_fenced(pg: &Pg) -> Result<usize, String> {
    let mut client = pg.client();
    let rows = client
        .query(
            "SELECT t.term, t.last_write <= n.began FROM keyward_terms t JOIN keyward_terms n ON n.term = t.term + 1",
            &[],
        )
        .map_err(|e| e.to_string())?;
    for r in &rows {
        let (term, before): (i64, Option<bool>) = (r.get(0), r.get(1));
        if before == Some(false) {
            return Err(format!("term {term} wrote after term {} began", term + 1));
        }
    }
    Ok(rows.len() + 1)
}

/// Mints counted by the sandbox (a new credential asked for).
fn mints(sb: &Sandbox) -> u64 {
    sb.stats()["by_route"]["POST /credentials"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (up to 10 s) until the sandbox counts another mint, watching closely: the kill that
/// follows lands while the provider makes the key and its answer is on the way.
fn next_mint(sb: &Sandbox) -> bool {
    let before = mints(sb);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if mints(sb) > before {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// Winds down: both daemons stopped, the overlaps over, rotations no longer due; one apply
/// finishes what the last leader left, and everything must have converged.
fn wind_down(sb: &Sandbox, ws: &Workspace, pg: &Pg, nodes: &mut [&mut Node]) {
    for n in nodes.iter_mut() {
        n.kill();
    }
    std::fs::write(
        ws.config_path(),
        config_text(pg, common::free_port(), "cache-a", "30d"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    expect_code(
        &ws.keyward(&["apply", "--auto-approve"]),
        0,
        "the final apply",
    );
    let logs = logs_of(&nodes.iter().map(|n| &**n).collect::<Vec<_>>());
    converged(sb, ws).unwrap_or_else(|e| panic!("{e}\n{logs}"));
}

fn setup() -> (Sandbox, Workspace, Pg) {
    // Requests take a while, and answers come late, so that kills land inside rotations.
    let sb = Sandbox::start(&["--latency", "30ms"]);
    sb.set_faults(serde_json::json!({"answer_latency_ms": 150}));
    let ws = Workspace::new(&sb);
    let pg = Pg::new();
    (sb, ws, pg)
}

/// Starts both daemons and waits until one leads and every slot has a key.
fn start_pair<'a>(sb: &Sandbox, ws: &Workspace, a: &'a mut Node, b: &'a mut Node) {
    a.start();
    within(Duration::from_secs(20), || a.leads())
        .unwrap_or_else(|| panic!("the first daemon never led:\n{}", a.log()));
    b.start();
    within(Duration::from_secs(10), || {
        b.metrics().lines().any(|l| l == "keyward_leader 0")
    })
    .unwrap_or_else(|| panic!("the second daemon is no standby:\n{}", b.log()));
    // Said once, not again at each try while the same leader leads.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        b.log().matches("locked by another keyward process").count(),
        1,
        "{}",
        b.log()
    );
    within(Duration::from_secs(20), || {
        USERS
            .iter()
            .all(|u| ws.path(&format!("secrets/ng/{u}/agent.json")).exists())
    })
    .unwrap_or_else(|| panic!("no first keys:\n{}", a.log()));
    sinks_work(sb, ws).unwrap();
}

#[test]
fn the_standby_takes_over_within_seconds_when_the_leader_is_killed_and_no_secret_is_lost() {
    let trials: usize = std::env::var("KEYWARD_HA_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let (sb, ws, pg) = setup();
    let mut a = Node::new("a", &ws, &pg);
    let mut b = Node::new("b", &ws, &pg);
    start_pair(&sb, &ws, &mut a, &mut b);
    let standby_metrics = b.metrics();
    assert!(
        standby_metrics.contains(&format!("pid {}", a.pid())),
        "the standby names the leader: {standby_metrics}"
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4841);
    let mut takeovers = Vec::new();
    let mut targeted = 0;
    for trial in 0..trials {
        let (leader, standby) = if a.leads() {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        if trial % 3 == 2 {
            // Just after the leader asked for a new key: its answer never arrives.
            if next_mint(&sb) {
                targeted += 1;
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..3000)));
        }
        leader.kill();
        let took = within(Duration::from_secs(10), || standby.leads()).unwrap_or_else(|| {
            panic!(
                "trial {trial}: no new leader within 10 s\n{}",
                logs_of(&[&*leader, &*standby])
            )
        });
        takeovers.push(took);
        sinks_work(&sb, &ws)
            .unwrap_or_else(|e| panic!("trial {trial}: {e}\n{}", logs_of(&[&*leader, &*standby])));
        leader.start();
    }
    takeovers.sort();
    let logs = logs_of(&[&a, &b]);
    let recovered = common::crash::RECOVERY_NOTES
        .iter()
        .map(|(label, text)| (*label, logs.matches(text).count()))
        .collect::<Vec<_>>();
    eprintln!(
        "{trials} kills ({targeted} just after a mint): takeover median {:?}, slowest {:?}; recoveries {recovered:?}; terms {:?}",
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1],
        terms_fenced(&pg)
    );
    assert!(targeted > 0, "no kill landed just after a mint");
    assert!(
        recovered.iter().any(|(_, n)| *n > 0),
        "no trial left anything for the next leader to recover:\n{logs}"
    );
    terms_fenced(&pg).unwrap_or_else(|e| panic!("{e}\n{logs}"));
    wind_down(&sb, &ws, &pg, &mut [&mut a, &mut b]);
}

#[test]
fn a_leader_stopped_past_its_session_timeout_completes_no_write_and_steps_down() {
    let (sb, ws, pg) = setup();
    let mut a = Node::new("a", &ws, &pg);
    let mut b = Node::new("b", &ws, &pg);
    start_pair(&sb, &ws, &mut a, &mut b);

    // Stopped just after it asked for a new key.
    assert!(next_mint(&sb), "a rotation");
    a.signal("STOP");
    // While its session lasts it still holds the lock: a plan made now shows the operation
    // in flight as such, not as an interrupted run.
    let plan = ws.keyward(&["plan"]);
    let err = common::text(&plan.stderr);
    if !a.log().contains("lost the lead") && !b.leads() {
        assert!(
            err.contains(&format!("pid {}", a.pid()))
                && err.contains("holds the lock and is at work"),
            "{err}"
        );
        assert!(!err.contains("recovery:"), "{err}");
    }
    within(Duration::from_secs(20), || b.leads()).unwrap_or_else(|| {
        panic!(
            "the standby never took over from a stopped leader\n{}",
            logs_of(&[&a, &b])
        )
    });
    // The new leader works on while the old one is stopped, then the old one wakes up.
    let rotated = mints(&sb);
    within(Duration::from_secs(15), || mints(&sb) > rotated).expect("the new leader rotates");
    a.signal("CONT");
    within(Duration::from_secs(15), || {
        a.log().contains("lost the lead")
    })
    .unwrap_or_else(|| panic!("the woken leader did not step down\n{}", logs_of(&[&a, &b])));
    assert!(
        !a.leads(),
        "the woken leader still says it leads\n{}",
        logs_of(&[&a, &b])
    );
    sinks_work(&sb, &ws).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&a, &b])));
    let terms = terms_fenced(&pg).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&a, &b])));
    assert!(terms >= 2, "{terms} term(s)");
    // It waits as a standby again, and takes over when the other goes.
    b.kill();
    within(Duration::from_secs(10), || a.leads())
        .unwrap_or_else(|| panic!("the old leader never led again\n{}", a.log()));
    wind_down(&sb, &ws, &pg, &mut [&mut a, &mut b]);
}

/// The key ids a [`SLOW_SINK`] log file lists.
fn noted(ws: &Workspace, file: &str) -> Vec<String> {
    std::fs::read_to_string(ws.path(file))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn an_exec_sink_of_a_stopped_leader_is_stopped_before_the_next_leader_delivers() {
    let (sb, ws, pg) = setup();
    let dir = ws.dir.path().to_path_buf();
    let mut a = Node::with_config("a", &ws, |port, cache| {
        slow_sink_config(&pg, port, cache, &dir)
    });
    let mut b = Node::with_config("b", &ws, |port, cache| {
        slow_sink_config(&pg, port, cache, &dir)
    });
    start_pair(&sb, &ws, &mut a, &mut b);
    let (leader, standby) = if a.leads() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // The next delivery takes 20 s: the leader is stopped while its program runs.
    std::fs::write(ws.path("delay"), "20").unwrap();
    let before = noted(&ws, "started").len();
    within(Duration::from_secs(15), || {
        noted(&ws, "started").len() > before
    })
    .unwrap_or_else(|| panic!("no delivery began\n{}", leader.log()));
    leader.signal("STOP");
    let stalled = noted(&ws, "started")[before].clone();
    std::fs::write(ws.path("delay"), "0").unwrap();
    within(Duration::from_secs(20), || standby.leads()).unwrap_or_else(|| {
        panic!(
            "the standby never took over\n{}",
            logs_of(&[&*leader, &*standby])
        )
    });
    // Past the time the stalled program would have finished: the new leader delivered since,
    // and the stalled program never did.
    std::thread::sleep(Duration::from_secs(22));
    let finished = noted(&ws, "finished");
    assert!(
        !finished.contains(&stalled),
        "the stopped leader's program handed over {stalled} after all: {finished:?}\n{}",
        logs_of(&[&*leader, &*standby])
    );
    leader.signal("CONT");
    // Woken, its delivery fails (its program was killed): it must not put the file sink back
    // as it was before its own rotation, over what the new leader delivered since.
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(6) {
        sinks_work(&sb, &ws).unwrap_or_else(|e| {
            panic!(
                "{:?} after SIGCONT: {e}\n{}",
                woke.elapsed(),
                logs_of(&[&*leader, &*standby])
            )
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    within(Duration::from_secs(15), || {
        leader.log().contains("lost the lead")
    })
    .unwrap_or_else(|| panic!("the woken leader did not step down\n{}", leader.log()));
    assert!(
        !noted(&ws, "finished").contains(&stalled),
        "handed over after SIGCONT"
    );
    // Every consumer holds a key that works.
    for u in USERS {
        let text = std::fs::read_to_string(ws.path(&format!("consumer/{u}.json"))).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            sb.secret_works("credential", doc["secret"].as_str().unwrap_or_default()),
            "{u}: the consumer's key {} does not authenticate\n{}",
            doc["key_id"],
            logs_of(&[&*leader, &*standby])
        );
    }
    sinks_work(&sb, &ws).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&*leader, &*standby])));
    terms_fenced(&pg).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&*leader, &*standby])));
    wind_down(&sb, &ws, &pg, &mut [&mut a, &mut b]);
}

/// A TCP proxy in front of the database that forwards until told to go silent, and from then
/// on forwards nothing while keeping every connection open (a network that carries nothing:
/// no reset, no close, TCP acknowledged by the proxy).
struct SilentProxy {
    port: u16,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentProxy {
    fn start(target: u16) -> SilentProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&silent);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = std::sync::Arc::clone(&flag);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while flag.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        SilentProxy { port, silent }
    }

    fn go_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_leader_whose_database_goes_silent_says_so_at_once_and_steps_down() {
    let (sb, ws, pg) = setup();
    let proxy = SilentProxy::start(pg.port());
    let through = pg
        .url
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port));
    let mut a = Node::with_config("a", &ws, |port, cache| {
        config_text(&pg, port, cache, ROTATE).replace(&pg.url, &through)
    });
    let mut b = Node::new("b", &ws, &pg);
    start_pair(&sb, &ws, &mut a, &mut b);
    assert!(a.leads(), "the daemon behind the proxy leads");
    proxy.go_silent();
    let silent = Instant::now();
    // Its lease lapses: it says it may not lead while it still waits on the silent call.
    within(Duration::from_secs(10), || {
        a.metrics().lines().any(|l| l == "keyward_leader 0")
    })
    .unwrap_or_else(|| panic!("still says it leads\n{}", logs_of(&[&a, &b])));
    // The server ends the silent session: the other leads.
    within(Duration::from_secs(20), || b.leads())
        .unwrap_or_else(|| panic!("no new leader\n{}", logs_of(&[&a, &b])));
    // And it steps down when the call it waits on gives up (a short call once the session
    // timeout passed without a word, a whole read of the state after 30 s).
    within(Duration::from_secs(30), || {
        a.log().contains("lost the lead")
    })
    .unwrap_or_else(|| panic!("never stepped down\n{}", logs_of(&[&a, &b])));
    eprintln!(
        "stepped down {:?} after the database went silent",
        silent.elapsed()
    );
    let before = mints(&sb);
    within(Duration::from_secs(15), || mints(&sb) > before).expect("the new leader rotates");
    sinks_work(&sb, &ws).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&a, &b])));
    terms_fenced(&pg).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&a, &b])));
    wind_down(&sb, &ws, &pg, &mut [&mut a, &mut b]);
}

#[test]
fn the_leaders_backend_terminated_mid_rotation_loses_nothing() {
    let (sb, ws, pg) = setup();
    let mut a = Node::new("a", &ws, &pg);
    let mut b = Node::new("b", &ws, &pg);
    start_pair(&sb, &ws, &mut a, &mut b);
    let mut client = pg.client();
    for round in 0..3 {
        let (leader, standby) = if a.leads() {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        assert!(next_mint(&sb), "a rotation");
        let ended: i64 = client
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1) t",
                &[&format!("keyward % pid {}", leader.pid())],
            )
            .unwrap()
            .get(0);
        assert_eq!(ended, 1, "round {round}: the leader's session");
        within(Duration::from_secs(10), || standby.leads()).unwrap_or_else(|| {
            panic!(
                "round {round}: no new leader within 10 s\n{}",
                logs_of(&[&*leader, &*standby])
            )
        });
        within(Duration::from_secs(10), || {
            leader.log().contains("lost the lead")
        })
        .unwrap_or_else(|| {
            panic!(
                "round {round}: the cut-off leader did not step down\n{}",
                leader.log()
            )
        });
        sinks_work(&sb, &ws).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    terms_fenced(&pg).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&a, &b])));
    wind_down(&sb, &ws, &pg, &mut [&mut a, &mut b]);
}

#[test]
fn one_shot_commands_take_the_leaders_lock_and_wait_for_it_with_lock_timeout() {
    let (sb, ws, pg) = setup();
    let mut a = Node::new("a", &ws, &pg);
    a.start();
    within(Duration::from_secs(20), || a.leads())
        .unwrap_or_else(|| panic!("the daemon never led:\n{}", a.log()));
    // At once: refused, naming the holder.
    let b_config = ws.path("b.yaml");
    std::fs::write(
        &b_config,
        config_text(&pg, common::free_port(), "cache-b", ROTATE),
    )
    .unwrap();
    let mut cmd = ws.command(&["apply", "--auto-approve"]);
    let refused = cmd.arg("-c").arg(&b_config).output().unwrap();
    expect_code(&refused, 1, "apply beside the leader");
    let err = common::text(&refused.stderr);
    assert!(
        err.contains("locked by another keyward process")
            && err.contains(&format!("pid {}", a.pid())),
        "{err}"
    );
    // With --lock-timeout it waits; the daemon stops; the apply goes on.
    let mut cmd = ws.command(&["apply", "--auto-approve", "--lock-timeout", "30s"]);
    let waiting = cmd
        .arg("-c")
        .arg(&b_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    a.signal("TERM");
    let out = waiting.wait_with_output().unwrap();
    expect_code(&out, 0, "apply with --lock-timeout");
    let err = common::text(&out.stderr);
    // Said once while the same holder held it, not once a second, with the whole wait.
    assert_eq!(err.matches("waiting up to").count(), 1, "{err}");
    assert!(err.contains("waiting up to 30s"), "{err}");
    assert!(
        !err.contains("locked by another keyward process (") || err.contains("waiting"),
        "{err}"
    );
    sinks_work(&sb, &ws).unwrap();
}
