//! The inbox core against the real Redis (127.0.0.1:6379): an entry that Redis delivers again
//! is committed and handled once, and acknowledged both times. Each test uses a stream of its
//! own. (Replies and discarding are tested against NATS, in `txbus-nats`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use txbus_core::{Bus, Message, MessageId, On};
use txbus_redis::{RedisSource, PAYLOAD_FIELD};
use txbus_relay::{wire, Inbox};
use txbus_sqlite::SqliteStore;

const REDIS: &str = "redis://127.0.0.1:6379";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(180);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A fresh connection for each use: another test of this crate drops every client connection
/// of the server now and then.
async fn redis() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// How many entries of `stream` the group `group` delivered and nobody acknowledged yet.
async fn pending(stream: &str, group: &str) -> i64 {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    match &reply {
        Value::Array(summary) => match summary[0] {
            Value::Int(n) => n,
            _ => panic!("XPENDING answered {reply:?}"),
        },
        _ => panic!("XPENDING answered {reply:?}"),
    }
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !f().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_committed_and_handled_once() {
    let stream = unique("txbus-core-in");
    let group = "billing";
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&runs);
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .handler("charge", On::in_module("billing"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                assert_eq!(m.headers().correlation_id.as_deref(), Some("order-1"));
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    // One entry, laid out as a relay writes it.
    let id = MessageId::new();
    let _: Value = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(PAYLOAD_FIELD)
        .arg(r#"{"amount":1}"#)
        .arg(wire::MESSAGE_ID)
        .arg(id.to_string())
        .arg(wire::EVENT_TYPE)
        .arg("invoice.requested")
        .arg(wire::MODULE)
        .arg("billing")
        .arg(wire::CORRELATION_ID)
        .arg("order-1")
        .query_async(&mut redis().await)
        .await
        .unwrap();
    let source = RedisSource::new(REDIS, &stream, group, "billing-1")
        .unwrap()
        .block(Duration::from_millis(100));
    let inbox = Inbox::builder(bus.clone(), "in", source).start().unwrap();

    // First delivery: committed, then acknowledged.
    eventually("the first delivery committed", async || {
        inbox.stats().committed == 1
    })
    .await;
    eventually("the first delivery acknowledged", async || {
        pending(&stream, group).await == 0
    })
    .await;

    // Redis delivers the entry again: the group is moved back to the start of the stream.
    let _: Value = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&stream)
        .arg(group)
        .arg("0")
        .query_async(&mut redis().await)
        .await
        .unwrap();
    eventually("the second delivery recognised", async || {
        inbox.stats().duplicates == 1
    })
    .await;
    // Delivered, so pending until the inbox acknowledges it.
    eventually("the second delivery acknowledged", async || {
        pending(&stream, group).await == 0
    })
    .await;
    eventually("handled", async || runs.load(Ordering::SeqCst) >= 1).await;

    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (stats.received, stats.committed, stats.duplicates),
        (2, 1, 1)
    );
    assert_eq!(stats.discarded, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handled once");
    let _: redis::RedisResult<Value> = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis().await)
        .await;
}
