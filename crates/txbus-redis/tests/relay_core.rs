//! The relay core against the real Redis (127.0.0.1:6379): the checkpoint advances only after
//! Redis answered, a failed batch is sent again from the checkpoint in order, and a checkpoint
//! moved by another relay of the same name is reloaded, not overwritten. Each test uses
//! streams and keys of its own; failures come from Redis itself (a key of the wrong type
//! refuses `XADD`), and unanswered writes from `CLIENT PAUSE WRITE`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use serde_json::json;
use txbus_core::{Backoff, Bus, Event, KvExpect, KvWrite, MessageId, StoredMessage};
use txbus_redis::RedisPublisher;
use txbus_relay::{checkpoint_key, read_checkpoint, wire, Relay};
use txbus_sqlite::SqliteStore;

const REDIS: &str = "redis://127.0.0.1:6379";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(180);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A fresh connection for each use: another test of this crate drops every client connection
/// of the server now and then.
async fn redis() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn bus(dir: &tempfile::TempDir) -> Bus {
    Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap()
}

async fn commit_events(bus: &Bus, n: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let e = Event::new("thing.happened", json!({"i": i})).module("m");
        ids.push(e.id());
        bus.publish(e).await.unwrap();
    }
    ids
}

/// The message ids of every entry of `stream`, in stream order.
async fn stored(stream: &str) -> Vec<MessageId> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis().await)
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
            let id = fields
                .chunks(2)
                .find_map(|kv| match (&kv[0], &kv[1]) {
                    (Value::BulkString(k), Value::BulkString(v))
                        if k == wire::MESSAGE_ID.as_bytes() =>
                    {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                })
                .expect("every entry carries its message id");
            MessageId(id.parse().unwrap())
        })
        .collect()
}

async fn delete(keys: &[&str]) {
    let _: redis::RedisResult<Value> = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut redis().await)
        .await;
}

/// Makes `key` a plain string: every `XADD` to it fails (WRONGTYPE) until it is deleted.
async fn poison(key: &str) {
    let _: Value = redis::cmd("SET")
        .arg(key)
        .arg("not a stream")
        .query_async(&mut redis().await)
        .await
        .unwrap();
}

fn to_stream(stream: &str) -> impl Fn(&StoredMessage) -> String + Send + Sync + 'static {
    let stream = stream.to_owned();
    move |_: &StoredMessage| stream.clone()
}

/// While alive, Redis holds every write command of every client unanswered (`CLIENT PAUSE …
/// WRITE`); reads go on. Dropping it (also on a failed assertion) lets the writes through.
struct WritesPaused;

impl WritesPaused {
    async fn start() -> Self {
        // The pause ends on its own after this long, should the process die before dropping.
        let _: Value = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(60_000)
            .arg("WRITE")
            .query_async(&mut redis().await)
            .await
            .unwrap();
        Self
    }
}

