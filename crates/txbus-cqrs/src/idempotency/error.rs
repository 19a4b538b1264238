//! What can go wrong with an idempotency key.

/// Why a request under an idempotency key cannot run or be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key was first used with a different request (another method, path, body or
    /// command). HTTP: 422 Unprocessable Content.
    #[error("idempotency key {key:?} was already used for a different request; send a new key for a new request")]
    Mismatch {
        /// The key.
        key: String,
    },
    /// A request with this key is still running. HTTP: 409 Conflict.
    #[error(
        "a request with idempotency key {key:?} is still in progress; retry once it has finished"
    )]
    InProgress {
        /// The key.
        key: String,
    },
    /// The key is empty, too long, or holds characters other than printable ASCII.
    /// HTTP: 400 Bad Request.
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// The request ran longer than the lock TTL, another request claimed the key, and this
    /// request's response was not stored.
    #[error("idempotency key {key:?}: the claim expired before the request finished (raise the lock TTL) and the response was not stored")]
    LockLost {
        /// The key.
        key: String,
    },
    /// The stored record cannot be read.
    #[error("idempotency key {key:?}: the stored record is unreadable ({reason}); delete the key to use it again")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error("idempotency store: {0}")]
    Store(#[source] txbus_core::Error),
}
