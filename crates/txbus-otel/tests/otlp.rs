//! The OTLP exporter against a real OTLP/HTTP receiver (an HTTP server in this test that
//! decodes the protobuf requests): one operation on a bus over SQLite exports its
//! `txbus.transact`, `txbus.commit` and `txbus.attempt` spans in one trace, linked parent to
//! child, and the trace context its message carries holds the exported ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use txbus_core::trace::{TraceParent, TRACEPARENT};
use txbus_core::{Bus, Event, Message, On};
use txbus_sqlite::SqliteStore;

use common::{flush_until, install, only, receiver, Received};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operation_exports_linked_spans_and_its_message_carries_their_ids() {
    let (addr, receiver) = receiver().await;
    let guard = install(addr, "otel-test");

    // What the handler saw: the attempt's own context and the message's traceparent header.
    let seen = Arc::new(Mutex::new(None::<(Option<TraceParent>, Option<String>)>));
    let seen_by_handler = Arc::clone(&seen);
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("otel.db")).unwrap())
        .handler("otel-handler", On::event("otel.ping"), move |m: Message| {
            let seen = Arc::clone(&seen_by_handler);
            async move {
                let header = m.headers().extra.get(TRACEPARENT).cloned();
                *seen.lock().unwrap() = Some((m.trace_parent(), header));
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    let op = bus
        .transact([Event::new("otel.ping", json!({ "n": 1 }))])
        .await
        .unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    let operation_id = op.id().to_string();
    // Every attempt span is closed once the bus has stopped.
    bus.shutdown(Duration::from_secs(10)).await.unwrap();

    // The batch exporter sends from its own thread: flush until the three spans are in.
    let of_op = |s: &Received, name: &str| {
        s.name == name && s.attr("operation_id") == Some(operation_id.as_str())
    };
    let spans = flush_until(&guard, &receiver, |spans| {
        ["txbus.transact", "txbus.commit", "txbus.attempt"]
            .iter()
            .all(|n| spans.iter().any(|s| of_op(s, n)))
    })
    .await;
    assert!(*receiver.requests.lock().unwrap() >= 1);
    let transact = only(&spans, "txbus.transact", |s| of_op(s, "txbus.transact"));
    let commit = only(&spans, "txbus.commit", |s| of_op(s, "txbus.commit"));
    let attempt = only(&spans, "txbus.attempt", |s| of_op(s, "txbus.attempt"));

    // One trace, linked transact → commit → attempt.
    assert_eq!(transact.parent_span_id, None, "{transact:?}");
    assert_eq!(commit.trace_id, transact.trace_id);
    assert_eq!(attempt.trace_id, transact.trace_id);
    assert_eq!(commit.parent_span_id, Some(transact.span_id));
    assert_eq!(attempt.parent_span_id, Some(commit.span_id));
    assert_ne!(commit.span_id, transact.span_id);
    assert_ne!(attempt.span_id, commit.span_id);
    for span in [transact, commit, attempt] {
        assert_eq!(span.service.as_deref(), Some("otel-test"), "{span:?}");
        // Log lines name the same ids as the exported spans.
        assert_eq!(
            span.attributes.get("trace_id"),
            Some(&format!("{:032x}", span.trace_id)),
            "{span:?}"
        );
        assert_eq!(
            span.attributes.get("span_id"),
            Some(&format!("{:016x}", span.span_id)),
            "{span:?}"
        );
    }
    assert_eq!(
        attempt.attributes.get("handler").map(String::as_str),
        Some("otel-handler")
    );
    assert_eq!(
        attempt.attributes.get("event_type").map(String::as_str),
        Some("otel.ping")
    );
    assert_eq!(
        attempt.attributes.get("outcome").map(String::as_str),
        Some("succeeded"),
        "{attempt:?}"
    );

    // The message carries the commit's context; the handler runs in the attempt's.
    let (attempt_context, header) = seen.lock().unwrap().clone().expect("handler ran");
    let header: TraceParent = header.expect("traceparent header").parse().unwrap();
    assert_eq!(header.trace_id, commit.trace_id);
    assert_eq!(header.span_id, commit.span_id);
    assert_eq!(header.flags & TraceParent::SAMPLED, TraceParent::SAMPLED);
    let attempt_context = attempt_context.expect("the attempt has a trace context");
    assert_eq!(attempt_context.trace_id, attempt.trace_id);
    assert_eq!(attempt_context.span_id, attempt.span_id);

    guard.shutdown().unwrap();
}

#[test]
fn settings_out_of_range_are_refused_with_what_to_change() {
    let Err(err) = txbus_otel::ExporterBuilder::default()
        .queue_size(0)
        .install::<tracing_subscriber::Registry>()
    else {
        panic!("a queue of 0 spans was accepted");
    };
    assert!(err.to_string().contains("queue size"), "{err}");
}
