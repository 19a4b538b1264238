//! How a saga moves on: the changes that follow a change, and the key–value writes that go
//! with them. Pure: the caller commits the result with the stream's expected version.

use std::time::Duration;

use serde_json::Value;
use txbus_core::{Event, KvExpect, KvWrite, MessageId};

use crate::definition::Saga;
use crate::error::Error;
use crate::id::SagaId;
use crate::keys::{self, TimerKind};
use crate::record::{Envelope, SagaEvent};
use crate::state::{CompensationStatus, Pending, SagaState, SagaStatus};
use crate::step::StepKind;
use crate::view::SagaSummary;

/// Changes to commit on top of a saga at a known version.
pub(crate) struct Plan<'a> {
    def: &'a Saga,
    base: Option<SagaState>,
    state: Option<SagaState>,
    events: Vec<Event>,
    cause: Option<MessageId>,
    now_ms: i64,
}

impl<'a> Plan<'a> {
    /// Changes on top of `base`, caused by the message `cause`.
    pub(crate) fn new(
        def: &'a Saga,
        base: &SagaState,
        cause: Option<MessageId>,
        now_ms: i64,
    ) -> Self {
        Self {
            def,
            base: Some(base.clone()),
            state: Some(base.clone()),
            events: Vec::new(),
            cause,
            now_ms,
        }
    }

    /// The first changes of a new saga: `started`, then its first step.
    pub(crate) fn start(
        def: &'a Saga,
        id: &SagaId,
        input: Value,
        correlation_id: String,
        now_ms: i64,
    ) -> Result<Self, Error> {
        let deadline_ms = def.deadline.map(|d| now_ms.saturating_add(millis(d)));
        let started = SagaEvent::Started {
            saga_type: def.name.clone(),
            input,
            correlation_id,
            deadline_ms,
            steps: def.step_names(),
        };
        let mut plan = Self {
            def,
            base: None,
            state: None,
            events: Vec::new(),
            cause: None,
            now_ms,
        };
        let event = plan.envelope_event(id, &def.name, &started)?;
        let state = SagaState::start(id, now_ms, &started).map_err(|reason| Error::Corrupt {
            id: id.clone(),
            reason,
        })?;
        plan.events.push(event);
        plan.state = Some(state);
        plan.follow_on()?;
        Ok(plan)
    }

    /// The saga as it was before these changes.
    pub(crate) fn base(&self) -> Option<&SagaState> {
        self.base.as_ref()
    }

    /// True when nothing was planned.
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn envelope_event(
        &self,
        id: &SagaId,
        saga_type: &str,
        event: &SagaEvent,
    ) -> Result<Event, Error> {
        let correlation = self
            .state
            .as_ref()
            .map(|s| s.correlation_id.as_str())
            .or(match event {
                SagaEvent::Started { correlation_id, .. } => Some(correlation_id.as_str()),
                _ => None,
            })
            .unwrap_or(id.as_str());
        Envelope {
            saga_id: id.clone(),
            at_ms: self.now_ms,
            event: event.clone(),
        }
        .to_event(saga_type, correlation, self.cause)
        .map_err(|e| Error::Input(e.to_string()))
    }

    /// Adds one change.
    pub(crate) fn push(&mut self, event: SagaEvent) -> Result<(), Error> {
        let Some(state) = self.state.as_ref() else {
            return Err(Error::InvalidDefinition(
                "internal: a change before `started`".into(),
            ));
        };
        let (id, saga_type) = (state.id.clone(), state.saga_type.clone());
        let stored = self.envelope_event(&id, &saga_type, &event)?;
        let message_id = stored.id();
        if let Some(state) = self.state.as_mut() {
            state
                .apply(message_id, self.now_ms, &event)
                .map_err(|reason| Error::Corrupt { id, reason })?;
        }
        self.events.push(stored);
        Ok(())
    }

    /// Adds what follows until the saga waits for something (a step, a compensation, an
    /// event) or has settled.
    pub(crate) fn follow_on(&mut self) -> Result<(), Error> {
        // Each round adds at least one change that either sets `pending` or settles the
        // saga, or completes a step (bounded by the number of steps): the loop ends.
        loop {
            let Some(state) = self.state.as_ref() else {
                return Ok(());
            };
            if state.pending.is_some() {
                return Ok(());
            }
            match state.status {
                SagaStatus::Running if state.failure.is_some() || state.deadline_exceeded => {
                    self.next_compensation()?;
                }
                SagaStatus::Running => {
                    let index = state.next_step();
                    let Some(step) = self.def.steps.get(index) else {
                        self.push(SagaEvent::Completed)?;
                        continue;
                    };
                    let name = step.name.clone();
                    match &step.kind {
                        StepKind::Action(_) => self.push(SagaEvent::StepRequested {
                            step: index,
                            name,
                            wait_until_ms: None,
                        })?,
                        StepKind::Wait { timeout, .. } => {
                            let early = state.steps.get(index).and_then(|s| s.early_event.clone());
                            self.push(SagaEvent::StepRequested {
                                step: index,
                                name: name.clone(),
                                wait_until_ms: Some(self.now_ms.saturating_add(millis(*timeout))),
                            })?;
                            if let Some(event) = early {
                                self.push(SagaEvent::StepCompleted {
                                    step: index,
                                    name,
                                    output: event,
                                    attempts: 1,
                                })?;
                            }
                        }
                    }
                }
                SagaStatus::Compensating => self.next_compensation()?,
                SagaStatus::Completed | SagaStatus::Failed | SagaStatus::NeedsAttention => {
                    return Ok(())
                }
            }
        }
    }

