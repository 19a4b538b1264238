//! The conformance suite: every behaviour of the bus, run against a store. Every store crate
//! runs it (`txbus_core::conformance_tests!(MyHarness::new())` in a test file), so that every
//! feature behaves the same on every store.
//!
//! A [`Harness`] makes fresh, empty stores and reopens them (to test restarts). Each case is a
//! public async function; the macro turns each into a `#[tokio::test]`.
// A test suite reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{
    CommitKind, Completion, CompletionEffect, DeadLetterQuery, DeliveryResult, NewCommit,
    NewDelivery, Store,
};
use crate::{
    Backoff, Bus, BusBuilder, Error, Event, FailureKind, HandlerError, Keep, Message, On,
    OperationState, PolicyOverride, Progress, Retention, SchemaRegistry, StoredMessage, TypedEvent,
};

mod acks;
mod commits;
mod inspect;
mod migration;
mod streams;
pub use acks::*;
pub use commits::*;
pub use inspect::*;
pub use migration::*;
pub use streams::*;

/// Makes stores for the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A fresh, empty store, and a key to reopen it with.
    async fn create(&self) -> (String, Arc<dyn Store>);
    /// Opens the store of `key` again, after the previous handle was shut down.
    async fn reopen(&self, key: &str) -> Arc<dyn Store>;
    /// Removes what the harness created (called at the end of each passing case).
    async fn cleanup(&self) {}
}

/// A bound on how long a case may wait before it is declared hung; never a measurement.
const HANG: Duration = Duration::from_secs(60);

pub(crate) fn builder(store: Arc<dyn Store>) -> BusBuilder {
    Bus::builder()
        .shared_store(store)
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .poll_interval(Duration::from_millis(50))
}

pub(crate) async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the case hung")
}

