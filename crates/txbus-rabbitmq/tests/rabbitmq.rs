//! The relay and the inbox against the real RabbitMQ (amqp://guest:guest@127.0.0.1:5672/%2f),
//! each test on an exchange and queues of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use txbus_core::{Backoff, Bus, Event, KvWrite, Message, MessageId, On};
use txbus_rabbitmq::{RabbitPublisher, RabbitSource};
use txbus_relay::{checkpoint_key, read_checkpoint, Inbox, Relay};
use txbus_sqlite::SqliteStore;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(180);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

async fn open_bus(dir: &tempfile::TempDir, file: &str, handled: Option<Handled>) -> Bus {
    let mut builder = Bus::builder().store(SqliteStore::open(dir.path().join(file)).unwrap());
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

type Handled = Arc<Mutex<HashMap<MessageId, u32>>>;

/// A raw channel of the test's own, to declare, inspect and clean up.
async fn raw_channel() -> (Connection, Channel) {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Declares `exchange` (durable topic) and a queue bound to it with `#`.
async fn queue_on(channel: &Channel, exchange: &str, queue: &str, arguments: FieldTable) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn clean_up(channel: &Channel, exchange: &str, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.into(), Default::default())
        .await;
}

/// Takes messages off `queue`, acking each, until `n` distinct message ids arrived; returns
/// (message id property, payload "i", persistent) of each first arrival, in arrival order.
async fn take(channel: &Channel, queue: &str, n: usize) -> Vec<(String, u64, bool)> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(HANG_GUARD, async {
        while out.len() < n {
            let d = consumer.next().await.unwrap().unwrap();
            let payload: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let id = d.properties.message_id().as_ref().unwrap().to_string();
            let persistent = *d.properties.delivery_mode() == Some(2);
            if !out.iter().any(|(seen, _, _)| *seen == id) {
                out.push((id, payload["i"].as_u64().unwrap(), persistent));
            }
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    })
    .await
    .expect("messages within the hang guard");
    out
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_in_log_order_persistent_with_message_ids() {
    let (exchange, queue) = (unique("txbus-t"), unique("q"));
    let (_conn, channel) = raw_channel().await;
    queue_on(&channel, &exchange, &queue, FieldTable::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(&dir, "origin.db", None).await;
    let n = 300;
    let ids = commit_numbered(&bus, 0..n).await;

    let relay = Relay::builder(bus.clone(), "out", RabbitPublisher::new(AMQP, &exchange))
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

    let got = take(&channel, &queue, usize::try_from(n).unwrap()).await;
    let order: Vec<u64> = got.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "log order kept");
    let got_ids: Vec<String> = got.iter().map(|(id, _, _)| id.clone()).collect();
    let want_ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(got_ids, want_ids);
    assert!(got.iter().all(|(_, _, persistent)| *persistent));

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    clean_up(&channel, &exchange, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_advances_only_over_what_rabbitmq_confirmed() {
    let (exchange, queue) = (unique("txbus-t"), unique("q"));
    let (_conn, channel) = raw_channel().await;
    // The queue takes 10 messages and refuses (negative confirms) the rest while full.
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    queue_on(&channel, &exchange, &queue, arguments).await;
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(&dir, "origin.db", None).await;
    commit_numbered(&bus, 0..50).await;
    let log = bus.read_log(0, 100).await.unwrap();
    let tenth = log[9].position;
    let last = log.last().unwrap().position;

    let relay = Relay::builder(bus.clone(), "out", RabbitPublisher::new(AMQP, &exchange))
        .read_batch(5)
        .backoff(Backoff::fixed(Duration::from_millis(50)))
        .start()
        .await
        .unwrap();
    let mut watch = relay.watch();
    tokio::time::timeout(HANG_GUARD, watch.wait_for(|s| s.failures >= 3))
        .await
        .unwrap()
        .unwrap();
    // Only the ten messages the broker confirmed are behind the checkpoint.
    let status = tokio::time::timeout(
        HANG_GUARD,
        watch.wait_for(|s| s.checkpoint == tenth && s.failures >= 4),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(status.last_error.unwrap_or_default().contains("refused"));
    assert_eq!(read_checkpoint(&bus, "out").await.unwrap(), tenth);

    // Consuming makes room: the rest is confirmed, in order (a batch refused in part is sent
    // again from its start, so a message may arrive twice; the first arrivals keep the order).
    let got = take(&channel, &queue, 50).await;
    let order: Vec<u64> = got.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>());
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.checkpoint, last);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    clean_up(&channel, &exchange, &queue).await;
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
async fn inbox_commits_each_message_once_and_drops_redeliveries() {
    let (exchange, queue) = (unique("txbus-t"), unique("q"));
    let (_conn, channel) = raw_channel().await;
    let dir = tempfile::tempdir().unwrap();
    let origin = open_bus(&dir, "origin.db", None).await;
    let handled: Handled = Arc::default();
    let receiver = open_bus(&dir, "receiver.db", Some(handled.clone())).await;

    // The queue exists before anything is published: RabbitMQ drops what no queue is bound for.
    queue_on(&channel, &exchange, &queue, FieldTable::default()).await;
    let source = RabbitSource::new(AMQP, &queue).bind(&exchange, "txbus.order.#");
    let inbox = Inbox::builder(receiver.clone(), "orders", source)
        .concurrency(16)
        .start()
        .unwrap();
    let n = 200;
    let ids = commit_numbered(&origin, 0..n).await;
    let publisher = RabbitPublisher::new(AMQP, &exchange);
    let relay = Relay::builder(origin.clone(), "out", publisher.clone())
        .start()
        .await
        .unwrap();
    wait_handled(&handled, ids.len()).await;
    relay.shutdown(Duration::from_secs(5)).await.unwrap();

    // Forget the checkpoint: the relay sends everything again, and the inbox drops it all.
    origin
        .kv_write(vec![KvWrite::delete(checkpoint_key("out"))])
        .await
        .unwrap();
    let relay = Relay::builder(origin.clone(), "out", publisher)
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
    assert!(stats.duplicates >= n);
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), ids.len());
    assert!(ids.iter().all(|id| handled.get(id) == Some(&1)));

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    clean_up(&channel, &exchange, &queue).await;
}

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restarts the RabbitMQ application while messages are being committed, relayed and
/// received: the relay and the inbox reconnect and resume; every message is handled exactly
/// once, repeats are only redeliveries, dropped by the inbox. (Run alone: it stops the broker
/// every test shares.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_under_load_loses_nothing_and_handles_once() {
    let (exchange, queue) = (unique("txbus-t"), unique("q"));
    let dir = tempfile::tempdir().unwrap();
    let origin = open_bus(&dir, "origin.db", None).await;
    let handled: Handled = Arc::default();
    let receiver = open_bus(&dir, "receiver.db", Some(handled.clone())).await;

    // The queue exists before anything is published: RabbitMQ drops what no queue is bound for.
    {
        let (_conn, channel) = raw_channel().await;
        queue_on(&channel, &exchange, &queue, FieldTable::default()).await;
    }
    let source = RabbitSource::new(AMQP, &queue).bind(&exchange, "#");
    let inbox = Inbox::builder(receiver.clone(), "orders", source)
        .concurrency(8)
        .backoff(Backoff::fixed(Duration::from_millis(200)))
        .start()
        .unwrap();
    let relay = Relay::builder(origin.clone(), "out", RabbitPublisher::new(AMQP, &exchange))
        .backoff(Backoff::fixed(Duration::from_millis(200)))
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
    // Restart once traffic flows.
    tokio::time::timeout(HANG_GUARD, async {
        while handled.lock().unwrap().len() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("traffic flows before the restart");
    rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;

    let ids = producer.await.unwrap();
    wait_handled(&handled, ids.len()).await;
    let status = tokio::time::timeout(HANG_GUARD, relay.drained())
        .await
        .unwrap()
        .unwrap();
    let handled = handled.lock().unwrap().clone();
    let stats = inbox.stats();
    eprintln!(
        "sent {} committed, relayed {} (failures {}), inbox received {} committed {} duplicates {}",
        ids.len(),
        status.published,
        status.failures,
        stats.received,
        stats.committed,
        stats.duplicates
    );
    assert_eq!(handled.len(), ids.len(), "nothing lost");
    assert!(
        ids.iter().all(|id| handled.get(id) == Some(&1)),
        "never handled twice"
    );
    assert_eq!(stats.committed, total);
    assert!(
        status.failures > 0 || stats.broker_errors > 0,
        "the restart was seen"
    );

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    let (_conn, channel) = raw_channel().await;
    clean_up(&channel, &exchange, &queue).await;
}
