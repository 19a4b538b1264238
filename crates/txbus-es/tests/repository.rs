//! The repository: load, run a command, save with the exact version, retry on conflict;
//! domain errors and invariants write nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::json;
use txbus_core::{Conflict, Event, ExpectedVersion, KvExpect, KvWrite};
use txbus_es::{CommandError, CommandOptions, Error, EventStore, Repository};

use common::{sqlite_bus, ItemAdded, Order, OrderCommand, OrderError, MAX_ITEMS};

fn add(sku: &str, qty: u32) -> OrderCommand {
    OrderCommand::Add {
        sku: sku.into(),
        qty,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_and_save_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone());

    // A new aggregate loads as its default state at version 0.
    let fresh = orders.load("1").await.unwrap();
    assert_eq!(fresh.version, 0);
    assert_eq!(fresh.state, Order::default());
    assert_eq!(fresh.stream, "order-1");

    let saved = orders.execute("1", add("A1", 2)).await.unwrap();
    assert_eq!(saved.version, 1);
    assert_eq!(saved.attempts, 1);
    assert_eq!(saved.state.items["A1"], 2);
    // The operation is the commit's: it finishes (nobody subscribed).
    assert!(saved
        .operation
        .expect("something was committed")
        .outcome()
        .await
        .unwrap()
        .is_ok());

    orders.execute("1", add("B2", 1)).await.unwrap();
    let saved = orders
        .execute("1", OrderCommand::Remove { sku: "A1".into() })
        .await
        .unwrap();
    assert_eq!(saved.version, 3);

    let loaded = orders.load("1").await.unwrap();
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.state, saved.state);
    assert_eq!(loaded.replayed, 3);
    assert_eq!(loaded.state.items.keys().collect::<Vec<_>>(), ["B2"]);

    // A command that yields no events commits nothing.
    let noop = orders.execute("1", OrderCommand::Noop).await.unwrap();
    assert!(noop.operation.is_none());
    assert_eq!(noop.version, 3);
    assert_eq!(store.stream_version("order-1").await.unwrap(), 3);

    // The events are in the stream, typed, with the aggregate's module.
    let events = store.read_forward("order-1", 1, 10).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].module.as_deref(), Some("order"));
    assert_eq!(
        events[0].typed::<ItemAdded>().unwrap().unwrap(),
        ItemAdded {
            sku: "A1".into(),
            qty: 2
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_error_and_a_broken_invariant_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone());
    orders.execute("2", add("A1", 60)).await.unwrap();

    // The command itself is refused.
    let err = orders
        .execute("2", OrderCommand::Remove { sku: "ZZ".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommandError::Domain(OrderError::NotInOrder(ref s)) if s == "ZZ"),
        "{err:?}"
    );

    // The events are fine one by one, but the state after them breaks "at most 100 items".
    let err = orders.execute("2", add("B2", 41)).await.unwrap_err();
    assert_eq!(err.domain(), Some(&OrderError::TooManyItems(101)));
    assert_eq!(store.stream_version("order-2").await.unwrap(), 1);

    // Exactly at the limit is fine.
    let saved = orders.execute("2", add("B2", 40)).await.unwrap();
    assert_eq!(saved.state.total(), MAX_ITEMS);

    // Once placed, every command is refused, and nothing is written.
    orders.execute("2", OrderCommand::Place).await.unwrap();
    let err = orders.execute("2", add("C3", 0)).await.unwrap_err();
    assert!(matches!(
        err,
        CommandError::Domain(OrderError::AlreadyPlaced)
    ));
    assert_eq!(store.stream_version("order-2").await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_each_command_applied_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone()).max_attempts(100);
    orders.execute("3", add("seed", 1)).await.unwrap();

    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let orders = orders.clone();
            tokio::spawn(async move {
                let mut retried = 0;
                for i in 0..5 {
                    let saved = orders
                        .execute("3", add(&format!("t{t}-{i}"), 1))
                        .await
                        .unwrap();
                    retried += saved.attempts - 1;
                }
                retried
            })
        })
        .collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let order = orders.load("3").await.unwrap();
    // 1 seed + 50 adds, each exactly once.
    assert_eq!(order.version, 51);
    assert_eq!(order.state.adds, 51);
    assert_eq!(order.state.items.len(), 51);
    assert!(order.state.items.values().all(|&q| q == 1));
    for t in 0..10 {
        for i in 0..5 {
            assert!(order.state.items.contains_key(&format!("t{t}-{i}")));
        }
    }
    eprintln!("conflicts retried: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_every_attempt_exhausts_the_retries() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone()).max_attempts(4);
    orders.execute("4", add("A1", 1)).await.unwrap();

    // Between each load and save, another writer appends to the stream.
    let runs = Arc::new(AtomicU32::new(0));
    let hook = {
        let store = store.clone();
        let runs = Arc::clone(&runs);
        Arc::new(move || {
            runs.fetch_add(1, Ordering::SeqCst);
            let store = store.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async move {
                    store
                        .append_typed(
                            "order-4",
                            ExpectedVersion::Any,
                            &[ItemAdded {
                                sku: "other".into(),
                                qty: 1,
                            }],
                        )
                        .await
                        .unwrap();
                })
            });
        })
    };
    let err = orders
        .execute(
            "4",
            OrderCommand::AddWithHook {
                sku: "mine".into(),
                hook,
            },
        )
        .await
        .unwrap_err();
    match &err {
        CommandError::RetriesExhausted {
            stream,
            attempts,
            last: Conflict::Stream { .. },
        } => {
            assert_eq!(stream, "order-4");
            assert_eq!(*attempts, 4);
        }
        other => panic!("expected exhausted retries, got {other:?}"),
    }
    assert!(err.to_string().contains("4 attempts"), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    // Only the other writer's events were written.
    let order = orders.load("4").await.unwrap();
    assert_eq!(order.version, 5);
    assert!(!order.state.items.contains_key("mine"));

    // A stale loaded aggregate saved directly: a plain conflict, no retry.
    let stale = orders.load("4").await.unwrap();
    orders.execute("4", add("B", 1)).await.unwrap();
    let err = orders
        .save(
            stale,
            vec![ItemAdded {
                sku: "C".into(),
                qty: 1,
            }
            .into()],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommandError::Store(Error::Conflict(Conflict::Stream { actual: 6, .. }))
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_options_commit_headers_events_and_keys_with_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone());

    let options = CommandOptions::new()
        .correlation_id("req-1")
        .header("tenant", "acme")
        .event(Event::new(
            "integration.order-changed",
            json!({"order": "5"}),
        ))
        .kv(KvWrite::put("idempotency/req-1", b"done".to_vec()).expect(KvExpect::Absent));
    let saved = orders
        .execute_with("5", &add("A1", 1), &options)
        .await
        .unwrap();
    assert_eq!(saved.version, 1);
    let e = &store.read_forward("order-5", 1, 1).await.unwrap()[0];
    assert_eq!(e.headers.correlation_id.as_deref(), Some("req-1"));
    assert_eq!(e.headers.extra["tenant"], "acme");
    let log = store.read_log(0, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].event_type, "integration.order-changed");
    assert!(store
        .bus()
        .kv_get("idempotency/req-1")
        .await
        .unwrap()
        .is_some());

    // The same idempotency key again: the key's condition fails, nothing is written, and it
    // is not retried as a stream conflict would be.
    let err = orders
        .execute_with("5", &add("A1", 1), &options)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommandError::Store(Error::Conflict(Conflict::Key { .. }))
        ),
        "{err:?}"
    );
    assert_eq!(store.stream_version("order-5").await.unwrap(), 1);
}

