//! The errors of the bus API.

use crate::conflict::Conflict;
use crate::message::OperationId;
use crate::store;

/// What went wrong with a bus call. Nothing was written when a call returns one of these,
/// except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event was rejected before anything was written.
    #[error("event {index} ({event_type:?}) rejected, nothing was written: {reason}")]
    InvalidEvent {
        /// The event's index in the list handed to `transact`.
        index: usize,
        /// Its event type.
        event_type: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `transact` was called with no events.
    #[error("transact needs at least one event; nothing was written")]
    NoEvents,
    /// More events in one commit than the configured limit.
    #[error("{count} events in one commit exceed the limit of {limit} (BusBuilder::max_events_per_commit); nothing was written")]
    TooManyEvents {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The bus was built without a store.
    #[error("no store configured: call BusBuilder::store(..) before build()")]
    NoStore,
    /// The configuration is inconsistent.
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// A condition of the commit (a stream's expected version, a key's expected version) did
    /// not hold; nothing was written. Reload and retry.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The commit's streams or key–value writes are unusable; nothing was written.
    #[error("invalid commit, nothing was written: {0}")]
    InvalidCommit(String),
    /// The store failed; the call may or may not have been applied only where the store says so.
    #[error(transparent)]
    Store(store::Error),
    /// The bus is shutting down and takes no new work.
    #[error("the bus is shutting down and accepts no new work")]
    ShuttingDown,
    /// No operation with this id is known (never committed, or its outcome was pruned by retention).
    #[error(
        "unknown operation {0}: never committed here, or its outcome was removed by retention"
    )]
    UnknownOperation(OperationId),
    /// What the call works on (a session, a batch's checkpoint) was changed by someone else
    /// since it was read; nothing was written. Open it again.
    #[error("{0}; nothing was written")]
    ChangedElsewhere(String),
    /// No dead letter with this id.
    #[error("no dead letter with delivery id {0}")]
    UnknownDeadLetter(i64),
    /// The store does not offer what was asked (for instance inspection); use a store that does.
    #[error("the store does not support {0}")]
    Unsupported(&'static str),
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Conflict(c) => Self::Conflict(c),
            store::Error::Invalid(reason) => Self::InvalidCommit(reason),
            other => Self::Store(other),
        }
    }
}
