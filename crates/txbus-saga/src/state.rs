//! A saga's state: its stream of changes, folded.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txbus_core::MessageId;

use crate::id::SagaId;
use crate::record::SagaEvent;

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SagaStatus {
    /// Its steps are running.
    Running,
    /// A step failed (or the deadline passed): completed steps are being compensated.
    Compensating,
    /// Every step completed.
    Completed,
    /// It failed, and every completed step with a compensation was compensated.
    Failed,
    /// A compensation failed for good: someone must look, then retry it.
    NeedsAttention,
}

impl SagaStatus {
    /// Every status, in the order listings use.
    pub const ALL: [Self; 5] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Failed,
        Self::NeedsAttention,
    ];

    /// The status as it appears in keys and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::NeedsAttention => "needs-attention",
        }
    }

    /// True when nothing more happens by itself: completed, failed, or needs attention.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::NeedsAttention)
    }

    /// True when the saga is over for good: completed or failed.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Not reached yet.
    NotStarted,
    /// Its action runs (or its wait goes on).
    Running,
    /// It completed.
    Completed,
    /// It failed for good.
    Failed,
}

/// Where one step's compensation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompensationStatus {
    /// Not requested.
    NotRequested,
    /// Requested and running.
    Running,
    /// Done.
    Compensated,
    /// Failed for good (the saga needs attention).
    Failed,
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt.
    pub attempt: u32,
    /// Why it failed.
    pub error: String,
}

/// One step of a saga, as far as it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name.
    pub name: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts made by its action (for a finished step: how many it took).
    pub attempts: u32,
    /// Failed attempts of its action, and the final error when it failed.
    pub errors: Vec<AttemptError>,
    /// What it produced, once completed.
    pub output: Option<Value>,
    /// An event that arrived for it before the saga reached it.
    pub early_event: Option<Value>,
    /// Where its compensation stands.
    pub compensation: CompensationStatus,
    /// Attempts made by its compensation.
    pub compensation_attempts: u32,
    /// Failed attempts of its compensation.
    pub compensation_errors: Vec<AttemptError>,
}

/// What a saga waits for now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Pending {
    /// A step's action (or wait).
    Step {
        /// The step.
        index: usize,
        /// The request's message id: a delivery of another request is stale.
        request: MessageId,
        /// For a waiting step: when it fails unless its event arrived.
        wait_until_ms: Option<i64>,
    },
    /// A step's compensation.
    Compensation {
        /// The step.
        index: usize,
        /// The request's message id.
        request: MessageId,
    },
}

/// A saga, as its stream tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The saga.
    pub id: SagaId,
    /// Its type.
    pub saga_type: String,
    /// Its input.
    pub input: Value,
    /// Its correlation id.
    pub correlation_id: String,
    /// Its deadline, ms since the epoch.
    pub deadline_ms: Option<i64>,
    /// True once the deadline passed before it completed.
    pub deadline_exceeded: bool,
    /// When it started, ms since the epoch.
    pub started_at_ms: i64,
    /// When it last changed, ms since the epoch.
    pub updated_at_ms: i64,
    /// Its stream's version: the number of changes.
    pub version: u64,
    /// Where it stands.
    pub status: SagaStatus,
    /// Its steps.
    pub steps: Vec<StepState>,
    /// What it waits for now.
    pub pending: Option<Pending>,
    /// Why it failed (or is compensating).
    pub failure: Option<String>,
    /// The step whose compensation failed, and why, while it needs attention.
    pub attention: Option<(usize, String)>,
    /// Completed steps, in the order they completed.
    pub completed: Vec<usize>,
}

