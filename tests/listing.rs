//! A provider listing cut short keeps the pages it read and goes on from where it stopped:
//! completed after a `401` mid-way, it holds the same account, object for object, as a listing
//! read without a stop, and it read no page twice. The ngrok client against the sandbox over
//! loopback; the requests are counted by the sandbox.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Sandbox, Workspace};
use keyward::model::AccountSnapshot;
use keyward::providers::marks::PageMarks;
use keyward::providers::{Listing, Provider};
use serde_json::json;

fn ids(snap: &AccountSnapshot) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        snap.users.iter().map(|u| u.id.clone()).collect(),
        snap.keys.iter().map(|k| k.id.clone()).collect(),
    )
}

/// The client of the account `name` in the workspace's config.
fn connect(
    rt: &tokio::runtime::Runtime,
    ws: &Workspace,
    name: &str,
) -> std::sync::Arc<dyn Provider> {
    connect_with(rt, ws, name, None)
}

/// The client of the account `name`, keeping page marks in `marks` if given.
fn connect_with(
    rt: &tokio::runtime::Runtime,
    ws: &Workspace,
    name: &str,
    marks: Option<&std::path::Path>,
) -> std::sync::Arc<dyn Provider> {
    let env = ws.env.clone();
    let lookup = move |var: &str| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone());
    let loaded = keyward::config::load_with_env(&ws.config_path(), &lookup)
        .unwrap_or_else(|d| panic!("{d:?}"));
    let account = loaded.config.providers[name].clone();
    let _enter = rt.enter();
    let marks = marks.map(|dir| std::sync::Arc::new(PageMarks::new(dir)));
    keyward::providers::connect(
        &account,
        8,
        tokio_util::sync::CancellationToken::new(),
        marks,
    )
    .unwrap()
}

