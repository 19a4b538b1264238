//! The conformance suite of relay brokers: what every [`Publisher`] and [`Source`] pair must
//! do, checked against the real broker by each broker crate's tests.
//!
//! ```no_run
//! # async fn example<B: txbus_relay::conformance::Broker>(broker: B) {
//! use txbus_relay::conformance;
//! # async fn new_bus() -> txbus_core::Bus { unimplemented!() }
//! conformance::run_all(&broker, || new_bus()).await;
//! # }
//! ```
//!
//! The checks panic with a message that says what broke, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Commit, Event, MessageId};

use crate::inbox::Inbox;
use crate::outbound::OutboundMessage;
use crate::publisher::Publisher;
use crate::relay::Relay;
use crate::route::Route;
use crate::source::{Acker, Received, Source};

/// A broker under test: fresh, isolated destinations per `scope` (a unique name per check).
pub trait Broker: Send + Sync {
    /// Its publisher.
    type Publisher: Publisher;
    /// Its source.
    type Source: Source;

    /// A publisher for the destinations of `scope` (create streams, queues, … as needed).
    fn publisher(&self, scope: &str) -> impl Future<Output = Self::Publisher> + Send;

    /// The route that sends every message to the destinations of `scope`.
    fn route(&self, scope: &str) -> Box<dyn Route>;

    /// A source, named `name`, that receives every message sent to the destinations of
    /// `scope`, including those sent before it was created.
    fn source(&self, scope: &str, name: &str) -> impl Future<Output = Self::Source> + Send;
}

struct BoxedRoute(Box<dyn Route>);

impl Route for BoxedRoute {
    fn destination(&self, message: &txbus_core::StoredMessage) -> String {
        self.0.destination(message)
    }
}

fn scope(check: &str) -> String {
    format!("{check}{}", uuid::Uuid::now_v7().simple())
}

async fn next<S: Source>(source: &mut S, what: &str) -> Received<S::Acker> {
    match tokio::time::timeout(Duration::from_secs(60), source.next()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{what}: the source failed: {e}"),
        Err(_) => panic!("{what}: no message within 60 s"),
    }
}

fn outbound(route: &dyn Route, i: usize) -> OutboundMessage {
    let stored = txbus_core::StoredMessage {
        id: MessageId::new(),
        event_type: "conformance.checked".into(),
        module: Some("conformance".into()),
        payload: json!({"i": i}),
        payload_json: format!("{{\"i\":{i}}}"),
        headers: txbus_core::Headers::default(),
        headers_json: "{}".into(),
    };
    let destination = route.destination(&stored);
    OutboundMessage::from_stored(
        stored,
        txbus_core::OperationId::new(),
        i as u64 + 1,
        0,
        destination,
    )
}

/// Runs every check.
pub async fn run_all<B, F, Fut>(broker: &B, new_bus: F)
where
    B: Broker,
    F: Fn() -> Fut,
    Fut: Future<Output = Bus>,
{
    relay_delivers_in_log_order_with_everything_a_receiver_needs(broker, new_bus().await).await;
    a_message_published_twice_is_committed_once(broker, new_bus().await).await;
    a_message_handed_back_is_delivered_again(broker).await;
    a_discarded_message_is_not_delivered_again(broker).await;
}

/// A relay's messages reach a source in log order, with id, type, module, headers, payload
/// and origin position.
pub async fn relay_delivers_in_log_order_with_everything_a_receiver_needs<B: Broker>(
    broker: &B,
    bus: Bus,
) {
    let scope = scope("order");
    // Positions before the first commit of the case (the bus's start-up record, if any).
    let before = bus.head_position().await.unwrap();
    let mut expected = Vec::new();
    for i in 0..40 {
        let mut events = vec![Event::new("conformance.first", json!({"i": i}))
            .module("conformance")
            .correlation_id(format!("c{i}"))
            .header("tenant", "t1")];
        if i % 4 == 0 {
            events.push(Event::new(
                "conformance.second",
                json!({"i": i, "second": true}),
            ));
        }
        expected.extend(events.iter().map(Event::id));
        bus.commit_unwatched(Commit::new().events(events))
            .await
            .unwrap();
    }
    let mut source = broker.source(&scope, "order-in").await;
    let relay = Relay::builder(bus.clone(), "conformance", broker.publisher(&scope).await)
        .route(BoxedRoute(broker.route(&scope)))
        .read_batch(7)
        .start()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), relay.drained())
        .await
        .expect("the relay drains within 60 s")
        .unwrap();
    // Every commit, the bus's start-up record (a system commit, not relayed) included.
    assert_eq!(
        status.checkpoint,
        before + 40,
        "the checkpoint covers every commit"
    );
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let r = next(&mut source, "relayed messages").await;
        let m = r.message.expect("a relayed message decodes");
        r.acker.ack().await.unwrap();
        if got.last() == Some(&m.id) {
            continue; // a redelivery of the previous message, allowed
        }
        if m.event_type == "conformance.first" {
            assert_eq!(m.module.as_deref(), Some("conformance"));
            assert!(m
                .headers
                .correlation_id
                .as_deref()
                .is_some_and(|c| c.starts_with('c')));
            assert_eq!(
                m.headers.extra.get("tenant").map(String::as_str),
                Some("t1")
            );
            assert!(m
                .origin_position
                .is_some_and(|p| (before + 1..=before + 40).contains(&p)));
        } else {
            assert_eq!(m.payload["second"], json!(true));
            assert_eq!(m.module, None);
        }
        got.push(m.id);
    }
    assert_eq!(got, expected, "messages arrive in log order");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The same message published twice (as after a relay restart) is committed once by an
