//! The relay and the inbox against the real Redis (127.0.0.1:6379), each test on streams of
//! its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use serde_json::json;
use txbus_core::{Backoff, Bus, Event, KvWrite, Message, MessageId, On, StoredMessage};
use txbus_redis::{RedisPublisher, RedisSource};
use txbus_relay::{checkpoint_key, read_checkpoint, wire, Inbox, Relay};
use txbus_sqlite::SqliteStore;

const REDIS: &str = "redis://127.0.0.1:6379";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(180);

type Handled = Arc<Mutex<HashMap<MessageId, u32>>>;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

async fn open_bus(dir: &tempfile::TempDir, file: &str, handled: Option<Handled>) -> Bus {
    // Counts the commits and positions it makes: no start-up or shutdown record.
    let mut builder = Bus::builder()
        .system_commits(false)
        .store(SqliteStore::open(dir.path().join(file)).unwrap());
    if let Some(handled) = handled {
        builder = builder.handler("count", On::all(), move |m: Message| {
            let handled = handled.clone();
            async move {
                *handled.lock().unwrap().entry(m.id()).or_insert(0) += 1;
                Ok(())
            }
        });
    }
    builder.build().await.unwrap()
}

async fn redis() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn commit_numbered(bus: &Bus, range: std::ops::Range<u64>) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for i in range {
        let event = Event::new("order.placed", json!({ "i": i })).module("order");
        ids.push(event.id());
        bus.publish(event).await.unwrap();
    }
    ids
}

fn field(fields: &[Value], name: &str) -> Option<String> {
    fields.chunks(2).find_map(|kv| match (&kv[0], &kv[1]) {
        (Value::BulkString(k), Value::BulkString(v)) if k == name.as_bytes() => {
            Some(String::from_utf8_lossy(v).into_owned())
        }
        _ => None,
    })
}