/// A handler that runs a command as its work acknowledges its delivery in the command's
/// commit: the save and the acknowledgement are one write, the bus does not acknowledge the
/// delivery again, and the operation that asked for it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_run_by_a_handler_acknowledges_its_delivery_in_the_save() {
    use std::sync::OnceLock;
    use txbus_core::{Bus, HandlerError, Message, On};

    let dir = tempfile::tempdir().unwrap();
    let repo: Arc<OnceLock<Repository<Order>>> = Arc::new(OnceLock::new());
    let runs = Arc::new(AtomicU32::new(0));
    let (r, n) = (repo.clone(), runs.clone());
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(dir.path().join("es.db")).unwrap())
        .handler(
            "cart",
            On::event("cart.item-requested"),
            move |m: Message| {
                let (repo, runs) = (r.clone(), n.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let orders = repo
                        .get()
                        .ok_or_else(|| HandlerError::transient("no repository"))?;
                    let sku = m.payload()["sku"].as_str().unwrap_or_default().to_owned();
                    orders
                        .execute_with(
                            "cart-1",
                            &add(&sku, 1),
                            &CommandOptions::new().acknowledging(&m),
                        )
                        .await
                        .map_err(HandlerError::transient)?;
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let store = EventStore::new(bus.clone());
    assert!(repo.set(Repository::<Order>::new(store.clone())).is_ok());
    for sku in ["A1", "B2"] {
        let op = bus
            .transact([Event::new("cart.item-requested", json!({ "sku": sku }))])
            .await
            .unwrap();
        assert!(op.outcome().await.unwrap().is_ok());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(store.stream_version("order-cart-1").await.unwrap(), 2);
    let counts = bus.inspect().handler_counts().await.unwrap();
    let cart = counts.iter().find(|c| c.handler == "cart").unwrap();
    assert_eq!((cart.succeeded, cart.retried), (2, 0), "{cart:?}");
    let d = bus.stats().await.unwrap().deliveries;
    assert_eq!((d.pending, d.leased, d.succeeded), (0, 0, 2));
}