impl Drop for WritesPaused {
    fn drop(&mut self) {
        // No panic here: this may run while a failed assertion unwinds.
        let unpaused = redis::Client::open(REDIS)
            .and_then(|client| client.get_connection())
            .and_then(|mut conn| {
                redis::cmd("CLIENT")
                    .arg("UNPAUSE")
                    .query::<Value>(&mut conn)
            });
        if let Err(e) = unpaused {
            eprintln!("CLIENT UNPAUSE failed ({e}); the pause ends on its own within a minute");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_advances_only_after_the_broker_confirmed() {
    let stream = unique("txbus-core-gated");
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    let ids = commit_events(&bus, 10).await;

    // Redis receives the XADDs but answers none of them while writes are paused.
    let paused = WritesPaused::start().await;
    let relay = Relay::builder(bus.clone(), "gated", RedisPublisher::new(REDIS).unwrap())
        .route(to_stream(&stream))
        .read_batch(3)
        .start()
        .await
        .unwrap();
    // Everything is handed to Redis (pipelined), nothing is confirmed yet.
    let status = tokio::time::timeout(
        HANG_GUARD,
        relay
            .watch()
            .wait_for(|s| s.head == 10 && s.in_flight == 10),
    )
    .await
    .expect("every message sent within the hang guard")
    .unwrap()
    .clone();
    assert_eq!(status.in_flight, 10, "many messages in flight at once");
    assert_eq!(status.checkpoint, 0);
    assert_eq!(status.confirmed, 0);
    assert_eq!(
        read_checkpoint(&bus, "gated").await.unwrap(),
        0,
        "nothing stored before confirmation"
    );
    assert_eq!(status.lag(), 10);
    assert!(
        stored(&stream).await.is_empty(),
        "Redis has appended nothing"
    );
    let status = relay.status();
    assert_eq!((status.checkpoint, status.confirmed), (0, 0));

    drop(paused);
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.checkpoint, 10);
    assert_eq!(status.lag(), 0);
    assert_eq!(read_checkpoint(&bus, "gated").await.unwrap(), 10);
    assert_eq!(stored(&stream).await, ids, "in log order");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&[&stream]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_sent_again_from_the_checkpoint_in_order() {
    let (good, bad) = (unique("txbus-core-flaky"), unique("txbus-core-flaky-bad"));
    // The second batch (messages 4 to 7) goes to a key Redis refuses to append to; every
    // other message goes to a usable stream.
    poison(&bad).await;
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    let ids = commit_events(&bus, 20).await;
    let route = {
        let (good, bad) = (good.clone(), bad.clone());
        move |m: &StoredMessage| {
            if (4..8).contains(&m.payload["i"].as_u64().unwrap()) {
                bad.clone()
            } else {
                good.clone()
            }
        }
    };
    let relay = Relay::builder(bus.clone(), "flaky", RedisPublisher::new(REDIS).unwrap())
        .route(route)
        .read_batch(4)
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();

    // The first batch is confirmed; the second is refused, and however often it is sent again
    // (later batches possibly confirmed meanwhile), the checkpoint stays before it.
    let status = tokio::time::timeout(
        HANG_GUARD,
        relay
            .watch()
            .wait_for(|s| s.failures >= 1 && s.checkpoint == 4),
    )
    .await
    .expect("a refused batch within the hang guard")
    .unwrap()
    .clone();
    assert!(
        status.last_error.unwrap_or_default().contains("WRONGTYPE"),
        "the failure is Redis's refusal"
    );
    assert_eq!(read_checkpoint(&bus, "flaky").await.unwrap(), 4);
    let kind: String = redis::cmd("TYPE")
        .arg(&bad)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    assert_eq!(kind, "string", "nothing of the refused batch appended");

    // Redis accepts the batch from now on.
    delete(&[&bad]).await;
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.checkpoint, 20);
    assert!(status.failures >= 1);
    assert_eq!(read_checkpoint(&bus, "flaky").await.unwrap(), 20);

    let in_bad = stored(&bad).await;
    assert_eq!(
        in_bad,
        &ids[4..8],
        "the refused batch, sent again from the checkpoint, in order"
    );
    let in_good = stored(&good).await;
    assert_eq!(&in_good[..4], &ids[..4], "the confirmed batch, once");
    // After the refusal everything from the checkpoint on is sent again: the batches after the
    // refused one, possibly confirmed before, arrive again, ending the stream in log order.
    assert!(in_good[4..].iter().all(|id| ids[8..].contains(id)));
    assert_eq!(
        &in_good[in_good.len() - 12..],
        &ids[8..],
        "resent from the checkpoint, not from the failure on"
    );
    let mut first_seen = Vec::new();
    for id in &in_good {
        if !first_seen.contains(id) {
            first_seen.push(*id);
        }
    }
    let mut expected = ids[..4].to_vec();
    expected.extend_from_slice(&ids[8..]);
    assert_eq!(first_seen, expected, "every message, in log order");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&[&good, &bad]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_moved_by_another_relay_is_reloaded_not_overwritten() {
    let stream = unique("txbus-core-twin");
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    commit_events(&bus, 5).await;
    let relay = Relay::builder(bus.clone(), "twin", RedisPublisher::new(REDIS).unwrap())
        .route(to_stream(&stream))
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    // Another relay with the same name writes the checkpoint (further on).
    let key = checkpoint_key("twin");
    let entry = bus.kv_get(&key).await.unwrap().unwrap();
    bus.kv_write(vec![
        KvWrite::put(key.clone(), b"7".to_vec()).expect(KvExpect::Version(entry.version))
    ])
    .await
    .unwrap();
    let later = commit_events(&bus, 4).await;
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert!(status.failures >= 1, "the stale write was refused");
    assert_eq!(status.checkpoint, 9);
    assert_eq!(read_checkpoint(&bus, "twin").await.unwrap(), 9);
    let stored = stored(&stream).await;
    for id in &later[2..] {
        assert!(
            stored.contains(id),
            "resumed from the other relay's checkpoint"
        );
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&[&stream]).await;
}
