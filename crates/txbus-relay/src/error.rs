//! The errors of relays and inboxes.

/// What went wrong starting or stopping a relay or an inbox. Broker failures while running
/// are not errors of this kind: they are retried with backoff and reported through
/// `tracing` and the handles' status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bus (its store) failed.
    #[error("the bus failed: {0}")]
    Bus(#[from] txbus_core::Error),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A stored checkpoint does not parse (edited by hand, or written by something else).
    #[error("the checkpoint at key {key:?} holds {value:?}, which is not a log position; delete the key to start from the beginning of the log")]
    CorruptCheckpoint {
        /// The key.
        key: String,
        /// What it holds.
        value: String,
    },
    /// The task running the relay or inbox stopped abnormally (it panicked).
    #[error("the {0} task stopped abnormally (it panicked); see the log")]
    TaskFailed(&'static str),
}
