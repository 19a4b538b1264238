//! What can go wrong with a query.

use crate::http::BoxError;

/// Why a query did not produce its result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No handler is registered for the query's type.
    #[error("no handler for query {name:?}: register one with QueryBus::builder().handler(..)")]
    NoHandler {
        /// The query's name.
        name: &'static str,
    },
    /// Two handlers were registered for one query type.
    #[error("query {name:?} has two handlers; register exactly one handler per query type")]
    DuplicateHandler {
        /// The query's name.
        name: &'static str,
    },
    /// The query is not acceptable (a limit out of range, …).
    #[error("query {name:?} is invalid: {reason}")]
    Invalid {
        /// The query's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The handler failed.
    #[error("query failed: {0}")]
    Failed(#[source] BoxError),
    /// The query could not be serialized into its cache key.
    #[error("query {name:?}: serializing it for the cache failed: {source}")]
    Codec {
        /// The query's name.
        name: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A failure of the handler.
    pub fn failed(error: impl Into<BoxError>) -> Self {
        Self::Failed(error.into())
    }
}
