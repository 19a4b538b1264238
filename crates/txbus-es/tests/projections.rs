//! Projections: catch up, then live; the checkpoint commits with the read model (effectively
//! once, across restarts and competing runners); rebuild from zero; lag; external projections
//! at least once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;
use txbus_core::{Event, ExpectedVersion, KvWrite, On};
use txbus_es::projection::{read_checkpoint, Projector};
use txbus_es::{BoxError, EventStore, ExternalProjection, LogEvent, ReadModel, ReadModelTx};

use common::{close, count, dump, sqlite_bus, Counts};

/// A hang guard: no test asserts a duration, but none may wait for ever either.
async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn append_orders(store: &EventStore, from: u64, to: u64) {
    for n in from..to {
        store
            .transaction()
            .append(
                format!("order-{}", n % 3),
                ExpectedVersion::Any,
                [Event::new(
                    "order.item-added",
                    json!({"sku": format!("s{n}"), "qty": 2}),
                )],
            )
            .event(Event::new("audit.seen", json!({ "n": n })))
            .commit()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_the_start_then_follow_the_log_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    append_orders(&store, 0, 20).await;

    let handle = Projector::read_model("counts", Counts::new("rm/counts/"))
        .page_size(7)
        // Only a commit's announcement can wake it: the live part cannot pass by polling.
        .poll_interval(Duration::from_secs(3600))
        .start(&store)
        .await
        .unwrap();
    let head = guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(handle.checkpoint(), head);
    let bus = store.bus();
    assert_eq!(count(bus, "rm/counts/events").await, 40);
    assert_eq!(count(bus, "rm/counts/type/order.item-added").await, 20);
    assert_eq!(count(bus, "rm/counts/qty").await, 40);
    assert_eq!(count(bus, "rm/counts/stream/order-0").await, 7);
    assert_eq!(read_checkpoint(bus, "counts").await.unwrap(), head);

    // Live: a new commit wakes it, and the checkpoint watch announces the progress.
    let mut watch = handle.checkpoint_watch();
    watch.borrow_and_update();
    append_orders(&store, 20, 21).await;
    guard("the checkpoint watch", watch.changed())
        .await
        .unwrap();
    let head = store.head_position(0).await.unwrap();
    guard("the live commit", handle.wait_for(head))
        .await
        .unwrap();
    assert_eq!(*watch.borrow(), head);
    assert_eq!(count(bus, "rm/counts/events").await, 42);
    assert_eq!(handle.lag().await.unwrap(), 0);
    assert!(handle.last_error().is_none());
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_survives_a_restart_and_nothing_is_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("es.db");
    let before = {
        let bus = sqlite_bus(&db).await;
        let store = EventStore::new(bus.clone());
        append_orders(&store, 0, 10).await;
        let handle = Projector::read_model("counts", Counts::new("rm/counts/"))
            .page_size(3)
            .start(&store)
            .await
            .unwrap();
        let head = guard("catch-up", handle.catch_up()).await.unwrap();
        handle.stop().await.unwrap();
        assert_eq!(count(&bus, "rm/counts/events").await, 20);
        drop(store);
        close(bus).await;
        head
    };

    // Reopen the file: the checkpoint is where it was, and the events before it are not
    // projected again.
    let bus = sqlite_bus(&db).await;
    let store = EventStore::new(bus.clone());
    assert_eq!(read_checkpoint(&bus, "counts").await.unwrap(), before);
    append_orders(&store, 10, 13).await;
    let handle = Projector::read_model("counts", Counts::new("rm/counts/"))
        .page_size(3)
        .start(&store)
        .await
        .unwrap();
    // It starts from there (and may have moved on already).
    assert!(handle.checkpoint() >= before);
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(count(&bus, "rm/counts/events").await, 26);
    assert_eq!(count(&bus, "rm/counts/type/order.item-added").await, 13);
    assert_eq!(count(&bus, "rm/counts/qty").await, 26);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_of_one_read_model_still_apply_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    append_orders(&store, 0, 10).await;
    let a = Projector::read_model("shared", Counts::new("rm/shared/"))
        .page_size(2)
        .start(&store)
        .await
        .unwrap();
    let b = Projector::read_model("shared", Counts::new("rm/shared/"))
        .page_size(3)
        .start(&store)
        .await
        .unwrap();
    append_orders(&store, 10, 40).await;
    guard("a", a.catch_up()).await.unwrap();
    guard("b", b.catch_up()).await.unwrap();
    assert_eq!(count(store.bus(), "rm/shared/events").await, 80);
    assert_eq!(count(store.bus(), "rm/shared/qty").await, 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_clears_the_read_model_and_replays_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    append_orders(&store, 0, 12).await;
    let handle = Projector::read_model("rb", Counts::new("rm/rb/"))
        .page_size(5)
        .start(&store)
        .await
        .unwrap();
    guard("catch-up", handle.catch_up()).await.unwrap();
    let good = dump(store.bus(), "rm/rb/").await;
    assert_eq!(good["events"], b"24");

    // Damage the read model: a stray key and a wrong counter.
    store
        .bus()
        .kv_write(vec![
            KvWrite::put("rm/rb/stray", b"1".to_vec()),
            KvWrite::put("rm/rb/events", b"999".to_vec()),
        ])
        .await
        .unwrap();
    guard("rebuild", handle.rebuild()).await.unwrap();
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(dump(store.bus(), "rm/rb/").await, good);

    // Other keys are left alone.
    store
        .bus()
        .kv_write(vec![KvWrite::put("rm/other", b"x".to_vec())])
        .await
        .unwrap();
    guard("rebuild", handle.rebuild()).await.unwrap();
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(dump(store.bus(), "rm/rb/").await, good);
    assert!(store.bus().kv_get("rm/other").await.unwrap().is_some());
}

/// What a recorder saw: (position, index, event type).
type Seen = Arc<Mutex<Vec<(u64, u32, String)>>>;

/// Records what it is handed; fails its first `fail_first` calls; waits for a permit per
/// call.
struct Recorder {
    seen: Seen,
    calls: Arc<AtomicU32>,
    resets: Arc<AtomicU32>,
    fail_first: u32,
    gate: Option<Arc<Semaphore>>,
}

#[txbus_es::async_trait]
impl ExternalProjection for Recorder {
    fn filter(&self) -> On {
        On::event("order.*")
    }

    async fn handle(&self, events: &[LogEvent]) -> Result<(), BoxError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await?.forget();
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call <= self.fail_first {
            return Err(format!("failure {call} on purpose").into());
        }
        let mut seen = self.seen.lock().unwrap();
        seen.extend(
            events
                .iter()
                .map(|e| (e.position, e.index, e.event_type.clone())),
        );
        Ok(())
    }

    async fn reset(&self) -> Result<(), BoxError> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().clear();
        Ok(())
    }
}

