//! Bad input to the bus API: every call gets a clear error naming what was wrong, nothing is
//! written (the log's length is read before and after), nothing hangs, nothing overflows the
//! stack. Counts are compared before and after each call rather than assumed, since a bus may
//! write commits of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use txbus::{
    Backoff, Bus, BusBuilder, Commit, Error, Event, FailureKind, HandlerError, Message, On,
    PolicyOverride, Retention, SqliteStore, Store,
};

/// A bound on how long a step may take before the test is declared hung; never a measurement.
const HANG: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        Self { _dir: dir, path }
    }

    fn builder(&self) -> BusBuilder {
        Bus::builder()
            .store(SqliteStore::open(&self.path).unwrap())
            .handler("h", On::event("t.ok"), |_m: Message| async { Ok(()) })
    }

    async fn bus(&self) -> Bus {
        self.builder().build().await.unwrap()
    }
}

/// (commits, messages) in the log of a running bus.
async fn log_len(bus: &Bus) -> (u64, u64) {
    let stats = bus.stats().await.unwrap();
    (stats.commits, stats.messages)
}

/// (commits, messages) of a store file nobody has open, read through the store itself.
async fn file_log_len(path: &Path) -> (u64, u64) {
    let store = SqliteStore::open(path).unwrap();
    let stats = store.stats().await.unwrap();
    store.close().await.unwrap();
    (stats.commits, stats.messages)
}

/// Runs `call` and checks that it failed and that the log did not change.
async fn refused<T: std::fmt::Debug>(
    bus: &Bus,
    what: &str,
    call: impl Future<Output = Result<T, Error>>,
) -> Error {
    let before = log_len(bus).await;
    let result = within(what, call).await;
    let after = log_len(bus).await;
    assert_eq!(before, after, "{what}: the log changed");
    match result {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        Err(e) => e,
    }
}

fn invalid_event(e: &Error) -> (usize, &str, &str) {
    match e {
        Error::InvalidEvent {
            index,
            event_type,
            reason,
        } => (*index, event_type.as_str(), reason.as_str()),
        other => panic!("expected InvalidEvent, got {other:?}"),
    }
}

fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_events_are_refused() {
    let f = Fixture::new();
    let bus = f.bus().await;
    let e = refused(&bus, "transact of nothing", bus.transact([])).await;
    assert!(matches!(e, Error::NoEvents), "{e:?}");
    assert!(e.to_string().contains("at least one event"), "{e}");
    let e = refused(&bus, "empty commit", bus.commit(Commit::new())).await;
    assert!(matches!(e, Error::NoEvents), "{e:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_commit_at_once_and_one_more_is_refused() {
    let f = Fixture::new();
    let bus = f.bus().await;
    let before = log_len(&bus).await;
    let events = (0..10_000).map(|i| Event::new("t.ok", json!({ "i": i })));
    let op = within("10 000 events", bus.transact(events)).await.unwrap();
    let outcome = within("their outcome", op.outcome()).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let after = log_len(&bus).await;
    assert_eq!(after.0, before.0 + 1, "one commit");
    assert_eq!(after.1, before.1 + 10_000, "with every message");

    let events = (0..10_001).map(|i| Event::new("t.ok", json!({ "i": i })));
    let e = refused(&bus, "10 001 events", bus.transact(events)).await;
    assert!(
        matches!(
            e,
            Error::TooManyEvents {
                count: 10_001,
                limit: 10_000
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("max_events_per_commit"), "{e}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_payload_is_refused_naming_the_event_and_the_limit() {
    let f = Fixture::new();
    let bus = f.bus().await;
    let big = "x".repeat(100 * 1024 * 1024);
    let events = [
        Event::new("t.ok", json!({"small": true})),
        Event::new("t.big", json!({ "blob": big })),
    ];
    drop(big);
    let e = refused(&bus, "a 100 MiB payload", bus.transact(events)).await;
    let (index, event_type, reason) = invalid_event(&e);
    assert_eq!((index, event_type), (1, "t.big"));
    assert!(reason.contains("limit is 1048576"), "{reason}");
    assert!(reason.contains("max_payload_bytes"), "{reason}");
    // A payload just under the limit is fine.
    let fits = "y".repeat(1024 * 1024 - 64);
    let op = bus
        .transact([Event::new("t.ok", json!({ "s": fits }))])
        .await
        .unwrap();
    assert!(within("outcome", op.outcome()).await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn json_nested_10000_deep_is_refused_without_overflowing_the_stack() {
    // A small stack, like a worker thread's: a recursive walk of 10 000 levels would not fit.
    let handle = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let f = Fixture::new();
                let bus = f.bus().await;
                let deep = nested(10_000);
                let e = refused(
                    &bus,
                    "a payload 10 000 deep",
                    bus.transact([Event::new("t.ok", deep)]),
                )
                .await;
                let (index, _, reason) = invalid_event(&e);
                assert_eq!(index, 0);
                assert!(reason.contains("nested"), "{reason}");
                // Deep headers cannot be built (they are strings), deep payloads up to the
                // limit commit and read back.
                let op = bus
                    .transact([Event::new("t.ok", nested(100))])
                    .await
                    .unwrap();
                assert!(within("outcome", op.outcome()).await.unwrap().is_ok());
                let log = bus.read_log(0, 10_000).await.unwrap();
                let last = log.last().unwrap();
                assert_eq!(last.messages[0].payload, nested(100));
                bus.shutdown(Duration::from_secs(5)).await.unwrap();
            });
        })
        .unwrap();
    handle.join().expect("the test thread failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_types_modules_and_headers_are_refused() {
    let f = Fixture::new();
    let bus = f.bus().await;
    let long = "a".repeat(256);
    let huge = "b".repeat(1024 * 1024);
    let cases: Vec<(Event, &str)> = vec![
        (Event::new("", json!({})), "empty"),
        (Event::new("user created", json!({})), "contains ' '"),
        (Event::new(" user.created", json!({})), "contains ' '"),
        (Event::new("user.created\n", json!({})), "contains '\\n'"),
        (Event::new("üser", json!({})), "contains 'ü'"),
        (
            Event::new(long.clone(), json!({})),
            "256 bytes; the limit is 255",
        ),
        (
            Event::new(huge.clone(), json!({})),
            "1048576 bytes; the limit is 255",
        ),
        (
            Event::new("t.ok", json!({})).module(""),
            "the module is empty",
        ),
        (Event::new("t.ok", json!({})).module("a b"), "the module"),
        (
            Event::new("t.ok", json!({})).module(long.clone()),
            "the module is 256 bytes",
        ),
        (
            Event::new("t.ok", json!({})).header("", "v"),
            "a header name is empty",
        ),
        (
            Event::new("t.ok", json!({})).header("a\tb", "v"),
            "contains '\\t'",
        ),
        (
            Event::new("t.ok", json!({})).header(long.clone(), "v"),
            "header name",
        ),
        (
            Event::new("t.ok", json!({})).header("k", huge.clone()),
            "the headers are",
        ),
    ];
    for (i, (event, expect)) in cases.into_iter().enumerate() {
        let event_type = event.event_type().to_owned();
        // The bad event comes second: the error must name it, not its neighbour.
        let events = [Event::new("t.ok", json!({"case": i})), event];
        let e = refused(&bus, &format!("case {i}"), bus.transact(events)).await;
        let (index, named, reason) = invalid_event(&e);
        assert_eq!(index, 1, "case {i}: {e}");
        assert_eq!(named, event_type, "case {i}");
        assert!(
            reason.contains(expect),
            "case {i}: {reason:?} lacks {expect:?}"
        );
    }
    // The same through publish.
    let e = refused(&bus, "publish", bus.publish(Event::new("a b", json!({})))).await;
    assert_eq!(invalid_event(&e).0, 0);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handler_configurations_fail_the_build_and_write_nothing() {
    let f = Fixture::new();
    // Create the store first, so that its log can be counted.
    f.bus()
        .await
        .shutdown(Duration::from_secs(5))
        .await
        .unwrap();
    let before = file_log_len(&f.path).await;
    let ok = |_m: Message| async { Ok(()) };
    type Make<'a> = Box<dyn Fn() -> BusBuilder + 'a>;
    let cases: Vec<(Make, &str)> = vec![
        (
            Box::new(|| f.builder().handler("h", On::event("x"), ok)),
            "handler name \"h\" is registered twice",
        ),
        (
            Box::new(|| f.builder().handler("", On::event("x"), ok)),
            "1 to 255 bytes",
        ),
        (
            Box::new(|| f.builder().handler("n".repeat(256), On::event("x"), ok)),
            "1 to 255 bytes",
        ),
        (
            Box::new(|| f.builder().handler_timeout(Duration::ZERO)),
            "timeout and concurrency must be above zero",
        ),
        (
            Box::new(|| {
                f.builder().handler_with(
                    "zero-timeout",
                    On::event("x"),
                    PolicyOverride::default().timeout(Duration::ZERO),
                    ok,
                )
            }),
            "\"zero-timeout\"",
        ),
        (
            Box::new(|| f.builder().handler_concurrency(0)),
            "concurrency must be above zero",
        ),
        (
            Box::new(|| f.builder().buffer_capacity(0)),
            "buffer_capacity",
        ),
        (
            Box::new(|| f.builder().max_concurrency(0)),
            "max_concurrency",
        ),
        (
            Box::new(|| f.builder().lease_ttl(Duration::ZERO)),
            "lease_ttl",
        ),
        (
            Box::new(|| f.builder().poll_interval(Duration::ZERO)),
            "poll_interval",
        ),
        (
            Box::new(|| {
                f.builder().retention(Retention {
                    interval: Duration::ZERO,
                    ..Retention::default()
                })
            }),
            "retention interval",
        ),
        (
            Box::new(|| f.builder().max_payload_bytes(0)),
            "max_payload_bytes",
        ),
        (
            Box::new(|| f.builder().max_events_per_commit(0)),
            "max_events_per_commit",
        ),
    ];
    for (i, (make, expect)) in cases.into_iter().enumerate() {
        let e = within("build", make().build()).await.unwrap_err();
        assert!(matches!(e, Error::Config(_)), "case {i}: {e:?}");
        assert!(
            e.to_string().contains(expect),
            "case {i}: {e} lacks {expect:?}"
        );
        // The failed build released the store file and wrote nothing.
        assert_eq!(file_log_len(&f.path).await, before, "case {i}");
    }
    let e = Bus::builder().build().await.unwrap_err();
    assert!(matches!(e, Error::NoStore), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_huge_timeouts_retries_and_backoffs_work_without_overflow() {
    let f = Fixture::new();
    let calls = Arc::new(AtomicU32::new(0));
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    let bus = Bus::builder()
        .store(SqliteStore::open(&f.path).unwrap())
        .handler_timeout(Duration::MAX)
        .lease_ttl(Duration::MAX)
        .max_retries(u32::MAX)
        .backoff(Backoff::none())
        // Fails twice, then succeeds: many retries allowed, three attempts used.
        .handler("flaky", On::event("t.flaky"), move |m: Message| {
            let calls = c1.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if m.attempt() < 3 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        })
        // No retry at all: one attempt, then dead.
        .handler_with(
            "once",
            On::event("t.once"),
            PolicyOverride::default().max_retries(0),
            move |_m: Message| {
                let calls = c2.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::transient("always"))
                }
            },
        )
        // A retry scheduled as far in the future as a duration goes.
        .handler_with(
            "far",
            On::event("t.far"),
            PolicyOverride::default()
                .max_retries(1)
                .backoff(Backoff::fixed(Duration::MAX))
                .timeout(Duration::from_secs(u64::MAX)),
            move |_m: Message| {
                let calls = c3.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::transient("later"))
                }
            },
        )
        .build()
        .await
        .unwrap();

    let op = bus
        .transact([Event::new("t.flaky", json!({}))])
        .await
        .unwrap();
    let outcome = within("flaky outcome", op.outcome()).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");

    let op = bus
        .transact([Event::new("t.once", json!({}))])
        .await
        .unwrap();
    let outcome = within("once outcome", op.outcome()).await.unwrap();
    let failure = outcome.error.expect("one attempt, then failed");
    assert_eq!(failure.attempts, 1);
    assert_eq!(failure.kind, FailureKind::RetriesExhausted);

    let op = bus
        .transact([Event::new("t.far", json!({}))])
        .await
        .unwrap();
    // The first attempt fails and its retry is due at the end of time: the operation waits.
    within("the first attempt of far", async {
        while calls.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(op.try_outcome().is_none());
    assert_eq!(bus.stats().await.unwrap().pending_operations, 1);
    // Shutdown does not wait for it.
    let report = within("shutdown", bus.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(report.drained, "{report:?}");
    let e = within("outcome after shutdown", op.outcome())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_shutdown_fail_clearly_and_write_nothing() {
    let f = Fixture::new();
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&f.path).unwrap())
        .handler("slow", On::event("t.slow"), move |_m: Message| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let pending = bus
        .transact([Event::new("t.slow", json!({}))])
        .await
        .unwrap();
    let pending_id = pending.id();
    within("the slow handler to start", async {
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let report = within("shutdown", bus.shutdown(Duration::from_millis(100)))
        .await
        .unwrap();
    assert_eq!(report.cancelled, 1, "{report:?}");
    let before = file_log_len(&f.path).await;

    let e = within("transact", bus.transact([Event::new("t.ok", json!({}))]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    let e = within("publish", bus.publish(Event::new("t.ok", json!({}))))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    let e = within(
        "commit",
        bus.commit_unwatched(Commit::new().event(Event::new("t.ok", json!({})))),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    let e = within(
        "kv write",
        bus.kv_write(vec![txbus::KvWrite::put("k", b"v".to_vec())]),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    let e = within("replay", bus.replay(1)).await.unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    // Waiting for an operation cannot hang once the bus is down, whether it was watched
    // before the shutdown or not.
    let e = within("outcome", pending.outcome()).await.unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    let e = within("wait by id", bus.wait(pending_id))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ShuttingDown), "{e:?}");
    // A second shutdown is harmless.
    within("second shutdown", bus.shutdown(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(file_log_len(&f.path).await, before, "nothing was written");

    // The cancelled operation resumes on the next start; a second bus on the same file while
    // one holds it is refused by name.
    let store = SqliteStore::open(&f.path).unwrap();
    let e = SqliteStore::open(&f.path).err().expect("a second open");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    drop(store);
}
