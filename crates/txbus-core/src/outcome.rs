//! What an operation came to, and the progress reported on the way.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::OperationId;

/// Why a delivery failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler rejected the message: no retry.
    Rejected,
    /// The handler kept returning transient errors until the retries ran out.
    RetriesExhausted,
    /// The last attempt timed out.
    TimedOut,
    /// The last attempt panicked.
    Panicked,
    /// The bus running it stopped (crashed, was killed) more often than the bus allows
    /// (`BusBuilder::max_interruptions`): the message may bring its process down, so it is not
    /// run again.
    Interrupted,
}

/// The failure that decided an operation: which event, which handler, why, after how many attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Index of the event within the commit.
    pub event_index: u32,
    /// Its event type.
    pub event_type: String,
    /// The handler that failed.
    pub handler: String,
    /// What kind of failure.
    pub kind: FailureKind,
    /// The handler's reason (or the timeout/panic message).
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handler {:?} failed on event {} ({:?}) after {} attempt(s): {:?}: {}",
            self.handler, self.event_index, self.event_type, self.attempts, self.kind, self.reason
        )
    }
}

/// The outcome of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The operation.
    pub operation_id: OperationId,
    /// `None` when every handler of every event succeeded; otherwise the failure that decided it.
    pub error: Option<Failure>,
    /// When it finished, in milliseconds since the Unix epoch.
    pub finished_at_ms: i64,
}

impl Outcome {
    /// True when every handler of every event succeeded.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Where an operation stands, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OperationState {
    /// Still running: deliveries remain.
    Pending {
        /// The operation.
        operation_id: OperationId,
        /// Deliveries that have not succeeded yet.
        remaining: u32,
    },
    /// Finished.
    Finished(Outcome),
}

/// One step of progress of an operation, in the order it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Progress {
    /// A handler succeeded.
    Succeeded {
        /// Event index in the commit.
        event_index: u32,
        /// The handler.
        handler: String,
        /// The attempt that succeeded.
        attempt: u32,
    },
    /// A handler failed and will be retried.
    Retrying {
        /// Event index in the commit.
        event_index: u32,
        /// The handler.
        handler: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        reason: String,
        /// When the next attempt runs.
        #[serde(with = "millis")]
        retry_in: Duration,
    },
    /// A handler failed for good.
    Failed(Failure),
    /// The operation finished; always the last item.
    Finished(Outcome),
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
