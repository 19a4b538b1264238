//! Buses on the PostgreSQL store: one bus end to end, and buses in several "processes" (stores
//! on one schema) handing work and outcomes to each other through the database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use txbus_core::store::Store;
use txbus_core::{Bus, BusBuilder, Event, FailureKind, HandlerError, Message, On};

use common::{open, TestSchema};

/// Generous bound for a step that takes milliseconds; never a measurement.
const HANG: Duration = Duration::from_secs(30);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the step hung")
}

async fn builder(schema: &str) -> BusBuilder {
    let store: Arc<dyn Store> = Arc::new(open(schema).await);
    Bus::builder().shared_store(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transact_reject_and_publish() {
    let schema = TestSchema::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<serde_json::Value>();
    let bus = builder(&schema.name)
        .await
        .max_retries(0)
        .handler("writer", On::event("user.created"), |_m: Message| async {
            Ok(())
        })
        .handler("picky", On::event("user.rejected"), |_m: Message| async {
            Err(HandlerError::reject("e-mail taken"))
        })
        .handler("mailer", On::event("mail.send"), move |m: Message| {
            let seen = seen_tx.clone();
            async move {
                seen.send(m.payload().clone()).unwrap();
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    let op = bus
        .transact([Event::new("user.created", json!({"id": 1}))])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());

    let op = bus
        .transact([
            Event::new("user.created", json!({"id": 2})),
            Event::new("user.rejected", json!({"id": 2})),
        ])
        .await
        .unwrap();
    let failure = within(op.outcome())
        .await
        .unwrap()
        .error
        .expect("it must fail");
    assert_eq!(failure.handler, "picky");
    assert_eq!(failure.kind, FailureKind::Rejected);
    assert_eq!(failure.reason, "e-mail taken");
    assert_eq!(failure.event_index, 1);

    let id = bus
        .publish(Event::new("mail.send", json!({"to": "a@b.c"})))
        .await
        .unwrap();
    assert_eq!(within(seen.recv()).await.unwrap(), json!({"to": "a@b.c"}));
    assert!(within(bus.wait(id)).await.unwrap().is_ok());

    // The bus's start-up record (a system commit), then the three operations.
    let log = common::wait_sealed(&open(&schema.name).await, 4).await;
    assert_eq!(log.len(), 4);
    assert!(log[0].is_system());
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buses_in_several_processes_share_work_and_outcomes() {
    let schema = TestSchema::new();
    // Long polls: what happens quickly below happens through notifications.
    let slow_poll = Duration::from_secs(20);
    let (b_ran, c_ran) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    // Process B has handler "b"; process A, started after it, routes to it.
    let b_count = Arc::clone(&b_ran);
    let bus_b = builder(&schema.name)
        .await
        .poll_interval(slow_poll)
        .handler("b", On::event("x"), move |_m: Message| {
            let n = Arc::clone(&b_count);
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let a_ran = Arc::new(AtomicUsize::new(0));
    let a_count = Arc::clone(&a_ran);
    let bus_a = builder(&schema.name)
        .await
        .poll_interval(slow_poll)
        .handler("a", On::event("x"), move |_m: Message| {
            let n = Arc::clone(&a_count);
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    // A commits; B is told of the work and runs "b"; A is told the operation finished.
    let op = bus_a.transact([Event::new("x", json!(1))]).await.unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    assert_eq!(a_ran.load(Ordering::SeqCst), 1);
    assert_eq!(b_ran.load(Ordering::SeqCst), 1);
    // B can wait for A's operation too.
    assert!(within(bus_b.wait(op.id())).await.unwrap().is_ok());

    // Process C starts with handler "c": A learns of it without waiting for a poll.
    let c_count = Arc::clone(&c_ran);
    let bus_c = builder(&schema.name)
        .await
        .poll_interval(slow_poll)
        .handler("c", On::event("x"), move |_m: Message| {
            let n = Arc::clone(&c_count);
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    within(async {
        while c_ran.load(Ordering::SeqCst) == 0 {
            let op = bus_a.transact([Event::new("x", json!(2))]).await.unwrap();
            assert!(op.outcome().await.unwrap().is_ok());
        }
    })
    .await;

    for bus in [bus_a, bus_b, bus_c] {
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}
