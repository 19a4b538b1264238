//! The errors of event sourcing calls.

use txbus_core::Conflict;

/// What went wrong with an event-store, repository or projection call. Nothing was written
/// when a call returns one of these, except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stream was not at the expected version (or a key-value condition did not hold);
    /// nothing was written. Match on it, reload, and try again.
    #[error(transparent)]
    Conflict(Conflict),
    /// The bus or its store failed.
    #[error(transparent)]
    Bus(txbus_core::Error),
    /// A stored event's type is not one the aggregate knows.
    #[error("stream {stream:?} version {version}: event type {event_type:?} is unknown to aggregate {aggregate}; add it to the aggregate's events or register an upcaster")]
    UnknownEvent {
        /// The aggregate kind.
        aggregate: &'static str,
        /// The stream.
        stream: String,
        /// The event's version in the stream.
        version: u64,
        /// Its event type.
        event_type: String,
    },
    /// A stored event's payload does not decode into its Rust type.
    #[error("event {event_type:?} ({location}) does not decode: {reason}; register an upcaster for its old shape")]
    Decode {
        /// Its event type.
        event_type: String,
        /// Where it is: stream and version, or log position.
        location: String,
        /// What serde said.
        reason: String,
    },
    /// An upcaster failed, or an event's schema version has no path to the current one.
    #[error("upcasting event {event_type:?} from schema version {from}: {reason}")]
    Upcast {
        /// Its event type.
        event_type: String,
        /// The schema version it was at.
        from: u32,
        /// What failed.
        reason: String,
    },
    /// A value could not be serialized (an event, a snapshot, a checkpoint).
    #[error("serializing {what}: {reason}")]
    Encode {
        /// What was being serialized.
        what: String,
        /// What serde said.
        reason: String,
    },
    /// A stored record (checkpoint) is unreadable: edited by hand, or written by something else.
    #[error("stored record {key:?} is unreadable: {reason}; delete it to start over")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A read model wrote a key outside its prefix (which rebuilds clear).
    #[error("read model {projection:?} wrote key {key:?}, outside its prefix {prefix:?}; keep its keys under the prefix so that a rebuild clears them")]
    OutsidePrefix {
        /// The projection.
        projection: String,
        /// The key.
        key: String,
        /// The read model's prefix.
        prefix: String,
    },
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A projection's own code failed (its `apply`, `handle` or `reset`).
    #[error("projection {name:?} failed: {reason}")]
    Projection {
        /// The projection.
        name: String,
        /// What it said.
        reason: String,
    },
    /// The projection has stopped (its handle was stopped or its task ended).
    #[error("projection {0:?} is not running; start it again")]
    Stopped(String),
}

impl From<txbus_core::Error> for Error {
    fn from(e: txbus_core::Error) -> Self {
        match e {
            txbus_core::Error::Conflict(c) => Self::Conflict(c),
            other => Self::Bus(other),
        }
    }
}

impl Error {
    /// The conflict, when this error is one: the caller may reload and retry.
    pub fn conflict(&self) -> Option<&Conflict> {
        match self {
            Self::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

/// What went wrong running a command through a [`crate::Repository`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate refused the command, or the events it produced would break one of its
    /// invariants ([`crate::Aggregate::check`]); nothing was written.
    #[error("command rejected: {0}")]
    Domain(E),
    /// Every attempt met a concurrent writer on the stream; nothing was written. Try again
    /// later, or raise [`crate::Repository::max_attempts`].
    #[error("stream {stream:?}: {attempts} attempts all met a concurrent change (last: {last}); nothing was written, try again")]
    RetriesExhausted {
        /// The stream.
        stream: String,
        /// Attempts made.
        attempts: u32,
        /// The last conflict.
        last: Conflict,
    },
    /// Loading or saving failed (including a key-value condition of the command's options
    /// that did not hold, as [`Error::Conflict`]).
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E> CommandError<E> {
    /// The domain error, when the aggregate refused the command.
    pub fn domain(&self) -> Option<&E> {
        match self {
            Self::Domain(e) => Some(e),
            _ => None,
        }
    }
}

/// Any error a projection returns; the runner logs it, waits, and retries the batch.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
