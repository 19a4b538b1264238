//! Streams on PostgreSQL beyond the conformance suite: processes racing on one stream, a
//! version taken behind the store's locks, and events read before their commit is sealed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, Executor};
use txbus_core::store::Store;
use txbus_core::{Bus, Commit, Conflict, Direction, Error, Event, ExpectedVersion};

use common::{open, options_named, raw, TestSchema};

/// Generous bound for steps that take milliseconds; never a measurement.
const HANG: Duration = Duration::from_secs(60);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the step hung")
}

async fn bus_on(store: impl Store) -> Bus {
    Bus::builder()
        .shared_store(Arc::new(store))
        // These tests count the commits and rows their appends write: no start-up record.
        .system_commits(false)
        .build()
        .await
        .unwrap()
}

/// Appends `count` events to `stream`, each with the exact version it read last, reading the
/// stream again after every conflict. Returns how many conflicts it met.
async fn append_exactly(bus: Bus, stream: &'static str, writer: u64, count: u64) -> u64 {
    let mut conflicts = 0;
    let mut version = bus.stream_version(stream).await.unwrap();
    let mut n = 0;
    while n < count {
        let event = Event::new("counter.bumped", json!({"writer": writer, "n": n}));
        let commit = Commit::new().stream(stream, ExpectedVersion::Exact(version), [event]);
        match bus.commit_unwatched(commit).await {
            Ok(_) => {
                version += 1;
                n += 1;
            }
            Err(Error::Conflict(Conflict::Stream {
                actual, expected, ..
            })) => {
                assert_eq!(expected, ExpectedVersion::Exact(version));
                assert!(
                    actual > version,
                    "a conflict names where the stream moved to"
                );
                conflicts += 1;
                version = bus.stream_version(stream).await.unwrap();
            }
            Err(e) => panic!("writer {writer}: {e}"),
        }
    }
    conflicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_racing_on_one_stream_take_every_version_once() {
    let schema = TestSchema::new();
    // Two stores: two pools, two sets of writer lanes, as two processes would have.
    let a = bus_on(open(&schema.name).await).await;
    let b = bus_on(open(&schema.name).await).await;
    let (ca, cb) = within(async {
        tokio::join!(
            tokio::spawn(append_exactly(a.clone(), "counter", 1, 50)),
            tokio::spawn(append_exactly(b.clone(), "counter", 2, 50)),
        )
    })
    .await;
    let conflicts = ca.unwrap() + cb.unwrap();

    assert_eq!(a.stream_version("counter").await.unwrap(), 100);
    let events = a
        .read_stream("counter", 1, Direction::Forward, 1000)
        .await
        .unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!(
        versions,
        (1..=100).collect::<Vec<u64>>(),
        "no gap, no duplicate"
    );
    let written: HashSet<(u64, u64)> = events
        .iter()
        .map(|e| {
            let p = &e.message.payload;
            (p["writer"].as_u64().unwrap(), p["n"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(written.len(), 100, "each append is in the stream once");
    // Conflicting appends wrote nothing: exactly the 100 that succeeded are in the log.
    assert_eq!(b.stats().await.unwrap().messages, 100);

    // What the table holds, counted by the database itself.
    let mut conn = raw().await;
    let (rows, distinct, max): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT version), max(version)
         FROM \"{}\".streams WHERE stream = 'counter'",
        schema.name
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((rows, distinct, max), (100, 100, 100));
    conn.close().await.unwrap();
    eprintln!("the two writers met {conflicts} conflicts");
    a.shutdown(Duration::from_secs(5)).await.unwrap();
    b.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_version_taken_behind_the_locks_reads_as_a_conflict() {
    let schema = TestSchema::new();
    let app = format!("streams_{}", schema.name);
    let store = options_named(&schema.name, &app).connect().await.unwrap();
    let bus = bus_on(store).await;

    // Another writer, one that does not take the store's locks, holds version 1 of the stream
    // in an open transaction.
    let mut other = raw().await;
    other.execute("BEGIN").await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO \"{}\".streams (stream, version, commit_id, idx) VALUES ('s', 1, 0, 0)",
        schema.name
    ))
    .execute(&mut other)
    .await
    .unwrap();

    // The store sees no version yet, so it appends at 1 and waits on the other's row.
    let appending = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.commit_unwatched(Commit::new().stream(
                "s",
                ExpectedVersion::NoStream,
                [Event::new("thing.happened", json!({}))],
            ))
            .await
        }
    });
    let mut watcher = raw().await;
    within(async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&app)
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    other.execute("COMMIT").await.unwrap();

    let err = within(appending).await.unwrap().unwrap_err();
    match err {
        Error::Conflict(Conflict::Stream {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, "s");
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, 1);
        }
        other => panic!("expected a stream conflict, got {other:?}"),
    }
    let stats = bus.stats().await.unwrap();
    assert_eq!(
        (stats.commits, stats.messages),
        (0, 0),
        "nothing was written"
    );
    watcher.close().await.unwrap();
    other.close().await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_are_read_before_their_commit_is_sealed() {
    let schema = TestSchema::new();
    let bus = bus_on(open(&schema.name).await).await;

    // Holding the chain head keeps the sealer from sealing anything.
    let mut holder = raw().await;
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(format!("SELECT 1 FROM \"{}\".chain_head FOR UPDATE", schema.name).as_str())
        .await
        .unwrap();

    bus.commit_unwatched(Commit::new().stream(
        "order-1",
        ExpectedVersion::NoStream,
        [
            Event::new("order.placed", json!({"n": 1})),
            Event::new("order.paid", json!({"n": 2})),
        ],
    ))
    .await
    .unwrap();
    assert!(
        bus.read_log(0, 10).await.unwrap().is_empty(),
        "the commit is not sealed yet"
    );
    let events = bus
        .read_stream("order-1", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.version, e.message.event_type.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "order.placed"), (2, "order.paid")]
    );
    assert_eq!(bus.stream_version("order-1").await.unwrap(), 2);

    holder.execute("COMMIT").await.unwrap();
    let log = within(async {
        loop {
            let log = bus.read_log(0, 10).await.unwrap();
            if !log.is_empty() {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(log[0].messages.len(), 2);
    assert_eq!(log[0].position, 1);
    holder.close().await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_refuse_what_postgres_text_cannot_hold_and_scans_stay_literal() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let err = store
        .kv_write(vec![txbus_core::KvWrite::put("a\0b", b"x".to_vec())])
        .await
        .unwrap_err();
    assert!(
        matches!(err, txbus_core::store::Error::Invalid(_)),
        "{err:?}"
    );
    assert!(store.kv_get("a\0b").await.unwrap().is_none());
    for k in ["a_b", "a%b", "axb", "a\\b", "ab"] {
        store
            .kv_write(vec![txbus_core::KvWrite::put(k, k.as_bytes().to_vec())])
            .await
            .unwrap();
    }
    let keys = |entries: Vec<txbus_core::KvEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.key).collect()
    };
    assert_eq!(keys(store.kv_scan("a_", None, 10).await.unwrap()), ["a_b"]);
    assert_eq!(keys(store.kv_scan("a%", None, 10).await.unwrap()), ["a%b"]);
    assert_eq!(
        keys(store.kv_scan("a\\", None, 10).await.unwrap()),
        ["a\\b"]
    );
    // Byte order, as every store lists keys.
    assert_eq!(
        keys(store.kv_scan("a", None, 10).await.unwrap()),
        ["a%b", "a\\b", "a_b", "ab", "axb"]
    );
    assert_eq!(
        keys(store.kv_scan("a", Some("a_b"), 10).await.unwrap()),
        ["ab", "axb"]
    );
    assert!(store.kv_scan("a\0", None, 10).await.unwrap().is_empty());
    store.close().await.unwrap();
}
