//! The migration case every store runs on data its earlier version wrote.
//!
//! Each store keeps, in its `tests/fixtures/`, what its version 0.1.0 wrote at schema version 5
//! for the same two runs of a bus (described in that folder's README): five `order.placed`
//! operations that succeeded, one rejected (`order.bad`), one dead letter (`order.flaky`), one
//! commit appending to stream `order-1` with the key `snapshot/order-1` = `v1`, then five
//! `later.event` publishes left two leased by a process that exited and three pending. A store
//! test loads it, opens the store on it (which migrates it) and runs this case.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::within;
use crate::store::Store;
use crate::{
    Bus, DeadLetterQuery, Event, FailureKind, HandlerError, Message, On, OperationId,
    OperationState,
};

/// The operations of the log's commits whose first event has this type, in log order.
async fn operations_of(store: &dyn Store, event_type: &str) -> Vec<OperationId> {
    store
        .read_log(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| {
            c.messages
                .first()
                .is_some_and(|m| m.event_type == event_type)
        })
        .map(|c| c.operation_id)
        .collect()
}

/// Waits until `check` holds.
async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// On a store opened on the schema-5 fixture: what the earlier version wrote reads back, the
/// chain verifies, finished outcomes are as they were, the deliveries left leased by the
/// process that exited and the pending ones run, the dead letter is listed and replays to
/// success, streams and keys are where they were, and new work is counted beside the old.
/// Returns the bus, still running, for the store's own checks of its layout.
pub async fn a_store_written_at_schema_5_migrates_and_loses_nothing(store: Arc<dyn Store>) -> Bus {
    assert!(store.describe().schema_version > 5);
    let before = store.stats().await.unwrap();
    assert_eq!(before.commits, 16, "{before:?}");
    assert_eq!(before.messages, 16, "{before:?}");
    assert_eq!(before.deliveries.succeeded, 6, "{before:?}");
    assert_eq!(before.deliveries.rejected, 1, "{before:?}");
    assert_eq!(before.deliveries.dead, 1, "{before:?}");
    // The two leases of the process that exited are freed or wait to be taken over: five wait
    // to run.
    assert_eq!(
        before.deliveries.pending + before.deliveries.leased,
        5,
        "{before:?}"
    );
    assert_eq!(before.pending_operations, 5, "{before:?}");

    let ran = Arc::new(Mutex::new(Vec::new()));
    let later = Arc::clone(&ran);
    let bus = Bus::builder()
        .shared_store(Arc::clone(&store))
        .max_retries(0)
        .handler("ok", On::event("order.placed"), |_m: Message| async {
            Ok(())
        })
        .handler("fails", On::event("order.bad"), |_m: Message| async {
            Err(HandlerError::reject("bad order"))
        })
        // The service it needed is back: a replay of the dead letter succeeds.
        .handler("dead", On::event("order.flaky"), |_m: Message| async {
            Ok(())
        })
        .handler("later", On::event("later.event"), move |m: Message| {
            let ran = Arc::clone(&later);
            async move {
                ran.lock().unwrap().push(m.id());
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    // The chain the old version linked verifies, with the new start-up commit after it (once
    // a store that positions commits after they commit has done so).
    eventually(|| async { bus.head_position().await.unwrap() >= 17 }).await;
    let report = bus.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.verified, 17);

    // Finished outcomes read back as they were.
    let placed = operations_of(&*store, "order.placed").await;
    assert_eq!(placed.len(), 6, "five transacts and the stream append");
    for op in &placed {
        match bus.outcome(*op).await.unwrap() {
            Some(OperationState::Finished(outcome)) => assert!(outcome.is_ok(), "{outcome:?}"),
            other => panic!("operation {op}: {other:?}"),
        }
    }
    let bad = operations_of(&*store, "order.bad").await;
    match bus.outcome(bad[0]).await.unwrap() {
        Some(OperationState::Finished(outcome)) => {
            let failure = outcome.error.expect("the rejection");
            assert_eq!(failure.kind, FailureKind::Rejected);
            assert_eq!(failure.handler, "fails");
            assert_eq!(failure.reason, "bad order");
        }
        other => panic!("{other:?}"),
    }

    // The deliveries the old process left leased or pending all run, once each at least, and
    // their operations finish.
    let later_ops = operations_of(&*store, "later.event").await;
    assert_eq!(later_ops.len(), 5);
    for op in &later_ops {
        let outcome = within(bus.wait(*op)).await.unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let distinct: HashSet<_> = ran.lock().unwrap().iter().copied().collect();
    assert_eq!(distinct.len(), 5);

    // The dead letter is listed with its error, and a replay runs it to success.
    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..DeadLetterQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].handler, "dead");
    assert_eq!(dead[0].error, "flaky service down");
    assert_eq!(dead[0].message.event_type, "order.flaky");
    bus.replay(dead[0].delivery_id).await.unwrap();
    eventually(|| async {
        let d = bus.stats().await.unwrap().deliveries;
        d.dead == 0 && d.pending == 0 && d.leased == 0
    })
    .await;

    // Streams and keys are where the old version left them.
    assert_eq!(bus.stream_version("order-1").await.unwrap(), 1);
    let snapshot = bus
        .kv_get("snapshot/order-1")
        .await
        .unwrap()
        .expect("the key");
    assert_eq!(snapshot.value, b"v1");

    let after = bus.stats().await.unwrap();
    assert_eq!(after.pending_operations, 0, "{after:?}");
    assert_eq!(after.deliveries.rejected, 1, "{after:?}");
    // 6 before, the 5 that ran now, the replayed dead letter.
    assert_eq!(after.deliveries.succeeded, 12, "{after:?}");

    // New work on the migrated store is counted beside the old.
    let op = bus
        .transact([Event::new("order.placed", serde_json::json!({"n": 99}))])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    assert_eq!(bus.stats().await.unwrap().deliveries.succeeded, 13);
    bus
}
