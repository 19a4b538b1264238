//! Every feature once more on PostgreSQL, each test in a fresh schema: streams and conflicts,
//! the repository under concurrent writers, snapshots, projections (with a restart of the bus),
//! upcasters. On PostgreSQL the log only shows sealed commits, in position order; the
//! projection follows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Conflict, Event, ExpectedVersion, KvWrite};
use txbus_es::projection::{read_checkpoint, Projector};
use txbus_es::{CommandError, Error, EventStore, Repository, Upcasters};

use common::{count, dump, Counts, Order, OrderCommand, OrderError, PgSchema};

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `key` of the store's key–value space counts `n` (a hang guard bounds it).
async fn until_count(bus: &Bus, key: &str, n: u64) {
    guard(key, async {
        loop {
            if count(bus, key).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn add(sku: &str, qty: u32) -> OrderCommand {
    OrderCommand::Add {
        sku: sku.into(),
        qty,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_streams_versions_conflicts_and_atomic_commits() {
    let schema = PgSchema::new();
    let store = EventStore::new(schema.bus().await);
    let e = |n: u64| Event::new("test.n", json!({ "n": n }));
    let a = store
        .append("s-1", ExpectedVersion::NoStream, [e(1), e(2)])
        .await
        .unwrap();
    assert_eq!(a.version, 2);
    assert_eq!(
        store
            .append("s-1", ExpectedVersion::Any, [e(3)])
            .await
            .unwrap()
            .version,
        3
    );
    let err = store
        .append("s-1", ExpectedVersion::Exact(2), [e(4)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Stream { actual: 3, .. })),
        "{err:?}"
    );

    // Two streams, one stale: neither is written.
    let err = store
        .transaction()
        .append("s-2", ExpectedVersion::NoStream, [e(1)])
        .append("s-1", ExpectedVersion::Exact(1), [e(9)])
        .commit()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Stream { .. })),
        "{err:?}"
    );
    assert_eq!(store.stream_version("s-2").await.unwrap(), 0);
    let c = store
        .transaction()
        .append("s-2", ExpectedVersion::NoStream, [e(1)])
        .append("s-1", ExpectedVersion::Exact(3), [e(4), e(5)])
        .commit()
        .await
        .unwrap();
    assert_eq!((c.version("s-1"), c.version("s-2")), (Some(5), Some(1)));
    let back = store.read_backward("s-1", u64::MAX, 2).await.unwrap();
    assert_eq!(back.iter().map(|r| r.version).collect::<Vec<_>>(), [5, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_repository_concurrent_writers_and_invariants() {
    let schema = PgSchema::new();
    let store = EventStore::new(schema.bus().await);
    let orders = Repository::<Order>::new(store.clone()).max_attempts(100);
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let orders = orders.clone();
            tokio::spawn(async move {
                for i in 0..3 {
                    orders
                        .execute("1", add(&format!("t{t}-{i}"), 1))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let order = orders.load("1").await.unwrap();
    assert_eq!((order.version, order.state.adds), (30, 30));
    assert_eq!(order.state.items.len(), 30);

    let err = orders.execute("1", add("big", 71)).await.unwrap_err();
    assert!(matches!(
        err,
        CommandError::Domain(OrderError::TooManyItems(101))
    ));
    assert_eq!(store.stream_version("order-1").await.unwrap(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_snapshots_every_n_and_on_demand() {
    let schema = PgSchema::new();
    let store = EventStore::new(schema.bus().await);
    let orders = Repository::<Order>::new(store.clone()).snapshot_every(4);
    for i in 0..10 {
        orders.execute("2", add(&format!("s{i}"), 1)).await.unwrap();
    }
    let loaded = orders.load("2").await.unwrap();
    assert_eq!(
        (loaded.snapshot, loaded.replayed, loaded.version),
        (Some(8), 2, 10)
    );
    Repository::<Order>::new(store.clone())
        .snapshot("2")
        .await
        .unwrap();
    let loaded = orders.load("2").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (Some(10), 0));
    assert_eq!(loaded.state.adds, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_projection_catch_up_live_restart_rebuild_and_lag() {
    let schema = PgSchema::new();
    let append = |store: EventStore, from: u64, to: u64| async move {
        for n in from..to {
            store
                .append(
                    format!("item-{}", n % 2),
                    ExpectedVersion::Any,
                    [Event::new("item.added", json!({ "qty": 3 }))],
                )
                .await
                .unwrap();
        }
    };
    {
        let bus = schema.bus().await;
        let store = EventStore::new(bus.clone());
        append(store.clone(), 0, 8).await;
        let handle = Projector::read_model("pg-counts", Counts::new("rm/pg/"))
            .page_size(3)
            .start(&store)
            .await
            .unwrap();
        until_count(&bus, "rm/pg/events", 8).await;
        // Live.
        append(store.clone(), 8, 10).await;
        until_count(&bus, "rm/pg/events", 10).await;
        guard("catch-up", handle.catch_up()).await.unwrap();
        assert_eq!(handle.lag().await.unwrap(), 0);
        handle.stop().await.unwrap();
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    // A new bus on the same schema: the checkpoint is where it was, nothing is applied twice.
    let bus = schema.bus().await;
    let store = EventStore::new(bus.clone());
    let checkpoint = read_checkpoint(&bus, "pg-counts").await.unwrap();
    assert!(checkpoint > 0);
    append(store.clone(), 10, 12).await;
    let handle = Projector::read_model("pg-counts", Counts::new("rm/pg/"))
        .page_size(3)
        .start(&store)
        .await
        .unwrap();
    assert!(handle.checkpoint() >= checkpoint);
    until_count(&bus, "rm/pg/events", 12).await;
    assert_eq!(count(&bus, "rm/pg/qty").await, 36);
    let good = dump(&bus, "rm/pg/").await;

    // Rebuild from zero after damaging the read model.
    bus.kv_write(vec![KvWrite::put("rm/pg/events", b"1000".to_vec())])
        .await
        .unwrap();
    guard("rebuild", handle.rebuild()).await.unwrap();
    guard("catch-up", handle.catch_up()).await.unwrap();
    assert_eq!(dump(&bus, "rm/pg/").await, good);
    assert_eq!(handle.lag().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_upcasters_on_load_and_in_projections() {
    let schema = PgSchema::new();
    let bus = schema.bus().await;
    EventStore::new(bus.clone())
        .append(
            "order-3",
            ExpectedVersion::NoStream,
            [Event::new("order.item-added", json!({"sku": "A", "quantity": 4})).module("order")],
        )
        .await
        .unwrap();
    let store = EventStore::new(bus.clone()).with_upcasters(Upcasters::new().register(
        "order.item-added",
        1,
        2,
        |mut v| {
            let q = v
                .as_object_mut()
                .and_then(|o| o.remove("quantity"))
                .ok_or("no quantity")?;
            v["qty"] = q;
            Ok(v)
        },
    ));
    let orders = Repository::<Order>::new(store.clone());
    assert_eq!(orders.load("3").await.unwrap().state.items["A"], 4);
    orders.execute("3", add("B", 2)).await.unwrap();
    let _handle = Projector::read_model("pg-up", Counts::new("rm/up/"))
        .start(&store)
        .await
        .unwrap();
    until_count(&bus, "rm/up/qty", 6).await;
}
