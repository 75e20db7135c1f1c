//! The emulators' error responses: ngrok's error body shape, which every official client decodes.
//!
//! `{"error_code":"ERR_NGROK_<n>","status_code":<int>,"msg":"…","details":{"operation_id":"op_…"}}`
//! plus an `ngrok-operation-id` header. `error_code` is present even on 404 (the Rust client needs
//! it) and every `details` value is a string (the Go and Rust clients type it as a string map).

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ids;

/// The error code the emulator uses for an unknown resource ID or path. ngrok does not document
/// the real one; the Go client's own 404 mock uses the message "Resource not found".
pub const NOT_FOUND_CODE: &str = "ERR_NGROK_404";

/// One API error, rendered as ngrok renders it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `ERR_NGROK_<n>`.
    pub code: String,
    /// Human-readable message.
    pub msg: String,
    /// Extra response headers (e.g. `Retry-After` on a 429).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with code `ERR_NGROK_<n>`.
    pub fn ngrok(status: StatusCode, n: u32, msg: impl Into<String>) -> Self {
        Self::with_code(status, format!("ERR_NGROK_{n}"), msg)
    }

    /// An error with an arbitrary code string.
    pub fn with_code(status: StatusCode, code: impl Into<String>, msg: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            msg: msg.into(),
            headers: Vec::new(),
        }
    }

    /// 404 for an ID or path that does not exist.
    pub fn not_found(what: &str) -> Self {
        Self::with_code(
            StatusCode::NOT_FOUND,
            NOT_FOUND_CODE,
            format!("Resource not found: {what}"),
        )
    }

    /// 400 with the given code.
    pub fn bad_request(n: u32, msg: impl Into<String>) -> Self {
        Self::ngrok(StatusCode::BAD_REQUEST, n, msg)
    }

    /// Adds a response header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Operation IDs only need to look real and be unique; they do not draw on the seeded RNG
        // so that error paths do not perturb reproducible resource IDs.
        let op = ids::mint("op_", None, &mut rand::rng());
        let body = json!({
            "error_code": self.code,
            "status_code": self.status.as_u16(),
            "msg": self.msg,
            "details": { "operation_id": op },
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&op) {
            headers.insert(HeaderName::from_static("ngrok-operation-id"), v);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        resp
    }
}
