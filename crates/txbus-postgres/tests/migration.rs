//! A schema written by an earlier version (`fixtures/schema-v5.sql`, described in
//! `fixtures/README.md`) opens with the current one: the schema is migrated on connect and
//! nothing is lost — finished outcomes read back, the dead letter is listed and replayable, the
//! deliveries left leased by a process that is gone and the pending ones run, streams and keys
//! are where they were, and the chain still verifies. The same case as the SQLite store's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Connection, Executor};
use txbus_core::store::Store;
use txbus_core::{
    Bus, DeadLetterQuery, FailureKind, HandlerError, Message, On, OperationId, OperationState,
};

use common::{raw, wait_sealed, TestSchema};

const FIXTURE: &str = include_str!("fixtures/schema-v5.sql");

/// Loads the fixture into `schema` (the dump names its schema `txbus_fixture`).
async fn load_fixture(schema: &str) {
    let mut conn = raw().await;
    // Unprepared (simple protocol): the dump is many statements.
    conn.execute(FIXTURE.replace("txbus_fixture", schema).as_str())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// The operations of the fixture's commits whose first event has this type, in log order.
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

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_written_by_schema_version_5_migrates_and_loses_nothing() {
    let schema = TestSchema::new();
    load_fixture(&schema.name).await;

    let store: Arc<dyn Store> = Arc::new(common::open(&schema.name).await);
    assert!(store.describe().schema_version > 5);
    // What the old version wrote, read through the current one before any bus runs.
    let before = store.stats().await.unwrap();
    assert_eq!(before.commits, 16, "{before:?}");
    assert_eq!(before.messages, 16, "{before:?}");
    assert_eq!(before.deliveries.succeeded, 6, "{before:?}");
    assert_eq!(before.deliveries.rejected, 1, "{before:?}");
    assert_eq!(before.deliveries.dead, 1, "{before:?}");
    // The two leases of the process that exited wait to be taken over: five wait to run.
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
    // the sealer has linked it).
    wait_sealed(&*store, 17).await;
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
        let outcome = tokio::time::timeout(Duration::from_secs(30), bus.wait(*op))
            .await
            .expect("the operation finishes")
            .unwrap();
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
    eventually("the replayed dead letter to succeed", || async {
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

    // New work on the migrated schema takes new ids past every old one, and keeps a delivery
    // that succeeds on its first attempt on its commit's row.
    let op = bus
        .transact([txbus_core::Event::new(
            "order.placed",
            serde_json::json!({"n": 99}),
        )])
        .await
        .unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    assert_eq!(
        bus.stats().await.unwrap().deliveries.succeeded,
        13,
        "counted as succeeded"
    );
    let mut conn = raw().await;
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".deliveries",
        schema.name
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, 13, "the old rows, and none for the new delivery");
    conn.close().await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
