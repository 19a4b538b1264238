//! A tower layer that makes HTTP requests idempotent with the `Idempotency-Key` header, for
//! axum or any tower-based server, on the keys of [`crate::idempotency`].
//!
//! | the request | the answer |
//! |---|---|
//! | first with this key | runs; its response is stored (2xx–4xx; 5xx releases the key) |
//! | same key, same method, path, query and body | the stored response, with `Idempotent-Replayed: true` |
//! | same key, another request | 422, code `idempotency_key_reused` |
//! | same key while the first still runs | 409, code `idempotency_key_in_progress`, `Retry-After: 1` |
//! | no key, or a safe method | passes through (400 if the key is [`required`](IdempotencyLayer::required)) |
//! | a key that is not 1–255 printable ASCII characters | 400, code `idempotency_key_invalid` |
//! | a body above the request limit | 413 |
//!
//! The request body is read whole (up to [`IdempotencyLayer::max_request_bytes`]) to
//! fingerprint it. The response body is read up to the idempotency service's response limit;
//! a larger one is streamed to the client as it comes and not stored, and its key is
//! released.

mod body;
mod layer;
mod problem;
mod service;

pub use body::{BoxError, ReplyBody};
pub use layer::{
    IdempotencyLayer, DEFAULT_MAX_REQUEST_BYTES, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};
pub use problem::{code_of, status_of};
pub use service::{IdempotencyService, ResponseFuture};