fn recorder(fail_first: u32, gate: Option<Arc<Semaphore>>) -> (Recorder, Seen, Arc<AtomicU32>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let resets = Arc::new(AtomicU32::new(0));
    (
        Recorder {
            seen: Arc::clone(&seen),
            calls: Arc::new(AtomicU32::new(0)),
            resets: Arc::clone(&resets),
            fail_first,
            gate,
        },
        seen,
        resets,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_projection_gets_every_matching_event_in_order_despite_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    append_orders(&store, 0, 9).await;
    let (rec, seen, resets) = recorder(2, None);
    let handle = Projector::external("ext", rec)
        .page_size(4)
        .start(&store)
        .await
        .unwrap();
    guard("catch-up", handle.catch_up()).await.unwrap();
    append_orders(&store, 9, 12).await;
    guard("catch-up", handle.catch_up()).await.unwrap();
    {
        let seen = seen.lock().unwrap();
        // Only the filter's events (not audit.seen), each once, in log order.
        assert_eq!(seen.len(), 12);
        assert!(seen
            .iter()
            .all(|(_, i, t)| *i == 0 && t == "order.item-added"));
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    }
    assert!(handle.last_error().is_none());

    guard("rebuild", handle.rebuild()).await.unwrap();
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_is_the_head_minus_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // The lag is counted in commits: the log holds only the orders (no start-up record).
    let bus = txbus_core::Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(dir.path().join("es.db")).unwrap())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let store = EventStore::new(bus);
    append_orders(&store, 0, 5).await;
    let gate = Arc::new(Semaphore::new(0));
    let (rec, seen, _) = recorder(0, Some(Arc::clone(&gate)));
    let handle = Projector::external("lagging", rec)
        .page_size(1)
        .start(&store)
        .await
        .unwrap();
    // Held at its first page: nothing projected, five commits behind.
    assert_eq!(handle.checkpoint(), 0);
    assert_eq!(handle.lag().await.unwrap(), 5);
    gate.add_permits(2);
    guard("two pages", handle.wait_for(2)).await.unwrap();
    assert_eq!(handle.lag().await.unwrap(), 3);
    // The runner measured the lag after its full pages too.
    assert!(handle.last_lag() >= 3);
    gate.add_permits(3);
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(handle.lag().await.unwrap(), 0);
    assert_eq!(seen.lock().unwrap().len(), 5);
}

/// Writes outside its prefix.
struct Trespasser;

#[txbus_es::async_trait]
impl ReadModel for Trespasser {
    fn prefix(&self) -> &str {
        "rm/mine/"
    }
    async fn apply(&self, _: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        tx.put("rm/mine/ok", b"1".to_vec())?;
        tx.put("rm/theirs/x", b"1".to_vec())?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_page_is_retried_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    append_orders(&store, 0, 3).await;
    let handle = Projector::read_model("trespasser", Trespasser)
        .start(&store)
        .await
        .unwrap();
    let error = guard("the error", async {
        loop {
            if let Some(e) = handle.last_error() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(error.contains("outside its prefix"), "{error}");
    // Other processes see it too: the runner records it beside its checkpoint.
    let recorded = guard("the recorded error", async {
        loop {
            if let Some(e) = store
                .bus()
                .kv_get("projection/trespasser/error")
                .await
                .unwrap()
            {
                break serde_json::from_slice::<txbus_core::inspect::RunnerError>(&e.value)
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        recorded.error.contains("outside its prefix"),
        "{recorded:?}"
    );
    assert_eq!(handle.checkpoint(), 0);
    assert!(dump(store.bus(), "rm/").await.is_empty());

    // A prefix that covers the checkpoints is refused at start.
    struct Greedy;
    #[txbus_es::async_trait]
    impl ReadModel for Greedy {
        fn prefix(&self) -> &str {
            "proj"
        }
        async fn apply(&self, _: &LogEvent, _: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let err = Projector::read_model("greedy", Greedy)
        .start(&store)
        .await
        .unwrap_err();
    assert!(matches!(err, txbus_es::Error::Config(_)), "{err:?}");
}
