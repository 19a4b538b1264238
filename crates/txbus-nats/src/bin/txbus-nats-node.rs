//! A service process for the two-process tests: a bus on an embedded store in a directory of
//! its own, connected to NATS JetStream at 127.0.0.1:4222 (or `NATS_URL`).
//!
//! `txbus-nats-node remote --dir D --stream S --subjects P --durable N`
//!   runs the remote side of a `transact` across services: an inbox on stream `S` (created
//!   with subjects `P.>` if missing) that commits requests as `transact`s and replies, and a
//!   handler `charger` for module `billing` that appends `start <id>` and `done <id>` lines to
//!   `D/seen.log`, sleeps `slow_ms` from the payload, and rejects with the payload's `reject`
//!   reason when it has one.
//!
//! `txbus-nats-node relay --dir D --stream S --prefix P --name R [--commit N] [--pace-ms M]`
//!   commits `N` events first (when given), 100 per commit, then relays the log to subjects
//!   `P.<module>.<type>` one commit per batch, waiting `M` ms before each batch (so that a test
//!   can kill it half-way), until everything is confirmed; prints `drained` and exits.
//!
//! Each prints `ready` on stdout once it is running.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Event, HandlerError, Message, On};
use txbus_nats::{ConsumerSpec, JetStreamPublisher, JetStreamSource, NatsReplier, StreamSpec};
use txbus_relay::{Inbox, OutboundMessage, Publisher, Relay, SubjectRoute};
use txbus_sqlite::SqliteStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("txbus-nats-node: no runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("txbus-nats-node: {e}");
        std::process::exit(1);
    }
}

fn flags(args: &[String]) -> Result<HashMap<String, String>, BoxError> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {a:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        out.insert(name.to_owned(), value.clone());
    }
    Ok(out)
}

fn flag<'a>(f: &'a HashMap<String, String>, name: &str) -> Result<&'a str, BoxError> {
    f.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required").into())
}

async fn run(args: Vec<String>) -> Result<(), BoxError> {
    let (role, rest) = args
        .split_first()
        .ok_or("usage: txbus-nats-node remote|relay --flag value …")?;
    let f = flags(rest)?;
    let dir = PathBuf::from(flag(&f, "dir")?);
    std::fs::create_dir_all(&dir)?;
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client.clone());
    match role.as_str() {
        "remote" => remote(&dir, &f, client, js).await,
        "relay" => relay(&dir, &f, js).await,
        other => Err(format!("unknown role {other:?}").into()),
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

async fn remote(
    dir: &Path,
    f: &HashMap<String, String>,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
) -> Result<(), BoxError> {
    let stream = flag(f, "stream")?;
    let subjects = flag(f, "subjects")?;
    let durable = flag(f, "durable")?;
    StreamSpec::new(stream, [format!("{subjects}.>")])
        .ensure(&js)
        .await?;
    let seen = dir.join("seen.log");
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.join("bus.db"))?)
        .handler_timeout(Duration::from_secs(30))
        .handler("charger", On::in_module("billing"), move |msg: Message| {
            let seen = seen.clone();
            async move {
                append_line(&seen, &format!("start {}", msg.id()))?;
                if let Some(ms) = msg.payload()["slow_ms"].as_u64() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(reason) = msg.payload()["reject"].as_str() {
                    append_line(&seen, &format!("reject {}", msg.id()))?;
                    return Err(HandlerError::reject(reason));
                }
                append_line(&seen, &format!("done {}", msg.id()))?;
                Ok(())
            }
        })
        .build()
        .await?;
    let source = JetStreamSource::new(
        js,
        ConsumerSpec::new(stream, durable)
            .filter_subject(format!("{subjects}.>"))
            .ack_wait(Duration::from_secs(5)),
    )
    .await?;
    let inbox = Inbox::builder(bus.clone(), durable, source)
        .replies(NatsReplier::new(client))
        .concurrency(16)
        .start()?;
    println!("ready");
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c().await?;
    inbox.shutdown(Duration::from_secs(5)).await?;
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

async fn relay(
    dir: &Path,
    f: &HashMap<String, String>,
    js: async_nats::jetstream::Context,
) -> Result<(), BoxError> {
    let stream = flag(f, "stream")?;
    let prefix = flag(f, "prefix")?;
    let name = flag(f, "name")?;
    StreamSpec::new(stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await?;
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.join("bus.db"))?)
        .build()
        .await?;
    if let Some(n) = f.get("commit") {
        let n: usize = n.parse()?;
        // Commits in chunks, many events each, so that the relay meets full batches.
        let mut i = 0;
        while i < n {
            let chunk: Vec<Event> = (i..n.min(i + 100))
                .map(|k| Event::new("order.placed", json!({"n": k})).module("shop"))
                .collect();
            i += chunk.len();
            bus.commit_unwatched(txbus_core::Commit::new().events(chunk))
                .await?;
        }
    }
    let pace = Duration::from_millis(f.get("pace-ms").map_or(Ok(0), |v| v.parse())?);
    let publisher = Paced {
        inner: JetStreamPublisher::new(js),
        pace,
    };
    let relay = Relay::builder(bus.clone(), name, publisher)
        .route(SubjectRoute::new(prefix))
        .read_batch(1)
        .max_in_flight(400)
        .start()
        .await?;
    println!("ready");
    std::io::stdout().flush()?;
    relay.drained().await?;
    let status = relay.shutdown(Duration::from_secs(5)).await?;
    println!("drained {}", status.checkpoint);
    std::io::stdout().flush()?;
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

/// A publisher that waits before each batch: slows the relay down so that a test can kill it
/// with batches in flight.
struct Paced<P> {
    inner: P,
    pace: Duration,
}

impl<P: Publisher> Publisher for Paced<P> {
    type Error = P::Error;
    type Confirm = P::Confirm;

    async fn send_batch(&self, batch: &[OutboundMessage]) -> Result<Self::Confirm, Self::Error> {
        tokio::time::sleep(self.pace).await;
        self.inner.send_batch(batch).await
    }
}
