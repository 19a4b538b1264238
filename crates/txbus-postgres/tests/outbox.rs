//! The transactional outbox: a service writes its business row and txbus events in its own
//! transaction; both commit or roll back together, and handlers in another process run the
//! events after the commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::{Executor, PgPool};
use tokio::sync::mpsc;
use txbus_core::store::{CommitRecord, Error as StoreError};
use txbus_core::{
    Bus, Commit, Conflict, Event, ExpectedVersion, KvWrite, Message, On, OperationId,
    OperationState,
};
use txbus_postgres::PostgresStore;

use common::{open, url, TestSchema};

/// Generous bound for steps that take milliseconds; never a measurement.
const HANG: Duration = Duration::from_secs(30);

/// Longer than [`HANG`]: a worker built with it runs new work only when a notification wakes
/// it, so a test that waits for its handler shows that the notification went out.
const NO_POLL: Duration = Duration::from_secs(600);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the step hung")
}

/// The service's own database access, and its business table in the test schema.
async fn service_pool(schema: &str) -> PgPool {
    let pool = PgPool::connect(&url()).await.unwrap();
    pool.execute(
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL)"
        )
        .as_str(),
    )
    .await
    .unwrap();
    pool
}

async fn order_count(pool: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".orders"))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn insert_order(conn: &mut sqlx::PgConnection, schema: &str, id: i64) {
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".orders (id, total) VALUES ($1, 1999)"
    ))
    .bind(id)
    .execute(conn)
    .await
    .unwrap();
}

