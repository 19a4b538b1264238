//! The state changes of a saga, as stored in its stream `saga-<id>`.
//!
//! Every change is an event of module `saga`. Two kinds are requests that a handler takes up:
//! `saga.step-requested/<saga>/<step>` (run a step's action) and
//! `saga.compensating/<saga>/<step>` (run a step's compensation); the others only record what
//! happened.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txbus_core::{Event, MessageId};

use crate::id::SagaId;

/// The module of every saga event.
pub const MODULE: &str = "saga";
/// The header naming the saga an event belongs to.
pub const SAGA_ID_HEADER: &str = "saga-id";

/// One state change of a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SagaEvent {
    /// The saga started.
    Started {
        /// Its type.
        saga_type: String,
        /// Its input.
        input: Value,
        /// Its correlation id.
        correlation_id: String,
        /// When its deadline passes, ms since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<i64>,
        /// The names of its steps, as defined when it started.
        steps: Vec<String>,
    },
    /// A step was requested: its action runs (or, for a waiting step, its wait begins).
    StepRequested {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// For a waiting step: when it fails unless its event has arrived.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_until_ms: Option<i64>,
    },
    /// An attempt of a step failed; it is retried.
    StepAttemptFailed {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// An event a waiting step waits for arrived before the saga reached the step; it
    /// completes the step when the saga gets there.
    EventArrived {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// The event (`{"message_id", "event_type", "payload"}`).
        event: Value,
    },
    /// A step completed.
    StepCompleted {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// What it produced.
        output: Value,
        /// Attempts it took.
        attempts: u32,
    },
    /// A step failed for good.
    StepFailed {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// Why.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The saga's deadline passed before it completed.
    DeadlineExceeded {
        /// The deadline, ms since the epoch.
        deadline_ms: i64,
    },
    /// A completed step's compensation was requested.
    Compensating {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
    },
    /// An attempt of a compensation failed; it is retried.
    CompensationAttemptFailed {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A step was compensated.
    Compensated {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// Attempts it took.
        attempts: u32,
    },
    /// A compensation failed for good.
    CompensationFailed {
        /// The step's index.
        step: usize,
        /// Its name.
        name: String,
        /// Why.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The saga stopped: a compensation failed for good and someone must look at it (then
    /// retry it with [`crate::SagaRuntime::retry_compensation`]).
    NeedsAttention {
        /// The step whose compensation failed.
        step: usize,
        /// Its name.
        name: String,
        /// Why.
        error: String,
    },
    /// An operator retried the compensation of a saga that needed attention.
    CompensationRetried {
        /// The step whose compensation runs again.
        step: usize,
        /// Its name.
        name: String,
    },
    /// Every step completed.
    Completed,
    /// The saga failed and every completed step with a compensation was compensated.
    Failed {
        /// Why it failed.
        reason: String,
    },
}

impl SagaEvent {
    /// The event type this change is stored under.
    pub(crate) fn event_type(&self, saga_type: &str) -> String {
        let kind = match self {
            Self::Started { .. } => "started",
            Self::StepRequested { name, .. } => {
                return step_requested_type(saga_type, name);
            }
            Self::StepAttemptFailed { .. } => "step-attempt-failed",
            Self::EventArrived { .. } => "event-arrived",
            Self::StepCompleted { .. } => "step-completed",
            Self::StepFailed { .. } => "step-failed",
            Self::DeadlineExceeded { .. } => "deadline-exceeded",
            Self::Compensating { name, .. } => return compensating_type(saga_type, name),
            Self::CompensationAttemptFailed { .. } => "compensation-attempt-failed",
            Self::Compensated { .. } => "compensated",
            Self::CompensationFailed { .. } => "compensation-failed",
            Self::NeedsAttention { .. } => "needs-attention",
            Self::CompensationRetried { .. } => "compensation-retried",
            Self::Completed => "completed",
            Self::Failed { .. } => "failed",
        };
        format!("saga.{kind}")
    }
}

/// The event type of a request to run a step.
pub(crate) fn step_requested_type(saga_type: &str, step: &str) -> String {
    format!("saga.step-requested/{saga_type}/{step}")
}

/// The event type of a request to run a step's compensation.
pub(crate) fn compensating_type(saga_type: &str, step: &str) -> String {
    format!("saga.compensating/{saga_type}/{step}")
}

/// A saga event as stored: the change, which saga, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) saga_id: SagaId,
    pub(crate) at_ms: i64,
    #[serde(flatten)]
    pub(crate) event: SagaEvent,
}

impl Envelope {
    /// The bus event for this change, linked to its saga's chain.
    pub(crate) fn to_event(
        &self,
        saga_type: &str,
        correlation_id: &str,
        causation: Option<MessageId>,
    ) -> Result<Event, serde_json::Error> {
        let payload = serde_json::to_value(self)?;
        let mut event = Event::new(self.event.event_type(saga_type), payload)
            .module(MODULE)
            .correlation_id(correlation_id)
            .header(SAGA_ID_HEADER, self.saga_id.as_str());
        if let Some(cause) = causation {
            event = event.causation_id(cause.to_string());
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_payload() {
        let envelope = Envelope {
            saga_id: SagaId::new("s1").unwrap(),
            at_ms: 5,
            event: SagaEvent::StepCompleted {
                step: 1,
                name: "pay".into(),
                output: serde_json::json!({"payment_id": "p-1"}),
                attempts: 2,
            },
        };
        let event = envelope.to_event("order", "corr", None).unwrap();
        assert_eq!(event.event_type(), "saga.step-completed");
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["change"], "step-completed");
        assert_eq!(json["saga_id"], "s1");
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
        let request = SagaEvent::StepRequested {
            step: 0,
            name: "pay".into(),
            wait_until_ms: None,
        };
        assert_eq!(request.event_type("order"), "saga.step-requested/order/pay");
    }
}
