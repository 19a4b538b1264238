//! The inbox on the real JetStream: each message committed once under its original id, even
//! when the broker holds it twice; messages that do not decode are discarded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use txbus_core::{Bus, Message, MessageId, On};
use txbus_nats::{ConsumerSpec, JetStreamSource, StreamSpec};
use txbus_relay::{dedupe_key, wire, Inbox};
use txbus_sqlite::SqliteStore;

type Runs = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

async fn receiving_bus(dir: &std::path::Path, runs: &Runs) -> Bus {
    let r = Arc::clone(runs);
    Bus::builder()
        .store(SqliteStore::open(dir.join("bus.db")).unwrap())
        .handler("charge", On::in_module("billing"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                r.lock().unwrap().push((
                    m.id().to_string(),
                    m.headers().correlation_id.clone(),
                    m.payload()["amount"].to_string(),
                ));
                Ok(())
            }
        })
        .build()
        .await
        .unwrap()
}

fn txbus_headers(id: MessageId, nats_msg_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::MESSAGE_ID, id.to_string());
    h.insert(wire::EVENT_TYPE, "invoice.requested");
    h.insert(wire::MODULE, "billing");
    h.insert(wire::CORRELATION_ID, "order-7");
    h.insert("Nats-Msg-Id", nats_msg_id);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_twice_is_committed_and_handled_once() {
    let (_client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("INBOX_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runs: Runs = Arc::default();
    let bus = receiving_bus(dir.path(), &runs).await;

    // The same txbus message twice, with distinct Nats-Msg-Ids so that the broker keeps both
    // copies (its own dedupe bypassed), then another message.
    let subject = format!("{prefix}.billing.invoice.requested");
    let twice = MessageId::new();
    let other = MessageId::new();
    for (id, nats_id, amount) in [
        (twice, "copy-1", "10"),
        (twice, "copy-2", "10"),
        (other, "other", "20"),
    ] {
        js.publish_with_headers(
            subject.clone(),
            txbus_headers(id, nats_id),
            format!("{{\"amount\":{amount}}}").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(
        stream_messages(&js, &stream).await,
        3,
        "the broker holds both copies"
    );

    let source = JetStreamSource::new(js.clone(), ConsumerSpec::new(&stream, "billing-in"))
        .await
        .unwrap();
    let inbox = Inbox::builder(bus.clone(), "billing-in", source)
        .start()
        .unwrap();
    eventually(Duration::from_secs(30), "three deliveries settled", || {
        let s = inbox.stats();
        s.committed + s.duplicates >= 3
    })
    .await;
    eventually(Duration::from_secs(30), "both handlers ran", || {
        runs.lock().unwrap().len() >= 2
    })
    .await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.committed, 2);
    assert_eq!(stats.duplicates, 1);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs,
        vec![
            (twice.to_string(), Some("order-7".into()), "10".into()),
            (other.to_string(), Some("order-7".into()), "20".into()),
        ],
        "each message handled once, with its original id, headers and payload"
    );
    // The dedupe mark is in the store, with its expiry.
    let mark = bus
        .kv_get(&dedupe_key("billing-in", twice))
        .await
        .unwrap()
        .expect("a dedupe mark");
    assert!(mark.expires_at_ms.is_some(), "dedupe marks expire");
    // Exactly one message with that id in the receiving log.
    let log = bus.read_log(0, 100).await.unwrap();
    let copies = log
        .iter()
        .flat_map(|c| &c.messages)
        .filter(|m| m.id == twice)
        .count();
    assert_eq!(copies, 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_decode_is_discarded_and_the_rest_goes_on() {
    let (_client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("POISON_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runs: Runs = Arc::default();
    let bus = receiving_bus(dir.path(), &runs).await;
    let subject = format!("{prefix}.billing.x");
    js.publish(subject.clone(), "no txbus headers".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let good = MessageId::new();
    js.publish_with_headers(
        subject,
        txbus_headers(good, "good"),
        "{\"amount\":5}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let source = JetStreamSource::new(js.clone(), ConsumerSpec::new(&stream, "in"))
        .await
        .unwrap();
    let inbox = Inbox::builder(bus.clone(), "in", source).start().unwrap();
    eventually(Duration::from_secs(30), "the good message handled", || {
        !runs.lock().unwrap().is_empty()
    })
    .await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.discarded, 1);
    assert_eq!(stats.committed, 1);
    assert_eq!(runs.lock().unwrap()[0].0, good.to_string());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
}
