//! The inbox core with a source kept in memory by the test: a redelivered message is committed
//! and handled once, acknowledged both times; a message asking for a reply is committed as a
//! `transact` and answered with its outcome, a repeat with the stored outcome of the first.
//! (The same inbox against the real NATS JetStream is tested in `txbus-nats`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use txbus_core::{Bus, HandlerError, Headers, Message, MessageId, On};
use txbus_relay::{
    Acker, InboundMessage, Inbox, Received, RemoteReply, RemoteResult, Replier, Source,
};
use txbus_sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
#[error("closed")]
struct Closed;

#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Ack,
    Retry,
    Discard,
}

struct MemoryAcker(Arc<Mutex<Vec<Settled>>>);

impl Acker for MemoryAcker {
    type Error = Closed;
    async fn ack(self) -> Result<(), Closed> {
        self.0.lock().unwrap().push(Settled::Ack);
        Ok(())
    }
    async fn retry(self, _delay: Duration) -> Result<(), Closed> {
        self.0.lock().unwrap().push(Settled::Retry);
        Ok(())
    }
    async fn discard(self) -> Result<(), Closed> {
        self.0.lock().unwrap().push(Settled::Discard);
        Ok(())
    }
}

struct MemorySource(mpsc::Receiver<Received<MemoryAcker>>);

impl Source for MemorySource {
    type Acker = MemoryAcker;
    type Error = Closed;
    async fn next(&mut self) -> Result<Received<MemoryAcker>, Closed> {
        match self.0.recv().await {
            Some(r) => Ok(r),
            None => std::future::pending().await,
        }
    }
}

#[derive(Clone, Default)]
struct MemoryReplier(Arc<Mutex<Vec<(String, RemoteReply)>>>);

impl Replier for MemoryReplier {
    type Error = Closed;
    async fn reply(&self, to: &str, reply: &RemoteReply) -> Result<(), Closed> {
        self.0.lock().unwrap().push((to.to_owned(), reply.clone()));
        Ok(())
    }
}

fn inbound(id: MessageId, payload: serde_json::Value, reply_to: Option<&str>) -> InboundMessage {
    InboundMessage {
        id,
        event_type: "invoice.requested".into(),
        module: Some("billing".into()),
        headers: Headers {
            correlation_id: Some("order-1".into()),
            ..Headers::default()
        },
        payload,
        origin_operation: None,
        origin_position: Some(1),
        reply_to: reply_to.map(str::to_owned),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_committed_and_handled_once() {
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
    let (tx, rx) = mpsc::channel(16);
    let settled = Arc::new(Mutex::new(Vec::new()));
    let inbox = Inbox::builder(bus.clone(), "in", MemorySource(rx))
        .start()
        .unwrap();
    let id = MessageId::new();
    for delivery in 1..=2 {
        tx.send(Received {
            message: Ok(inbound(id, json!({"amount": 1}), None)),
            delivery_count: Some(delivery),
            acker: MemoryAcker(Arc::clone(&settled)),
        })
        .await
        .unwrap();
    }
    wait_until("both settled", || settled.lock().unwrap().len() == 2).await;
    wait_until("handled", || runs.load(Ordering::SeqCst) >= 1).await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(*settled.lock().unwrap(), vec![Settled::Ack, Settled::Ack]);
    assert_eq!((stats.committed, stats.duplicates), (1, 1));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handled once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_with_its_outcome_and_a_repeat_with_the_same_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&runs);
    let bus = Bus::builder()
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
    let (tx, rx) = mpsc::channel(16);
    let settled = Arc::new(Mutex::new(Vec::new()));
    let replier = MemoryReplier::default();
    let inbox = Inbox::builder(bus.clone(), "in", MemorySource(rx))
        .replies(replier.clone())
        .start()
        .unwrap();
    let ok = MessageId::new();
    let bad = MessageId::new();
    let send = |id, amount, to: &'static str| {
        let tx = tx.clone();
        let settled = Arc::clone(&settled);
        async move {
            tx.send(Received {
                message: Ok(inbound(id, json!({"amount": amount}), Some(to))),
                delivery_count: None,
                acker: MemoryAcker(settled),
            })
            .await
            .unwrap();
        }
    };
    send(ok, 5, "reply.ok").await;
    send(bad, 0, "reply.bad").await;
    wait_until("two replies", || replier.0.lock().unwrap().len() == 2).await;
    send(ok, 5, "reply.ok").await;
    wait_until("a third reply", || replier.0.lock().unwrap().len() == 3).await;
    let replies = replier.0.lock().unwrap().clone();
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    let of = |to: &str| -> Vec<RemoteReply> {
        replies
            .iter()
            .filter(|(t, _)| t == to)
            .map(|(_, r)| r.clone())
            .collect()
    };
    let oks = of("reply.ok");
    assert_eq!(oks.len(), 2);
    assert!(oks
        .iter()
        .all(|r| r.result == RemoteResult::Succeeded && r.message_id == ok));
    assert_eq!(
        oks[0].operation_id, oks[1].operation_id,
        "the repeat gets the first's outcome"
    );
    let bads = of("reply.bad");
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_cannot_be_committed_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let settled = Arc::new(Mutex::new(Vec::new()));
    let inbox = Inbox::builder(bus.clone(), "in", MemorySource(rx))
        .start()
        .unwrap();
    // Not decodable, and an event type the bus refuses (a space is not allowed).
    tx.send(Received {
        message: Err(txbus_relay::wire::DecodeError::Missing(
            txbus_relay::wire::MESSAGE_ID,
        )),
        delivery_count: None,
        acker: MemoryAcker(Arc::clone(&settled)),
    })
    .await
    .unwrap();
    let mut bad = inbound(MessageId::new(), json!({}), None);
    bad.event_type = "not allowed".into();
    tx.send(Received {
        message: Ok(bad),
        delivery_count: None,
        acker: MemoryAcker(Arc::clone(&settled)),
    })
    .await
    .unwrap();
    wait_until("both settled", || settled.lock().unwrap().len() == 2).await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        *settled.lock().unwrap(),
        vec![Settled::Discard, Settled::Discard]
    );
    assert_eq!(stats.discarded, 2);
}
