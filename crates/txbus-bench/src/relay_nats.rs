//! The NATS JetStream scenarios: the outbox relay against raw pipelined JetStream publishes of
//! the same messages, and `transact` across services over NATS.
//!
//! `relay-nats` commits N messages with `publish` first (N = 50 000), then times a relay
//! draining them until the broker confirmed every one and the checkpoint is stored.
//! `raw-nats` publishes the same number of messages (same payloads, same headers,
//! `Nats-Msg-Id`) with async-nats directly, in batches of the relay's size with the same
//! number in flight. `transact-remote` runs one caller doing `transact`s whose handler lives
//! in another bus (its own store) reached through JetStream, and reports the latency until
//! the outcome is back.

use std::time::{Duration, Instant};

use serde_json::json;
use txbus::{Bus, Event, Message, On, SqliteStore};
use txbus_nats::async_nats::{self, jetstream};
use txbus_nats::{
    ConsumerSpec, JetStreamPublisher, JetStreamSource, NatsReplier, RemoteHandler, StreamSpec,
};
use txbus_relay::{Inbox, OutboundMessage, Relay, SubjectRoute};

use crate::report::{print_check, Line};
use crate::scenarios::{workdir, BoxError};
use crate::Args;

/// Messages relayed (and published raw) per run.
const MESSAGES: usize = 50_000;
/// Commits read per relay batch, and messages per raw batch.
const BATCH: usize = 512;
/// Messages awaiting confirmation at most, for both.
const IN_FLIGHT: usize = 4096;

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into())
}

/// Runs a NATS scenario, or returns `None` when `args` names another one.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "relay-nats" | "raw-nats" => relay_and_raw(args).await,
        "transact-remote" => transact_remote(args).await,
        _ => return None,
    };
    Some(result)
}

/// A fresh stream for one measurement, and its subject prefix.
async fn fresh_stream(js: &jetstream::Context, what: &str) -> Result<(String, String), BoxError> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (name, prefix) = (format!("BENCH_{what}_{id}"), format!("bench{id}"));
    StreamSpec::new(&name, [format!("{prefix}.>")])
        .ensure(js)
        .await?;
    Ok((name, prefix))
}

/// `relay-nats`, `raw-nats` and their ratio, in one run.
async fn relay_and_raw(args: &Args) -> Result<(), BoxError> {
    let client = async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client);
    let relay = relay_nats(args, &js).await?;
    relay.print(args.json);
    let raw = raw_nats(&js).await?;
    raw.print(args.json);
    let ratio = relay.ops_per_sec() / raw.ops_per_sec().max(1e-9);
    print_check(
        args.json,
        "relay-nats / raw-nats",
        ratio,
        ">= 0.5",
        ratio >= 0.5,
    );
    Ok(())
}

fn payload(i: usize) -> serde_json::Value {
    json!({"order": i, "sku": "A-1234", "quantity": 3, "note": "bench"})
}

async fn relay_nats(args: &Args, js: &jetstream::Context) -> Result<Line, BoxError> {
    let dir = workdir(args)?;
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db"))?)
        .build()
        .await?;
    // Pre-commit with publish, from many callers.
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
    let (stream, prefix) = fresh_stream(js, "RELAY").await?;
    let start = Instant::now();
    let relay = Relay::builder(bus.clone(), "bench", JetStreamPublisher::new(js.clone()))
        .route(SubjectRoute::new(prefix))
        .read_batch(BATCH)
        .max_in_flight(IN_FLIGHT)
        .start()
        .await?;
    let status = relay.drained().await?;
    let elapsed = start.elapsed();
    relay.shutdown(Duration::from_secs(5)).await?;
    bus.shutdown(Duration::from_secs(5)).await?;
    js.delete_stream(&stream).await?;
    if status.published < MESSAGES as u64 {
        return Err(format!("the relay confirmed {} of {MESSAGES}", status.published).into());
    }
    Ok(Line::new(
        "relay-nats",
        MESSAGES as u64,
        elapsed,
        Vec::new(),
    ))
}

