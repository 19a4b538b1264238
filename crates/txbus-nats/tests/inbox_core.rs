//! The inbox core against the real NATS JetStream (127.0.0.1:4222): a message asking for a
//! reply is committed as a `transact` and answered, through the real [`NatsReplier`], with its
//! outcome, a repeat with the stored outcome of the first; messages that cannot be committed
//! are discarded (terminated at the broker, as its advisories show). Each test uses a stream,
//! subjects and reply subjects of its own. (Redelivery is tested against Redis, in
//! `txbus-redis`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use futures_util::StreamExt;
use txbus_core::{Bus, HandlerError, Message, MessageId, On};
use txbus_nats::{ConsumerSpec, JetStreamSource, NatsReplier, StreamSpec};
use txbus_relay::{wire, Inbox, RemoteReply, RemoteResult};
use txbus_sqlite::SqliteStore;

/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The headers of a txbus message of the `billing` module; `nats_msg_id` is unique per
/// publish, so that the broker keeps every copy.
fn txbus_headers(id: MessageId, event_type: &str, reply_to: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::MESSAGE_ID, id.to_string());
    h.insert(wire::EVENT_TYPE, event_type);
    h.insert(wire::MODULE, "billing");
    h.insert(wire::CORRELATION_ID, "order-1");
    if let Some(to) = reply_to {
        h.insert(wire::REPLY_TO, to);
    }
    h.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string());
    h
}

/// Publishes to JetStream and waits for the stream to have stored it.
async fn publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: &str,
) {
    js.publish_with_headers(subject.to_owned(), headers, payload.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Waits for the next core NATS message of `sub`.
async fn next(sub: &mut async_nats::Subscriber, what: &str) -> async_nats::Message {
    tokio::time::timeout(HANG_GUARD, sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the subscription goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_with_its_outcome_and_a_repeat_with_the_same_outcome() {
    let (client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("REQUEST_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    let replies_to = unique("_TXBUS_TEST_REPLY.");
    let (to_ok, to_bad) = (format!("{replies_to}.ok"), format!("{replies_to}.bad"));
    let mut replies = client.subscribe(format!("{replies_to}.>")).await.unwrap();
    client.flush().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&runs);
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .handler("charger", On::in_module("billing"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                if m.payload()["amount"].as_i64() == Some(0) {
                    return Err(HandlerError::reject("nothing to charge"));
                }
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let source = JetStreamSource::new(js.clone(), ConsumerSpec::new(&stream, "in"))
        .await
        .unwrap();
    let inbox = Inbox::builder(bus.clone(), "in", source)
        .replies(NatsReplier::new(client.clone()))
        .start()
        .unwrap();

    let subject = format!("{prefix}.billing.invoice.requested");
    let ok = MessageId::new();
    let bad = MessageId::new();
    let send = |id, amount: i64, to: &str| {
        let headers = txbus_headers(id, "invoice.requested", Some(to));
        let (js, subject) = (js.clone(), subject.clone());
        async move { publish(&js, &subject, headers, &format!("{{\"amount\":{amount}}}")).await }
    };
    send(ok, 5, &to_ok).await;
    send(bad, 0, &to_bad).await;
    let mut received = Vec::new();
    for _ in 0..2 {
        received.push(next(&mut replies, "two replies").await);
    }
    // The same message again (a copy the broker keeps: another Nats-Msg-Id).
    send(ok, 5, &to_ok).await;
    received.push(next(&mut replies, "a third reply").await);
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    let replies: Vec<(String, RemoteReply)> = received
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            )
        })
        .collect();
    let of = |to: &str| -> Vec<RemoteReply> {
        replies
            .iter()
            .filter(|(t, _)| t == to)
            .map(|(_, r)| r.clone())
            .collect()
    };
    let oks = of(&to_ok);
    assert_eq!(oks.len(), 2);
    assert!(oks
        .iter()
        .all(|r| r.result == RemoteResult::Succeeded && r.message_id == ok));
    assert!(oks[0].operation_id.is_some());
    assert_eq!(
        oks[0].operation_id, oks[1].operation_id,
        "the repeat gets the first's outcome"
    );
    let bads = of(&to_bad);
    assert_eq!(bads.len(), 1);
    assert_eq!(bads[0].message_id, bad);
    match &bads[0].result {
        RemoteResult::Failed { failure } => {
            assert_eq!(failure.handler, "charger");
            assert_eq!(failure.reason, "nothing to charge");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the repeat did not run the handler again"
    );
    assert_eq!(
        (stats.committed, stats.duplicates, stats.replies),
        (2, 1, 3)
    );
    delete_stream(&js, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_cannot_be_committed_are_discarded() {
    let (client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("DISCARD_");
    let durable = "in";
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    // The server announces each message a consumer terminated (discarded), by stream sequence.
    let mut terminated = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.{durable}"
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap();
    // Not decodable (no txbus headers), and an event type the bus refuses (a space is not
    // allowed).
    let subject = format!("{prefix}.billing.x");
    js.publish(subject.clone(), "not from a txbus relay".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(
        &js,
        &subject,
        txbus_headers(MessageId::new(), "not allowed", None),
        "{}",
    )
    .await;
    let source = JetStreamSource::new(js.clone(), ConsumerSpec::new(&stream, durable))
        .await
        .unwrap();
    let inbox = Inbox::builder(bus.clone(), "in", source).start().unwrap();

    let mut sequences = Vec::new();
    for _ in 0..2 {
        let advisory = next(&mut terminated, "both discarded").await;
        let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
        sequences.push(advisory["stream_seq"].as_u64().unwrap());
    }
    sequences.sort_unstable();
    assert_eq!(sequences, [1, 2], "both messages terminated at the broker");
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.discarded, 2);
    assert_eq!((stats.committed, stats.retried), (0, 0));
    assert!(
        bus.read_log(0, 10).await.unwrap().is_empty(),
        "nothing committed"
    );
    // Settled at the broker: nothing left to deliver or awaiting an acknowledgement.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
}
