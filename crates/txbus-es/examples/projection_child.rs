//! The child process of the projection crash test (`tests/crash.rs`).
//!
//! ```text
//! projection_child load   <db>   # append commits for ever while a read model projects them
//! projection_child verify <db>   # catch the read model up, rebuild a copy from zero, compare
//! ```
//!
//! `load` prints `ready` once the projection runs, then `appended <n>` as it goes; the test
//! kills it with SIGKILL at a random moment, several times. `verify` prints one JSON object:
//! the live read model, a copy rebuilt from zero, and the counts computed from the log
//! directly. With the checkpoint committed together with the read model's writes, all three
//! are equal, however often the projection was killed mid-page.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Event, ExpectedVersion};
use txbus_es::projection::{read_checkpoint, Projector};
use txbus_es::{async_trait, BoxError, EventStore, LogEvent, ReadModel, ReadModelTx};
use txbus_sqlite::SqliteStore;

/// Counts events per type and per stream and sums quantities: applying an event twice (or
/// not at all) shows. The live copy takes a millisecond per event, as real work would, so
/// that it falls behind the writer and a kill lands in the middle of a page.
struct Counts(&'static str, Duration);

async fn bump(tx: &mut ReadModelTx<'_>, key: String, by: u64) -> Result<(), BoxError> {
    let n: u64 = tx.get_json(&key).await?.unwrap_or(0);
    tx.put_json(key, &(n + by))?;
    Ok(())
}

#[async_trait]
impl ReadModel for Counts {
    fn prefix(&self) -> &str {
        self.0
    }

    async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        if !self.1.is_zero() {
            tokio::time::sleep(self.1).await;
        }
        for (key, by) in keys(event) {
            bump(tx, format!("{}{key}", self.0), by).await?;
        }
        Ok(())
    }
}

/// The counters an event adds to.
fn keys(event: &LogEvent) -> Vec<(String, u64)> {
    let mut out = vec![
        ("events".to_owned(), 1),
        (format!("type/{}", event.event_type), 1),
    ];
    if let Some(stream) = event.stream() {
        out.push((format!("stream/{stream}"), 1));
    }
    if let Some(qty) = event.payload.get("qty").and_then(|q| q.as_u64()) {
        out.push(("qty".to_owned(), qty));
    }
    out
}

/// The work the live read model does per event.
const WORK: Duration = Duration::from_millis(1);

async fn open(db: &Path) -> Bus {
    Bus::builder()
        .store(SqliteStore::open(db).expect("open the store"))
        .build()
        .await
        .expect("start the bus")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn load(db: &Path) {
    let store = EventStore::new(open(db).await);
    let _handle = Projector::read_model("counts", Counts("rm/live/", WORK))
        .page_size(5)
        .start(&store)
        .await
        .expect("start the projection");
    say("ready");
    let mut n: u64 = 0;
    loop {
        let events = 1 + fastrand::usize(..3);
        let mut tx = store.transaction().append(
            format!("item-{}", fastrand::u8(..8)),
            ExpectedVersion::Any,
            (0..events).map(|_| Event::new("item.added", json!({ "qty": fastrand::u64(1..10) }))),
        );
        if fastrand::bool() {
            tx = tx.event(Event::new("audit.noted", json!({ "n": n })));
        }
        tx.commit().await.expect("commit");
        n += 1;
        if n.is_multiple_of(20) {
            say(&format!("appended {n}"));
        }
    }
}

async fn verify(db: &Path) {
    let bus = open(db).await;
    let store = EventStore::new(bus.clone());
    let checkpoint_at_start = read_checkpoint(&bus, "counts").await.expect("checkpoint");
    let live = Projector::read_model("counts", Counts("rm/live/", WORK))
        .page_size(5)
        .start(&store)
        .await
        .expect("start");
    let head = live.catch_up().await.expect("catch up");
    live.stop().await.expect("stop");
    let rebuilt = Projector::read_model("counts-rebuilt", Counts("rm/rebuilt/", Duration::ZERO))
        .page_size(64)
        .start(&store)
        .await
        .expect("start");
    rebuilt.catch_up().await.expect("catch up");
    rebuilt.stop().await.expect("stop");

    // The same counts, straight from the log.
    let mut direct: BTreeMap<String, u64> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = store.read_log(after, 500).await.expect("read the log");
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in &page {
            for (key, by) in keys(e) {
                *direct.entry(key).or_default() += by;
            }
        }
    }

    let dump = |prefix: &'static str| {
        let bus = bus.clone();
        async move {
            let mut out: BTreeMap<String, u64> = BTreeMap::new();
            let mut after: Option<String> = None;
            loop {
                let page = bus
                    .kv_scan(prefix, after.as_deref(), 500)
                    .await
                    .expect("scan");
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for e in page {
                    let n: u64 = serde_json::from_slice(&e.value).expect("a counter");
                    out.insert(e.key[prefix.len()..].to_owned(), n);
                }
            }
            out
        }
    };
    say(&json!({
        "checkpoint_at_start": checkpoint_at_start,
        "head": head,
        "live": dump("rm/live/").await,
        "rebuilt": dump("rm/rebuilt/").await,
        "direct": direct,
    })
    .to_string());
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(db)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: projection_child load|verify <db>");
        std::process::exit(2);
    };
    match mode.as_str() {
        "load" => load(Path::new(db)).await,
        "verify" => verify(Path::new(db)).await,
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
