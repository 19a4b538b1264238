//! Deliveries kept on their commit's row: one that succeeds on its first attempt never gets a
//! row of its own; a retry, a release or a crash gives it one, and it finishes there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use txbus_core::{Backoff, Bus, Event, HandlerError, Message, On};
use txbus_sqlite::SqliteStore;

/// Delivery rows in the file, by status (read beside the running bus).
fn rows(path: &Path) -> Vec<(i64, i64, i64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT status, attempts, COUNT(*) FROM deliveries GROUP BY status, attempts")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_success_writes_no_delivery_row_and_a_retry_writes_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.db");
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let calls = flaky_calls.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .handler("ok", On::event("ok"), |_m: Message| async { Ok(()) })
        .handler("audit", On::event("ok"), |_m: Message| async { Ok(()) })
        .handler("flaky", On::event("flaky"), move |m: Message| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if m.attempt() == 1 {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    for i in 0..20 {
        let op = bus.transact([Event::new("ok", json!(i))]).await.unwrap();
        assert!(op.outcome().await.unwrap().is_ok());
    }
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 40, "{stats:?}");
    assert!(
        rows(&path).is_empty(),
        "40 first-attempt successes wrote delivery rows: {:?}",
        rows(&path)
    );

    // A retry needs a row: it gets one, and the delivery finishes on it.
    let op = bus
        .transact([Event::new("flaky", json!({}))])
        .await
        .unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        rows(&path),
        vec![(2, 2, 1)],
        "one succeeded row, two attempts"
    );

    // The operation's tree shows every delivery, kept on the row or not.
    let detail = bus
        .inspect()
        .operation(op.id())
        .await
        .unwrap()
        .expect("the operation");
    let d = &detail.events[0].deliveries;
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].handler.as_str(), d[0].attempts), ("flaky", 2));
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 41, "{stats:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A bus that stops while deliveries it leased are still on their commit rows releases them
/// as rows; the next bus on the file runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_left_on_commit_rows_at_shutdown_run_on_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.db");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .handler("held", On::event("held"), move |_m: Message| {
            let g = g.clone();
            async move {
                let _p = g.acquire().await.map_err(HandlerError::transient)?;
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for i in 0..3 {
        ops.push(bus.publish(Event::new("held", json!(i))).await.unwrap());
    }
    let leased = bus.stats().await.unwrap().deliveries.leased;
    assert_eq!(leased, 3);
    assert!(rows(&path).is_empty(), "leased on their commit rows");
    // Shutdown cannot wait for them: their leases go back as pending rows.
    bus.shutdown(Duration::from_millis(100)).await.unwrap();
    drop(bus);
    assert_eq!(rows(&path), vec![(0, 0, 3)], "three pending rows");

    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .handler("held", On::event("held"), move |_m: Message| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    for op in ops {
        let outcome = tokio::time::timeout(Duration::from_secs(30), bus.wait(op))
            .await
            .expect("the operation finishes")
            .unwrap();
        assert!(outcome.is_ok());
    }
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    let d = bus.stats().await.unwrap().deliveries;
    assert_eq!((d.pending, d.leased, d.succeeded), (0, 0, 3));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
