//! What a step's action or compensation receives.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use txbus_core::{Bus, Event, HandlerError, MessageId};

use crate::id::SagaId;

/// The context of one attempt of a step (or of its compensation): the saga's input, what the
/// steps before it produced, which attempt this is, and the bus, to publish events from.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub(crate) saga_id: SagaId,
    pub(crate) saga_type: Arc<str>,
    pub(crate) step: Arc<str>,
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    pub(crate) input: Arc<Value>,
    pub(crate) outputs: Arc<BTreeMap<String, Value>>,
    pub(crate) output: Option<Value>,
    pub(crate) correlation_id: Arc<str>,
    pub(crate) request_id: MessageId,
    pub(crate) bus: Bus,
}

impl StepContext {
    /// The saga.
    pub fn saga_id(&self) -> &SagaId {
        &self.saga_id
    }

    /// The saga's type (its definition's name).
    pub fn saga_type(&self) -> &str {
        &self.saga_type
    }

    /// This step's name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// This step's position in the saga, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// This attempt's number, from 1. Steps and compensations run at least once: use
    /// [`idempotency_key`](Self::idempotency_key) so that a repeat does nothing twice.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The saga's input, as JSON.
    pub fn input_json(&self) -> &Value {
        &self.input
    }

    /// The saga's input, decoded. A payload that does not decode is a rejection (retrying
    /// would not change it).
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&*self.input)
            .map_err(|e| HandlerError::reject(format!("saga input does not decode: {e}")))
    }

    /// What an earlier step produced, by its name (`None` when it has not completed or
    /// produced nothing).
    pub fn output_of_json(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }

    /// What an earlier step produced, decoded; an absent or undecodable output is a
    /// rejection.
    pub fn output_of<T: DeserializeOwned>(&self, step: &str) -> Result<T, HandlerError> {
        let value = self
            .outputs
            .get(step)
            .ok_or_else(|| HandlerError::reject(format!("step {step:?} has no recorded output")))?;
        T::deserialize(value).map_err(|e| {
            HandlerError::reject(format!("output of step {step:?} does not decode: {e}"))
        })
    }

    /// In a compensation: what this step produced when it completed (the payment id a refund
    /// needs). `None` in an action.
    pub fn output_json(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// In a compensation: this step's output, decoded; an absent or undecodable output is a
    /// rejection.
    pub fn output<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let value = self.output.as_ref().ok_or_else(|| {
            HandlerError::reject(format!("step {:?} has no recorded output", self.step))
        })?;
        T::deserialize(value).map_err(|e| {
            HandlerError::reject(format!(
                "output of step {:?} does not decode: {e}",
                self.step
            ))
        })
    }

    /// A key that is the same on every attempt of this step of this saga: hand it to the
    /// service the step calls so that a repeated attempt is recognised.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}", self.saga_id, self.step)
    }

    /// The saga's correlation id (the saga id unless the starter chose one).
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// An event that continues this saga's chain: same correlation id, caused by this step's
    /// request, and tagged with the saga id (so a waiting step of this saga recognises it).
    pub fn event(&self, event_type: impl Into<String>, payload: Value) -> Event {
        Event::new(event_type, payload)
            .correlation_id(self.correlation_id.to_string())
            .causation_id(self.request_id.to_string())
            .header(crate::record::SAGA_ID_HEADER, self.saga_id.as_str())
    }

    /// The bus the saga runs on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
}
