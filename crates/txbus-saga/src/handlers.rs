//! The bus handlers that drive sagas: one per action step (takes its requests), one per
//! compensation, and one per waiting step (takes the events it waits for).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::json;
use txbus_core::{Backoff, BusBuilder, HandlerError, HandlerResult, Message, On, PolicyOverride};

use crate::definition::Saga;
use crate::error::Error;
use crate::id::SagaId;
use crate::keys;
use crate::record::{self, Envelope, SagaEvent, SAGA_ID_HEADER};
use crate::shared::Shared;
use crate::state::{Pending, SagaStatus};
use crate::step::{Retry, StepKind};

/// Registers every handler the registered sagas need.
pub(crate) fn install(shared: &Arc<Shared>, mut builder: BusBuilder) -> BusBuilder {
    let mut defs: Vec<&Arc<Saga>> = shared.defs.values().collect();
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    for def in defs {
        for (index, step) in def.steps.iter().enumerate() {
            let base = format!("saga/{}/{}", def.name, step.name);
            match &step.kind {
                StepKind::Action(_) => {
                    builder = builder.handler_with(
                        format!("{base}/run"),
                        On::event(record::step_requested_type(&def.name, &step.name))
                            .module(record::MODULE),
                        policy(step.retry, shared.options.commit_grace),
                        StepRunner {
                            shared: Arc::clone(shared),
                            def: Arc::clone(def),
                            index,
                        },
                    );
                }
                StepKind::Wait { event_type, .. } => {
                    builder = builder.handler_with(
                        format!("{base}/await"),
                        On::event(event_type.clone()),
                        PolicyOverride::default()
                            .max_retries(10)
                            .backoff(
                                Backoff::exponential(Duration::from_millis(50))
                                    .max(Duration::from_secs(5)),
                            )
                            .timeout(shared.options.commit_grace),
                        Awaiter {
                            shared: Arc::clone(shared),
                            def: Arc::clone(def),
                            index,
                        },
                    );
                }
            }
            if step.compensation.is_some() {
                builder = builder.handler_with(
                    format!("{base}/compensate"),
                    On::event(record::compensating_type(&def.name, &step.name))
                        .module(record::MODULE),
                    policy(step.compensation_retry, shared.options.commit_grace),
                    Compensator {
                        shared: Arc::clone(shared),
                        def: Arc::clone(def),
                        index,
                    },
                );
            }
        }
    }
    builder
}

/// The bus policy of a saga handler: the step's retries and backoff; its timeout leaves room
/// past the step's own (which the handler enforces) to record the result.
fn policy(retry: Retry, grace: Duration) -> PolicyOverride {
    PolicyOverride::default()
        .timeout(retry.timeout.saturating_add(grace))
        .max_retries(retry.max_retries)
        .backoff(retry.backoff)
}

/// How one attempt of user code ended.
enum Attempt<T> {
    Done(T),
    /// Failed; `final_` when it must not be retried (a rejection).
    Failed {
        reason: String,
        rejected: bool,
    },
}

/// Runs user code with a timeout, containing panics.
async fn attempt<T>(
    fut: impl std::future::Future<Output = Result<T, HandlerError>> + Send,
    timeout: Duration,
) -> Attempt<T> {
    match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(Ok(value))) => Attempt::Done(value),
        Ok(Ok(Err(HandlerError::Reject(reason)))) => Attempt::Failed {
            reason,
            rejected: true,
        },
        Ok(Ok(Err(HandlerError::Transient(reason)))) => Attempt::Failed {
            reason,
            rejected: false,
        },
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Attempt::Failed {
                reason: format!("panicked: {what}"),
                rejected: false,
            }
        }
        Err(_) => Attempt::Failed {
            reason: format!("timed out after {timeout:?}"),
            rejected: false,
        },
    }
}

fn transient(e: Error) -> HandlerError {
    HandlerError::transient(e)
}

/// The saga a request names.
fn request_saga(msg: &Message) -> Result<SagaId, HandlerError> {
    let envelope: Envelope = msg
        .decode()
        .map_err(|e| HandlerError::reject(format!("not a saga request: {e}")))?;
    Ok(envelope.saga_id)
}

/// Runs a step's action for each of its requests.
struct StepRunner {
    shared: Arc<Shared>,
    def: Arc<Saga>,
    index: usize,
}

