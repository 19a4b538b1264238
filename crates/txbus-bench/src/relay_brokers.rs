//! The RabbitMQ and Redis Streams relays against the raw publish rate of the same client
//! library, with the same pipelining, in the same run.
//!
//! `relay-rabbitmq` / `relay-redis` commit N messages with `publish` first (N = 50 000), then
//! time a relay draining them until the broker confirmed every one and the checkpoint is
//! stored. `raw-rabbitmq` publishes the same number of messages (same payloads, same
//! properties and headers, persistent, publisher confirms) with lapin directly;
//! `raw-redis` sends the same `XADD`s with the redis crate directly: both in batches of the
//! relay's size with the same number of messages in flight. Either name runs the pair and
//! prints their ratio.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::json;
use txbus::{Bus, Event, SqliteStore};
use txbus_rabbitmq::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use txbus_rabbitmq::lapin::types::FieldTable;
use txbus_rabbitmq::lapin::{self, Confirmation, ExchangeKind};
use txbus_rabbitmq::RabbitPublisher;
use txbus_redis::redis;
use txbus_redis::RedisPublisher;
use txbus_relay::{OutboundMessage, Publisher, Relay};

use crate::report::{print_check, Line};
use crate::scenarios::{workdir, BoxError};
use crate::Args;

/// Messages relayed (and published raw) per run.
const MESSAGES: usize = 50_000;
/// Commits read per relay batch, and messages per raw batch.
const BATCH: usize = 512;
/// Messages awaiting confirmation at most, for both.
const IN_FLIGHT: usize = 4096;

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Runs a RabbitMQ or Redis scenario, or returns `None` when `args` names another one.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "relay-rabbitmq" | "raw-rabbitmq" => rabbitmq(args).await,
        "relay-redis" | "raw-redis" => redis_pair(args).await,
        _ => return None,
    };
    Some(result)
}

fn payload(i: usize) -> serde_json::Value {
    json!({"order": i, "sku": "A-1234", "quantity": 3, "note": "bench"})
}

/// A bus holding `MESSAGES` committed messages, from many callers.
async fn committed_bus(args: &Args) -> Result<(Bus, tempfile::TempDir), BoxError> {
    let dir = workdir(args)?;
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db"))?)
        .build()
        .await?;
    let callers = 256;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while i < MESSAGES {
                bus.publish(Event::new("order.placed", payload(i)).module("shop"))
                    .await?;
                i += callers;
            }
            Ok::<_, txbus::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((bus, dir))
}

/// The messages the relay would send, for the raw runs.
fn outbound(destination: &str) -> Vec<OutboundMessage> {
    (0..MESSAGES)
        .map(|i| OutboundMessage {
            id: txbus::MessageId::new(),
            operation_id: txbus::OperationId::new(),
            position: i as u64 + 1,
            index: 0,
            event_type: "order.placed".into(),
            module: Some("shop".into()),
            headers: txbus::Headers::default(),
            payload: serde_json::to_string(&payload(i))
                .unwrap_or_default()
                .into(),
            destination: destination.to_owned(),
        })
        .collect()
}

/// Times a relay of `bus`'s log through `publisher`.
async fn time_relay<P: Publisher>(
    bus: &Bus,
    publisher: P,
    route: impl txbus_relay::Route,
    scenario: &str,
) -> Result<Line, BoxError> {
    let start = Instant::now();
    let relay = Relay::builder(bus.clone(), "bench", publisher)
        .route(route)
        .read_batch(BATCH)
        .max_in_flight(IN_FLIGHT)
        .start()
        .await?;
    let status = relay.drained().await?;
    let elapsed = start.elapsed();
    relay.shutdown(Duration::from_secs(5)).await?;
    if status.published < MESSAGES as u64 {
        return Err(format!("the relay confirmed {} of {MESSAGES}", status.published).into());
    }
    Ok(Line::new(scenario, MESSAGES as u64, elapsed, Vec::new()))
}

fn ratio_check(args: &Args, relay: &Line, raw: &Line) {
    relay.print(args.json);
    raw.print(args.json);
    let ratio = relay.ops_per_sec() / raw.ops_per_sec().max(1e-9);
    print_check(
        args.json,
        &format!("{} / {}", relay.scenario, raw.scenario),
        ratio,
        ">= 0.5",
        ratio >= 0.5,
    );
}

/// A durable exchange with a durable queue bound to all of it, so that messages are stored.
async fn rabbit_topology(channel: &lapin::Channel, name: &str) -> Result<(), BoxError> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            name.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