/// A worker process: its own store on the schema, with a handler for `order.placed` that
/// reports each order id it sees.
async fn worker(schema: &str) -> (Bus, mpsc::UnboundedReceiver<i64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let bus = Bus::builder()
        .shared_store(Arc::new(open(schema).await))
        // These tests count the commits and rows the outbox writes: no start-up record.
        .system_commits(false)
        .poll_interval(NO_POLL)
        .handler("shipping", On::event("order.placed"), move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(m.payload()["id"].as_i64().unwrap()).unwrap();
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    (bus, rx)
}

/// The service process: a store it appends through, and a bus without handlers that
/// prepares commits (routing them to the worker's handlers).
async fn service(schema: &str) -> (PostgresStore, Bus) {
    let store = open(schema).await;
    let bus = Bus::builder()
        .shared_store(Arc::new(store.clone()))
        .system_commits(false)
        .build()
        .await
        .unwrap();
    (store, bus)
}

fn placed(id: i64) -> Event {
    Event::new("order.placed", json!({"id": id}))
}

async fn sealed_log(bus: &Bus, count: usize) -> Vec<CommitRecord> {
    within(async {
        loop {
            let log = bus.read_log(0, 100).await.unwrap();
            if log.len() >= count {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_in_the_callers_transaction_run_after_its_commit() {
    let schema = TestSchema::new();
    let (worker, mut seen) = worker(&schema.name).await;
    let (store, bus) = service(&schema.name).await;
    let pool = service_pool(&schema.name).await;

    let mut tx = pool.begin().await.unwrap();
    insert_order(&mut tx, &schema.name, 42).await;
    let commit = bus
        .prepare(
            Commit::new()
                .stream("order-42", ExpectedVersion::NoStream, [placed(42)])
                .kv(KvWrite::put("orders/42", b"placed".to_vec())),
        )
        .unwrap();
    let op = commit.operation_id;
    assert_eq!(commit.deliveries.len(), 1, "routed to the worker's handler");
    let receipt = store.append_in(&mut tx, commit).await.unwrap();
    assert!(receipt.finished.is_none());

    // Until the service commits, nobody else sees anything of it.
    assert!(bus.outcome(op).await.unwrap().is_none());
    assert_eq!(order_count(&pool, &schema.name).await, 0);
    assert_eq!(bus.stream_version("order-42").await.unwrap(), 0);
    assert!(bus.kv_get("orders/42").await.unwrap().is_none());

    tx.commit().await.unwrap();

    // The worker polls only every ten minutes: the notification sent by the service's commit
    // is what wakes it.
    assert_eq!(within(seen.recv()).await, Some(42));
    let outcome = within(bus.wait(op)).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    match bus.outcome(op).await.unwrap() {
        Some(OperationState::Finished(o)) => assert!(o.is_ok()),
        other => panic!("expected a finished operation, got {other:?}"),
    }
    assert_eq!(order_count(&pool, &schema.name).await, 1);
    assert_eq!(bus.stream_version("order-42").await.unwrap(), 1);
    assert_eq!(
        bus.kv_get("orders/42").await.unwrap().unwrap().value,
        b"placed"
    );
    let log = sealed_log(&bus, 1).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].operation_id, op);
    assert_eq!(log[0].messages[0].event_type, "order.placed");
    assert!(bus.verify().await.unwrap().is_intact());

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_leaves_no_row_no_commit_and_no_delivery() {
    let schema = TestSchema::new();
    let (worker, mut seen) = worker(&schema.name).await;
    let (store, bus) = service(&schema.name).await;
    let pool = service_pool(&schema.name).await;

    let mut tx = pool.begin().await.unwrap();
    insert_order(&mut tx, &schema.name, 7).await;
    let commit = bus.prepare(Commit::new().event(placed(7))).unwrap();
    let rolled_back = commit.operation_id;
    store.append_in(&mut tx, commit).await.unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(order_count(&pool, &schema.name).await, 0);
    assert!(bus.outcome(rolled_back).await.unwrap().is_none());
    let stats = bus.stats().await.unwrap();
    assert_eq!(
        (stats.commits, stats.messages, stats.deliveries.pending),
        (0, 0, 0),
        "nothing of the rolled-back commit exists, so nothing of it can ever run"
    );

    // A commit made afterwards is the only one the worker ever sees.
    let mut tx = pool.begin().await.unwrap();
    insert_order(&mut tx, &schema.name, 8).await;
    let commit = bus.prepare(Commit::new().event(placed(8))).unwrap();
    let kept = commit.operation_id;
    store.append_in(&mut tx, commit).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(within(seen.recv()).await, Some(8));
    assert!(within(bus.wait(kept)).await.unwrap().is_ok());
    let log = sealed_log(&bus, 1).await;
    assert_eq!(
        log.iter().map(|c| c.operation_id).collect::<Vec<_>>(),
        vec![kept]
    );
    // The worker is done with everything there is: nothing else is waiting for it.
    let stats = bus.stats().await.unwrap();
    assert_eq!((stats.commits, stats.deliveries.pending), (1, 0));
    worker.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(seen.try_recv().is_err(), "the rolled-back order never ran");

    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_inside_the_callers_transaction_leaves_it_usable() {
    let schema = TestSchema::new();
    let (store, bus) = service(&schema.name).await;
    let pool = service_pool(&schema.name).await;
    bus.commit(Commit::new().stream("order-9", ExpectedVersion::NoStream, [placed(9)]))
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    insert_order(&mut tx, &schema.name, 9).await;
    let stale = bus
        .prepare(
            Commit::new()
                .stream("order-9", ExpectedVersion::NoStream, [placed(9)])
                .kv(KvWrite::put("orders/9", b"x".to_vec())),
        )
        .unwrap();
    let stale_op = stale.operation_id;
    let err = store.append_in(&mut tx, stale).await.unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Conflict(Conflict::Stream { stream, actual: 1, expected: ExpectedVersion::NoStream })
                if stream == "order-9"
        ),
        "{err:?}"
    );
    // The transaction is still usable: the service reads, then tries again with the version
    // it now knows, in the same transaction.
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".orders", schema.name))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the service's own row is still there");
    let retry = bus
        .prepare(Commit::new().stream("order-9", ExpectedVersion::Exact(1), [placed(9)]))
        .unwrap();
    let retry_op = retry.operation_id;
    store.append_in(&mut tx, retry).await.unwrap();
    // And it may still roll back: then the retry vanishes too.
    tx.rollback().await.unwrap();
    assert_eq!(order_count(&pool, &schema.name).await, 0);
    assert_eq!(bus.stream_version("order-9").await.unwrap(), 1);
    assert!(bus.outcome(stale_op).await.unwrap().is_none());
    assert!(bus.outcome(retry_op).await.unwrap().is_none());
    assert!(bus.kv_get("orders/9").await.unwrap().is_none());
    assert_eq!(bus.stats().await.unwrap().commits, 1);

    // The locks went with the rolled-back transaction: the stream takes appends again.
    bus.commit(Commit::new().stream("order-9", ExpectedVersion::Exact(1), [placed(9)]))
        .await
        .unwrap();
    assert_eq!(bus.stream_version("order-9").await.unwrap(), 2);

    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_handlers_is_finished_when_the_caller_commits() {
    let schema = TestSchema::new();
    let (store, bus) = service(&schema.name).await;
    let pool = service_pool(&schema.name).await;

    let mut tx = pool.begin().await.unwrap();
    let commit = bus
        .prepare(Commit::new().event(Event::new("audit.noted", json!({}))))
        .unwrap();
    let op: OperationId = commit.operation_id;
    let receipt = store.append_in(&mut tx, commit).await.unwrap();
    assert!(receipt.finished.is_some(), "nobody is subscribed");
    assert!(bus.outcome(op).await.unwrap().is_none());
    tx.commit().await.unwrap();
    assert!(within(bus.wait(op)).await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_in_refuses_a_connection_outside_a_transaction() {
    let schema = TestSchema::new();
    let (store, bus) = service(&schema.name).await;
    let pool = service_pool(&schema.name).await;
    let mut conn = pool.acquire().await.unwrap();
    let commit = bus.prepare(Commit::new().event(placed(1))).unwrap();
    let err = store.append_in(&mut conn, commit).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(bus.stats().await.unwrap().commits, 0);
    drop(conn);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
}
