//! Relay and projection lag on `/metrics`, scraped over real HTTP while a relay to the real
//! Redis server is held back by a key it cannot append to and a projection is held at a page,
//! then once both have caught up: each gauge says what the relay's and the projection's own
//! state say.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::sync::Semaphore;
use txbus_core::{Backoff, Bus, Event, StoredMessage};
use txbus_es::projection::Projector;
use txbus_es::{BoxError, EventStore, ExternalProjection, LogEvent};
use txbus_redis::RedisPublisher;
use txbus_relay::Relay;
use txbus_sqlite::SqliteStore;

use common::{get, parse, scrape_expecting, value};

const REDIS: &str = "redis://127.0.0.1:6379";
/// A bound only a stuck run reaches; never a measurement.
const HANG: Duration = Duration::from_secs(60);

/// An external projection that handles one page per permit of its gate.
struct Gated(Arc<Semaphore>);

#[txbus_es::async_trait]
impl ExternalProjection for Gated {
    async fn handle(&self, _events: &[LogEvent]) -> Result<(), BoxError> {
        self.0.acquire().await?.forget();
        Ok(())
    }
}

async fn redis() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_projection_lag_gauges_follow_their_state() {
    let metrics = txbus_metrics::Metrics::builder().install().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No start-up record: the log holds only the orders below.
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("lag.db")).unwrap())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    metrics.watch("lag", &bus);
    for i in 0..20u64 {
        bus.publish(Event::new("order.placed", json!({ "i": i })))
            .await
            .unwrap();
    }
    let log = bus.read_log(0, 100).await.unwrap();
    assert_eq!(log.len(), 20);
    let head = log[19].position;
    let fifth = log[4].position;
    let tenth = log[9].position;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = metrics.router();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // A projection in pages of five commits, let through its first page only.
    let gate = Arc::new(Semaphore::new(1));
    let projection = Projector::external("order-totals", Gated(Arc::clone(&gate)))
        .page_size(5)
        .start(&EventStore::new(bus.clone()))
        .await
        .unwrap();
    tokio::time::timeout(HANG, projection.wait_for(fifth))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(projection.checkpoint(), fifth);
    assert_eq!(projection.lag().await.unwrap(), head - fifth);
    assert_eq!(projection.last_lag(), head - fifth);
    scrape_expecting(
        addr,
        &[
            (
                "txbus_projection_lag",
                vec![("projection", "order-totals")],
                (head - fifth) as f64,
            ),
            (
                "txbus_projection_position",
                vec![("projection", "order-totals")],
                fifth as f64,
            ),
        ],
    )
    .await;

    // A relay whose first ten messages go to a stream, the rest to a key holding a string:
    // Redis refuses those appends (WRONGTYPE), so its checkpoint stops at the tenth.
    let suffix = format!("{:016x}", fastrand::u64(..));
    let (good, bad) = (
        format!("txbus-m-{suffix}-ok"),
        format!("txbus-m-{suffix}-no"),
    );
    let mut conn = redis().await;
    let _: redis::Value = redis::cmd("SET")
        .arg(&bad)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let route = {
        let (good, bad) = (good.clone(), bad.clone());
        move |m: &StoredMessage| {
            if m.payload["i"].as_u64().unwrap() < 10 {
                good.clone()
            } else {
                bad.clone()
            }
        }
    };
    let relay = Relay::builder(
        bus.clone(),
        "orders-out",
        RedisPublisher::new(REDIS).unwrap(),
    )
    .route(route)
    // Batches of five: the first two are appended, the third is refused as a whole.
    .read_batch(5)
    .backoff(Backoff::fixed(Duration::from_millis(50)))
    .start()
    .await
    .unwrap();
    let held = tokio::time::timeout(
        HANG,
        relay
            .watch()
            .wait_for(|s| s.failures >= 1 && s.checkpoint == tenth && s.head == head),
    )
    .await
    .unwrap_or_else(|_| panic!("head {head}, tenth {tenth}: {:?}", relay.status()))
    .unwrap()
    .clone();
    assert_eq!(held.lag(), head - tenth);
    let body = scrape_expecting(
        addr,
        &[(
            "txbus_relay_lag",
            vec![("relay", "orders-out")],
            (head - tenth) as f64,
        )],
    )
    .await;
    let samples = parse(&body);
    let relay_failures = value(
        &samples,
        "txbus_relay_failures_total",
        &[("relay", "orders-out")],
    )
    .expect("the relay's failures are counted");
    assert!(relay_failures >= 1.0, "{body}");
    let relay_published = value(
        &samples,
        "txbus_relay_published_total",
        &[("relay", "orders-out")],
    )
    .expect("the relay's confirmations are counted");
    assert!(relay_published >= 10.0, "{body}");

    // The key becomes a usable stream: the relay drains, its lag drops to 0, and the counters
    // say what its status says.
    let _: redis::Value = redis::cmd("DEL")
        .arg(&bad)
        .query_async(&mut conn)
        .await
        .unwrap();
    let drained = tokio::time::timeout(HANG, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(drained.checkpoint, head);
    assert_eq!(drained.lag(), 0);
    scrape_expecting(
        addr,
        &[
            ("txbus_relay_lag", vec![("relay", "orders-out")], 0.0),
            (
                "txbus_relay_published_total",
                vec![("relay", "orders-out")],
                drained.published as f64,
            ),
            (
                "txbus_relay_failures_total",
                vec![("relay", "orders-out")],
                drained.failures as f64,
            ),
        ],
    )
    .await;

    // The projection goes on to the head.
    gate.add_permits(10);
    tokio::time::timeout(HANG, projection.catch_up())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(projection.checkpoint(), head);
    scrape_expecting(
        addr,
        &[
            (
                "txbus_projection_lag",
                vec![("projection", "order-totals")],
                0.0,
            ),
            (
                "txbus_projection_position",
                vec![("projection", "order-totals")],
                head as f64,
            ),
        ],
    )
    .await;
    // The store's view of the same bus is scraped beside them.
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(
        value(&parse(&body), "txbus_log_commits", &[("bus", "lag")]),
        Some(20.0),
        "{body}"
    );

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    let _: redis::Value = redis::cmd("DEL")
        .arg(&good)
        .arg(&bad)
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