impl txbus_core::Handler for StepRunner {
    async fn handle(&self, msg: Message) -> HandlerResult {
        let shared = &self.shared;
        let bus = shared.bus().await;
        let id = request_saga(&msg)?;
        let request = msg.id();
        let attempt_no = msg.attempt();
        let Some(state) = shared
            .load(&bus, &id, Some(request))
            .await
            .map_err(transient)?
        else {
            tracing::warn!(saga = %id, "a step request for a saga that does not exist; ignored");
            return Ok(());
        };
        if !state.awaits(request) {
            tracing::debug!(saga = %id, step = self.index, "stale step request; the saga has moved on");
            return Ok(());
        }
        let step = &self.def.steps[self.index];
        if state.steps.get(self.index).map(|s| s.name.as_str()) != Some(step.name.as_str()) {
            return Err(HandlerError::reject(format!(
                "saga {id} was started with other steps than its definition now has"
            )));
        }
        let StepKind::Action(action) = &step.kind else {
            return Ok(());
        };
        let index = self.index;
        let name = step.name.clone();
        if state.deadline_exceeded {
            // The deadline passed while this step waited for an attempt: do not start it.
            shared
                .drive_acking(
                    &bus,
                    &id,
                    Some(request),
                    Some(request),
                    Some(&msg),
                    |plan| {
                        if plan.base().is_some_and(|s| s.awaits(request)) {
                            plan.push(SagaEvent::StepFailed {
                                step: index,
                                name: name.clone(),
                                error: "the saga's deadline passed before this step could run"
                                    .into(),
                                attempts: attempt_no.saturating_sub(1),
                            })?;
                        }
                        Ok(())
                    },
                )
                .await
                .map_err(transient)?;
            return Ok(());
        }
        let ctx = shared.context(&bus, &state, index, attempt_no, request, false);
        tracing::debug!(saga = %id, step = %name, attempt = attempt_no, "running step");
        match attempt(action(ctx), step.retry.timeout).await {
            Attempt::Done(output) => {
                // The completion and the next step's request commit with this delivery's
                // acknowledgement: one durable write per step.
                shared
                    .drive_acking(
                        &bus,
                        &id,
                        Some(request),
                        Some(request),
                        Some(&msg),
                        |plan| {
                            if plan.base().is_some_and(|s| s.awaits(request)) {
                                plan.push(SagaEvent::StepCompleted {
                                    step: index,
                                    name: name.clone(),
                                    output: output.clone(),
                                    attempts: attempt_no,
                                })?;
                            }
                            Ok(())
                        },
                    )
                    .await
                    .map_err(transient)?;
                Ok(())
            }
            Attempt::Failed { reason, rejected } => {
                let last = rejected || attempt_no > step.retry.max_retries;
                let mut failed_for_good = false;
                // The attempt that ends the step acknowledges its delivery in the same commit;
                // one to be retried leaves its delivery to the retry.
                let ack = last.then_some(&msg);
                let driven = shared
                    .drive_acking(&bus, &id, Some(request), Some(request), ack, |plan| {
                        failed_for_good = false;
                        let Some(base) = plan.base() else {
                            return Ok(());
                        };
                        if !base.awaits(request) {
                            return Ok(());
                        }
                        if last || base.deadline_exceeded {
                            failed_for_good = true;
                            plan.push(SagaEvent::StepFailed {
                                step: index,
                                name: name.clone(),
                                error: reason.clone(),
                                attempts: attempt_no,
                            })
                        } else {
                            plan.push(SagaEvent::StepAttemptFailed {
                                step: index,
                                name: name.clone(),
                                attempt: attempt_no,
                                error: reason.clone(),
                            })
                        }
                    })
                    .await;
                match driven {
                    Ok(_) if failed_for_good => {
                        tracing::info!(saga = %id, step = %name, attempts = attempt_no, %reason, "step failed; compensating");
                        Ok(())
                    }
                    Ok(_) => Err(HandlerError::transient(reason)),
                    Err(e) if last => Err(transient(e)),
                    Err(e) => {
                        tracing::warn!(saga = %id, step = %name, error = %e, "could not record a failed attempt");
                        Err(HandlerError::transient(reason))
                    }
                }
            }
        }
    }
}

/// Runs a step's compensation for each of its requests.
struct Compensator {
    shared: Arc<Shared>,
    def: Arc<Saga>,
    index: usize,
}