async fn rabbit_clean_up(channel: &lapin::Channel, name: &str) -> Result<(), BoxError> {
    channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(name.into(), Default::default())
        .await?;
    Ok(())
}

async fn rabbitmq(args: &Args) -> Result<(), BoxError> {
    let url = amqp_url();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let admin = conn.create_channel().await?;

    let (bus, _dir) = committed_bus(args).await?;
    let name = format!("bench-relay-{}", uuid::Uuid::now_v7().simple());
    rabbit_topology(&admin, &name).await?;
    let relay = time_relay(
        &bus,
        RabbitPublisher::new(url.clone(), name.clone()),
        txbus_relay::SubjectRoute::new("bench"),
        "relay-rabbitmq",
    )
    .await?;
    rabbit_clean_up(&admin, &name).await?;
    bus.shutdown(Duration::from_secs(5)).await?;

    let name = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    rabbit_topology(&admin, &name).await?;
    let raw = raw_rabbitmq(&conn, &name).await?;
    rabbit_clean_up(&admin, &name).await?;
    ratio_check(args, &relay, &raw);
    Ok(())
}

async fn raw_rabbitmq(conn: &lapin::Connection, exchange: &str) -> Result<Line, BoxError> {
    let messages = outbound("bench.shop.order.placed");
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let start = Instant::now();
    let mut in_flight = VecDeque::new();
    let mut pending = 0usize;
    for chunk in messages.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        m.destination.as_str().into(),
                        BasicPublishOptions::default(),
                        &m.payload,
                        txbus_rabbitmq::message_properties(m)?,
                    )
                    .await?,
            );
        }
        pending += confirms.len();
        in_flight.push_back(confirms);
        while pending >= IN_FLIGHT {
            let Some(batch) = in_flight.pop_front() else {
                break;
            };
            pending -= batch.len();
            for c in batch {
                confirmed(c.await?)?;
            }
        }
    }
    for batch in in_flight {
        for c in batch {
            confirmed(c.await?)?;
        }
    }
    let elapsed = start.elapsed();
    Ok(Line::new(
        "raw-rabbitmq",
        MESSAGES as u64,
        elapsed,
        Vec::new(),
    ))
}

fn confirmed(c: Confirmation) -> Result<(), BoxError> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("RabbitMQ did not confirm a message: {other:?}").into()),
    }
}

async fn redis_pair(args: &Args) -> Result<(), BoxError> {
    let url = redis_url();
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;

    let (bus, _dir) = committed_bus(args).await?;
    let stream = format!("bench-relay-{}", uuid::Uuid::now_v7().simple());
    let route = {
        let stream = stream.clone();
        move |_: &txbus::StoredMessage| stream.clone()
    };
    let relay = time_relay(&bus, RedisPublisher::new(&url)?, route, "relay-redis").await?;
    let _: redis::Value = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await?;
    bus.shutdown(Duration::from_secs(5)).await?;

    let stream = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let raw = raw_redis(&client, &stream).await?;
    let _: redis::Value = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await?;
    ratio_check(args, &relay, &raw);
    Ok(())
}

async fn raw_redis(client: &redis::Client, stream: &str) -> Result<Line, BoxError> {
    let messages = outbound(stream);
    let conn = client.get_multiplexed_async_connection().await?;
    let start = Instant::now();
    // Each pipeline is sent at once by a task of its own; answers are awaited in order.
    let mut in_flight = VecDeque::new();
    let mut pending = 0usize;
    for chunk in messages.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for m in chunk {
            let cmd = pipe.cmd("XADD").arg(&m.destination).arg("*");
            for (name, value) in txbus_redis::entry_fields(m) {
                cmd.arg(name).arg(value);
            }
        }
        let mut c = conn.clone();
        let n = chunk.len();
        in_flight.push_back((
            n,
            tokio::spawn(async move { pipe.query_async::<Vec<redis::Value>>(&mut c).await }),
        ));
        pending += n;
        while pending >= IN_FLIGHT {
            let Some((sent, done)) = in_flight.pop_front() else {
                break;
            };
            check_answers(done.await??.len(), sent)?;
            pending -= sent;
        }
    }
    for (sent, done) in in_flight {
        check_answers(done.await??.len(), sent)?;
    }
    let elapsed = start.elapsed();
    Ok(Line::new("raw-redis", MESSAGES as u64, elapsed, Vec::new()))
}

fn check_answers(answers: usize, sent: usize) -> Result<(), BoxError> {
    if answers == sent {
        Ok(())
    } else {
        Err(format!("{answers} answers to {sent} XADDs").into())
    }
}
