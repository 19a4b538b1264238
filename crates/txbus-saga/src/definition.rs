//! Saga definitions: a named list of steps and an optional deadline.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::Error;
use crate::step::{Step, StepKind};

/// The longest saga type or step name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Checks a name used in event types, handler names and keys: ASCII letters, digits, `-`
/// and `_`.
pub(crate) fn check_name(what: &str, name: &str, limit: usize) -> Result<(), Error> {
    if name.is_empty() || name.len() > limit {
        return Err(Error::InvalidDefinition(format!(
            "{what} {name:?} must be 1 to {limit} bytes"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(Error::InvalidDefinition(format!(
            "{what} {name:?} contains {c:?}; use ASCII letters, digits, - and _"
        )));
    }
    Ok(())
}

/// A saga type: its name and its steps, run in order.
///
/// ```
/// use serde_json::json;
/// use txbus_saga::{Saga, Step, StepContext};
///
/// let saga = Saga::builder("order")
///     .step(Step::action("reserve-items", |_ctx: StepContext| async { Ok(json!({"reservation": 1})) })
///         .compensate(|_ctx: StepContext| async { Ok(()) }))
///     .step(Step::action("charge-payment", |_ctx: StepContext| async { Ok(json!({"payment": 2})) }))
///     .deadline(std::time::Duration::from_secs(300))
///     .build()?;
/// assert_eq!(saga.name(), "order");
/// # Ok::<(), txbus_saga::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Saga {
    pub(crate) name: String,
    pub(crate) steps: Vec<Step>,
    pub(crate) deadline: Option<Duration>,
}

impl Saga {
    /// Starts defining a saga type named `name` (its identity across restarts: handlers,
    /// event types and keys are named after it).
    pub fn builder(name: impl Into<String>) -> SagaBuilder {
        SagaBuilder {
            name: name.into(),
            steps: Vec::new(),
            deadline: None,
        }
    }

    /// The saga type's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The deadline of each saga of this type, counted from its start.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    pub(crate) fn step_names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name.clone()).collect()
    }
}

/// Builds a [`Saga`].
#[derive(Debug)]
pub struct SagaBuilder {
    name: String,
    steps: Vec<Step>,
    deadline: Option<Duration>,
}

impl SagaBuilder {
    /// Adds the next step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// A deadline for the whole saga, from its start: when it passes before the saga has
    /// completed, no further step starts, a waiting step fails, an action already running
    /// finishes, and the completed steps are compensated.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Checks the names (unique, safe for keys and event types) and builds the definition.
    pub fn build(self) -> Result<Saga, Error> {
        check_name("saga type", &self.name, MAX_NAME_BYTES)?;
        if self.steps.is_empty() {
            return Err(Error::InvalidDefinition(format!(
                "saga {:?} has no steps",
                self.name
            )));
        }
        let mut seen = HashSet::new();
        for step in &self.steps {
            check_name("step name", &step.name, MAX_NAME_BYTES)?;
            if !seen.insert(step.name.as_str()) {
                return Err(Error::InvalidDefinition(format!(
                    "saga {:?} has two steps named {:?}",
                    self.name, step.name
                )));
            }
            if step.retry.timeout.is_zero() || step.compensation_retry.timeout.is_zero() {
                return Err(Error::InvalidDefinition(format!(
                    "step {:?}: timeouts must be above zero",
                    step.name
                )));
            }
            if let StepKind::Wait {
                event_type,
                timeout,
            } = &step.kind
            {
                if event_type.is_empty() || timeout.is_zero() {
                    return Err(Error::InvalidDefinition(format!(
                        "step {:?} waits for an event: its event type must not be empty and its timeout must be above zero",
                        step.name
                    )));
                }
            }
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidDefinition(format!(
                "saga {:?}: the deadline must be above zero",
                self.name
            )));
        }
        Ok(Saga {
            name: self.name,
            steps: self.steps,
            deadline: self.deadline,
        })
    }
}
