//! HTTP-level tests of the emulator, run in process against [`Sandbox::start`].

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Sandbox, SandboxOptions};

struct Api {
    http: reqwest::Client,
    sb: Sandbox,
}

impl Api {
    async fn start(opts: SandboxOptions) -> Api {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let sb = Sandbox::start(listen, opts).await.expect("start sandbox");
        Api {
            http: reqwest::Client::new(),
            sb,
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.sb.url())
        }
    }

    /// An authenticated ngrok request; returns status, `Retry-After` and the JSON body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        self.call_as(&self.sb.ngrok_admin_key(), method, path, body)
            .await
    }

    async fn call_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(key)
            .header("Ngrok-Version", "2");
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON body")
        };
        (status, retry, json)
    }

    async fn support(&self, method: &str, path: &str, body: Value) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = self
            .http
            .request(method, self.url(path))
            .json(&body)
            .send()
            .await
            .expect("send");
        resp.json().await.expect("JSON")
    }

    async fn stats(&self) -> Value {
        self.http
            .get(self.url("/_sandbox/stats"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("JSON")
    }

    async fn seed_users(&self, n: usize) {
        let users: Vec<Value> = (0..n)
            .map(|i| json!({"name": format!("u{i:04}")}))
            .collect();
        let out = self
            .support(
                "POST",
                "/_sandbox/ngrok/seed",
                json!({"service_users": users}),
            )
            .await;
        assert_eq!(out["service_users"].as_array().map(Vec::len), Some(n));
    }

    /// Follows `next_page_uri` to the end; returns the pages' sizes and all IDs.
    async fn walk(&self, path: &str, list_key: &str) -> (Vec<usize>, Vec<String>) {
        let mut sizes = Vec::new();
        let mut ids = Vec::new();
        let mut next = Some(path.to_owned());
        while let Some(uri) = next {
            let (status, _, body) = self.call("GET", &uri, None).await;
            assert_eq!(status, 200, "{body}");
            let items = body[list_key].as_array().expect("list").clone();
            sizes.push(items.len());
            ids.extend(
                items
                    .iter()
                    .map(|i| i["id"].as_str().expect("id").to_owned()),
            );
            next = body["next_page_uri"].as_str().map(str::to_owned);
        }
        (sizes, ids)
    }
}

#[tokio::test]
async fn exactly_full_last_page_has_null_next_page_uri() {
    let api = Api::start(SandboxOptions::default()).await;
    api.seed_users(100).await;
    let (sizes, _) = api.walk("/service_users", "service_users").await;
    assert_eq!(sizes, vec![100]);
    let (sizes, ids) = api.walk("/service_users?limit=50", "service_users").await;
    assert_eq!(sizes, vec![50, 50]);
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "newest first");
    api.sb.shutdown().await;
}

#[tokio::test]
async fn one_over_a_page_gives_a_second_page_of_one() {
    let api = Api::start(SandboxOptions::default()).await;
    api.seed_users(101).await;
    let (status, _, first) = api.call("GET", "/service_users", None).await;
    assert_eq!(status, 200);
    let next = first["next_page_uri"].as_str().expect("next page");
    let last_id = first["service_users"][99]["id"].as_str().expect("id");
    assert_eq!(
        next,
        format!(
            "{}/service_users?before_id={last_id}&limit=100",
            api.sb.url()
        )
    );
    let (sizes, ids) = api.walk("/service_users", "service_users").await;
    assert_eq!(sizes, vec![100, 1]);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        101
    );
    api.sb.shutdown().await;
}

#[tokio::test]
async fn thousand_users_and_two_thousand_keys_seed_and_list() {
    let api = Api::start(SandboxOptions::default()).await;
    let users: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("su-{i}")}))
        .collect();
    let keys: Vec<Value> = (0..2000)
        .map(|i| json!({"owner_name": format!("su-{}", i % 1000), "metadata": "{}"}))
        .collect();
    let out = api
        .support(
            "POST",
            "/_sandbox/ngrok/seed",
            json!({"service_users": users, "api_keys": keys}),
        )
        .await;
    let created = out["api_keys"].as_array().expect("keys");
    assert_eq!(created.len(), 2000);
    assert!(
        created
            .iter()
            .all(|k| k["token"].as_str().is_some_and(|t| t.len() == 49))
    );
    let (sizes, ids) = api.walk("/api_keys", "keys").await;
    assert_eq!(sizes.len(), 21);
    assert_eq!(ids.len(), 2001, "seeded keys plus the bootstrap admin key");
    let owner = created[0]["owner_id"].as_str().expect("owner");
    let filter = format!("/api_keys?filter=obj.owner_id%20%3D%3D%20%22{owner}%22&limit=1");
    let (sizes, _) = api.walk(&filter, "keys").await;
    assert_eq!(sizes, vec![1, 1], "two keys per user, one per page");
    // A seeded key authenticates.
    let token = created[0]["token"].as_str().expect("token");
    let (status, _, _) = api.call_as(token, "GET", "/api_keys?limit=1", None).await;
    assert_eq!(status, 200);
    api.sb.shutdown().await;
}

