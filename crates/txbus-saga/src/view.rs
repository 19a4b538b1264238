//! What the visibility API returns: sagas listed by status, and one saga's history.

use serde::{Deserialize, Serialize};
use txbus_core::MessageId;

use crate::id::SagaId;
use crate::record::SagaEvent;
use crate::state::SagaStatus;

/// One saga in a listing by status (the status index entry, written with the state change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaSummary {
    /// The saga.
    pub id: SagaId,
    /// Its type.
    pub saga_type: String,
    /// Its status.
    pub status: SagaStatus,
    /// Since when, ms since the epoch.
    pub since_ms: i64,
    /// The step concerned: the failed one while compensating, the one whose compensation
    /// failed while it needs attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The error: why it is compensating or failed, or why its compensation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One change in a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Its version in the saga's stream (from 1).
    pub version: u64,
    /// When it was written, ms since the epoch.
    pub at_ms: i64,
    /// Its message id in the log.
    pub message_id: MessageId,
    /// The message that caused it (the step request a completion answers, the event a
    /// waiting step received, …).
    pub causation_id: Option<String>,
    /// The change.
    pub event: SagaEvent,
}
