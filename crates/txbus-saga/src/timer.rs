//! The timer loop: fires saga deadlines and waiting steps' timeouts.
//!
//! Timers are keys (`saga/timer/<due>/<saga>/<what>`) written in the same commit as the change
//! that sets them and deleted by the change that makes them moot, so they survive restarts.
//! Every runtime runs this loop; two processes firing the same timer cannot both apply it (the
//! saga's stream version decides).

use std::sync::Arc;
use std::time::Duration;

use txbus_core::{Bus, KvExpect, KvWrite};

use crate::error::Error;
use crate::keys::{self, TimerKind};
use crate::record::SagaEvent;
use crate::shared::{Driven, Shared};
use crate::state::{Pending, SagaStatus};
use crate::step::StepKind;

/// Runs until the bus stops taking work.
pub(crate) async fn run(shared: Arc<Shared>, bus: Bus) {
    loop {
        let next_due = match fire_due(&shared, &bus).await {
            Ok(next) => next,
            Err(Error::Bus(txbus_core::Error::ShuttingDown)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "saga timers: scan failed; retrying");
                None
            }
        };
        let mut sleep = shared.options.timer_poll;
        if let Some(due) = next_due {
            let wait = due.saturating_sub(txbus_core::time::now_ms()).max(1);
            sleep = sleep.min(Duration::from_millis(u64::try_from(wait).unwrap_or(1)));
        }
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = shared.timer_wake.notified() => {}
        }
    }
}

/// Fires every timer that is due; returns when the next one is due, if known.
async fn fire_due(shared: &Shared, bus: &Bus) -> Result<Option<i64>, Error> {
    let mut after: Option<String> = None;
    loop {
        let batch = bus
            .kv_scan(
                keys::timer_prefix(),
                after.as_deref(),
                shared.options.timer_batch,
            )
            .await?;
        let full = batch.len() == shared.options.timer_batch;
        for entry in &batch {
            let Some((due, id, kind)) = keys::parse_timer(&entry.key) else {
                continue;
            };
            let now = txbus_core::time::now_ms();
            if due > now {
                return Ok(Some(due));
            }
            let fired = fire(shared, bus, &id, kind, now).await;
            match fired {
                Ok(true) => {}
                // Moot (the saga moved on, or is gone): drop the key if it is still this one.
                Ok(false) | Err(Error::NotFound(_)) => {
                    let _ = bus
                        .kv_write(vec![KvWrite::delete(entry.key.clone())
                            .expect(KvExpect::Version(entry.version))])
                        .await;
                }
                Err(e @ Error::Bus(txbus_core::Error::ShuttingDown)) => return Err(e),
                Err(e) => {
                    tracing::warn!(saga = %id, error = %e, "saga timer could not fire; retrying later")
                }
            }
        }
        if !full {
            return Ok(None);
        }
        after = batch.last().map(|e| e.key.clone());
    }
}

/// Applies one due timer. `Ok(false)` when it no longer applies.
async fn fire(
    shared: &Shared,
    bus: &Bus,
    id: &crate::id::SagaId,
    kind: TimerKind,
    now: i64,
) -> Result<bool, Error> {
    let driven = shared
        .drive(bus, id, None, None, |plan| {
            let Some(s) = plan.base() else { return Ok(()) };
            let waiting = match &s.pending {
                Some(Pending::Step {
                    index,
                    wait_until_ms: Some(until),
                    ..
                }) => Some((*index, *until)),
                _ => None,
            };
            let def = shared.def(&s.saga_type)?;
            match kind {
                TimerKind::Deadline => {
                    let Some(deadline) = s.deadline_ms else {
                        return Ok(());
                    };
                    if s.status != SagaStatus::Running || s.deadline_exceeded || deadline > now {
                        return Ok(());
                    }
                    plan.push(SagaEvent::DeadlineExceeded {
                        deadline_ms: deadline,
                    })?;
                    // A waiting step fails now; an action already running finishes first.
                    if let Some((index, _)) = waiting {
                        let name = s_name(def, index);
                        plan.push(SagaEvent::StepFailed {
                            step: index,
                            name,
                            error: "the saga's deadline passed while waiting".into(),
                            attempts: 1,
                        })?;
                    }
                    Ok(())
                }
                TimerKind::Wait(step) => {
                    let Some((index, until)) = waiting else {
                        return Ok(());
                    };
                    if index != step || until > now {
                        return Ok(());
                    }
                    let waited_for = match def.steps.get(index).map(|s| &s.kind) {
                        Some(StepKind::Wait {
                            event_type,
                            timeout,
                        }) => {
                            format!("no {event_type} event arrived within {timeout:?}")
                        }
                        _ => "the wait timed out".into(),
                    };
                    plan.push(SagaEvent::StepFailed {
                        step: index,
                        name: s_name(def, index),
                        error: waited_for,
                        attempts: 1,
                    })
                }
            }
        })
        .await?;
    Ok(matches!(driven, Driven::Committed))
}

fn s_name(def: &crate::definition::Saga, index: usize) -> String {
    def.steps
        .get(index)
        .map_or_else(|| format!("step-{index}"), |s| s.name.clone())
}
