//! The child process of the crash test.
//!
//! `txbus-crash load DIR` runs a bus on `DIR/bus.db` and commits transacts and publishes from
//! many tasks until it is killed. `txbus-crash drain DIR` runs the same bus until no work is
//! left, then shuts down cleanly. Handlers record every delivery they see in `DIR/seen.db`
//! (a separate "business" database), counting repeats, so the test can check that nothing
//! was lost and count duplicates.
//!
//! `txbus-crash pg-worker URL SCHEMA NAME` is a worker process on a shared PostgreSQL store
//! (see `pg.rs`), for the multi-process tests.
//!
//! `txbus-crash soak-load STORE DIR` and `soak-drain STORE DIR` are the crash soak's child
//! (see `soak.rs`), on SQLite or PostgreSQL.

mod pg;
mod soak;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use txbus::{Backoff, Bus, Event, HandlerError, Message, On, SqliteStore};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Records deliveries durably in the business database.
#[derive(Clone)]
struct Seen(Arc<Mutex<rusqlite::Connection>>);

impl Seen {
    fn open(path: &Path) -> Result<Self, BoxError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS seen (
                 message_id TEXT NOT NULL, handler TEXT NOT NULL, times INTEGER NOT NULL,
                 PRIMARY KEY (message_id, handler));",
        )?;
        Ok(Self(Arc::new(Mutex::new(conn))))
    }

    async fn record(&self, msg: &Message) -> Result<(), HandlerError> {
        let (db, id, handler) = (
            self.0.clone(),
            msg.id().to_string(),
            msg.handler().to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            conn.execute(
                "INSERT INTO seen (message_id, handler, times) VALUES (?1, ?2, 1)
                 ON CONFLICT (message_id, handler) DO UPDATE SET times = times + 1",
                rusqlite::params![id, handler],
            )
        })
        .await
        .map_err(HandlerError::transient)??;
        Ok(())
    }
}

async fn bus(dir: &Path) -> Result<Bus, BoxError> {
    let seen = Seen::open(&dir.join("seen.db"))?;
    let (a, b, c) = (seen.clone(), seen.clone(), seen);
    Ok(Bus::builder()
        .store(SqliteStore::open(dir.join("bus.db"))?)
        .max_retries(8)
        .backoff(Backoff::fixed(Duration::from_millis(10)))
        .buffer_capacity(512)
        .poll_interval(Duration::from_millis(100))
        .handler(
            "writer",
            On::event("crash.tx").module("app"),
            move |m: Message| {
                let s = a.clone();
                async move { s.record(&m).await }
            },
        )
        .handler("audit", On::in_module("audit"), move |m: Message| {
            let s = b.clone();
            async move { s.record(&m).await }
        })
        .handler("jobs", On::event("crash.job"), move |m: Message| {
            let s = c.clone();
            async move {
                // Some first attempts fail, so retries are in flight when the kill comes.
                if m.attempt() == 1 && fastrand::u8(..) < 64 {
                    return Err(HandlerError::transient("first attempt refused"));
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                s.record(&m).await
            }
        })
        .build()
        .await?)
}

async fn load(dir: PathBuf) -> Result<(), BoxError> {
    let bus = bus(&dir).await?;
    let mut tasks = Vec::new();
    for worker in 0..32u64 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                if n.is_multiple_of(3) {
                    bus.publish(Event::new("crash.job", json!({"worker": worker, "n": n})))
                        .await?;
                } else {
                    let op = bus
                        .transact([
                            Event::new("crash.tx", json!({"worker": worker, "n": n})).module("app"),
                            Event::new("audit.crash-tx", json!({"worker": worker, "n": n}))
                                .module("audit"),
                        ])
                        .await?;
                    if n.is_multiple_of(2) {
                        op.outcome().await?;
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn drain(dir: PathBuf) -> Result<(), BoxError> {
    let bus = bus(&dir).await?;
    loop {
        let stats = bus.stats().await?;
        if stats.deliveries.pending == 0
            && stats.deliveries.leased == 0
            && stats.pending_operations == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = bus.verify().await?;
    if !report.is_intact() {
        return Err(format!("the chain does not verify: {report:?}").into());
    }
    bus.shutdown(Duration::from_secs(10)).await?;
    tracing::info!(verified = report.verified, "drained");
    Ok(())
}

fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let [mode, url, schema, name] = args.as_slice() {
        if mode == "pg-worker" {
            return rt.block_on(pg::worker(url.clone(), schema.clone(), name.clone()));
        }
    }
    if let [mode, store, dir] = args.as_slice() {
        let (store, dir) = (store.clone(), PathBuf::from(dir));
        match mode.as_str() {
            "soak-load" => return rt.block_on(soak::load(store, dir)),
            "soak-drain" => return rt.block_on(soak::drain(store, dir)),
            _ => {}
        }
    }
    let (mode, dir) = match args.as_slice() {
        [m, d] => (m.clone(), PathBuf::from(d)),
        _ => return Err("usage: txbus-crash load|drain DIR | pg-worker URL SCHEMA NAME | soak-load|soak-drain STORE DIR".into()),
    };
    match mode.as_str() {
        "load" => rt.block_on(load(dir)),
        "drain" => rt.block_on(drain(dir)),
        other => Err(format!("unknown mode {other:?}; use load or drain").into()),
    }
}
