//! Test-support endpoints under `/_sandbox/`: no provider authentication, never counted, never
//! faulted. They let tests and the quick start inspect and steer the emulators:
//!
//! - `GET /_sandbox/stats`, `POST /_sandbox/stats/reset`: request counters.
//! - `GET|PUT /_sandbox/faults`: read or change latency, answer latency, error rate, rate limit
//!   and `refuse_credentials` (every API request answered 401) at runtime.
//! - `POST /_sandbox/verify` `{"token"}`: is this a live secret whose owner is active? (An ngrok
//!   authtoken cannot call the API, so this is how a test proves a delivered credential works.)
//! - `POST /_sandbox/ngrok/seed`: create ngrok objects directly, backdated if asked.
//! - `POST /_sandbox/asa/verify` `{"key_id","key_secret"}`: would this ASA key pair mint a token?
//! - `POST /_sandbox/asa/seed`: create ASA service users and keys directly, backdated if asked.
//! - `GET|PUT /_sandbox/asa/settings`: ASA token lifetime, key grace, page size, relative links.
//! - `POST /_sandbox/asa/expire` `{"key_id"}`: expire an ASA key now (the console's "Expire Now").
//! - `POST /_sandbox/asa/revoke_tokens`: invalidate every ASA bearer token (keys stay valid).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::{Shared, asa, ngrok, parse_rate_limit};

/// The `/_sandbox/` routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/stats/reset", post(reset_stats))
        .route("/_sandbox/faults", get(get_faults).put(put_faults))
        .route("/_sandbox/verify", post(verify))
        .route(
            "/_sandbox/ngrok/seed",
            // Large seed documents (thousands of objects) exceed axum's 2 MB default.
            post(seed_ngrok).layer(DefaultBodyLimit::max(SEED_BODY_LIMIT)),
        )
        .route("/_sandbox/asa/verify", post(asa_verify))
        .route(
            "/_sandbox/asa/seed",
            post(asa_seed).layer(DefaultBodyLimit::max(SEED_BODY_LIMIT)),
        )
        .route(
            "/_sandbox/asa/settings",
            get(asa_settings).put(put_asa_settings),
        )
        .route("/_sandbox/asa/expire", post(asa_expire))
        .route("/_sandbox/asa/revoke_tokens", post(asa_revoke_tokens))
}

/// Largest accepted seed document.
const SEED_BODY_LIMIT: usize = 64 * 1024 * 1024;

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::with_code(StatusCode::BAD_REQUEST, "SANDBOX_INVALID_REQUEST", msg)
}

fn json_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid("the body must be a JSON object")),
        Err(e) => Err(invalid(format!("the body is not valid JSON: {e}"))),
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.control().stats.to_json())
}

async fn reset_stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut control = shared.control();
    control.reset_stats();
    Json(control.stats.to_json())
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.control().faults.to_json())
}

/// Every field is optional; an absent field keeps its value, `"rate_limit": null` removes the
/// limit.
async fn put_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let result = (|| {
        let map = json_object(&body)?;
        let mut faults = shared.control().faults.clone();
        for (key, value) in map {
            match (key.as_str(), value) {
                ("latency_ms", Value::Null) => faults.latency = Default::default(),
                ("latency_ms", v) => {
                    let ms = v
                        .as_u64()
                        .ok_or_else(|| invalid("latency_ms must be a non-negative integer"))?;
                    faults.latency = std::time::Duration::from_millis(ms);
                }
                ("answer_latency_ms", Value::Null) => faults.answer_latency = Default::default(),
                ("answer_latency_ms", v) => {
                    let ms = v.as_u64().ok_or_else(|| {
                        invalid("answer_latency_ms must be a non-negative integer")
                    })?;
                    faults.answer_latency = std::time::Duration::from_millis(ms);
                }
                ("error_rate", Value::Null) => faults.error_rate = 0.0,
                ("error_rate", v) => {
                    let rate = v
                        .as_f64()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| invalid("error_rate must be a number between 0 and 1"))?;
                    faults.error_rate = rate;
                }
                ("refuse_credentials", Value::Bool(b)) => faults.refuse_credentials = b,
                ("rate_limit", Value::Null) => faults.rate_limit = None,
                ("rate_limit", Value::String(s)) => {
                    faults.rate_limit = Some(parse_rate_limit(&s).map_err(invalid)?);
                }
                (other, _) => {
                    return Err(invalid(format!(
                        "unknown or mistyped field {other:?} (expected latency_ms, answer_latency_ms, error_rate, rate_limit, refuse_credentials)"
                    )));
                }
            }
        }
        let mut control = shared.control();
        control.set_faults(faults);
        Ok::<_, ApiError>(control.faults.to_json())
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn verify(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let token = match json_object(&body).map(|m| m.get("token").cloned()) {
        Ok(Some(Value::String(t))) => t,
        Ok(_) => return invalid("the body must be {\"token\": \"…\"}").into_response(),
        Err(e) => return e.into_response(),
    };
    match shared.ngrok().verify(&token) {
        Some(v) => Json(v).into_response(),
        None => ApiError::ngrok(
            StatusCode::UNAUTHORIZED,
            203,
            "The token is not a live API key or credential, or its owner is deactivated.",
        )
        .into_response(),
    }
}

async fn seed_ngrok(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: ngrok::SeedRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("invalid seed document: {e}")).into_response(),
    };
    let base = shared.base_from(&headers);
    match shared.ngrok().seed(req, &base) {
        Ok(created) => (StatusCode::CREATED, Json(created)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn asa_field(body: &Bytes, field: &str) -> Result<String, ApiError> {
    match json_object(body)?.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(invalid(format!("the body needs a string field {field:?}"))),
    }
}

async fn asa_verify(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let pair = asa_field(&body, "key_id").and_then(|id| Ok((id, asa_field(&body, "key_secret")?)));
    match pair {
        Ok((id, secret)) => match shared.asa().verify(&id, &secret) {
            Some(v) => Json(v).into_response(),
            None => ApiError::with_code(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "not a live, unexpired ASA key of an active service user",
            )
            .into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn asa_seed(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: asa::SeedRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("invalid ASA seed document: {e}")).into_response(),
    };
    match shared.asa().seed(req) {
        Ok(created) => (StatusCode::CREATED, Json(created)).into_response(),
        Err(e) => invalid(e.message()).into_response(),
    }
}

async fn asa_settings(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.asa().settings_json())
}

async fn put_asa_settings(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let map = match json_object(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match shared.asa().set_settings(&map) {
        Ok(v) => Json(v).into_response(),
        Err(e) => invalid(e).into_response(),
    }
}

async fn asa_expire(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match asa_field(&body, "key_id") {
        Ok(id) if shared.asa().expire_key(&id) => Json(json!({"key_id": id})).into_response(),
        Ok(id) => ApiError::not_found(&format!("ASA key {id}")).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn asa_revoke_tokens(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"revoked": shared.asa().revoke_tokens()}))
}