/// inbox, and its handlers run once.
pub async fn a_message_published_twice_is_committed_once<B: Broker>(broker: &B, bus: Bus) {
    let scope = scope("dedupe");
    let publisher = broker.publisher(&scope).await;
    let route = broker.route(&scope);
    let batch: Vec<OutboundMessage> = (0..5).map(|i| outbound(route.as_ref(), i)).collect();
    publisher.publish_batch(&batch).await.unwrap();
    publisher.publish_batch(&batch[..2]).await.unwrap();
    let source = broker.source(&scope, "dedupe-in").await;
    let inbox = Inbox::builder(bus.clone(), "dedupe-in", source)
        .start()
        .unwrap();
    let mut committed = HashMap::<MessageId, usize>::new();
    for _ in 0..6000 {
        let stats = inbox.stats();
        if stats.committed >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let any repeat arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.committed, 5, "each message committed once: {stats:?}");
    let mut after = 0;
    loop {
        let commits = bus.read_log(after, 100).await.unwrap();
        let Some(last) = commits.last() else { break };
        after = last.position;
        for m in commits.iter().flat_map(|c| &c.messages) {
            *committed.entry(m.id).or_default() += 1;
        }
    }
    for m in &batch {
        assert_eq!(
            committed.get(&m.id),
            Some(&1),
            "message {} in the log once",
            m.id
        );
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A message handed back with [`Acker::retry`] is delivered again.
pub async fn a_message_handed_back_is_delivered_again<B: Broker>(broker: &B) {
    let scope = scope("retry");
    let publisher = broker.publisher(&scope).await;
    let route = broker.route(&scope);
    let message = outbound(route.as_ref(), 0);
    publisher
        .publish_batch(std::slice::from_ref(&message))
        .await
        .unwrap();
    let mut source = broker.source(&scope, "retry-in").await;
    let first = next(&mut source, "the first delivery").await;
    assert_eq!(first.message.as_ref().unwrap().id, message.id);
    first.acker.retry(Duration::ZERO).await.unwrap();
    let again = next(&mut source, "the redelivery").await;
    assert_eq!(
        again.message.as_ref().unwrap().id,
        message.id,
        "delivered again"
    );
    if let Some(n) = again.delivery_count {
        assert!(n >= 2, "the broker counts the redelivery: {n}");
    }
    again.acker.ack().await.unwrap();
}

/// A discarded message is not delivered again; the next one is.
pub async fn a_discarded_message_is_not_delivered_again<B: Broker>(broker: &B) {
    let scope = scope("discard");
    let publisher = broker.publisher(&scope).await;
    let route = broker.route(&scope);
    let poison = outbound(route.as_ref(), 0);
    let good = outbound(route.as_ref(), 1);
    publisher
        .publish_batch(std::slice::from_ref(&poison))
        .await
        .unwrap();
    let mut source = broker.source(&scope, "discard-in").await;
    let first = next(&mut source, "the first message").await;
    assert_eq!(first.message.as_ref().unwrap().id, poison.id);
    first.acker.discard().await.unwrap();
    publisher
        .publish_batch(std::slice::from_ref(&good))
        .await
        .unwrap();
    let second = next(&mut source, "the next message").await;
    assert_eq!(
        second.message.as_ref().unwrap().id,
        good.id,
        "the discarded one is gone"
    );
    second.acker.ack().await.unwrap();
}
