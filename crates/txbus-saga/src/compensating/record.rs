//! What compensating transacts keep in the key–value space, and what they report.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txbus_core::{MessageId, OperationId, Outcome};

/// A success that registered how to undo it: which handler, on which event, with what data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The handler that succeeded.
    pub handler: String,
    /// The index of the event in its commit.
    pub event_index: u32,
    /// The event's type.
    pub event_type: String,
    /// The event's message id.
    pub message_id: MessageId,
    /// What the handler registered for its compensation.
    pub data: Value,
    /// When it succeeded, as a UUIDv7 (orders the compensations).
    pub(crate) seq: String,
}

/// A compensation that failed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationFailure {
    /// The handler whose compensation failed.
    pub handler: String,
    /// The event's index in its commit.
    pub event_index: u32,
    /// Why.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
}

/// The main compensation run of a failed operation (`compensate/run/<op>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunState {
    /// What it compensates, in the order it does.
    pub(crate) records: Vec<Registered>,
    /// True once it ended.
    pub(crate) finished: bool,
    /// What it compensated.
    pub(crate) compensated: Vec<Registered>,
    /// What failed for good.
    pub(crate) failed: Option<CompensationFailure>,
}

/// The outcome of a compensating transact: the operation's outcome and, when it failed, what
/// was compensated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompensatedOutcome {
    /// The operation's outcome.
    pub outcome: Outcome,
    /// The successes that were undone, in the order they were (the reverse of the order
    /// they happened). Empty when the operation succeeded.
    pub compensated: Vec<Registered>,
    /// A compensation that failed for good: its delivery is a dead letter (replay it once
    /// the cause is fixed) and the rest of the run did not happen.
    pub failed: Option<CompensationFailure>,
}

impl CompensatedOutcome {
    /// True when the operation succeeded.
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// What a compensation receives.
#[derive(Debug, Clone)]
pub struct Compensation {
    /// The failed operation.
    pub operation_id: OperationId,
    /// What the handler registered when it succeeded.
    pub registered: Registered,
    /// This attempt of the compensation run, from 1.
    pub attempt: u32,
}

/// The run request's payload (`txbus.compensate`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunRequest {
    pub(crate) operation_id: OperationId,
    pub(crate) records: Vec<Registered>,
    /// The main run (its result goes to `compensate/run/<op>`), or a late one for successes
    /// registered after the main run had started.
    pub(crate) main: bool,
}

pub(crate) fn record_prefix(op: OperationId) -> String {
    format!("compensate/rec/{op}/")
}

pub(crate) fn record_key(op: OperationId, handler: &str, event_index: u32) -> String {
    format!("compensate/rec/{op}/{handler}/{event_index}")
}

pub(crate) fn done_key(op: OperationId, handler: &str, event_index: u32) -> String {
    format!("compensate/done/{op}/{handler}/{event_index}")
}

pub(crate) fn run_key(op: OperationId) -> String {
    format!("compensate/run/{op}")
}

pub(crate) const RECORDS: &str = "compensate/rec/";

/// The operation of a record key.
pub(crate) fn op_of(key: &str) -> Option<OperationId> {
    key.strip_prefix(RECORDS)?.split('/').next()?.parse().ok()
}