    /// Requests the compensation of the latest completed step that has one and was not
    /// compensated; when none is left, the saga has failed.
    fn next_compensation(&mut self) -> Result<(), Error> {
        let Some(state) = self.state.as_ref() else {
            return Ok(());
        };
        let next = state.completed.iter().rev().copied().find(|&i| {
            self.def
                .steps
                .get(i)
                .is_some_and(|s| s.compensation.is_some())
                && state
                    .steps
                    .get(i)
                    .is_some_and(|s| s.compensation == CompensationStatus::NotRequested)
        });
        match next {
            Some(index) => {
                let name = state.steps[index].name.clone();
                self.push(SagaEvent::Compensating { step: index, name })
            }
            None => {
                let reason = state
                    .failure
                    .clone()
                    .unwrap_or_else(|| "the saga failed".into());
                self.push(SagaEvent::Failed { reason })
            }
        }
    }

    /// The commit's events and the saga after them.
    pub(crate) fn finish(
        self,
        options: &KvOptions,
    ) -> Option<(SagaState, Vec<Event>, Vec<KvWrite>)> {
        let state = self.state?;
        let kv = kv_changes(self.base.as_ref(), &state, options);
        Some((state, self.events, kv))
    }
}

/// Options of the key–value index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvOptions {
    /// How long the status entry of a finished saga is kept.
    pub(crate) finished_ttl: Option<Duration>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn deadline_timer(state: &SagaState) -> Option<String> {
    match state.deadline_ms {
        Some(due) if state.status == SagaStatus::Running && !state.deadline_exceeded => {
            Some(keys::timer_key(due, &state.id, TimerKind::Deadline))
        }
        _ => None,
    }
}

fn wait_timer(state: &SagaState) -> Option<String> {
    match &state.pending {
        Some(Pending::Step {
            index,
            wait_until_ms: Some(due),
            ..
        }) => Some(keys::timer_key(*due, &state.id, TimerKind::Wait(*index))),
        _ => None,
    }
}

/// The summary stored in the status index.
pub(crate) fn summary(state: &SagaState) -> SagaSummary {
    let (step, error) = match (state.status, &state.attention) {
        (SagaStatus::NeedsAttention, Some((index, error))) => (
            state.steps.get(*index).map(|s| s.name.clone()),
            Some(error.clone()),
        ),
        (SagaStatus::Compensating | SagaStatus::Failed, _) => (
            state
                .steps
                .iter()
                .find(|s| s.status == crate::state::StepStatus::Failed)
                .map(|s| s.name.clone()),
            state.failure.clone(),
        ),
        _ => (None, None),
    };
    SagaSummary {
        id: state.id.clone(),
        saga_type: state.saga_type.clone(),
        status: state.status,
        since_ms: state.updated_at_ms,
        step,
        error,
    }
}

/// The key–value writes that keep the index and timers in step with the saga.
fn kv_changes(before: Option<&SagaState>, after: &SagaState, options: &KvOptions) -> Vec<KvWrite> {
    let mut writes = Vec::new();
    if before.map(|b| b.status) != Some(after.status) {
        if let Some(b) = before {
            writes.push(KvWrite::delete(keys::status_key(b.status, &b.id)));
        }
        let value = serde_json::to_vec(&summary(after)).unwrap_or_default();
        let mut put = KvWrite::put(keys::status_key(after.status, &after.id), value);
        if after.status.is_finished() {
            if let Some(ttl) = options.finished_ttl {
                put = put.ttl(ttl);
            }
        }
        writes.push(put);
    }
    let correlation = keys::correlation_key(&after.saga_type, &after.correlation_id);
    match before {
        None => writes.push(
            KvWrite::put(correlation, after.id.as_str().as_bytes().to_vec())
                .expect(KvExpect::Absent),
        ),
        Some(b) if !b.status.is_finished() && after.status.is_finished() => {
            writes.push(KvWrite::delete(correlation));
        }
        Some(_) => {}
    }
    for timer in [deadline_timer, wait_timer] {
        let old = before.and_then(timer);
        let new = timer(after);
        if old != new {
            if let Some(old) = old {
                writes.push(KvWrite::delete(old));
            }
            if let Some(new) = new {
                writes.push(KvWrite::put(new, Vec::new()));
            }
        }
    }
    writes
}