/// Every entry of `stream`: (message id field, payload "i").
async fn entries(conn: &mut MultiplexedConnection, stream: &str) -> Vec<(String, u64)> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
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
            let payload: serde_json::Value =
                serde_json::from_str(&field(fields, txbus_redis::PAYLOAD_FIELD).unwrap()).unwrap();
            (
                field(fields, wire::MESSAGE_ID).unwrap(),
                payload["i"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn delete(conn: &mut MultiplexedConnection, keys: &[&str]) {
    let _: redis::RedisResult<Value> = redis::cmd("DEL").arg(keys).query_async(conn).await;
}

fn to_stream(stream: &str) -> impl Fn(&StoredMessage) -> String + Send + Sync + 'static {
    let stream = stream.to_owned();
    move |_: &StoredMessage| stream.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_appends_in_log_order_with_message_ids() {
    let stream = unique("txbus-t");
    let mut conn = redis().await;
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(&dir, "origin.db", None).await;
    let n = 300;
    let ids = commit_numbered(&bus, 0..n).await;

    let relay = Relay::builder(bus.clone(), "out", RedisPublisher::new(REDIS).unwrap())
        .route(to_stream(&stream))
        .read_batch(32)
        .start()
        .await
        .unwrap();
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    let last = bus
        .read_log(0, 10_000)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;
    assert_eq!(status.checkpoint, last);
    assert_eq!(read_checkpoint(&bus, "out").await.unwrap(), last);

    let got = entries(&mut conn, &stream).await;
    let order: Vec<u64> = got.iter().map(|(_, i)| *i).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "log order kept");
    let got_ids: Vec<String> = got.into_iter().map(|(id, _)| id).collect();
    let want: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(got_ids, want);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&mut conn, &[&stream]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_advances_only_over_what_redis_confirmed() {
    let (good, bad) = (unique("txbus-t"), unique("txbus-t"));
    let mut conn = redis().await;
    // A plain string under the second stream's name: every XADD to it fails (WRONGTYPE).
    let _: Value = redis::cmd("SET")
        .arg(&bad)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(&dir, "origin.db", None).await;
    commit_numbered(&bus, 0..50).await;
    let log = bus.read_log(0, 100).await.unwrap();
    let tenth = log[9].position;
    let last = log.last().unwrap().position;

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
    let relay = Relay::builder(bus.clone(), "out", RedisPublisher::new(REDIS).unwrap())
        .route(route)
        .read_batch(5)
        .backoff(Backoff::fixed(Duration::from_millis(50)))
        .start()
        .await
        .unwrap();
    let mut watch = relay.watch();
    let status = tokio::time::timeout(
        HANG_GUARD,
        watch.wait_for(|s| s.failures >= 3 && s.checkpoint == tenth),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(status.last_error.unwrap_or_default().contains("WRONGTYPE"));
    assert_eq!(read_checkpoint(&bus, "out").await.unwrap(), tenth);
    assert_eq!(entries(&mut conn, &good).await.len(), 10);

    // The key becomes usable: the rest is appended, in order, once.
    delete(&mut conn, &[&bad]).await;
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.checkpoint, last);
    let rest: Vec<u64> = entries(&mut conn, &bad)
        .await
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    assert_eq!(rest, (10..50).collect::<Vec<_>>());
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&mut conn, &[&good, &bad]).await;
}

async fn wait_handled(handled: &Handled, n: usize) {
    tokio::time::timeout(HANG_GUARD, async {
        while handled.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every message handled within the hang guard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_commits_each_entry_once_and_drops_repeats() {
    let stream = unique("txbus-t");
    let mut conn = redis().await;
    let dir = tempfile::tempdir().unwrap();
    let origin = open_bus(&dir, "origin.db", None).await;
    let handled: Handled = Arc::default();
    let receiver = open_bus(&dir, "receiver.db", Some(handled.clone())).await;

    let source = RedisSource::new(REDIS, &stream, "billing", "billing-1").unwrap();
    let inbox = Inbox::builder(receiver.clone(), "orders", source)
        .concurrency(16)
        .start()
        .unwrap();
    let n = 200;
    let ids = commit_numbered(&origin, 0..n).await;
    let publisher = RedisPublisher::new(REDIS).unwrap();
    let relay = Relay::builder(origin.clone(), "out", publisher.clone())
        .route(to_stream(&stream))
        .start()
        .await
        .unwrap();
    wait_handled(&handled, ids.len()).await;
    relay.shutdown(Duration::from_secs(5)).await.unwrap();

    // Forget the checkpoint: the relay appends everything again, the inbox drops it all.
    origin
        .kv_write(vec![KvWrite::delete(checkpoint_key("out"))])
        .await
        .unwrap();
    let relay = Relay::builder(origin.clone(), "out", publisher)
        .route(to_stream(&stream))
        .start()
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, async {
        while inbox.stats().duplicates < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("repeats received within the hang guard");
    let stats = inbox.stats();
    assert_eq!(stats.committed, n);
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), ids.len());
    assert!(ids.iter().all(|id| handled.get(id) == Some(&1)));
    // Everything was acknowledged.
    let pending: Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("billing")
        .query_async(&mut conn)
        .await
        .unwrap();
    let Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(summary[0], Value::Int(0));

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&mut conn, &[&stream]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_pending_by_a_dead_consumer_are_reclaimed() {
    let stream = unique("txbus-t");
    let mut conn = redis().await;
    let dir = tempfile::tempdir().unwrap();
    let origin = open_bus(&dir, "origin.db", None).await;
    let n = 40;
    let ids = commit_numbered(&origin, 0..n).await;
    let relay = Relay::builder(origin.clone(), "out", RedisPublisher::new(REDIS).unwrap())
        .route(to_stream(&stream))
        .start()
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();

    // A consumer of the group reads half the entries and dies without acknowledging them.
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("billing")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("crashed")
        .arg("COUNT")
        .arg(20)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    let handled: Handled = Arc::default();
    let receiver = open_bus(&dir, "receiver.db", Some(handled.clone())).await;
    let source = RedisSource::new(REDIS, &stream, "billing", "billing-1")
        .unwrap()
        .claim_idle(Duration::from_millis(300));
    let inbox = Inbox::builder(receiver, "orders", source).start().unwrap();
    wait_handled(&handled, ids.len()).await;
    let handled = handled.lock().unwrap().clone();
    assert!(ids.iter().all(|id| handled.get(id) == Some(&1)));
    // The crashed consumer's entries were taken over and acknowledged.
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg("billing")
                .query_async(&mut conn)
                .await
                .unwrap();
            if matches!(&pending, Value::Array(s) if s[0] == Value::Int(0)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nothing pending within the hang guard");

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    delete(&mut conn, &[&stream]).await;
}

/// What one run under load saw: the ids sent, the relay's and the inbox's counters, and how
/// often each message was handled.
struct LoadOutcome {
    ids: Vec<MessageId>,
    status: txbus_relay::RelayStatus,
    stats: txbus_relay::InboxStats,
    handled: HashMap<MessageId, u32>,
}

/// Commits 3000 messages in chunks while the relay appends them to a fresh stream on the
/// server at `url` and the inbox consumes it through a consumer group; once traffic flows,
/// runs `fault` (given the stream's name), then waits until everything sent was handled and the relay drained.
async fn under_load<F, Fut>(url: &str, fault: F) -> LoadOutcome
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let stream = unique("txbus-t");
    let dir = tempfile::tempdir().unwrap();
    let origin = open_bus(&dir, "origin.db", None).await;
    let handled: Handled = Arc::default();
    let receiver = open_bus(&dir, "receiver.db", Some(handled.clone())).await;

    let source = RedisSource::new(url, &stream, "billing", "billing-1")
        .unwrap()
        .claim_idle(Duration::from_secs(1));
    let inbox = Inbox::builder(receiver.clone(), "orders", source)
        .concurrency(8)
        .backoff(Backoff::fixed(Duration::from_millis(100)))
        .start()
        .unwrap();
    let relay = Relay::builder(origin.clone(), "out", RedisPublisher::new(url).unwrap())
        .route(to_stream(&stream))
        .backoff(Backoff::fixed(Duration::from_millis(100)))
        .start()
        .await
        .unwrap();

    let total: u64 = 3000;
    let producer = {
        let origin = origin.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for chunk in 0..(total / 50) {
                ids.extend(commit_numbered(&origin, chunk * 50..(chunk + 1) * 50).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    tokio::time::timeout(HANG_GUARD, async {
        while handled.lock().unwrap().len() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("traffic flows before the faults");
    fault(stream.clone()).await;

    let ids = producer.await.unwrap();
    wait_handled(&handled, ids.len()).await;
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    let handled = handled.lock().unwrap().clone();
    let stats = inbox.stats();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    delete(&mut conn, &[&stream]).await;
    LoadOutcome {
        ids,
        status,
        stats,
        handled,
    }
}

impl LoadOutcome {
    /// Every message handled exactly once, every one committed by the inbox once; the faults
    /// were seen by the relay or the inbox. Repeats are only redeliveries the inbox dropped.
    fn assert_exactly_once(&self, fault: &str) {
        let (ids, status, stats) = (&self.ids, &self.status, &self.stats);
        eprintln!(
            "{fault}; sent {} committed, relayed {} (failures {}), inbox received {} committed {} duplicates {} broker errors {}",
            ids.len(),
            status.published,
            status.failures,
            stats.received,
            stats.committed,
            stats.duplicates,
            stats.broker_errors
        );
        assert_eq!(self.handled.len(), ids.len(), "nothing lost");
        assert!(
            ids.iter().all(|id| self.handled.get(id) == Some(&1)),
            "never handled twice"
        );
        assert_eq!(stats.committed, ids.len() as u64);
        assert_eq!(stats.discarded, 0, "nothing refused");
        assert!(
            status.failures > 0 || stats.broker_errors > 0,
            "the faults were seen"
        );
    }
}

/// Drops every client connection of the Redis server several times while messages are being
/// committed, relayed and received: the relay and the inbox reconnect and resume; every
/// message is handled exactly once, repeats are only redeliveries, dropped by the inbox. (Run
/// alone: it cuts the connections of every client of the shared server.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_of_connections_under_load_loses_nothing_and_handles_once() {
    let mut killed = 0;
    let counted = &mut killed;
    let outcome = under_load(REDIS, move |_| async move {
        let killed = counted;
        let mut killer = redis().await;
        for _ in 0..5 {
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut killer)
                .await
                .unwrap();
            *killed += n;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(killed > 0);
    outcome.assert_exactly_once(&format!("connections killed {killed}"));
}

/// A `redis-server` of the test's own, on a free loopback port, persisting every write to its
/// append-only file in a temp dir before answering, so that a restart keeps the streams and
/// the consumer groups. Killed when dropped.
struct OwnRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        server.spawn().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on the PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        tokio::time::timeout(HANG_GUARD, async {
            loop {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    // PING answers LOADING while the append-only file is read back.
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server answers within the hang guard");
    }

    async fn stream_len(&self, stream: &str) -> u64 {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Shuts the server down (`SHUTDOWN`: it syncs the append-only file and exits) and waits
    /// for the process to end.
    async fn stop(&mut self) {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        // The server closes the connection instead of answering.
        let _: redis::RedisResult<Value> = redis::cmd("SHUTDOWN").query_async(&mut conn).await;
        let mut child = self.child.take().unwrap();
        let status = tokio::time::timeout(HANG_GUARD, child.wait())
            .await
            .expect("redis-server exits within the hang guard")
            .unwrap();
        assert!(status.success(), "redis-server exited with {status}");
    }
}

/// Restarts the Redis server — shuts it down, keeps it down for two seconds, starts it again
/// on the same port and data — while messages are being committed, relayed and received: the
/// relay and the inbox reconnect by themselves and resume; every message is handled exactly
/// once, repeats are only redeliveries, dropped by the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load_loses_nothing_and_handles_once() {
    let mut server = OwnRedis::start().await;
    let url = server.url();
    let restarting = &mut server;
    let outcome = under_load(&url, move |stream| async move {
        let server = restarting;
        let before = server.stream_len(&stream).await;
        server.stop().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.spawn().await;
        let after = server.stream_len(&stream).await;
        eprintln!("stream entries before the restart {before}, after {after}");
        assert!(
            before > 0 && after >= before,
            "the stream survived the restart"
        );
    })
    .await;
    outcome.assert_exactly_once("server restarted once");
}
