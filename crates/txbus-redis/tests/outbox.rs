//! The transactional outbox over a real broker: a service writes its business row and txbus
//! events inside its own PostgreSQL transaction (`PostgresStore::append_in`); once it commits,
//! the relay publishes the events to Redis Streams, in order; a rolled-back transaction leaves
//! neither the row nor anything on the broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use serde_json::json;
use sqlx::{Executor, PgPool};
use txbus_core::{Bus, Commit, Event, MessageId};
use txbus_postgres::{PostgresOptions, PostgresStore};
use txbus_redis::RedisPublisher;
use txbus_relay::{wire, Relay};

const REDIS: &str = "redis://127.0.0.1:6379";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn pg_url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The message ids of the entries of `stream`, in stream order.
async fn stream_ids(stream: &str) -> Vec<MessageId> {
    let mut conn = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let Value::Array(items) = reply else {
        panic!("XRANGE answered {reply:?}")
    };
    items
        .iter()
        .map(|item| {
            let Value::Array(parts) = item else {
                panic!("{item:?}")
            };
            let Value::Array(fields) = &parts[1] else {
                panic!("{item:?}")
            };
            fields
                .chunks(2)
                .find_map(|kv| match (&kv[0], &kv[1]) {
                    (Value::BulkString(k), Value::BulkString(v))
                        if k == wire::MESSAGE_ID.as_bytes() =>
                    {
                        Some(MessageId(String::from_utf8_lossy(v).parse().unwrap()))
                    }
                    _ => None,
                })
                .expect("every entry carries its message id")
        })
        .collect()
}

/// One business write and its event in one transaction of the service's own pool.
async fn place_order(
    pool: &PgPool,
    store: &PostgresStore,
    bus: &Bus,
    schema: &str,
    id: i64,
    commit: bool,
) -> MessageId {
    let event = Event::new("order.placed", json!({"id": id})).module("orders");
    let message_id = event.id();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO \"{schema}\".orders (id) VALUES ($1)"))
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let prepared = bus.prepare(Commit::new().event(event)).unwrap();
    store.append_in(&mut tx, prepared).await.unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    message_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_the_callers_transaction_are_relayed_after_its_commit_and_never_after_a_rollback()
{
    let schema = format!("t_{:016x}", fastrand::u64(..));
    let stream = format!("outbox-{:016x}", fastrand::u64(..));
    let store = PostgresOptions::new(pg_url())
        .schema(&schema)
        .max_connections(4)
        .connect()
        .await
        .unwrap();
    let pool = PgPool::connect(&pg_url()).await.unwrap();
    pool.execute(format!("CREATE TABLE \"{schema}\".orders (id BIGINT PRIMARY KEY)").as_str())
        .await
        .unwrap();
    let bus = Bus::builder()
        .shared_store(Arc::new(store.clone()))
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let to = stream.clone();
    let relay = Relay::builder(bus.clone(), "outbox", RedisPublisher::new(REDIS).unwrap())
        .route(move |_: &txbus_core::StoredMessage| to.clone())
        .poll_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();

    let mut committed = Vec::new();
    for id in 0..5 {
        committed.push(place_order(&pool, &store, &bus, &schema, id, true).await);
    }
    let rolled_back = place_order(&pool, &store, &bus, &schema, 99, false).await;
    committed.push(place_order(&pool, &store, &bus, &schema, 5, true).await);

    let relayed = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let ids = stream_ids(&stream).await;
            if ids.len() >= committed.len() {
                break ids;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay published the committed events");
    assert_eq!(
        relayed, committed,
        "each committed event once, in commit order"
    );
    assert!(!relayed.contains(&rolled_back));
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".orders"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 6, "the rolled-back order left no row");

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    txbus_core::Store::close(&store).await.unwrap();
    let _: redis::RedisResult<Value> = redis::cmd("DEL")
        .arg(&stream)
        .query_async(
            &mut redis::Client::open(REDIS)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await;
    pool.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .unwrap();
}
