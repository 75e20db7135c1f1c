//! The request budget of observing: a no-op plan of 1,000 managed users with 2,000 keys costs
//! exactly one request per list page — ceil(users/100) + ceil(api_keys/100) +
//! ceil(credentials/100) — never one per object. Counted by the sandbox itself.

mod common;

use common::{Sandbox, Workspace, expect_code};

#[test]
fn noop_plan_of_1000_users_costs_one_request_per_page() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    let mut users = String::from("users:\n");
    for i in 0..1000 {
        users.push_str(&format!(
            "  - provider: ng\n    name: fleet-{i:04}\n    keys:\n      api: {{kind: api_key}}\n      agent: {{kind: credential}}\n"
        ));
    }
    ws.write_config("  concurrency: 16\n", &users);
    expect_code(
        &ws.keyward(&["apply", "--auto-approve", "-q"]),
        0,
        "apply 1000 users",
    );

    let users_n = sb.list("/service_users", "service_users").len();
    // The sandbox's own admin key is listed too: count every key the account has.
    let api_keys_n = sb.list("/api_keys", "keys").len();
    let creds_n = sb.list("/credentials", "credentials").len();
    assert_eq!(users_n, 1000);
    assert!(
        api_keys_n >= 1000 && creds_n == 1000,
        "{api_keys_n} api keys, {creds_n} credentials"
    );

    sb.reset_stats();
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "no-op plan");
    assert_costs_one_request_per_page(&sb, users_n, api_keys_n, creds_n);
}

#[test]
fn noop_plan_of_10000_imported_users_costs_one_request_per_page() {
    let sb = Sandbox::start(&[]);
    let ws = Workspace::new(&sb);
    // A fleet account as keyward finds it: 10,000 service users with 2 API keys and 1
    // credential each, seeded directly.
    for batch in 0..4 {
        let names: Vec<String> = (batch * 2500..(batch + 1) * 2500)
            .map(|i| format!("edge-{i:05}"))
            .collect();
        let keys = |d: &str| -> Vec<serde_json::Value> {
            names
                .iter()
                .map(|n| serde_json::json!({"owner_name": n, "description": d}))
                .collect()
        };
        let mut api_keys = keys("deploy");
        api_keys.extend(keys("ci"));
        sb.seed(serde_json::json!({
            "service_users": names.iter().map(|n| serde_json::json!({"name": n})).collect::<Vec<_>>(),
            "api_keys": api_keys,
            "credentials": keys("agent"),
        }));
    }
    // Taken over with `import` into an included file: the plan is a no-op.
    ws.write_config("  concurrency: 16\n", "include: [fleet.yaml]\nusers: []\n");
    let out = ws.keyward(&["import", "-q", "--out", "fleet.yaml"]);
    expect_code(&out, 0, "import");

    let users_n = sb.list("/service_users", "service_users").len();
    let api_keys_n = sb.list("/api_keys", "keys").len();
    let creds_n = sb.list("/credentials", "credentials").len();
    assert_eq!((users_n, creds_n), (10_000, 10_000));
    sb.reset_stats();
    let plan = ws.keyward(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0, "no-op plan of 10,000 users");
    assert_costs_one_request_per_page(&sb, users_n, api_keys_n, creds_n);
}

/// The sandbox counted exactly one request per list page of an account with these counts.
fn assert_costs_one_request_per_page(sb: &Sandbox, users: usize, api_keys: usize, creds: usize) {
    let pages = |n: usize| n.div_ceil(100).max(1) as u64;
    let bound = pages(users) + pages(api_keys) + pages(creds);
    let stats = sb.stats();
    assert_eq!(
        stats["requests"].as_u64().unwrap(),
        bound,
        "requests for a no-op plan: {stats}"
    );
    assert_eq!(
        stats["by_route"]["GET /service_users"].as_u64().unwrap(),
        pages(users),
        "{stats}"
    );
}
