//! The handlers of compensating transacts: the user's handlers, wrapped so that they register
//! their compensations, and the runner that calls the compensations.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::{json, Value};
use txbus_core::{Bus, Commit, Event, HandlerError, HandlerResult, KvWrite, Message};

use super::record::{self, CompensationFailure, Registered, RunRequest, RunState};
use super::{Compensation, Shared, MODULE, RESULT_EVENT};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type ActionFn =
    Arc<dyn Fn(Message) -> BoxFuture<Result<Option<Value>, HandlerError>> + Send + Sync>;
pub(crate) type CompensationFn =
    Arc<dyn Fn(Compensation) -> BoxFuture<Result<(), HandlerError>> + Send + Sync>;

/// A user handler that registers its compensation when it succeeds.
pub(crate) struct Registering {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
}

impl txbus_core::Handler for Registering {
    async fn handle(&self, msg: Message) -> HandlerResult {
        let shared = &self.shared;
        let bus = shared.bus().await;
        let op = msg.operation_id();
        // The operation failed and is being compensated: doing the work now would only add
        // something to undo.
        if bus
            .kv_get(&record::run_key(op))
            .await
            .map_err(HandlerError::transient)?
            .is_some()
        {
            tracing::debug!(handler = %msg.handler(), operation = %op, "operation already compensated; skipped");
            return Ok(());
        }
        let entry = &shared.entries[self.index];
        let Some(data) = (entry.action)(msg.clone()).await? else {
            return Ok(());
        };
        let context = msg.context();
        let registered = Registered {
            handler: entry.name.clone(),
            event_index: context.index,
            event_type: msg.event_type().to_owned(),
            message_id: msg.id(),
            data,
            seq: uuid::Uuid::now_v7().to_string(),
        };
        let value = serde_json::to_vec(&registered).map_err(HandlerError::transient)?;
        bus.kv_write(vec![KvWrite::put(
            record::record_key(op, &entry.name, context.index),
            value,
        )
        .ttl(shared.keep_for)])
            .await
            .map_err(HandlerError::transient)?;
        // Succeeded after its operation had failed (another handler was faster): a run of its
        // own undoes it.
        if bus
            .kv_get(&record::run_key(op))
            .await
            .map_err(HandlerError::transient)?
            .is_some()
        {
            shared
                .take_and_run(&bus, op)
                .await
                .map_err(HandlerError::transient)?;
        }
        Ok(())
    }
}

/// Calls the compensations of one run, newest success first, each once (done marks).
pub(crate) struct Runner {
    pub(crate) shared: Arc<Shared>,
}

impl Runner {
    async fn finish(
        &self,
        bus: &Bus,
        request: &RunRequest,
        compensated: Vec<Registered>,
        failed: Option<CompensationFailure>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let op = request.operation_id;
        let event = Event::new(
            RESULT_EVENT,
            json!({
                "operation_id": op,
                "compensated": compensated,
                "failed": failed,
            }),
        )
        .module(MODULE)
        .correlation_id(op.to_string())
        .causation_id(msg.id().to_string());
        let mut commit = Commit::new().event(event);
        if request.main {
            let state = RunState {
                records: request.records.clone(),
                finished: true,
                compensated,
                failed,
            };
            let value = serde_json::to_vec(&state).map_err(HandlerError::transient)?;
            commit = commit.kv(KvWrite::put(record::run_key(op), value).ttl(self.shared.keep_for));
        }
        bus.commit_unwatched(commit)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

impl txbus_core::Handler for Runner {
    async fn handle(&self, msg: Message) -> HandlerResult {
        let shared = &self.shared;
        let bus = shared.bus().await;
        let request: RunRequest = msg
            .decode()
            .map_err(|e| HandlerError::reject(format!("not a compensation run request: {e}")))?;
        let op = request.operation_id;
        let attempt = msg.attempt();
        let last = attempt > shared.retry.max_retries;
        let mut compensated = Vec::with_capacity(request.records.len());
        for registered in &request.records {
            let done = record::done_key(op, &registered.handler, registered.event_index);
            if bus
                .kv_get(&done)
                .await
                .map_err(HandlerError::transient)?
                .is_some()
            {
                compensated.push(registered.clone());
                continue;
            }
            let failure = match shared.compensation(&registered.handler) {
                None => Some((
                    format!(
                        "no compensation is installed for handler {:?}",
                        registered.handler
                    ),
                    true,
                )),
                Some(compensate) => {
                    let call = compensate(Compensation {
                        operation_id: op,
                        registered: registered.clone(),
                        attempt,
                    });
                    match tokio::time::timeout(
                        shared.retry.timeout,
                        AssertUnwindSafe(call).catch_unwind(),
                    )
                    .await
                    {
                        Ok(Ok(Ok(()))) => None,
                        Ok(Ok(Err(HandlerError::Reject(r)))) => Some((r, true)),
                        Ok(Ok(Err(HandlerError::Transient(r)))) => Some((r, false)),
                        Ok(Err(_)) => Some(("the compensation panicked".to_owned(), false)),
                        Err(_) => {
                            Some((format!("timed out after {:?}", shared.retry.timeout), false))
                        }
                    }
                }
            };
            match failure {
                None => {
                    bus.kv_write(vec![KvWrite::put(done, Vec::new()).ttl(shared.keep_for)])
                        .await
                        .map_err(HandlerError::transient)?;
                    tracing::debug!(operation = %op, handler = %registered.handler, "compensated");
                    compensated.push(registered.clone());
                }
                Some((reason, rejected)) => {
                    if rejected || last {
                        tracing::error!(operation = %op, handler = %registered.handler, %reason,
                            "compensation failed for good");
                        let failed = CompensationFailure {
                            handler: registered.handler.clone(),
                            event_index: registered.event_index,
                            error: reason.clone(),
                            attempts: attempt,
                        };
                        self.finish(&bus, &request, compensated, Some(failed), &msg)
                            .await?;
                        // A dead letter (replayable) when retries ran out; a rejection stays
                        // rejected.
                        return Err(if rejected {
                            HandlerError::reject(reason)
                        } else {
                            HandlerError::transient(reason)
                        });
                    }
                    return Err(HandlerError::transient(reason));
                }
            }
        }
        self.finish(&bus, &request, compensated, None, &msg).await
    }
}