impl SagaState {
    /// The outputs of completed steps, by step name.
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| s.output.clone().map(|o| (s.name.clone(), o)))
            .collect()
    }

    /// The step after the last completed one.
    pub(crate) fn next_step(&self) -> usize {
        self.completed.last().map_or(0, |i| i + 1)
    }

    /// True when `request` is the request this saga waits for.
    pub(crate) fn awaits(&self, request: MessageId) -> bool {
        match &self.pending {
            Some(Pending::Step { request: r, .. } | Pending::Compensation { request: r, .. }) => {
                *r == request
            }
            None => false,
        }
    }

    /// Starts the fold with a saga's first change.
    pub(crate) fn start(id: &SagaId, at_ms: i64, event: &SagaEvent) -> Result<Self, String> {
        let SagaEvent::Started {
            saga_type,
            input,
            correlation_id,
            deadline_ms,
            steps,
        } = event
        else {
            return Err("its first event is not `started`".into());
        };
        Ok(Self {
            id: id.clone(),
            saga_type: saga_type.clone(),
            input: input.clone(),
            correlation_id: correlation_id.clone(),
            deadline_ms: *deadline_ms,
            deadline_exceeded: false,
            started_at_ms: at_ms,
            updated_at_ms: at_ms,
            version: 1,
            status: SagaStatus::Running,
            steps: steps
                .iter()
                .map(|name| StepState {
                    name: name.clone(),
                    status: StepStatus::NotStarted,
                    attempts: 0,
                    errors: Vec::new(),
                    output: None,
                    early_event: None,
                    compensation: CompensationStatus::NotRequested,
                    compensation_attempts: 0,
                    compensation_errors: Vec::new(),
                })
                .collect(),
            pending: None,
            failure: None,
            attention: None,
            completed: Vec::new(),
        })
    }

    fn step_mut(&mut self, index: usize) -> Result<&mut StepState, String> {
        let count = self.steps.len();
        self.steps
            .get_mut(index)
            .ok_or_else(|| format!("it names step {index}, but has {count} steps"))
    }

    /// Applies the next change (message `id`, written at `at_ms`).
    pub(crate) fn apply(
        &mut self,
        id: MessageId,
        at_ms: i64,
        event: &SagaEvent,
    ) -> Result<(), String> {
        self.version += 1;
        self.updated_at_ms = at_ms;
        match event {
            SagaEvent::Started { .. } => return Err("it is started twice".into()),
            SagaEvent::StepRequested {
                step,
                wait_until_ms,
                ..
            } => {
                let s = self.step_mut(*step)?;
                s.status = StepStatus::Running;
                self.pending = Some(Pending::Step {
                    index: *step,
                    request: id,
                    wait_until_ms: *wait_until_ms,
                });
            }
            SagaEvent::StepAttemptFailed {
                step,
                attempt,
                error,
                ..
            } => {
                let s = self.step_mut(*step)?;
                s.attempts = s.attempts.max(*attempt);
                s.errors.push(AttemptError {
                    attempt: *attempt,
                    error: error.clone(),
                });
            }
            SagaEvent::EventArrived { step, event, .. } => {
                self.step_mut(*step)?.early_event = Some(event.clone());
            }
            SagaEvent::StepCompleted {
                step,
                output,
                attempts,
                ..
            } => {
                let s = self.step_mut(*step)?;
                s.status = StepStatus::Completed;
                s.output = Some(output.clone());
                s.attempts = *attempts;
                self.completed.push(*step);
                self.pending = None;
            }
            SagaEvent::StepFailed {
                step,
                name,
                error,
                attempts,
            } => {
                let s = self.step_mut(*step)?;
                s.status = StepStatus::Failed;
                s.attempts = *attempts;
                s.errors.push(AttemptError {
                    attempt: *attempts,
                    error: error.clone(),
                });
                self.failure = Some(format!("step {name:?} failed: {error}"));
                self.pending = None;
            }
            SagaEvent::DeadlineExceeded { .. } => {
                self.deadline_exceeded = true;
                if self.failure.is_none() {
                    self.failure = Some("the saga's deadline passed".into());
                }
            }
            SagaEvent::Compensating { step, .. } => {
                self.step_mut(*step)?.compensation = CompensationStatus::Running;
                self.status = SagaStatus::Compensating;
                self.attention = None;
                self.pending = Some(Pending::Compensation {
                    index: *step,
                    request: id,
                });
            }
            SagaEvent::CompensationAttemptFailed {
                step,
                attempt,
                error,
                ..
            } => {
                let s = self.step_mut(*step)?;
                s.compensation_attempts = s.compensation_attempts.max(*attempt);
                s.compensation_errors.push(AttemptError {
                    attempt: *attempt,
                    error: error.clone(),
                });
            }
            SagaEvent::Compensated { step, attempts, .. } => {
                let s = self.step_mut(*step)?;
                s.compensation = CompensationStatus::Compensated;
                s.compensation_attempts = *attempts;
                self.pending = None;
            }
            SagaEvent::CompensationFailed {
                step,
                error,
                attempts,
                ..
            } => {
                let s = self.step_mut(*step)?;
                s.compensation = CompensationStatus::Failed;
                s.compensation_attempts = *attempts;
                s.compensation_errors.push(AttemptError {
                    attempt: *attempts,
                    error: error.clone(),
                });
                self.pending = None;
            }
            SagaEvent::NeedsAttention { step, error, .. } => {
                self.status = SagaStatus::NeedsAttention;
                self.attention = Some((*step, error.clone()));
                self.pending = None;
            }
            SagaEvent::CompensationRetried { step, .. } => {
                let s = self.step_mut(*step)?;
                s.compensation = CompensationStatus::NotRequested;
                s.compensation_attempts = 0;
            }
            SagaEvent::Completed => {
                self.status = SagaStatus::Completed;
                self.pending = None;
            }
            SagaEvent::Failed { .. } => {
                self.status = SagaStatus::Failed;
                self.pending = None;
            }
        }
        Ok(())
    }
}
