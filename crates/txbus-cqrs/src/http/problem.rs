//! The responses the layer answers with itself: a JSON body `{"error": {"code", "message"}}`
//! with the status that says what the client should do.

use http::{header, HeaderValue, Method, Response, StatusCode};

use super::body::{full, ReplyBody};
use crate::idempotency::Error;

/// The status a client gets for an idempotency error.
pub fn status_of(error: &Error) -> StatusCode {
    match error {
        Error::Mismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::InProgress { .. } => StatusCode::CONFLICT,
        Error::InvalidKey { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A short, stable code for an idempotency error, for clients to match on.
pub fn code_of(error: &Error) -> &'static str {
    match error {
        Error::Mismatch { .. } => "idempotency_key_reused",
        Error::InProgress { .. } => "idempotency_key_in_progress",
        Error::InvalidKey { .. } => "idempotency_key_invalid",
        _ => "idempotency_store_failed",
    }
}

pub(crate) fn from_error(error: &Error) -> Response<ReplyBody> {
    let status = status_of(error);
    if status.is_server_error() {
        tracing::error!(error = %error, "idempotency check failed");
    }
    let mut response = json(status, code_of(error), &error.to_string());
    if matches!(error, Error::InProgress { .. }) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

pub(crate) fn missing_key(method: &Method) -> Response<ReplyBody> {
    json(
        StatusCode::BAD_REQUEST,
        "idempotency_key_missing",
        &format!("{method} requests need an Idempotency-Key header; send a unique key per request"),
    )
}

pub(crate) fn too_large(limit: usize) -> Response<ReplyBody> {
    json(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        &format!("the request body exceeds {limit} bytes, the limit for requests with an Idempotency-Key"),
    )
}

pub(crate) fn unreadable_body(
    error: &(dyn std::error::Error + Send + Sync),
) -> Response<ReplyBody> {
    json(
        StatusCode::BAD_REQUEST,
        "request_unreadable",
        &format!("the request body could not be read: {error}"),
    )
}

fn json(status: StatusCode, code: &str, message: &str) -> Response<ReplyBody> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut response = Response::new(full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