#[tokio::test]
async fn injected_errors_have_no_side_effects_and_are_counted() {
    let api = Api::start(SandboxOptions {
        error_rate: 1.0,
        rng_seed: Some(3),
        ..SandboxOptions::default()
    })
    .await;
    for i in 0..5 {
        let (status, _, body) = api
            .call(
                "POST",
                "/service_users",
                Some(json!({"name": format!("x{i}")})),
            )
            .await;
        assert!(status == 500 || status == 503, "{status}");
        assert!(body["details"]["operation_id"].is_string());
    }
    api.support("PUT", "/_sandbox/faults", json!({"error_rate": 0}))
        .await;
    let (status, _, body) = api.call("GET", "/service_users", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["service_users"], json!([]), "nothing was created");
    let stats = api.stats().await;
    assert_eq!(stats["requests"], 6);
    assert_eq!(stats["injected_errors"], 5);
    assert_eq!(stats["by_route"]["POST /service_users"], 5);
    assert_eq!(stats["by_route"]["GET /service_users"], 1);
    api.sb.shutdown().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_resets() {
    let api = Api::start(SandboxOptions {
        rate_limit: Some((2, Duration::from_secs(30))),
        ..SandboxOptions::default()
    })
    .await;
    assert_eq!(api.call("GET", "/api_keys", None).await.0, 200);
    assert_eq!(api.call("GET", "/api_keys", None).await.0, 200);
    let (status, retry, body) = api.call("GET", "/api_keys", None).await;
    assert_eq!(status, 429);
    assert_eq!(body["error_code"], "ERR_NGROK_226");
    assert_eq!(
        body["msg"],
        "Your account is rate limited to 2 API requests per 30 seconds."
    );
    let retry: u64 = retry
        .expect("Retry-After")
        .parse()
        .expect("integer seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    // Support endpoints are neither limited nor counted.
    let faults = api
        .support("PUT", "/_sandbox/faults", json!({"rate_limit": null}))
        .await;
    assert_eq!(faults["rate_limit"], Value::Null);
    assert_eq!(api.call("GET", "/api_keys", None).await.0, 200);
    let stats = api.stats().await;
    assert_eq!(stats["requests"], 4);
    assert_eq!(stats["rate_limited"], 1);
    api.support("POST", "/_sandbox/stats/reset", json!({}))
        .await;
    assert_eq!(api.stats().await["requests"], 0);
    api.sb.shutdown().await;
}

#[tokio::test]
async fn patch_semantics_follow_the_official_clients() {
    let api = Api::start(SandboxOptions::default()).await;
    let (status, _, key) = api
        .call(
            "POST",
            "/api_keys",
            Some(json!({"description": "d", "metadata": "m", "owner_id": null})),
        )
        .await;
    assert_eq!(status, 201);
    let path = format!("/api_keys/{}", key["id"].as_str().expect("id"));
    // The Rust client sends the id and nulls for unchanged fields.
    let (status, _, got) = api
        .call(
            "PATCH",
            &path,
            Some(json!({"id": key["id"], "description": null, "metadata": ""})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (got["description"].as_str(), got["metadata"].as_str()),
        (Some("d"), Some(""))
    );
    assert_eq!(got["token"], Value::Null);
    let (status, _, got) = api.call("PATCH", &path, Some(json!({}))).await;
    assert_eq!((status, got["description"].as_str()), (200, Some("d")));
    for body in [json!({"owner_id": "usr_x"}), json!({"colour": "blue"})] {
        let (status, _, err) = api.call("PATCH", &path, Some(body)).await;
        assert_eq!(
            (status, err["error_code"].as_str()),
            (400, Some("ERR_NGROK_214"))
        );
    }
    let (status, _, err) = api
        .call("POST", "/service_users", Some(json!({"name": "a", "x": 1})))
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_214"))
    );
    let (status, _, body) = api.call("DELETE", &path, None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _, err) = api.call("DELETE", &path, None).await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (404, Some(super::NOT_FOUND_CODE))
    );
    api.sb.shutdown().await;
}

#[tokio::test]
async fn deactivation_suspends_keys_and_verify_reflects_it() {
    let api = Api::start(SandboxOptions::default()).await;
    let (_, _, su) = api
        .call("POST", "/bot_users", Some(json!({"name": "svc"})))
        .await;
    let su_id = su["id"].as_str().expect("id").to_owned();
    let (_, _, key) = api
        .call("POST", "/api_keys", Some(json!({"owner_id": su_id})))
        .await;
    let token = key["token"].as_str().expect("token").to_owned();
    let verify = |t: String| {
        let http = api.http.clone();
        let url = api.url("/_sandbox/verify");
        async move {
            let resp = http
                .post(url)
                .json(&json!({"token": t}))
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, body) = verify(token.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"kind": "api_key", "id": key["id"], "owner_id": su_id})
    );
    let user_path = format!("/service_users/{su_id}");
    api.call("PATCH", &user_path, Some(json!({"active": false})))
        .await;
    let (status, _, err) = api.call_as(&token, "GET", "/api_keys", None).await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (401, Some("ERR_NGROK_203"))
    );
    assert_eq!(verify(token.clone()).await.0, 401);
    api.call("PATCH", &user_path, Some(json!({"active": true})))
        .await;
    assert_eq!(api.call_as(&token, "GET", "/api_keys", None).await.0, 200);
    // An API key ID is not a token.
    let (status, _, err) = api
        .call_as(key["id"].as_str().expect("id"), "GET", "/api_keys", None)
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (401, Some("ERR_NGROK_208"))
    );
    api.call("DELETE", &user_path, None).await;
    assert_eq!(verify(token.clone()).await.0, 401);
    let (status, _, _) = api
        .call(
            "GET",
            &format!("/api_keys/{}", key["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 404, "deleting the owner deleted the key");
    api.sb.shutdown().await;
}

#[tokio::test]
async fn seeded_rng_reproduces_ids_and_tokens() {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let api = Api::start(SandboxOptions {
            rng_seed: Some(99),
            ..SandboxOptions::default()
        })
        .await;
        let key = api.sb.ngrok_admin_key();
        // The time part differs between runs; the random secret does not.
        seen.push(key[28..].to_owned());
        api.sb.shutdown().await;
    }
    assert_eq!(seen[0], seen[1]);
}

#[tokio::test]
async fn credentials_and_ssh_credentials_validate_their_fields() {
    let api = Api::start(SandboxOptions::default()).await;
    let (status, _, err) = api
        .call("POST", "/credentials", Some(json!({"acl": ["nope"]})))
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_600"))
    );
    let (status, _, err) = api
        .call(
            "POST",
            "/credentials",
            Some(json!({"owner_id": "bot_0000000000000000000000000"})),
        )
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_634"))
    );
    let pk = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyForTests me@host";
    let (status, _, ssh) = api
        .call("POST", "/ssh_credentials", Some(json!({"public_key": pk})))
        .await;
    assert_eq!(status, 201, "{ssh}");
    assert!(
        ssh["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sshcr_"))
    );
    assert_eq!(ssh["acl"], json!([]));
    assert!(ssh.get("token").is_none(), "SSH credentials have no token");
    let (status, _, err) = api
        .call("POST", "/ssh_credentials", Some(json!({"public_key": pk})))
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_609"))
    );
    let (status, _, err) = api
        .call("GET", "/ssh_credentials?before_id=cr_x", None)
        .await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_223"))
    );
    let (status, _, err) = api.call("GET", "/ssh_credentials?page=2", None).await;
    assert_eq!(
        (status, err["error_code"].as_str()),
        (400, Some("ERR_NGROK_231"))
    );
    api.sb.shutdown().await;
}

