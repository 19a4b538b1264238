//! Choreography helpers: reactions linked to their trigger and published once per trigger,
//! and chains read back from the log within bounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use serde_json::json;
use txbus_core::{DeliveryContext, Event, Handler, Message, MessageId, OperationId, StoredMessage};
use txbus_saga::choreography::{chain, CausedBy, ChainQuery, Reactor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_is_published_once_per_trigger_even_when_the_trigger_is_delivered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::bus_builder(dir.path()).build().await.unwrap();
    let reactor = Reactor::new();
    reactor.bind(bus.clone());
    let handler = reactor.handler(|msg: Message| async move {
        Ok(vec![Event::new(
            "items.released",
            json!({"order_id": msg.payload()["order_id"]}),
        )])
    });

    // The same delivery twice, as after a crash between the reaction and the ack.
    let trigger = Arc::new(
        StoredMessage::from_stored(
            MessageId::new(),
            "payment.failed".into(),
            None,
            json!({"order_id": "o-9"}).to_string(),
            json!({"correlation_id": "o-9"}).to_string(),
        )
        .unwrap(),
    );
    for attempt in 1..=2 {
        let msg = Message::new(
            Arc::clone(&trigger),
            DeliveryContext {
                operation_id: OperationId::new(),
                commit_id: 1,
                index: 0,
                handler: Arc::from("inventory/release"),
                attempt,
                delivery_id: 1,
            },
        );
        handler.handle(msg).await.unwrap();
    }

    let flow = chain(&bus, "o-9", ChainQuery::default()).await.unwrap();
    assert_eq!(flow.event_types(), vec!["items.released"]);
    let released = &flow.links[0].message;
    assert_eq!(released.headers.causation_id, Some(trigger.id.to_string()));
    assert_eq!(released.headers.correlation_id.as_deref(), Some("o-9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_read_within_its_bounds_and_can_be_continued() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::bus_builder(dir.path()).build().await.unwrap();
    let root = Event::new("order.placed", json!({})).correlation_id("o-1");
    let root_id = root.id();
    bus.publish(root).await.unwrap();
    for i in 0..5 {
        bus.publish(Event::new("noise", json!({"i": i})).correlation_id("other"))
            .await
            .unwrap();
        bus.publish(
            Event::new("order.step", json!({"i": i}))
                .correlation_id("o-1")
                .causation_id(root_id.to_string()),
        )
        .await
        .unwrap();
    }

    let whole = chain(&bus, "o-1", ChainQuery::default()).await.unwrap();
    assert_eq!(whole.links.len(), 6);
    assert!(!whole.truncated);
    assert_eq!(whole.caused_by(root_id).len(), 5);
    assert!(whole.dangling().is_empty());

    // Bounded: at most 4 commits per call; continue from where it stopped.
    let query = ChainQuery {
        max_commits: 4,
        page: 2,
        ..ChainQuery::default()
    };
    let first = chain(&bus, "o-1", query).await.unwrap();
    assert!(first.truncated);
    assert_eq!(first.links.len(), 2);
    let mut links = first.links.len();
    let mut after = first.scanned_to;
    loop {
        let next = chain(
            &bus,
            "o-1",
            ChainQuery {
                after_position: after,
                ..query
            },
        )
        .await
        .unwrap();
        links += next.links.len();
        after = next.scanned_to;
        if !next.truncated {
            break;
        }
    }
    assert_eq!(links, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_to_a_trigger_without_correlation_is_correlated_by_the_trigger_id() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::bus_builder(dir.path()).build().await.unwrap();
    let trigger_id = MessageId::new();
    let trigger = Message::new(
        Arc::new(
            StoredMessage::from_stored(trigger_id, "a".into(), None, "{}".into(), "{}".into())
                .unwrap(),
        ),
        DeliveryContext {
            operation_id: OperationId::new(),
            commit_id: 1,
            index: 0,
            handler: Arc::from("h"),
            attempt: 1,
            delivery_id: 1,
        },
    );
    // The trigger starts the flow: its id becomes the correlation id.
    bus.publish(Event::new("b", json!({})).caused_by(&trigger))
        .await
        .unwrap();
    let flow = chain(&bus, &trigger_id.to_string(), ChainQuery::default())
        .await
        .unwrap();
    assert_eq!(flow.event_types(), vec!["b"]);
    let headers = &flow.links[0].message.headers;
    assert_eq!(headers.correlation_id, Some(trigger_id.to_string()));
    assert_eq!(headers.causation_id, Some(trigger_id.to_string()));
}
