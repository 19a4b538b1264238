//! The layer: configuration of the idempotency middleware, applied to a service.

use std::sync::Arc;

use http::{HeaderName, Method};
use tower_layer::Layer;

use super::service::IdempotencyService;
use crate::idempotency::Idempotency;

/// The header a client sends its key in.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header set (to `true`) on a response replayed from the store.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request body limit by default: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Makes requests that carry an `Idempotency-Key` header idempotent: the first runs, a repeat
/// with the same key and request gets the stored response (marked with
/// `Idempotent-Replayed: true`), the same key with another request gets 422, and a repeat
/// while the first is still running gets 409.
///
/// Only unsafe methods are covered (POST and PATCH by default, see
/// [`methods`](Self::methods)); other requests, and requests without the header, pass
/// through untouched unless the key is [`required`](Self::required). Responses with a 5xx
/// status are not stored by default: the key is released so that the client can retry.
///
/// ```no_run
/// # fn app(bus: txbus_core::Bus) -> axum::Router {
/// use axum::{routing::post, Router};
/// use txbus_cqrs::http::IdempotencyLayer;
/// use txbus_cqrs::idempotency::{Idempotency, Options};
///
/// Router::new()
///     .route("/payments", post(|| async { "paid" }))
///     .layer(IdempotencyLayer::new(Idempotency::new(bus, Options::default())))
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    pub(crate) shared: Arc<Shared>,
}

/// What every service made by one layer shares.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) keys: Idempotency,
    pub(crate) methods: Vec<Method>,
    pub(crate) required: bool,
    pub(crate) max_request_bytes: usize,
    pub(crate) keep_headers: Vec<HeaderName>,
    pub(crate) store_server_errors: bool,
}

impl IdempotencyLayer {
    /// The layer over `keys`, whose keys it keeps under its own `http` scope.
    pub fn new(keys: Idempotency) -> Self {
        Self {
            shared: Arc::new(Shared {
                keys: keys.scoped("http"),
                methods: vec![Method::POST, Method::PATCH],
                required: false,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                keep_headers: [
                    http::header::CONTENT_TYPE,
                    http::header::CONTENT_LANGUAGE,
                    http::header::CONTENT_ENCODING,
                    http::header::LOCATION,
                    http::header::ETAG,
                    http::header::LAST_MODIFIED,
                ]
                .to_vec(),
                store_server_errors: false,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The methods covered. Default: POST and PATCH.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.edit(|s| s.methods = methods)
    }

    /// Rejects requests of a covered method that carry no key, with 400. Default: false
    /// (they pass through and run as usual).
    pub fn required(self, required: bool) -> Self {
        self.edit(|s| s.required = required)
    }

    /// The largest request body accepted with a key, in bytes (the body is read whole to
    /// fingerprint it); a larger one is refused with 413. Default: 1 MiB.
    pub fn max_request_bytes(self, bytes: usize) -> Self {
        self.edit(|s| s.max_request_bytes = bytes)
    }

    /// Also keeps this response header for replay. Kept by default: `content-type`,
    /// `content-language`, `content-encoding`, `location`, `etag`, `last-modified`.
    pub fn keep_header(self, name: HeaderName) -> Self {
        self.edit(|s| s.keep_headers.push(name))
    }

    /// Stores 5xx responses too, so that a repeat replays the failure instead of running
    /// again. Default: false.
    pub fn store_server_errors(self, store: bool) -> Self {
        self.edit(|s| s.store_server_errors = store)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            shared: self.shared.clone(),
        }
    }
}
