//! A resumable bulk import: rows committed in chunks, each with the batch's checkpoint, so that
//! a run killed at any moment resumes where the last durable chunk ended.
//!
//! ```sh
//! cargo run -p txbus --example batch_import -- run ./data/import.db 200000 1000   # import
//! cargo run -p txbus --example batch_import -- check ./data/import.db             # what landed
//! # on PostgreSQL (feature `postgres`), in the schema given:
//! cargo run -p txbus --features postgres --example batch_import -- \
//!     run postgres://postgres@127.0.0.1/test 200000 1000 --schema import
//! ```
//!
//! `run` prints `ready`, then `progress <done>/<total>` as chunks commit, then `finished`;
//! `check` prints one JSON line: rows found in the log, distinct rows, the first missing row,
//! duplicates, and whether the chain verifies. `stores` prints the stores this build has.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use serde_json::json;
use txbus::{Batch, Bus, BusBuilder, Event, SqliteStore};

/// The bus on the store named: a SQLite file, or a PostgreSQL URL and `--schema`.
async fn builder(store: &str, schema: Option<&str>) -> BusBuilder {
    if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        {
            let pg = txbus::PostgresOptions::new(store)
                .schema(schema.unwrap_or("txbus"))
                .connect()
                .await
                .expect("connect to PostgreSQL");
            return Bus::builder().store(pg);
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = schema;
            eprintln!("this build has no PostgreSQL store: build it with --features postgres");
            std::process::exit(2);
        }
    }
    Bus::builder().store(SqliteStore::open(store).expect("open the store"))
}

/// Waits until every commit is in the log (a PostgreSQL store links commits into the chain a
/// moment after they are written, and a killed run may have left some for this bus to link).
async fn all_sealed(bus: &Bus) {
    loop {
        let written = bus.stats().await.expect("count the commits").commits;
        if bus.head_position().await.expect("read the head") >= written {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("stores") {
        println!(
            "sqlite{}",
            if cfg!(feature = "postgres") {
                " postgres"
            } else {
                ""
            }
        );
        return;
    }
    let schema = match args.iter().position(|a| a == "--schema") {
        Some(i) if i + 1 < args.len() => {
            let schema = args.remove(i + 1);
            args.remove(i);
            Some(schema)
        }
        _ => None,
    };
    let (Some(mode), Some(db)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: batch_import run <db or postgres://…> <rows> <chunk> | check <db or postgres://…> [--schema NAME]"
        );
        std::process::exit(2);
    };
    let bus = builder(db, schema.as_deref())
        .await
        .build()
        .await
        .expect("build the bus");
    match mode.as_str() {
        "run" => {
            let rows: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(200_000);
            let chunk: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1000);
            let batch = Batch::new(bus.clone(), "import")
                .chunk_size(chunk)
                .total(rows);
            let mut progress = batch.progress();
            let printer = tokio::spawn(async move {
                while progress.changed().await.is_ok() {
                    let line = progress
                        .borrow()
                        .as_ref()
                        .map(|p| format!("progress {}/{}", p.done, p.total.unwrap_or(0)));
                    if let Some(line) = line {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{line}");
                        let _ = out.flush();
                    }
                }
            });
            println!("ready");
            let done = batch
                .run(|from| {
                    (from..rows).map(|n| {
                        Event::new(
                            "row.imported",
                            json!({"row": n, "name": format!("user-{n}")}),
                        )
                    })
                })
                .await
                .expect("the batch runs");
            let _ = printer.await;
            println!("finished {}", done.done);
        }
        "check" => {
            all_sealed(&bus).await;
            let mut seen = BTreeSet::new();
            let mut duplicates = 0u64;
            let mut after = 0;
            loop {
                let page = bus.read_log(after, 1000).await.expect("read the log");
                let Some(last) = page.last() else { break };
                after = last.position;
                for c in &page {
                    for m in c.messages.iter().filter(|m| m.event_type == "row.imported") {
                        let row = m.payload["row"].as_u64().expect("a row number");
                        if !seen.insert(row) {
                            duplicates += 1;
                        }
                    }
                }
            }
            let rows = seen.len() as u64;
            let first_missing = (0..).find(|n| !seen.contains(n)).unwrap_or(0);
            let progress = bus
                .batch_progress("import")
                .await
                .expect("read the checkpoint");
            let report = bus.verify().await.expect("verify");
            println!(
                "{}",
                json!({
                    "rows": rows,
                    "duplicates": duplicates,
                    "first_missing": first_missing,
                    "checkpoint_done": progress.as_ref().map(|p| p.done),
                    "finished": progress.as_ref().map(|p| p.finished),
                    "intact": report.is_intact(),
                })
            );
        }
        other => {
            eprintln!("unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shut down");
}
