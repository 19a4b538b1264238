//! Upcasters: events stored in an old shape are seen in the current one, by stream reads,
//! aggregate loads and projections; new events are stamped with the current version.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use serde_json::json;
use txbus_core::{Event, ExpectedVersion};
use txbus_es::projection::Projector;
use txbus_es::{Error, EventStore, Repository, Upcasters, SCHEMA_VERSION_HEADER};

use common::{count, sqlite_bus, Counts, Order, OrderCommand};

/// `order.item-added` v1 said `quantity`; v2 says `qty`; v3 adds a `note`.
fn upcasters() -> Upcasters {
    Upcasters::new()
        .register("order.item-added", 1, 2, |mut v| {
            let q = v
                .as_object_mut()
                .and_then(|o| o.remove("quantity"))
                .ok_or("no quantity")?;
            v["qty"] = q;
            Ok(v)
        })
        .register("order.item-added", 2, 3, |mut v| {
            v["note"] = json!("");
            Ok(v)
        })
}

/// Appends three events in the v1 shape, as an old version of the program did.
async fn old_events(raw: &EventStore) {
    for (sku, quantity) in [("A", 1), ("B", 2), ("A", 3)] {
        raw.append(
            "order-1",
            ExpectedVersion::Any,
            [Event::new(
                "order.item-added",
                json!({"sku": sku, "quantity": quantity}),
            )
            .module("order")],
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_upcast_on_read_and_on_load_and_new_ones_are_stamped() {
    let dir = tempfile::tempdir().unwrap();
    let bus = sqlite_bus(&dir.path().join("es.db")).await;
    let raw = EventStore::new(bus.clone());
    old_events(&raw).await;

    // Without the upcasters, the old shape does not decode into today's event.
    let err = Repository::<Order>::new(raw.clone())
        .load("1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");

    let store = EventStore::new(bus.clone()).with_upcasters(upcasters());
    let read = store.read_forward("order-1", 1, 10).await.unwrap();
    assert_eq!(read[1].payload, json!({"sku": "B", "qty": 2, "note": ""}));
    assert_eq!(
        (read[1].stored_schema_version, read[1].schema_version),
        (1, 3)
    );

    let orders = Repository::<Order>::new(store.clone());
    let order = orders.load("1").await.unwrap();
    assert_eq!(order.state.items["A"], 4);
    assert_eq!(order.state.items["B"], 2);

    // New events are stamped with the current version and read as they are.
    orders
        .execute(
            "1",
            OrderCommand::Add {
                sku: "C".into(),
                qty: 5,
            },
        )
        .await
        .unwrap();
    let new = &store.read_forward("order-1", 4, 1).await.unwrap()[0];
    assert_eq!(new.headers.extra[SCHEMA_VERSION_HEADER], "3");
    assert_eq!((new.stored_schema_version, new.schema_version), (3, 3));
    assert_eq!(orders.load("1").await.unwrap().state.items["C"], 5);

    // The log reads upcast too.
    let log = store.read_log(0, 10).await.unwrap();
    assert!(log.iter().all(|e| e.payload.get("qty").is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_see_the_current_shape() {
    let dir = tempfile::tempdir().unwrap();
    let bus = sqlite_bus(&dir.path().join("es.db")).await;
    old_events(&EventStore::new(bus.clone())).await;
    let store = EventStore::new(bus.clone()).with_upcasters(upcasters());
    store
        .append(
            "order-1",
            ExpectedVersion::Exact(3),
            [Event::new(
                "order.item-added",
                json!({"sku": "D", "qty": 10, "note": "n"}),
            )],
        )
        .await
        .unwrap();
    // `Counts` sums the `qty` field, which only the current shape has.
    let handle = Projector::read_model("qty", Counts::new("rm/qty/"))
        .start(&store)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), handle.catch_up())
        .await
        .expect("catch-up")
        .unwrap();
    assert_eq!(count(&bus, "rm/qty/qty").await, 16);
    assert_eq!(count(&bus, "rm/qty/events").await, 4);
}

#[test]
fn a_version_without_a_path_or_newer_than_known_is_an_error() {
    let up = upcasters();
    assert_eq!(up.current_version("order.item-added"), 3);
    assert_eq!(up.current_version("order.placed"), 1);
    let err = up.upcast("order.item-added", 4, json!({})).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
    let err = up
        .upcast("order.item-added", 1, json!({"sku": "A"}))
        .unwrap_err();
    assert!(err.to_string().contains("no quantity"), "{err}");
    let gap = Upcasters::new().register("x.y", 2, 3, Ok);
    let err = gap.upcast("x.y", 1, json!({})).unwrap_err();
    assert!(
        err.to_string().contains("no upcaster from version 1"),
        "{err}"
    );
    // A step that does not go up is refused, and reads of its type say so.
    let backwards = Upcasters::new().register("x.z", 2, 1, Ok);
    assert!(!backwards.is_empty());
    let err = backwards.upcast("x.z", 1, json!({})).unwrap_err();
    assert!(err.to_string().contains("from version 2 to 1"), "{err}");
    // Events of a type without upcasters pass through untouched.
    assert_eq!(
        up.upcast("order.placed", 1, json!({"a": 1})).unwrap(),
        (json!({"a": 1}), 1)
    );
}