impl txbus_core::Handler for Compensator {
    async fn handle(&self, msg: Message) -> HandlerResult {
        let shared = &self.shared;
        let bus = shared.bus().await;
        let id = request_saga(&msg)?;
        let request = msg.id();
        let attempt_no = msg.attempt();
        let Some(state) = shared
            .load(&bus, &id, Some(request))
            .await
            .map_err(transient)?
        else {
            return Ok(());
        };
        if !state.awaits(request) {
            tracing::debug!(saga = %id, step = self.index, "stale compensation request");
            return Ok(());
        }
        let step = &self.def.steps[self.index];
        let Some(compensation) = &step.compensation else {
            return Ok(());
        };
        let index = self.index;
        let name = step.name.clone();
        let ctx = shared.context(&bus, &state, index, attempt_no, request, true);
        tracing::debug!(saga = %id, step = %name, attempt = attempt_no, "compensating step");
        let outcome = attempt(compensation(ctx), step.compensation_retry.timeout).await;
        let (done, last, reason) = match outcome {
            Attempt::Done(()) => (true, true, String::new()),
            Attempt::Failed { reason, rejected } => (
                false,
                rejected || attempt_no > step.compensation_retry.max_retries,
                reason,
            ),
        };
        let ack = (done || last).then_some(&msg);
        let driven = shared
            .drive_acking(&bus, &id, Some(request), Some(request), ack, |plan| {
                if !plan.base().is_some_and(|s| s.awaits(request)) {
                    return Ok(());
                }
                if done {
                    plan.push(SagaEvent::Compensated {
                        step: index,
                        name: name.clone(),
                        attempts: attempt_no,
                    })
                } else if last {
                    plan.push(SagaEvent::CompensationFailed {
                        step: index,
                        name: name.clone(),
                        error: reason.clone(),
                        attempts: attempt_no,
                    })?;
                    plan.push(SagaEvent::NeedsAttention {
                        step: index,
                        name: name.clone(),
                        error: reason.clone(),
                    })
                } else {
                    plan.push(SagaEvent::CompensationAttemptFailed {
                        step: index,
                        name: name.clone(),
                        attempt: attempt_no,
                        error: reason.clone(),
                    })
                }
            })
            .await;
        match driven {
            Ok(_) if done => Ok(()),
            Ok(_) if last => {
                tracing::error!(saga = %id, step = %name, attempts = attempt_no, %reason,
                    "compensation failed for good; the saga needs attention");
                Ok(())
            }
            Ok(_) => Err(HandlerError::transient(reason)),
            Err(e) if done || last => Err(transient(e)),
            Err(e) => {
                tracing::warn!(saga = %id, step = %name, error = %e, "could not record a failed compensation attempt");
                Err(HandlerError::transient(reason))
            }
        }
    }
}

/// Takes the events a waiting step waits for.
struct Awaiter {
    shared: Arc<Shared>,
    def: Arc<Saga>,
    index: usize,
}

impl Awaiter {
    /// The saga an arriving event belongs to: its `saga-id` header, else its correlation id.
    async fn resolve(&self, bus: &txbus_core::Bus, msg: &Message) -> Result<Option<SagaId>, Error> {
        if let Some(id) = msg.headers().extra.get(SAGA_ID_HEADER) {
            return Ok(SagaId::new(id.as_str()).ok());
        }
        let Some(correlation) = &msg.headers().correlation_id else {
            return Ok(None);
        };
        let key = keys::correlation_key(&self.def.name, correlation);
        if key.len() > txbus_core::kv::MAX_KEY_BYTES {
            return Ok(None);
        }
        Ok(bus
            .kv_get(&key)
            .await?
            .and_then(|e| String::from_utf8(e.value).ok())
            .and_then(|id| SagaId::new(id).ok()))
    }
}

impl txbus_core::Handler for Awaiter {
    async fn handle(&self, msg: Message) -> HandlerResult {
        if msg.module() == Some(record::MODULE) {
            return Ok(());
        }
        let shared = &self.shared;
        let bus = shared.bus().await;
        let Some(id) = self.resolve(&bus, &msg).await.map_err(transient)? else {
            return Ok(());
        };
        let index = self.index;
        let name = self.def.steps[index].name.clone();
        let saga_type = self.def.name.clone();
        let event = json!({
            "message_id": msg.id(),
            "event_type": msg.event_type(),
            "payload": msg.payload(),
        });
        let driven = shared
            .drive(&bus, &id, None, Some(msg.id()), |plan| {
                let Some(s) = plan.base() else { return Ok(()) };
                if s.saga_type != saga_type {
                    return Ok(());
                }
                match &s.pending {
                    Some(Pending::Step { index: i, .. }) if *i == index => {
                        plan.push(SagaEvent::StepCompleted {
                            step: index,
                            name: name.clone(),
                            output: event.clone(),
                            attempts: 1,
                        })
                    }
                    Some(Pending::Step { index: i, .. })
                        if *i < index
                            && s.status == SagaStatus::Running
                            && !s.deadline_exceeded
                            && s.steps
                                .get(index)
                                .is_some_and(|st| st.early_event.is_none()) =>
                    {
                        plan.push(SagaEvent::EventArrived {
                            step: index,
                            name: name.clone(),
                            event: event.clone(),
                        })
                    }
                    _ => Ok(()),
                }
            })
            .await;
        match driven {
            Ok(_) => Ok(()),
            // An event for a saga that is not there (yet, or in this store): nothing to do.
            Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(transient(e)),
        }
    }
}