#[tokio::test]
async fn faults_can_be_changed_in_process() {
    let api = Api::start(SandboxOptions::default()).await;
    api.sb.set_faults(super::Faults {
        latency: Duration::from_millis(1),
        error_rate: 1.0,
        rate_limit: None,
        ..Default::default()
    });
    assert!(api.call("GET", "/api_keys", None).await.0 >= 500);
    api.sb.set_faults(super::Faults::default());
    assert_eq!(api.call("GET", "/api_keys", None).await.0, 200);
    assert_eq!(api.sb.faults(), super::Faults::default());
    let stats = api.sb.stats();
    assert_eq!(
        (
            stats["requests"].as_u64(),
            stats["injected_errors"].as_u64()
        ),
        (Some(2), Some(1))
    );
    api.sb.shutdown().await;
}

#[tokio::test]
async fn answer_latency_applies_the_write_before_answering() {
    let api = std::sync::Arc::new(Api::start(SandboxOptions::default()).await);
    api.support(
        "PUT",
        "/_sandbox/faults",
        json!({"answer_latency_ms": 3000}),
    )
    .await;
    assert_eq!(api.sb.faults().answer_latency, Duration::from_secs(3));
    let poster = std::sync::Arc::clone(&api);
    let post = tokio::spawn(async move {
        poster
            .call(
                "POST",
                "/service_users",
                Some(json!({"name": "made-unheard"})),
            )
            .await
            .0
    });
    // Once the POST is counted it has its answer latency; later requests answer at once.
    while api.stats().await["by_route"]["POST /service_users"] != 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    api.support(
        "PUT",
        "/_sandbox/faults",
        json!({"answer_latency_ms": null}),
    )
    .await;
    let mut seen = false;
    for _ in 0..100 {
        let (status, _, body) = api.call("GET", "/service_users", None).await;
        assert_eq!(status, 200);
        if body["service_users"][0]["name"] == "made-unheard" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "the POST was never applied");
    assert!(
        !post.is_finished(),
        "the user was visible only after its creator had its answer"
    );
    assert_eq!(post.await.unwrap(), 201);
}
