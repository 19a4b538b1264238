//! Conformance cases for acknowledgements carried in the commit a handler makes
//! ([`crate::Commit::acknowledging`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use super::{builder, one_message_commit, within, Harness};
use crate::message::DeliveryContext;
use crate::store::{Completion, CompletionEffect, DeliveryResult};
use crate::{
    Bus, Commit, Conflict, Error, Event, HandlerError, Message, On, OperationId, Progress,
    StoredMessage,
};

/// The commit of a step: its result event, carrying the acknowledgement of the step's own
/// delivery.
async fn commit_step(bus: &OnceLock<Bus>, m: &Message) -> Result<(), HandlerError> {
    let bus = bus
        .get()
        .ok_or_else(|| HandlerError::transient("the bus is not built yet"))?;
    bus.commit_unwatched(
        Commit::new()
            .event(Event::new("step.done", json!({"of": m.payload()["n"]})))
            .acknowledging(m),
    )
    .await
    .map_err(HandlerError::transient)?;
    Ok(())
}

/// A handler's commit carries its delivery's acknowledgement: the operation succeeds with one
/// attempt, its progress shows the step's success before the outcome, the delivery is counted
/// once, and the bus does not acknowledge it again — not even when the handler fails after
/// its commit is durable. Acknowledging twice is refused as a lease conflict.
pub async fn a_handler_commit_carries_the_acknowledgement_of_its_delivery(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus_cell: Arc<OnceLock<Bus>> = Arc::new(OnceLock::new());
    let runs = Arc::new(AtomicU32::new(0));
    let twice = Arc::new(OnceLock::new());
    let (b1, b2, b3) = (bus_cell.clone(), bus_cell.clone(), bus_cell.clone());
    let (r1, r2) = (runs.clone(), runs.clone());
    let twice_seen = twice.clone();
    let bus = builder(store)
        .handler("step", On::event("step.requested"), move |m: Message| {
            let (bus, runs) = (b1.clone(), r1.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                commit_step(&bus, &m).await
            }
        })
        // Fails after its commit is durable: the acknowledgement stands, nothing is retried.
        .handler(
            "step-then-fail",
            On::event("step.flaky"),
            move |m: Message| {
                let (bus, runs) = (b2.clone(), r2.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    commit_step(&bus, &m).await?;
                    Err(HandlerError::transient("failed after committing"))
                }
            },
        )
        // Acknowledges twice: the second commit is refused and writes nothing.
        .handler("step-twice", On::event("step.twice"), move |m: Message| {
            let (bus, seen) = (b3.clone(), twice_seen.clone());
            async move {
                commit_step(&bus, &m).await?;
                let bus = bus.get().ok_or_else(|| HandlerError::transient("no bus"))?;
                let second = bus
                    .commit_unwatched(
                        Commit::new()
                            .event(Event::new("step.again", json!({})))
                            .acknowledging(&m),
                    )
                    .await;
                let _ = seen.set(second.map(|_| ()));
                Ok(())
            }
        })
        .handler("done", On::event("step.done"), |_m: Message| async {
            Ok(())
        })
        .max_retries(3)
        .build()
        .await
        .unwrap();
    assert!(bus_cell.set(bus.clone()).is_ok());

    let op = bus
        .transact([Event::new("step.requested", json!({"n": 1}))])
        .await
        .unwrap();
    let updates: Vec<Progress> = within(op.updates().collect()).await;
    let outcome = within(op.outcome()).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let step_succeeded = updates.iter().position(
        |p| matches!(p, Progress::Succeeded { handler, attempt: 1, .. } if handler == "step"),
    );
    let finished = updates
        .iter()
        .position(|p| matches!(p, Progress::Finished(_)));
    assert!(
        matches!((step_succeeded, finished), (Some(s), Some(f)) if s < f),
        "{updates:?}"
    );

    let flaky = bus
        .transact([Event::new("step.flaky", json!({"n": 2}))])
        .await
        .unwrap();
    assert!(within(flaky.outcome()).await.unwrap().is_ok());

    let op = bus
        .transact([Event::new("step.twice", json!({"n": 3}))])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    let second = within(async {
        loop {
            if let Some(r) = twice.get() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        matches!(second, Err(Error::Conflict(Conflict::Lease { .. }))),
        "{second:?}"
    );

    // Every step ran once, and each delivery was counted once: three steps, three results.
    within(async {
        loop {
            let d = bus.stats().await.unwrap().deliveries;
            if d.pending + d.leased == 0 && d.succeeded == 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let log = bus.read_log(0, 100).await.unwrap();
    let again = log
        .iter()
        .flat_map(|c| &c.messages)
        .filter(|m| m.event_type == "step.again")
        .count();
    assert_eq!(again, 0, "the refused commit wrote nothing");
    let counts = bus.inspect().handler_counts().await.unwrap();
    for name in ["step", "step-then-fail", "step-twice"] {
        let c = counts.iter().find(|c| c.handler == name).unwrap();
        assert_eq!((c.succeeded, c.retried), (1, 0), "{name}: {c:?}");
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// At the store: a commit acknowledging a delivery whose lease moved on (taken over with a
/// higher fence, or finished) is refused and writes nothing; with the current fence it lands
/// with the acknowledgement applied and the operation finished in the same append.
pub async fn an_acknowledgement_whose_lease_moved_on_refuses_its_commit(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let handlers = vec!["h".to_owned()];
    let first = one_message_commit(1, Some(a));
    let operation = first.operation_id;
    let receipt = store.append(first).await.unwrap();
    let id = receipt.delivery_ids[0];
    // A stops; B takes the delivery over with fence 2.
    store.release(a).await.unwrap();
    store.heartbeat(b).await.unwrap();
    let taken = store
        .claim(b, &handlers, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].fence, 2);
    let ack = |fence| Completion {
        delivery_id: id,
        fence,
        commit_id: receipt.commit_id,
        attempts: 1,
        handler: "h".into(),
        result: DeliveryResult::Succeeded,
    };
    let with_ack = |n, fence| {
        let mut c = one_message_commit(n, None);
        c.deliveries.clear();
        c.acks = vec![ack(fence)];
        c
    };
    // Commits in the store, sealed into the log or not yet.
    let commits = || async { store.stats().await.unwrap().commits };
    let before = commits().await;
    match store.append(with_ack(2, 1)).await {
        Err(crate::store::Error::Conflict(Conflict::Lease { delivery_id })) => {
            assert_eq!(delivery_id, id)
        }
        other => panic!("a stale acknowledgement must refuse its commit: {other:?}"),
    }
    assert_eq!(commits().await, before, "nothing was written");
    assert_eq!(store.stats().await.unwrap().deliveries.leased, 1);

    let landed = store.append(with_ack(3, 2)).await.unwrap();
    match landed.acked.as_slice() {
        [CompletionEffect::Applied(Some(outcome))] => {
            assert!(outcome.is_ok());
            assert_eq!(outcome.operation_id, operation);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        store.operation(operation).await.unwrap(),
        Some(crate::OperationState::Finished(o)) if o.is_ok()
    ));
    // Acknowledged: a second commit carrying it is refused too.
    let before = commits().await;
    assert!(matches!(
        store.append(with_ack(4, 2)).await,
        Err(crate::store::Error::Conflict(Conflict::Lease { .. }))
    ));
    assert_eq!(commits().await, before);
    let d = store.stats().await.unwrap().deliveries;
    assert_eq!((d.leased, d.pending, d.succeeded), (0, 0, 1));
    store.close().await.unwrap();
}

/// Only a message a bus delivered can be acknowledged, and only through a bus: one built by
/// hand, or a commit prepared for the caller's own transaction, is refused before anything is
/// written.
pub async fn acknowledging_refuses_messages_no_bus_delivered(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    let data = Arc::new(StoredMessage {
        id: crate::MessageId::new(),
        event_type: "step.requested".into(),
        module: None,
        payload_json: "{}".into(),
        payload: json!({}),
        headers: Default::default(),
        headers_json: "{}".into(),
    });
    let by_hand = Message::new(
        data,
        DeliveryContext {
            operation_id: OperationId::new(),
            commit_id: 1,
            index: 0,
            handler: Arc::from("step"),
            attempt: 1,
            delivery_id: 1,
        },
    );
    let before = bus.stats().await.unwrap().commits;
    let commit = Commit::new()
        .event(Event::new("step.done", json!({})))
        .acknowledging(&by_hand);
    assert!(matches!(
        bus.commit(commit.clone()).await,
        Err(Error::InvalidCommit(_))
    ));
    assert!(matches!(bus.prepare(commit), Err(Error::InvalidCommit(_))));
    assert_eq!(bus.stats().await.unwrap().commits, before);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
