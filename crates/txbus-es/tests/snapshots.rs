//! Snapshots: every N events and on demand, in the key–value space; a snapshot of another
//! snapshot version (or unreadable) is ignored, the stream replayed and a new one written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde::{Deserialize, Serialize};
use txbus_core::KvWrite;
use txbus_es::{snapshot_key, Aggregate, EventStore, Repository, Snapshot};

use common::{sqlite_bus, Order, OrderCommand, OrderError, OrderEvent};

fn add(sku: &str) -> OrderCommand {
    OrderCommand::Add {
        sku: sku.into(),
        qty: 1,
    }
}

/// The state of a stream rebuilt from its events alone.
async fn replayed(store: &EventStore, stream: &str) -> Order {
    let mut order = Order::default();
    for e in store.read_forward(stream, 1, 10_000).await.unwrap() {
        let event = <OrderEvent as txbus_es::DomainEvent>::decode(&e.event_type, &e.payload)
            .unwrap()
            .unwrap();
        order.apply(&event);
    }
    order
}

async fn stored_snapshot(store: &EventStore, stream: &str) -> Option<Snapshot<serde_json::Value>> {
    store
        .bus()
        .kv_get(&snapshot_key(stream))
        .await
        .unwrap()
        .map(|e| serde_json::from_slice(&e.value).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_every_n_events_and_loads_start_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone()).snapshot_every(5);

    let mut written_at = Vec::new();
    for i in 1..=12 {
        let saved = orders.execute("1", add(&format!("s{i}"))).await.unwrap();
        if saved.snapshot_written {
            written_at.push(saved.version);
        }
        if i == 4 {
            assert!(stored_snapshot(&store, "order-1").await.is_none());
        }
        if i == 7 {
            assert_eq!(
                stored_snapshot(&store, "order-1")
                    .await
                    .unwrap()
                    .stream_version,
                5
            );
        }
    }
    assert_eq!(written_at, [5, 10]);
    let snap = stored_snapshot(&store, "order-1").await.unwrap();
    assert_eq!(snap.stream_version, 10);
    assert_eq!(snap.snapshot_version, Order::SNAPSHOT_VERSION);
    // The snapshot holds the state after exactly its 10 events.
    let at_10: Order = serde_json::from_value(snap.state).unwrap();
    assert_eq!(at_10.adds, 10);
    assert!(at_10.items.contains_key("s10") && !at_10.items.contains_key("s11"));

    let loaded = orders.load("1").await.unwrap();
    assert_eq!(loaded.snapshot, Some(10));
    assert_eq!(loaded.replayed, 2);
    assert_eq!(loaded.version, 12);
    assert_eq!(loaded.state, replayed(&store, "order-1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let orders = Repository::<Order>::new(store.clone());
    assert_eq!(
        orders.snapshot("2").await.unwrap(),
        0,
        "no events: no snapshot"
    );
    assert!(stored_snapshot(&store, "order-2").await.is_none());

    for i in 0..7 {
        orders.execute("2", add(&format!("x{i}"))).await.unwrap();
    }
    // No automatic snapshots here.
    assert!(stored_snapshot(&store, "order-2").await.is_none());
    assert_eq!(orders.snapshot("2").await.unwrap(), 7);
    assert_eq!(
        stored_snapshot(&store, "order-2")
            .await
            .unwrap()
            .stream_version,
        7
    );

    let loaded = orders.load("2").await.unwrap();
    assert_eq!(
        (loaded.snapshot, loaded.replayed, loaded.version),
        (Some(7), 0, 7)
    );

    orders.execute("2", add("y")).await.unwrap();
    orders.execute("2", add("z")).await.unwrap();
    let loaded = orders.load("2").await.unwrap();
    assert_eq!(
        (loaded.snapshot, loaded.replayed, loaded.version),
        (Some(7), 2, 9)
    );
    assert_eq!(loaded.state, replayed(&store, "order-2").await);
}

/// The order aggregate after a change of its state's shape: snapshot version 2.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct OrderV2 {
    lines: Vec<(String, u32)>,
    placed: bool,
}

impl Aggregate for OrderV2 {
    const KIND: &'static str = "order";
    const SNAPSHOT_VERSION: u32 = 2;
    type Event = OrderEvent;
    type Command = ();
    type Error = OrderError;

    fn create(_id: &str) -> Self {
        Self::default()
    }
    fn handle(&self, _: &()) -> Result<Vec<OrderEvent>, OrderError> {
        Ok(vec![])
    }
    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Added(e) => self.lines.push((e.sku.clone(), e.qty)),
            OrderEvent::Removed(e) => self.lines.retain(|(s, _)| *s != e.sku),
            OrderEvent::Placed(_) => self.placed = true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_an_old_shape_is_ignored_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let v1 = Repository::<Order>::new(store.clone());
    for i in 0..6 {
        v1.execute("3", add(&format!("p{i}"))).await.unwrap();
    }
    v1.snapshot("3").await.unwrap();
    assert_eq!(
        stored_snapshot(&store, "order-3")
            .await
            .unwrap()
            .snapshot_version,
        1
    );

    // The new shape ignores the v1 snapshot, replays all six events, and writes its own.
    let v2 = Repository::<OrderV2>::new(store.clone());
    let loaded = v2.load("3").await.unwrap();
    assert_eq!(
        (loaded.snapshot, loaded.replayed, loaded.version),
        (None, 6, 6)
    );
    assert_eq!(loaded.state.lines.len(), 6);
    let snap = stored_snapshot(&store, "order-3").await.unwrap();
    assert_eq!((snap.snapshot_version, snap.stream_version), (2, 6));
    let loaded = v2.load("3").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (Some(6), 0));
    assert_eq!(loaded.state.lines.len(), 6);

    // And the old shape ignores the new one in turn (and is still right).
    let loaded = v1.load("3").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (None, 6));
    assert_eq!(loaded.state, replayed(&store, "order-3").await);

    // An unreadable snapshot is ignored and replaced too.
    store
        .bus()
        .kv_write(vec![KvWrite::put(
            snapshot_key("order-3"),
            b"{not json".to_vec(),
        )])
        .await
        .unwrap();
    let loaded = v1.load("3").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (None, 6));
    let loaded = v1.load("3").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (Some(6), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_replays_n_events_writes_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    let plain = Repository::<Order>::new(store.clone());
    for i in 0..8 {
        plain.execute("4", add(&format!("q{i}"))).await.unwrap();
    }
    // Pages smaller than the stream load the same state (and no snapshot is written here).
    let paged = Repository::<Order>::new(store.clone()).page_size(3);
    let loaded = paged.load("4").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (None, 8));
    assert_eq!(loaded.state, replayed(&store, "order-4").await);
    assert!(stored_snapshot(&store, "order-4").await.is_none());

    let every_5 = Repository::<Order>::new(store.clone()).snapshot_every(5);
    let loaded = every_5.load("4").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (None, 8));
    let loaded = every_5.load("4").await.unwrap();
    assert_eq!((loaded.snapshot, loaded.replayed), (Some(8), 0));
    assert_eq!(loaded.state, replayed(&store, "order-4").await);
}
