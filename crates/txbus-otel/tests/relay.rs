//! One trace across services: an operation committed on one bus, relayed through the real
//! Redis server and committed again by the inbox of another bus, exports spans that all share
//! the trace id and link parent to child — commit, relay, inbox, then the receiving bus's
//! transact, commit and attempt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use txbus_core::trace::TraceParent;
use txbus_core::{Bus, Event, Message, On, StoredMessage};
use txbus_redis::{RedisPublisher, RedisSource};
use txbus_relay::{Inbox, Relay};
use txbus_sqlite::SqliteStore;

use common::{flush_until, install, only, receiver, Received, HANG};

const REDIS: &str = "redis://127.0.0.1:6379";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_message_continues_the_trace_on_the_receiving_bus() {
    let (addr, receiver) = receiver().await;
    let guard = install(addr, "otel-relay-test");
    let stream = format!("txbus-otel-{:016x}", fastrand::u64(..));

    let dir = tempfile::tempdir().unwrap();
    let origin = Bus::builder()
        .store(SqliteStore::open(dir.path().join("origin.db")).unwrap())
        .build()
        .await
        .unwrap();
    let seen: Arc<Mutex<Option<Option<TraceParent>>>> = Arc::default();
    let s = Arc::clone(&seen);
    let billing = Bus::builder()
        .store(SqliteStore::open(dir.path().join("billing.db")).unwrap())
        .handler(
            "invoice-writer",
            On::event("order.placed"),
            move |m: Message| {
                let s = Arc::clone(&s);
                async move {
                    *s.lock().unwrap() = Some(m.trace_parent());
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let inbox = Inbox::builder(
        billing.clone(),
        "orders",
        RedisSource::new(REDIS, &stream, "billing", "billing-1").unwrap(),
    )
    .start()
    .unwrap();
    let relay = Relay::builder(
        origin.clone(),
        "to-billing",
        RedisPublisher::new(REDIS).unwrap(),
    )
    .route({
        let stream = stream.clone();
        move |_: &StoredMessage| stream.clone()
    })
    .start()
    .await
    .unwrap();

    let op = origin
        .transact([Event::new("order.placed", json!({ "order": 7 }))])
        .await
        .unwrap();
    let operation_id = op.id().to_string();
    tokio::time::timeout(HANG, async {
        while seen.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the receiving bus ran its handler");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    billing.shutdown(Duration::from_secs(5)).await.unwrap();
    origin.shutdown(Duration::from_secs(5)).await.unwrap();

    let named = |s: &Received, name: &str| s.name == name;
    let spans = flush_until(&guard, &receiver, |spans| {
        spans
            .iter()
            .any(|s| named(s, "txbus.attempt") && s.attr("handler") == Some("invoice-writer"))
            && spans.iter().any(|s| named(s, "txbus.inbox"))
            && spans
                .iter()
                .any(|s| named(s, "txbus.relay") && s.attr("operation_id") == Some(&operation_id))
    })
    .await;

    let on_op = |s: &Received| s.attr("operation_id") == Some(operation_id.as_str());
    let transact = only(&spans, "origin transact", |s| {
        named(s, "txbus.transact") && on_op(s)
    });
    let commit = only(&spans, "origin commit", |s| {
        named(s, "txbus.commit") && on_op(s)
    });
    let relayed = only(&spans, "relay", |s| named(s, "txbus.relay") && on_op(s));
    let inboxed = only(&spans, "inbox", |s| named(s, "txbus.inbox"));
    let remote_transact = only(&spans, "receiving transact", |s| {
        named(s, "txbus.transact") && s.parent_span_id == Some(inboxed.span_id)
    });
    let remote_op = remote_transact.attr("operation_id").unwrap().to_owned();
    assert_ne!(
        remote_op, operation_id,
        "the inbox commits an operation of its own"
    );
    let remote_commit = only(&spans, "receiving commit", |s| {
        named(s, "txbus.commit") && s.attr("operation_id") == Some(remote_op.as_str())
    });
    let attempt = only(&spans, "receiving attempt", |s| {
        named(s, "txbus.attempt") && s.attr("handler") == Some("invoice-writer")
    });

    // transact → commit → relay → inbox → transact → commit → attempt, in one trace.
    assert_eq!(transact.parent_span_id, None);
    let chain = [
        transact,
        commit,
        relayed,
        inboxed,
        remote_transact,
        remote_commit,
        attempt,
    ];
    for pair in chain.windows(2) {
        assert_eq!(pair[1].trace_id, transact.trace_id, "{:?}", pair[1]);
        assert_eq!(
            pair[1].parent_span_id,
            Some(pair[0].span_id),
            "{} under {}: {chain:#?}",
            pair[1].name,
            pair[0].name
        );
    }
    assert_eq!(inboxed.attr("inbox"), Some("orders"));
    assert_eq!(relayed.attr("relay"), Some("to-billing"));
    // The remote handler runs in its attempt's context: exported ids.
    let context = seen.lock().unwrap().unwrap().expect("a trace context");
    assert_eq!(context.trace_id, transact.trace_id);
    assert_eq!(context.span_id, attempt.span_id);

    let mut conn = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    guard.shutdown().unwrap();
}