/// Makes the sandbox refuse every credential (401) once it has served `n` requests, from a
/// thread that watches its counters.
fn refuse_credentials_after(sb: &Sandbox, n: u64) -> std::thread::JoinHandle<()> {
    let url = sb.url.clone();
    std::thread::spawn(move || {
        let agent = reqwest::blocking::Client::new();
        loop {
            let stats: serde_json::Value = agent
                .get(format!("{url}/_sandbox/stats"))
                .send()
                .and_then(|r| r.json())
                .unwrap();
            if stats["requests"].as_u64().unwrap_or(0) >= n {
                let r = agent
                    .put(format!("{url}/_sandbox/faults"))
                    .json(&json!({"refuse_credentials": true}))
                    .send()
                    .unwrap();
                assert!(r.status().is_success());
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn an_ngrok_listing_cut_short_goes_on_and_reads_every_page_once() {
    let sb = Sandbox::start(&["--latency", "10ms"]);
    // 3,000 users with an API key and a credential each: about 30 pages per list.
    seed_users(&sb, "edge", 3000);
    let ws = Workspace::new(&sb);
    ws.write_config("", "users: []\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = connect(&rt, &ws, "ng");

    // The whole account read without a stop, and what that costs.
    sb.reset_stats();
    let whole = rt.block_on(provider.observe(None)).unwrap();
    let pages = sb.stats()["requests"].as_u64().unwrap();
    assert!(pages >= 90, "{pages} pages");

    // The account's credential stops working once 12 requests were served.
    sb.reset_stats();
    let cutter = refuse_credentials_after(&sb, 12);
    let mut listing = Listing::default();
    let cut = rt.block_on(provider.list(None, &mut listing, None));
    cutter.join().unwrap();
    let error = cut.expect_err("the listing must stop at the 401");
    assert_eq!(error.status, Some(401), "{error}");
    assert!(
        listing.begun() && listing.pages >= 3 && listing.pages < pages,
        "read {} of {pages} pages before the stop",
        listing.pages
    );

    // The account answers again: the listing goes on, and ends with the whole account.
    sb.set_faults(json!({"refuse_credentials": false}));
    rt.block_on(provider.list(None, &mut listing, None))
        .expect("the listing goes on");
    let stats = sb.stats();
    let refused = stats["refused"].as_u64().unwrap();
    assert!(refused >= 1, "{stats}");
    assert_eq!(
        stats["requests"].as_u64().unwrap(),
        pages + refused,
        "every page once, besides the requests refused: {stats}"
    );
    assert_eq!(listing.pages, pages);
    let resumed = listing.into_snapshot();
    assert_eq!(resumed.users.len(), whole.users.len());
    assert_eq!(resumed.keys.len(), whole.keys.len());
    assert_eq!(ids(&resumed), ids(&whole));
}

/// Seeds `n` users named `{prefix}-{i}` with an API key and a credential each.
fn seed_users(sb: &Sandbox, prefix: &str, n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
    let keys = |d: &str| -> Vec<serde_json::Value> {
        names
            .iter()
            .map(|n| json!({"owner_name": n, "description": d}))
            .collect()
    };
    sb.seed(json!({
        "service_users": names.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
        "api_keys": keys("deploy"),
        "credentials": keys("agent"),
    }));
}

/// The marks file's `after` ids of one list.
fn marked_items(dir: &std::path::Path, list: &str) -> Vec<String> {
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("listing-marks.json")).unwrap()).unwrap();
    file["accounts"]["ng"]["lists"][list]["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["after"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_listing_read_in_stretches_from_remembered_pages_reads_every_item_once() {
    let sb = Sandbox::start(&["--latency", "5ms"]);
    // 1,500 users with an API key and a credential each.
    seed_users(&sb, "fleet", 1500);
    let ws = Workspace::new(&sb);
    ws.write_config("", "users: []\n");
    let marks = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = connect_with(&rt, &ws, "ng", Some(marks.path()));
    let plain = connect(&rt, &ws, "ng");
    let unique = |snap: &AccountSnapshot| {
        let (users, keys) = ids(snap);
        assert_eq!(users.len(), snap.users.len(), "a user listed twice");
        assert_eq!(keys.len(), snap.keys.len(), "a key listed twice");
        (users, keys)
    };

    // The first listing has no marks: each list is read page after page. It leaves marks.
    sb.reset_stats();
    let first = rt.block_on(provider.observe(None)).unwrap();
    let stats = sb.stats();
    // 15 pages of users, 16 of API keys (the account's own key is listed too), 15 of
    // credentials.
    let lower = 15 + 16 + 15;
    assert_eq!(stats["requests"], lower, "{stats}");
    assert_eq!(stats["max_in_flight"], 3, "{stats}");
    assert!(!marked_items(marks.path(), "api_keys").is_empty());

    // The next reads the lists in stretches side by side, at the same cost.
    sb.reset_stats();
    let second = rt.block_on(provider.observe(None)).unwrap();
    let stats = sb.stats();
    assert_eq!(stats["requests"], lower, "one request per page: {stats}");
    assert!(stats["max_in_flight"].as_u64().unwrap() > 3, "{stats}");
    assert_eq!(unique(&second), unique(&first));

    // The account changes under the marks: the items where stretches end are gone, and new
    // users came first in every list. Still every item once.
    for id in marked_items(marks.path(), "service_users") {
        assert_eq!(
            sb.api("DELETE", &format!("/service_users/{id}"), None).0,
            204
        );
    }
    for id in marked_items(marks.path(), "api_keys") {
        let (status, _) = sb.api("DELETE", &format!("/api_keys/{id}"), None);
        assert!(status == 204 || status == 404, "{status}");
    }
    seed_users(&sb, "newer", 250);
    let changed = rt.block_on(provider.observe(None)).unwrap();
    sb.reset_stats();
    let truth = rt.block_on(plain.observe(None)).unwrap();
    let pages = sb.stats()["requests"].as_u64().unwrap();
    assert_eq!(unique(&changed), unique(&truth));
    assert_ne!(ids(&changed), ids(&first));

    // Remembered pages the provider refuses: the stretch before reads on through them.
    let path = marks.path().join("listing-marks.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // Cursors of another kind, consistent with their items: they fit the list's links, and
    // the provider refuses them.
    let broken = text.replace("ak_", "cr_");
    assert_ne!(broken, text);
    std::fs::write(&path, broken).unwrap();
    let provider = connect_with(&rt, &ws, "ng", Some(marks.path()));
    sb.reset_stats();
    let refused = rt.block_on(provider.observe(None)).unwrap();
    // Each refused page is a request, and the stretch before reads its last page again.
    let requests = sb.stats()["requests"].as_u64().unwrap();
    assert!(
        requests > pages + 1,
        "{requests} requests for {pages} pages"
    );
    assert_eq!(unique(&refused), unique(&truth));
}

#[test]
fn an_asa_listing_cut_short_goes_on_from_the_user_where_it_stopped() {
    let sb = Sandbox::start(&["--latency", "5ms"]);
    // 300 users with one key each: 3 pages of users, then one key list per user.
    let seeded: Vec<serde_json::Value> = (0..300)
        .map(|i| json!({"name": format!("svc-{i:03}"), "keys": [{}]}))
        .collect();
    common::asa::seed(&sb, json!({"service_users": seeded}));
    let ws = common::asa::workspace(&sb);
    common::asa::write_config(&ws, "", "users: []\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = connect(&rt, &ws, "asa");
    let key_lists = |sb: &Sandbox| {
        common::asa::route_count(sb, "GET /v1/teams/{team}/service_users/{name}/keys")
    };

    let whole = rt.block_on(provider.observe(None)).unwrap();
    assert!(whole.keys.len() >= 300, "{} keys", whole.keys.len());

    // The credential stops working once 100 requests were served, in the middle of the
    // users' key lists.
    sb.reset_stats();
    let cutter = refuse_credentials_after(&sb, 100);
    let mut listing = Listing::default();
    let cut = rt.block_on(provider.list(None, &mut listing, None));
    cutter.join().unwrap();
    cut.expect_err("the listing must stop at the 401");
    let before = listing.keys.len();
    assert!(
        (50..300).contains(&before),
        "{before} users' keys before the stop"
    );
    let read_before = key_lists(&sb);

    sb.set_faults(json!({"refuse_credentials": false}));
    sb.reset_stats();
    rt.block_on(provider.list(None, &mut listing, None))
        .expect("the listing goes on");
    // The users before the stop are not read again: at most the few whose lists were on the
    // wire (the client's concurrency) or refused are.
    let read_after = key_lists(&sb);
    assert!(
        read_after <= 300 - before as u64 + 8,
        "{read_after} key lists after the stop, {before} users read before it ({read_before} lists)"
    );
    assert_eq!(
        common::asa::route_count(&sb, "GET /v1/teams/{team}/service_users"),
        0,
        "the users were listed again"
    );
    let resumed = listing.into_snapshot();
    assert_eq!(ids(&resumed), ids(&whole));
}

/// Rewrites the marks file through `edit` (on its JSON).
fn edit_marks(dir: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("listing-marks.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut file);
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
}

/// Every mark of one list in the file, mutably.
fn each_mark(
    file: &mut serde_json::Value,
    list: &str,
    mut f: impl FnMut(usize, &mut serde_json::Value),
) {
    for (i, m) in file["accounts"]["ng"]["lists"][list]["marks"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        f(i, m);
    }
}

#[test]
fn remembered_pages_that_do_not_fit_the_list_are_never_followed() {
    let sb = Sandbox::start(&[]);
    seed_users(&sb, "fleet", 1500);
    let ws = Workspace::new(&sb);
    ws.write_config("", "users: []\n");
    let marks = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let truth = rt.block_on(connect(&rt, &ws, "ng").observe(None)).unwrap();
    let fresh_marks = || {
        let _ = std::fs::remove_file(marks.path().join("listing-marks.json"));
        rt.block_on(connect_with(&rt, &ws, "ng", Some(marks.path())).observe(None))
            .unwrap();
    };
    let listed = || {
        let snap = rt
            .block_on(connect_with(&rt, &ws, "ng", Some(marks.path())).observe(None))
            .unwrap();
        let (users, keys) = ids(&snap);
        assert_eq!(users.len(), snap.users.len(), "a user listed twice");
        assert_eq!(keys.len(), snap.keys.len(), "a key listed twice");
        (users, keys)
    };

    // Links to another host: never followed, the API key never sent there.
    let elsewhere = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let other = elsewhere.local_addr().unwrap();
    // Whatever reaches the other host is counted and hung up on at once.
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let reached = std::sync::Arc::clone(&reached);
        std::thread::spawn(move || {
            for conn in elsewhere.incoming() {
                reached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        });
    }
    let own = url::Url::parse(&sb.url).unwrap();
    let own_origin = format!("{}:{}", own.host_str().unwrap(), own.port().unwrap());
    let mut tampered = Vec::new();
    type Edit = Box<dyn Fn(usize, &mut serde_json::Value)>;
    let origin = own_origin.clone();
    tampered.push((
        "another host",
        Box::new(move |_: usize, m: &mut serde_json::Value| {
            let uri = m["uri"]
                .as_str()
                .unwrap()
                .replace(&origin, &other.to_string());
            m["uri"] = uri.into();
        }) as Edit,
    ));
    let origin = own_origin.clone();
    tampered.push((
        "user info",
        Box::new(move |_: usize, m: &mut serde_json::Value| {
            let uri = m["uri"]
                .as_str()
                .unwrap()
                .replace(&origin, &format!("{origin}@{other}"));
            m["uri"] = uri.into();
        }),
    ));
    // One character of a link's cursor changed: the stretch before must not stop short.
    tampered.push((
        "a changed cursor",
        Box::new(|_: usize, m: &mut serde_json::Value| {
            let uri = m["uri"]
                .as_str()
                .unwrap()
                .replacen("before_id=ak_", "before_id=ak_X", 1);
            m["uri"] = uri.into();
        }),
    ));
    tampered.push((
        "a filter",
        Box::new(|_: usize, m: &mut serde_json::Value| {
            let uri = format!(
                "{}&filter=obj.description+%3D%3D+%22deploy%22",
                m["uri"].as_str().unwrap()
            );
            m["uri"] = uri.into();
        }),
    ));
    tampered.push((
        "another list",
        Box::new(|_: usize, m: &mut serde_json::Value| {
            let uri = m["uri"]
                .as_str()
                .unwrap()
                .replace("/api_keys?", "/credentials?");
            m["uri"] = uri.into();
        }),
    ));
    for (what, edit) in &tampered {
        fresh_marks();
        edit_marks(marks.path(), |file| each_mark(file, "api_keys", edit));
        assert_eq!(listed(), ids(&truth), "{what}");
        assert_eq!(
            reached.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{what}: a connection reached the other host"
        );
        // Nothing the listing wrote back carries the change.
        let text = std::fs::read_to_string(marks.path().join("listing-marks.json")).unwrap();
        assert!(
            !text.contains(&other.to_string())
                && !text.contains("filter")
                && !text.contains("ak_X"),
            "{what}: {text}"
        );
    }
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a connection reached the other host"
    );
}

#[test]
fn after_the_account_shrinks_the_next_listing_costs_one_request_per_page_again() {
    let sb = Sandbox::start(&["--latency", "5ms"]);
    seed_users(&sb, "fleet", 2000);
    let ws = Workspace::new(&sb);
    ws.write_config("", "users: []\n");
    let marks = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = connect_with(&rt, &ws, "ng", Some(marks.path()));
    rt.block_on(provider.observe(None)).unwrap();
    // 700 users go, and with them their keys: stretches no longer end on whole pages.
    let users = sb.list("/service_users", "service_users");
    for u in users.iter().take(1100).skip(400) {
        let id = u["id"].as_str().unwrap();
        assert_eq!(
            sb.api("DELETE", &format!("/service_users/{id}"), None).0,
            204
        );
    }
    sb.reset_stats();
    let plain = rt.block_on(connect(&rt, &ws, "ng").observe(None)).unwrap();
    let pages = sb.stats()["requests"].as_u64().unwrap();
    sb.reset_stats();
    let changed = rt.block_on(provider.observe(None)).unwrap();
    let first = sb.stats()["requests"].as_u64().unwrap();
    assert_eq!(ids(&changed), ids(&plain));
    assert!(first >= pages, "{first} requests for {pages} pages");
    // The marks it left are in line with whole pages again.
    sb.reset_stats();
    let again = rt.block_on(provider.observe(None)).unwrap();
    let stats = sb.stats();
    assert_eq!(stats["requests"].as_u64().unwrap(), pages, "{stats}");
    assert!(stats["max_in_flight"].as_u64().unwrap() > 3, "{stats}");
    assert_eq!(ids(&again), ids(&plain));
}
