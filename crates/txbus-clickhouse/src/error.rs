//! What can go wrong talking to ClickHouse.

use std::time::Duration;

/// A ClickHouse client or sink failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server address is not a usable `http://host:port` URL.
    #[error("invalid ClickHouse URL {url:?}: {reason}; give one like http://127.0.0.1:8123")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid ClickHouse sink configuration: {0}")]
    Config(String),
    /// No connection could be made; the server is down or unreachable.
    #[error("cannot connect to ClickHouse at {address}: {source}; is the server running?")]
    Connect {
        /// host:port.
        address: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed midway (connection dropped, malformed response).
    #[error("HTTP exchange with ClickHouse at {address} failed: {source}; the request may or may not have been applied")]
    Http {
        /// host:port.
        address: String,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// The server did not answer in time.
    #[error("ClickHouse at {address} did not answer within {after:?}; the request may or may not have been applied")]
    Timeout {
        /// host:port.
        address: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The server answered with an error (its text says what: a missing table, a row that does
    /// not parse, …).
    #[error("ClickHouse refused the request (HTTP {status}): {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// The server's error text.
        message: String,
    },
    /// The sink's batcher has stopped (the runtime is shutting down).
    #[error("the ClickHouse sink has stopped and takes no more rows")]
    Closed,
}

impl Error {
    /// True when the server answered and refused: retrying the same request unchanged is likely
    /// to fail again (unlike a connection that could not be made).
    pub fn is_server_refusal(&self) -> bool {
        matches!(self, Self::Server { .. })
    }
}
