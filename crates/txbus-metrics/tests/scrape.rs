//! `/metrics` over real HTTP after a known load on a real SQLite store: every count matches
//! what happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use txbus_core::{Backoff, Bus, Event, HandlerError, Message, On};
use txbus_sqlite::SqliteStore;

use common::{get, parse, value, Expected};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_what_happened() {
    let metrics = txbus_metrics::Metrics::builder().install().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flaky_seen = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = Arc::clone(&flaky_seen);
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("m.db")).unwrap())
        .max_retries(1)
        .backoff(Backoff::fixed(Duration::from_millis(10)))
        .handler("m-ok", On::event("m.ok"), |_m: Message| async { Ok(()) })
        // Fails the first attempt of every message, then succeeds.
        .handler("m-flaky", On::event("m.ok"), move |m: Message| {
            let seen = Arc::clone(&seen);
            async move {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(m.id().to_string()).or_insert(0);
                *n += 1;
                if *n == 1 {
                    Err(HandlerError::transient("first attempt fails"))
                } else {
                    Ok(())
                }
            }
        })
        .handler("m-rejecter", On::event("m.reject"), |_m: Message| async {
            Err(HandlerError::reject("no"))
        })
        .handler("m-dier", On::event("m.dead"), |_m: Message| async {
            Err(HandlerError::transient("always fails"))
        })
        .build()
        .await
        .unwrap();
    metrics.watch("test", &bus);

    let mut ops = Vec::new();
    for i in 0..20 {
        ops.push(
            bus.transact([Event::new("m.ok", json!({ "i": i }))])
                .await
                .unwrap(),
        );
    }
    for i in 0..3 {
        ops.push(
            bus.transact([Event::new("m.reject", json!({ "i": i }))])
                .await
                .unwrap(),
        );
    }
    for i in 0..2 {
        ops.push(
            bus.transact([Event::new("m.dead", json!({ "i": i }))])
                .await
                .unwrap(),
        );
    }
    for i in 0..5 {
        bus.publish(Event::new("m.unhandled", json!({ "i": i })))
            .await
            .unwrap();
    }
    let mut failed = 0;
    for op in ops {
        if !op.outcome().await.unwrap().is_ok() {
            failed += 1;
        }
    }
    assert_eq!(failed, 5);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = metrics.router();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let expected: Vec<Expected> = vec![
        ("txbus_commits_total", vec![("kind", "transact")], 25.0),
        ("txbus_commits_total", vec![("kind", "publish")], 5.0),
        (
            "txbus_commit_duration_seconds_count",
            vec![("kind", "transact")],
            25.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-ok"), ("outcome", "succeeded")],
            20.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-flaky"), ("outcome", "retried")],
            20.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-flaky"), ("outcome", "succeeded")],
            20.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-rejecter"), ("outcome", "rejected")],
            3.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-dier"), ("outcome", "retried")],
            2.0,
        ),
        (
            "txbus_deliveries_total",
            vec![("handler", "m-dier"), ("outcome", "dead")],
            2.0,
        ),
        ("txbus_deliveries_total", vec![("outcome", "stale")], 0.0),
        (
            "txbus_attempt_duration_seconds_count",
            vec![("handler", "m-flaky")],
            40.0,
        ),
        (
            "txbus_attempt_duration_seconds_count",
            vec![("handler", "m-dier")],
            4.0,
        ),
        (
            "txbus_operations_finished_total",
            vec![("result", "succeeded")],
            20.0,
        ),
        (
            "txbus_operations_finished_total",
            vec![("result", "failed")],
            5.0,
        ),
        (
            "txbus_deliveries",
            vec![("bus", "test"), ("state", "dead")],
            2.0,
        ),
        (
            "txbus_deliveries",
            vec![("bus", "test"), ("state", "rejected")],
            3.0,
        ),
        (
            "txbus_deliveries",
            vec![("bus", "test"), ("state", "succeeded")],
            40.0,
        ),
        (
            "txbus_deliveries",
            vec![("bus", "test"), ("state", "pending")],
            0.0,
        ),
        (
            "txbus_deliveries",
            vec![("bus", "test"), ("state", "leased")],
            0.0,
        ),
        ("txbus_dead_letters", vec![("bus", "test")], 2.0),
        ("txbus_log_commits", vec![("bus", "test")], 31.0), // 30 commits and the bus start (a system commit)
        ("txbus_pending_operations", vec![("bus", "test")], 0.0),
    ];
    // The last counters of an operation may be bumped a moment after its outcome is out:
    // scrape until they are all in, with a deadline for a stuck run.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (head, body) = loop {
        let (head, body) = get(addr, "/metrics").await;
        let samples = parse(&body);
        let all = expected
            .iter()
            .all(|(n, l, v)| value(&samples, n, l) == Some(*v));
        if all || Instant::now() > deadline {
            break (head, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    let samples = parse(&body);
    for (name, labels, want) in &expected {
        assert_eq!(
            value(&samples, name, labels),
            Some(*want),
            "{name} {labels:?} (None: no such series) in\n{body}"
        );
    }
    // Histograms are histograms (buckets), not summaries, and group commits were measured.
    assert!(
        body.contains("# TYPE txbus_attempt_duration_seconds histogram"),
        "{body}"
    );
    let groups = value(
        &samples,
        "txbus_group_commit_size_count",
        &[("store", "sqlite")],
    )
    .expect("group commit sizes are measured");
    assert!(groups >= 1.0, "{groups} group commits:\n{body}");
    let batched = value(
        &samples,
        "txbus_group_commit_size_sum",
        &[("store", "sqlite")],
    )
    .expect("group commit sizes are summed");
    // Every commit went through the writer in some group.
    assert!(
        batched >= 30.0,
        "group commits covered {batched} calls:\n{body}"
    );
    assert!(body.contains("# HELP txbus_deliveries_total"), "{body}");

    let (head, _) = get(addr, "/nothing").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