async fn raw_nats(js: &jetstream::Context) -> Result<Line, BoxError> {
    let (stream, prefix) = fresh_stream(js, "RAW").await?;
    let subject = format!("{prefix}.shop.order.placed");
    // The same messages the relay sends: payload as stored, txbus headers, Nats-Msg-Id.
    let messages: Vec<OutboundMessage> = (0..MESSAGES)
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
            destination: subject.clone(),
        })
        .collect();
    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    let mut pending = 0usize;
    for chunk in messages.chunks(BATCH) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in txbus_relay::wire::headers(m) {
                headers.insert(k, v);
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .headers(headers)
                .message_id(m.id.to_string());
            acks.push(js.send_publish(m.destination.clone(), publish).await?);
        }
        pending += acks.len();
        in_flight.push_back(acks);
        while pending >= IN_FLIGHT {
            let Some(batch) = in_flight.pop_front() else {
                break;
            };
            pending -= batch.len();
            for ack in batch {
                ack.await?;
            }
        }
    }
    for batch in in_flight {
        for ack in batch {
            ack.await?;
        }
    }
    let elapsed = start.elapsed();
    js.delete_stream(&stream).await?;
    Ok(Line::new("raw-nats", MESSAGES as u64, elapsed, Vec::new()))
}

async fn transact_remote(args: &Args) -> Result<(), BoxError> {
    let client = async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client.clone());
    let (stream, prefix) = fresh_stream(&js, "REMOTE").await?;
    let subjects = format!("{prefix}.remote");
    let dir = workdir(args)?;

    // The remote service: its own store, a handler, an inbox that answers.
    let remote = Bus::builder()
        .store(SqliteStore::open(dir.path().join("remote.db"))?)
        .handler("charger", On::in_module("billing"), |_m: Message| async {
            Ok(())
        })
        .build()
        .await?;
    let source = JetStreamSource::new(
        js.clone(),
        ConsumerSpec::new(&stream, "billing-in").filter_subject(format!("{subjects}.>")),
    )
    .await?;
    let inbox = Inbox::builder(remote.clone(), "billing-in", source)
        .replies(NatsReplier::new(client.clone()))
        .start()?;

    // The origin: the remote handler stands for the billing module.
    let origin = Bus::builder()
        .store(SqliteStore::open(dir.path().join("origin.db"))?)
        .handler(
            "billing",
            On::in_module("billing"),
            RemoteHandler::new(client, "billing")
                .route(SubjectRoute::new(subjects))
                .reply_prefix(format!("{prefix}.reply")),
        )
        .build()
        .await?;

    // Warm up, then one caller for the configured time.
    for i in 0..20 {
        let op = origin
            .transact([Event::new("invoice.requested", json!({"i": i})).module("billing")])
            .await?;
        op.outcome().await?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    let deadline = start + args.secs;
    let mut i = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        let op = origin
            .transact([Event::new("invoice.requested", json!({"i": i})).module("billing")])
            .await?;
        let outcome = op.outcome().await?;
        if !outcome.is_ok() {
            return Err(format!("a remote transact failed: {outcome:?}").into());
        }
        latencies.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    let elapsed = start.elapsed();
    inbox.shutdown(Duration::from_secs(5)).await?;
    origin.shutdown(Duration::from_secs(5)).await?;
    remote.shutdown(Duration::from_secs(5)).await?;
    js.delete_stream(&stream).await?;
    let line = Line::new(
        "transact-remote",
        latencies.len() as u64,
        elapsed,
        latencies,
    );
    let p90 = line.percentile_ms(0.90);
    let p50 = line.percentile_ms(0.50);
    let line = line.with("p90_ms", p90);
    line.print(args.json);
    print_check(
        args.json,
        "transact-remote p50 (ms)",
        p50,
        "<= 5",
        p50 <= 5.0,
    );
    Ok(())
}