pub async fn transact_succeeds_when_every_handler_succeeds(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let (s1, s2) = (seen.clone(), seen.clone());
    let bus = builder(store)
        .handler(
            "user-writer",
            On::event("user.created").module("user"),
            move |m: Message| {
                let s = s1.clone();
                async move {
                    assert_eq!(m.attempt(), 1);
                    assert_eq!(m.payload()["email"], "a@b.c");
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .handler("audit", On::in_module("audit"), move |_m: Message| {
            let s = s2.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([
            Event::new("user.created", json!({"user_id": 1, "email": "a@b.c"})).module("user"),
            Event::new("audit.user-created", json!({"user_id": 1})).module("audit"),
        ])
        .await
        .unwrap();
    let updates: Vec<Progress> = within(op.updates().collect()).await;
    let outcome = within(op.outcome()).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.operation_id, op.id());
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let succeeded: Vec<_> = updates
        .iter()
        .filter_map(|p| match p {
            Progress::Succeeded {
                event_index,
                handler,
                ..
            } => Some((*event_index, handler.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(succeeded.len(), 2, "{updates:?}");
    assert!(succeeded.contains(&(0, "user-writer".to_owned())));
    assert!(succeeded.contains(&(1, "audit".to_owned())));
    assert!(matches!(updates.last(), Some(Progress::Finished(o)) if o.is_ok()));
    // Readable by id too.
    match bus.outcome(op.id()).await.unwrap() {
        Some(OperationState::Finished(o)) => assert!(o.is_ok()),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(bus.wait(op.id()).await.unwrap(), outcome);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn a_commit_without_subscribers_succeeds_at_once(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    let op = bus
        .transact([Event::new("nobody.listens", json!({}))])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn a_reject_fails_the_operation_at_once_without_retry(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let bus = builder(store)
        .max_retries(5)
        .handler("ok", On::event("a"), |_m: Message| async { Ok(()) })
        .handler("picky", On::event("b"), move |_m: Message| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err(HandlerError::reject("e-mail taken"))
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new("a", json!(1)), Event::new("b", json!(2))])
        .await
        .unwrap();
    let outcome = within(op.outcome()).await.unwrap();
    let failure = outcome.error.expect("the operation must fail");
    assert_eq!(failure.event_index, 1);
    assert_eq!(failure.event_type, "b");
    assert_eq!(failure.handler, "picky");
    assert_eq!(failure.kind, FailureKind::Rejected);
    assert_eq!(failure.reason, "e-mail taken");
    assert_eq!(failure.attempts, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A rejection is not a dead letter.
    assert!(bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn transient_errors_are_retried_until_success(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store)
        .max_retries(3)
        .handler("flaky", On::event("x"), |m: Message| async move {
            if m.attempt() < 3 {
                Err(HandlerError::transient(format!(
                    "not yet ({})",
                    m.attempt()
                )))
            } else {
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus.transact([Event::new("x", json!({}))]).await.unwrap();
    let updates: Vec<Progress> = within(op.updates().collect()).await;
    let retries: Vec<u32> = updates
        .iter()
        .filter_map(|p| match p {
            Progress::Retrying { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(retries, vec![1, 2]);
    assert!(matches!(
        updates.iter().rev().nth(1),
        Some(Progress::Succeeded { attempt: 3, .. })
    ));
    assert!(within(op.outcome()).await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn exhausted_retries_make_a_dead_letter_that_can_be_replayed(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healed.clone();
    let bus = builder(store)
        .max_retries(2)
        .handler("fragile", On::event("job"), move |_m: Message| {
            let h = h.clone();
            async move {
                if h.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(std::io::Error::other("disk on fire").into())
                }
            }
        })
        .build()
        .await
        .unwrap();
    let id = bus
        .publish(Event::new("job", json!({"n": 7})))
        .await
        .unwrap();
    let outcome = within(bus.wait(id)).await.unwrap();
    let failure = outcome.error.unwrap();
    assert_eq!(failure.kind, FailureKind::RetriesExhausted);
    assert_eq!(failure.attempts, 3);
    assert!(failure.reason.contains("disk on fire"));

    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].handler, "fragile");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].message.payload, json!({"n": 7}));
    assert_eq!(dead[0].operation_id, id);

    healed.store(true, Ordering::SeqCst);
    bus.replay(dead[0].delivery_id).await.unwrap();
    within(async {
        loop {
            let s = bus.stats().await.unwrap();
            if s.deliveries.succeeded == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    // Replaying what is no longer a dead letter is a clear error.
    assert!(matches!(
        bus.replay(dead[0].delivery_id).await,
        Err(Error::UnknownDeadLetter(_))
    ));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn timeouts_and_panics_are_transient_and_contained(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store)
        .max_retries(1)
        .handler_with(
            "sleepy",
            On::event("slow"),
            PolicyOverride::default().timeout(Duration::from_millis(50)),
            |_m: Message| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            },
        )
        .handler("boom", On::event("panic"), |m: Message| async move {
            if m.attempt() == 1 {
                panic!("first attempt explodes");
            }
            Ok(())
        })
        .handler(
            "always-boom",
            On::event("panic-forever"),
            |_m: Message| async move {
                panic!("every attempt explodes");
            },
        )
        .build()
        .await
        .unwrap();
    let slow = bus.transact([Event::new("slow", json!({}))]).await.unwrap();
    let failure = within(slow.outcome()).await.unwrap().error.unwrap();
    assert_eq!(failure.kind, FailureKind::TimedOut);
    assert_eq!(failure.attempts, 2);

    let once = bus
        .transact([Event::new("panic", json!({}))])
        .await
        .unwrap();
    assert!(within(once.outcome()).await.unwrap().is_ok());

    let forever = bus
        .transact([Event::new("panic-forever", json!({}))])
        .await
        .unwrap();
    let failure = within(forever.outcome()).await.unwrap().error.unwrap();
    assert_eq!(failure.kind, FailureKind::Panicked);
    assert!(
        failure.reason.contains("every attempt explodes"),
        "{}",
        failure.reason
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn invalid_events_are_rejected_and_nothing_is_written(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let schemas = SchemaRegistry::new()
        .register(
            "user.created",
            json!({"type": "object", "required": ["email"], "properties": {"email": {"type": "string"}}}),
        )
        .unwrap();
    let bus = builder(store)
        .schemas(schemas)
        .max_payload_bytes(64)
        .handler("h", On::all(), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let err = bus
        .transact([
            Event::new("user.created", json!({"email": "a@b.c"})),
            Event::new("user.created", json!({"email": 5})),
        ])
        .await
        .unwrap_err();
    match &err {
        Error::InvalidEvent {
            index,
            event_type,
            reason,
        } => {
            assert_eq!(*index, 1);
            assert_eq!(event_type, "user.created");
            assert!(reason.contains("/email"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = bus
        .transact([Event::new("big", json!({"blob": "x".repeat(100)}))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit is 64"), "{err}");
    assert!(matches!(
        bus.transact(Vec::new()).await,
        Err(Error::NoEvents)
    ));
    // The log holds the bus's start-up record (a system commit) and nothing else.
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.commits, 1);
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.deliveries, Default::default());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn building_without_a_store_is_an_error(h: &dyn Harness) {
    let err = Bus::builder().build().await.unwrap_err();
    assert!(matches!(err, Error::NoStore), "{err:?}");
    let (_key, store) = h.create().await;
    let err = builder(store)
        .handler("same", On::all(), |_m: Message| async { Ok(()) })
        .handler("same", On::all(), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("registered twice"), "{err}");
}

pub async fn unfinished_work_resumes_after_a_restart_and_outcomes_survive_it(h: &dyn Harness) {
    let (key, store) = h.create().await;
    // First life: handlers paused, so the work is committed but not done.
    let bus = builder(store)
        .start_paused(true)
        .handler("h", On::event("e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new("e", json!(1)), Event::new("e", json!(2))])
        .await
        .unwrap();
    let id = op.id();
    drop(op);
    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.released, 2);

    // Second life: the same handler picks the work up; the outcome is readable by id.
    let bus = builder(h.reopen(&key).await)
        .handler("h", On::event("e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let outcome = within(bus.wait(id)).await.unwrap();
    assert!(outcome.is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // Third life: nothing to do, the outcome is still there.
    let bus = builder(h.reopen(&key).await).build().await.unwrap();
    assert!(
        matches!(bus.outcome(id).await.unwrap(), Some(OperationState::Finished(o)) if o.is_ok())
    );
    let unknown = crate::OperationId::new();
    assert!(bus.outcome(unknown).await.unwrap().is_none());
    assert!(matches!(
        bus.wait(unknown).await,
        Err(Error::UnknownOperation(_))
    ));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn shutdown_drains_within_its_deadline_and_leaves_the_rest_pending(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let bus = builder(store)
        .handler("quick", On::event("quick"), |_m: Message| async { Ok(()) })
        .handler("stuck", On::event("stuck"), move |_m: Message| {
            let s = s.clone();
            async move {
                s.notify_one();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let quick = bus
        .transact([Event::new("quick", json!({}))])
        .await
        .unwrap();
    assert!(within(quick.outcome()).await.unwrap().is_ok());
    let stuck = bus
        .transact([Event::new("stuck", json!({}))])
        .await
        .unwrap();
    within(started.notified()).await;
    let report = bus.shutdown(Duration::from_millis(100)).await.unwrap();
    assert!(!report.drained);
    assert_eq!(report.cancelled, 1);
    assert_eq!(report.released, 1);
    assert!(matches!(stuck.outcome().await, Err(Error::ShuttingDown)));
    // After shutdown nothing new is taken.
    assert!(matches!(
        bus.publish(Event::new("quick", json!({}))).await,
        Err(Error::ShuttingDown)
    ));

    // The next start runs the released delivery to its end.
    let bus = builder(h.reopen(&key).await)
        .handler("stuck", On::event("stuck"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    assert!(within(bus.wait(stuck.id())).await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn a_full_buffer_leaves_work_in_the_store_and_all_of_it_is_done(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let bus = builder(store)
        .buffer_capacity(4)
        .start_paused(true)
        .handler("count", On::event("n"), move |_m: Message| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(bus.publish(Event::new("n", json!(i))).await.unwrap());
    }
    assert!(bus.buffered() <= 4, "buffered {}", bus.buffered());
    let stats = bus.stats().await.unwrap();
    assert!(stats.deliveries.pending >= 196, "{stats:?}");
    bus.resume();
    for id in ids {
        assert!(within(bus.wait(id)).await.unwrap().is_ok());
    }
    assert_eq!(handled.load(Ordering::SeqCst), 200);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn handler_concurrency_is_limited(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let bus = builder(store)
        .handler_with(
            "two-at-a-time",
            On::event("w"),
            PolicyOverride::default().concurrency(2),
            move |_m: Message| {
                let (r, p) = (r.clone(), p.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for i in 0..20 {
        ops.push(bus.transact([Event::new("w", json!(i))]).await.unwrap());
    }
    for op in ops {
        assert!(within(op.outcome()).await.unwrap().is_ok());
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct OrderPlaced {
    order_id: u64,
    total_cents: u64,
}

impl TypedEvent for OrderPlaced {
    const EVENT_TYPE: &'static str = "order.placed";
    const MODULE: Option<&'static str> = Some("order");
}

pub async fn typed_events_and_handlers(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let bus = builder(store)
        .on::<OrderPlaced, _, _>("order-writer", move |e: OrderPlaced, m: Message| {
            let g = g.clone();
            async move {
                assert_eq!(m.module(), Some("order"));
                g.lock().unwrap().push(e.order_id);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::typed(&OrderPlaced {
            order_id: 9,
            total_cents: 100,
        })
        .correlation_id("req-1")])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    assert_eq!(*got.lock().unwrap(), vec![9]);
    // A payload that does not decode into the typed event is rejected, not retried.
    let bad = bus
        .transact([Event::new("order.placed", json!({"order_id": "nine"})).module("order")])
        .await
        .unwrap();
    let failure = within(bad.outcome()).await.unwrap().error.unwrap();
    assert_eq!(failure.kind, FailureKind::Rejected);
    assert!(
        failure.reason.contains("does not decode"),
        "{}",
        failure.reason
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn retention_bounds_finished_deliveries_and_outcomes(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let retention = Retention {
        succeeded: Keep::new(5, Duration::from_secs(3600)),
        failed: Keep::new(2, Duration::from_secs(3600)),
        outcomes: Keep::new(3, Duration::from_secs(3600)),
        interval: Duration::from_secs(3600),
    };
    let bus = builder(store)
        .retention(retention)
        .max_retries(0)
        .handler("ok", On::event("ok"), |_m: Message| async { Ok(()) })
        .handler("bad", On::event("bad"), |_m: Message| async {
            Err(HandlerError::transient("no"))
        })
        .build()
        .await
        .unwrap();
    let mut last = None;
    for i in 0..20 {
        let op = bus.transact([Event::new("ok", json!(i))]).await.unwrap();
        within(op.outcome()).await.unwrap();
        last = Some(op.id());
    }
    for i in 0..6 {
        let op = bus.transact([Event::new("bad", json!(i))]).await.unwrap();
        within(op.outcome()).await.unwrap();
    }
    let report = bus.prune().await.unwrap();
    assert_eq!(report.succeeded, 15);
    assert_eq!(report.failed, 4);
    // 26 operations and the bus's start-up record (a system commit, finished at once).
    assert_eq!(report.outcomes, 27 - 3);
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 5);
    assert_eq!(stats.deliveries.dead, 2);
    // 26 operations' commits and the bus's start-up record (a system commit).
    assert_eq!(stats.commits, 27, "the log itself is kept");
    // The outcome of an early operation is gone; the log still verifies.
    assert!(bus.outcome(last.unwrap()).await.unwrap().is_none());
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn work_finishing_behind_the_retention_bounds_is_pruned_as_it_finishes(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let retention = Retention {
        succeeded: Keep::new(2, Duration::from_secs(3600)),
        failed: Keep::new(10, Duration::from_secs(3600)),
        outcomes: Keep::new(2, Duration::from_secs(3600)),
        interval: Duration::from_secs(3600),
    };
    let bus = builder(store)
        .retention(retention)
        .handler("gated", On::event("gated"), move |_m: Message| {
            let g = g.clone();
            async move {
                let _permit = g.acquire().await.map_err(HandlerError::transient)?;
                Ok(())
            }
        })
        .handler("ok", On::event("ok"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    // The oldest operation is still running while newer ones finish and get pruned past it.
    let old = bus
        .transact([Event::new("gated", json!({}))])
        .await
        .unwrap();
    for i in 0..5 {
        let op = bus.transact([Event::new("ok", json!(i))]).await.unwrap();
        assert!(within(op.outcome()).await.unwrap().is_ok());
    }
    let report = bus.prune().await.unwrap();
    assert_eq!(report.succeeded, 3);
    // Three of the five, and the bus's start-up record (a system commit, the oldest outcome).
    assert_eq!(report.outcomes, 4);
    assert!(matches!(
        bus.outcome(old.id()).await.unwrap(),
        Some(OperationState::Pending { .. })
    ));

    gate.add_permits(1);
    // Its caller still gets the outcome; once pruned, the store keeps neither its delivery nor
    // its outcome (a store may drop them as they finish or on the next pass).
    assert!(within(old.outcome()).await.unwrap().is_ok());
    bus.prune().await.unwrap();
    assert!(bus.outcome(old.id()).await.unwrap().is_none());
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 2);
    assert_eq!(stats.deliveries.pending + stats.deliveries.leased, 0);
    assert_eq!(stats.pending_operations, 0);
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub async fn retention_by_age_removes_everything_older_than_the_bound(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let unlimited = u64::MAX;
    let retention = Retention {
        succeeded: Keep::new(unlimited, Duration::ZERO),
        failed: Keep::new(unlimited, Duration::ZERO),
        outcomes: Keep::new(unlimited, Duration::ZERO),
        interval: Duration::from_secs(3600),
    };
    let bus = builder(store)
        .retention(retention)
        .max_retries(0)
        .handler("ok", On::event("ok"), |_m: Message| async { Ok(()) })
        .handler("bad", On::event("bad"), |_m: Message| async {
            Err(HandlerError::reject("no"))
        })
        .build()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let op = bus
            .transact([Event::new("ok", json!(i)), Event::new("bad", json!(i))])
            .await
            .unwrap();
        within(op.outcome()).await.unwrap();
        ids.push(op.id());
    }
    // An operation is decided by its first failure: the success of its other delivery may
    // still be on its way to the store. Wait until every attempt is recorded.
    within(async {
        loop {
            let d = bus.stats().await.unwrap().deliveries;
            if d.succeeded == 4 && d.rejected == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Make sure the clock has moved past the last commit, so all of it is older than "now".
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = bus.prune().await.unwrap();
    assert_eq!(report.succeeded, 4);
    assert_eq!(report.failed, 4);
    // The four operations and the bus's start-up record (a system commit).
    assert_eq!(report.outcomes, 5);
    for id in ids {
        assert!(bus.outcome(id).await.unwrap().is_none());
    }
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.deliveries, Default::default());
    // The four commits and the bus's start-up record (a system commit): the log is kept.
    assert_eq!(stats.commits, 4 + 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

pub(crate) fn one_message_commit(n: u64, lease_to: Option<uuid::Uuid>) -> NewCommit {
    let payload = json!({"n": n});
    NewCommit {
        operation_id: crate::OperationId::new(),
        kind: CommitKind::Transact,
        created_at_ms: crate::engine::now_ms(),
        messages: vec![Arc::new(StoredMessage {
            id: crate::MessageId::new(),
            event_type: "thing.happened".into(),
            module: None,
            payload_json: payload.to_string(),
            payload,
            headers: Default::default(),
            headers_json: "{}".into(),
        })],
        deliveries: vec![NewDelivery {
            message_index: 0,
            handler: Arc::from("h"),
            leased: true,
        }],
        lease_to,
        streams: Vec::new(),
        kv: Vec::new(),
        acks: Vec::new(),
    }
}

/// A lease whose holder stopped sending heartbeats is taken over with a higher fence; the
/// old holder's late ack counts for nothing.
pub async fn a_late_ack_from_a_superseded_lease_counts_for_nothing(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let ttl = Duration::from_millis(50);
    store.heartbeat(a).await.unwrap();
    store.heartbeat(b).await.unwrap();
    let receipt = store.append(one_message_commit(1, Some(a))).await.unwrap();
    let id = receipt.delivery_ids[0];
    let handlers = vec!["h".to_owned()];
    // While A is alive, B cannot take its lease.
    assert!(store
        .claim(b, &handlers, 10, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    let taken = within(async {
        loop {
            store.heartbeat(b).await.unwrap();
            let got = store.claim(b, &handlers, 10, ttl).await.unwrap();
            if !got.is_empty() {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].id, id);
    assert_eq!(taken[0].fence, 2);
    assert_eq!(taken[0].message.payload, json!({"n": 1}));
    let ack = |fence| Completion {
        delivery_id: id,
        fence,
        commit_id: receipt.commit_id,
        attempts: 1,
        handler: "h".into(),
        result: DeliveryResult::Succeeded,
    };
    assert_eq!(
        store.complete(vec![ack(1)]).await.unwrap(),
        vec![CompletionEffect::Stale]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.deliveries.leased, 1);
    assert_eq!(stats.pending_operations, 1);
    match store.complete(vec![ack(2)]).await.unwrap().as_slice() {
        [CompletionEffect::Applied(Some(outcome))] => assert!(outcome.is_ok()),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        store.complete(vec![ack(2)]).await.unwrap(),
        vec![CompletionEffect::Stale]
    );
    store.close().await.unwrap();
}

/// The log reads back in order with intact hashes.
pub async fn the_log_reads_back_in_order_and_verifies(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let mut ops = Vec::new();
    for n in 1..=20 {
        let c = one_message_commit(n, None);
        ops.push(c.operation_id);
        store.append(c).await.unwrap();
    }
    let log = within(async {
        loop {
            let log = store.read_log(0, 100).await.unwrap();
            if log.len() == 20 {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let positions: Vec<u64> = log.iter().map(|c| c.position).collect();
    assert_eq!(positions, (1..=20).collect::<Vec<u64>>());
    let mut seen: Vec<_> = log.iter().map(|c| c.operation_id).collect();
    seen.sort();
    ops.sort();
    assert_eq!(seen, ops, "every commit exactly once");
    assert_eq!(store.read_log(15, 100).await.unwrap().len(), 5);
    let report = crate::chain::verify(store.as_ref()).await.unwrap();
    assert!(report.is_intact());
    assert_eq!(report.verified, 20);
    store.close().await.unwrap();
}

/// A delivery whose bus keeps stopping while holding it (a message that brings its process
/// down) is dead-lettered once the interruptions pass the bound, without running again.
pub async fn a_delivery_interrupted_too_often_is_dead_lettered_without_running(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let ttl = Duration::from_millis(50);
    let handlers = vec!["h".to_owned()];
    let first = uuid::Uuid::now_v7();
    store.heartbeat(first).await.unwrap();
    let commit = one_message_commit(1, Some(first));
    let operation = commit.operation_id;
    store.append(commit).await.unwrap();
    // Two more holders take it over in turn, each then stopping with the lease.
    for n in 1..=2u32 {
        let next = uuid::Uuid::now_v7();
        let taken = within(async {
            loop {
                store.heartbeat(next).await.unwrap();
                let got = store.claim(next, &handlers, 10, ttl).await.unwrap();
                if !got.is_empty() {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(taken[0].interruptions, n);
    }
    store.close().await.unwrap();

    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let bus = builder(h.reopen(&key).await)
        .lease_ttl(ttl)
        .max_interruptions(2)
        .handler("h", On::all(), move |_m: Message| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let failure = within(bus.wait(operation))
        .await
        .unwrap()
        .error
        .expect("it must fail");
    assert_eq!(failure.kind, FailureKind::Interrupted);
    assert_eq!(failure.handler, "h");
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "the handler must not run again"
    );
    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.contains("stopped 3 times"),
        "{}",
        dead[0].error
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Generates one `#[tokio::test]` per case of the suite, each with a harness made by `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn transact_succeeds_when_every_handler_succeeds() {
            let harness = $harness;
            $crate::conformance::transact_succeeds_when_every_handler_succeeds(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_commit_without_subscribers_succeeds_at_once() {
            let harness = $harness;
            $crate::conformance::a_commit_without_subscribers_succeeds_at_once(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_reject_fails_the_operation_at_once_without_retry() {
            let harness = $harness;
            $crate::conformance::a_reject_fails_the_operation_at_once_without_retry(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn transient_errors_are_retried_until_success() {
            let harness = $harness;
            $crate::conformance::transient_errors_are_retried_until_success(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn exhausted_retries_make_a_dead_letter_that_can_be_replayed() {
            let harness = $harness;
            $crate::conformance::exhausted_retries_make_a_dead_letter_that_can_be_replayed(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn timeouts_and_panics_are_transient_and_contained() {
            let harness = $harness;
            $crate::conformance::timeouts_and_panics_are_transient_and_contained(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn invalid_events_are_rejected_and_nothing_is_written() {
            let harness = $harness;
            $crate::conformance::invalid_events_are_rejected_and_nothing_is_written(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn building_without_a_store_is_an_error() {
            let harness = $harness;
            $crate::conformance::building_without_a_store_is_an_error(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn unfinished_work_resumes_after_a_restart_and_outcomes_survive_it() {
            let harness = $harness;
            $crate::conformance::unfinished_work_resumes_after_a_restart_and_outcomes_survive_it(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn shutdown_drains_within_its_deadline_and_leaves_the_rest_pending() {
            let harness = $harness;
            $crate::conformance::shutdown_drains_within_its_deadline_and_leaves_the_rest_pending(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_full_buffer_leaves_work_in_the_store_and_all_of_it_is_done() {
            let harness = $harness;
            $crate::conformance::a_full_buffer_leaves_work_in_the_store_and_all_of_it_is_done(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn handler_concurrency_is_limited() {
            let harness = $harness;
            $crate::conformance::handler_concurrency_is_limited(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn typed_events_and_handlers() {
            let harness = $harness;
            $crate::conformance::typed_events_and_handlers(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_bounds_finished_deliveries_and_outcomes() {
            let harness = $harness;
            $crate::conformance::retention_bounds_finished_deliveries_and_outcomes(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn work_finishing_behind_the_retention_bounds_is_pruned_as_it_finishes() {
            let harness = $harness;
            $crate::conformance::work_finishing_behind_the_retention_bounds_is_pruned_as_it_finishes(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retention_by_age_removes_everything_older_than_the_bound() {
            let harness = $harness;
            $crate::conformance::retention_by_age_removes_everything_older_than_the_bound(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_late_ack_from_a_superseded_lease_counts_for_nothing() {
            let harness = $harness;
            $crate::conformance::a_late_ack_from_a_superseded_lease_counts_for_nothing(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_delivery_interrupted_too_often_is_dead_lettered_without_running() {
            let harness = $harness;
            $crate::conformance::a_delivery_interrupted_too_often_is_dead_lettered_without_running(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_log_reads_back_in_order_and_verifies() {
            let harness = $harness;
            $crate::conformance::the_log_reads_back_in_order_and_verifies(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn streams_append_with_expected_versions_and_read_both_ways() {
            let harness = $harness;
            $crate::conformance::streams_append_with_expected_versions_and_read_both_ways(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn several_streams_commit_atomically_or_not_at_all() {
            let harness = $harness;
            $crate::conformance::several_streams_commit_atomically_or_not_at_all(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn stream_events_run_their_handlers_in_the_same_operation() {
            let harness = $harness;
            $crate::conformance::stream_events_run_their_handlers_in_the_same_operation(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_conflict_inside_a_group_commit_fails_only_its_own_commit() {
            let harness = $harness;
            $crate::conformance::a_conflict_inside_a_group_commit_fails_only_its_own_commit(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn key_value_compare_and_set_and_expiry() {
            let harness = $harness;
            $crate::conformance::key_value_compare_and_set_and_expiry(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn key_value_writes_commit_with_events_atomically() {
            let harness = $harness;
            $crate::conformance::key_value_writes_commit_with_events_atomically(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inspection_counts_deliveries_by_handler_and_minute() {
            let harness = $harness;
            $crate::conformance::inspection_counts_deliveries_by_handler_and_minute(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn operations_are_searched_and_shown_as_a_tree() {
            let harness = $harness;
            $crate::conformance::operations_are_searched_and_shown_as_a_tree(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn dead_letters_are_inspected_replayed_in_bulk_and_discarded() {
            let harness = $harness;
            $crate::conformance::dead_letters_are_inspected_replayed_in_bulk_and_discarded(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn streams_and_keys_survive_a_restart() {
            let harness = $harness;
            $crate::conformance::streams_and_keys_survive_a_restart(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn signed_commits_verify_and_old_keys_still_verify_after_a_rotation() {
            let harness = $harness;
            $crate::conformance::signed_commits_verify_and_old_keys_still_verify_after_a_rotation(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn commits_read_back_with_their_checksums_and_key_writes() {
            let harness = $harness;
            $crate::conformance::commits_read_back_with_their_checksums_and_key_writes(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn state_at_rebuilds_past_versions_and_diff_versions_lists_the_changes() {
            let harness = $harness;
            $crate::conformance::state_at_rebuilds_past_versions_and_diff_versions_lists_the_changes(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_whose_key_is_gone_is_dead_lettered_naming_the_key() {
            let harness = $harness;
            $crate::conformance::a_message_whose_key_is_gone_is_dead_lettered_naming_the_key(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn commits_read_from_the_log_append_and_diff() {
            let harness = $harness;
            $crate::conformance::commits_read_from_the_log_append_and_diff(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn past_scans_skip_absent_keys_and_streams_in_bounded_pages() {
            let harness = $harness;
            $crate::conformance::past_scans_skip_absent_keys_and_streams_in_bounded_pages(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn system_commits_record_start_and_shutdown_without_deliveries() {
            let harness = $harness;
            $crate::conformance::system_commits_record_start_and_shutdown_without_deliveries(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sessions_survive_restarts_and_rebase_reports_conflicts() {
            let harness = $harness;
            $crate::conformance::sessions_survive_restarts_and_rebase_reports_conflicts(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn batches_commit_bounded_chunks_and_resume_without_duplicates_or_gaps() {
            let harness = $harness;
            $crate::conformance::batches_commit_bounded_chunks_and_resume_without_duplicates_or_gaps(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_handler_commit_carries_the_acknowledgement_of_its_delivery() {
            let harness = $harness;
            $crate::conformance::a_handler_commit_carries_the_acknowledgement_of_its_delivery(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_acknowledgement_whose_lease_moved_on_refuses_its_commit() {
            let harness = $harness;
            $crate::conformance::an_acknowledgement_whose_lease_moved_on_refuses_its_commit(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn acknowledging_refuses_messages_no_bus_delivered() {
            let harness = $harness;
            $crate::conformance::acknowledging_refuses_messages_no_bus_delivered(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn encrypted_fields_are_stored_sealed_and_handed_to_handlers_plain() {
            let harness = $harness;
            $crate::conformance::encrypted_fields_are_stored_sealed_and_handed_to_handlers_plain(&harness).await;
            $crate::conformance::Harness::cleanup(&harness).await;
        }
    };
}
