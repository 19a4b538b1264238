//! The crash soak's child: `txbus-crash soak-load STORE DIR` and `txbus-crash soak-drain STORE DIR`.
//!
//! STORE is `sqlite` (the store is `DIR/bus.db`) or a PostgreSQL URL with the schema after a
//! `#` (`postgres://…/test#schema`). Handlers record every delivery they see in `DIR/seen.db`
//! (the "business" database), counting repeats:
//!
//! - `writer` and `audit`: quick;
//! - `flaky`: fails its first two attempts of one message in four (transient failures, so
//!   retries are in flight at every kill);
//! - `slow`: takes 20–150 ms, so kills land mid-handler;
//! - `hold`: see below.
//!
//! Every message carries the mark of the process that committed it (`proc` in its payload), so
//! that a process tells its own messages from the backlog an earlier one left.
//!
//! `soak-load` prints `starting`, then `backlog N` (deliveries left pending or leased by the
//! processes before it) and `ready` once its bus runs, then `committed N` every 100 commits, and
//! commits from many tasks until it is killed. So that the parent's kills land where they are
//! meant to, deterministically:
//!
//! - **During a graceful shutdown**: a line `shutdown` on stdin makes it publish a `soak.hold`
//!   event, whose `hold` handler does not return in the process that published it; once that
//!   attempt runs, it prints `shutting-down` and shuts the bus down, which waits for the attempt
//!   (up to 30 s). It prints `stopped …` when the shutdown is over: a kill before that line cut
//!   the shutdown short. Any later process runs the held message at once.
//! - **During start-up recovery**: with `SOAK_HOLD_RECOVERY=1`, every delivery of a message
//!   committed by an earlier process does not return (it prints `recovering` when the first one
//!   starts), so the backlog cannot be finished before the kill. The next process runs them.
//!
//! `soak-drain` runs the same bus until nothing is pending or leased, then writes what the
//! test checks to `DIR/report.json`, through the public API only: every message of the log,
//! every operation's outcome, the chain's verification and the store's counts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncBufReadExt;
use txbus::{Backoff, Bus, Event, HandlerError, Message, On, OperationState, SqliteStore};
use txbus_postgres::PostgresOptions;

use crate::BoxError;

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

/// What makes this process hold deliveries, so that kills land in shutdown and in recovery.
struct Holds {
    /// This process's mark, in the payload of every message it commits.
    token: u64,
    /// Hold every delivery of a message committed by an earlier process.
    recovery: bool,
    /// Told when the hold handler runs this process's own `soak.hold`.
    holding: tokio::sync::Notify,
    said_recovering: AtomicBool,
}

impl Holds {
    fn new(recovery: bool) -> Arc<Self> {
        Arc::new(Self {
            token: fastrand::u64(..),
            recovery,
            holding: tokio::sync::Notify::new(),
            said_recovering: AtomicBool::new(false),
        })
    }

    fn is_own(&self, m: &Message) -> bool {
        m.payload()["proc"].as_u64() == Some(self.token)
    }

    /// Never returns for a message of the backlog when recovery is held.
    async fn recovered(&self, m: &Message) {
        if self.recovery && !self.is_own(m) {
            if !self.said_recovering.swap(true, Ordering::AcqRel) {
                say("recovering");
            }
            std::future::pending::<()>().await;
        }
    }
}

/// One message in four is refused on its first two attempts; which ones is fixed by its id,
/// so that the choice survives restarts.
fn flaky(msg: &Message) -> bool {
    msg.id().0.as_u128().is_multiple_of(4) && msg.attempt() <= 2
}

async fn bus(store: &str, dir: &Path, holds: Arc<Holds>) -> Result<Bus, BoxError> {
    let seen = Seen::open(&dir.join("seen.db"))?;
    let builder = match store.split_once('#') {
        None if store == "sqlite" => Bus::builder().store(SqliteStore::open(dir.join("bus.db"))?),
        Some((url, schema)) => Bus::builder()
            .store(
                PostgresOptions::new(url)
                    .schema(schema)
                    .max_connections(8)
                    .connect()
                    .await?,
            )
            // A killed process's leases are taken over this long after its last heartbeat.
            .lease_ttl(Duration::from_millis(1500)),
        None => return Err(format!("unknown store {store:?}: sqlite or URL#schema").into()),
    };
    let (a, b, c, d, e) = (seen.clone(), seen.clone(), seen.clone(), seen.clone(), seen);
    let (ha, hb, hc, hd, he) = (
        holds.clone(),
        holds.clone(),
        holds.clone(),
        holds.clone(),
        holds,
    );
    Ok(builder
        .max_retries(8)
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        // Every kill counts an interruption for each delivery the killed bus held; the soak
        // kills 20 times, so the bound (meant for messages that crash their process) is
        // set above that.
        .max_interruptions(40)
        .buffer_capacity(256)
        .poll_interval(Duration::from_millis(100))
        .handler(
            "writer",
            On::event("soak.tx").module("app"),
            move |m: Message| {
                let (s, h) = (a.clone(), ha.clone());
                async move {
                    h.recovered(&m).await;
                    s.record(&m).await
                }
            },
        )
        .handler("audit", On::in_module("audit"), move |m: Message| {
            let (s, h) = (b.clone(), hb.clone());
            async move {
                h.recovered(&m).await;
                s.record(&m).await
            }
        })
        .handler("flaky", On::event("soak.job"), move |m: Message| {
            let (s, h) = (c.clone(), hc.clone());
            async move {
                h.recovered(&m).await;
                if flaky(&m) {
                    return Err(HandlerError::transient("refused, try again"));
                }
                s.record(&m).await
            }
        })
        .handler("slow", On::event("soak.slow"), move |m: Message| {
            let (s, h) = (d.clone(), hd.clone());
            async move {
                h.recovered(&m).await;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(20..150))).await;
                s.record(&m).await
            }
        })
        .handler("hold", On::event("soak.hold"), move |m: Message| {
            let (s, h) = (e.clone(), he.clone());
            async move {
                h.recovered(&m).await;
                if h.is_own(&m) {
                    // Published by this process as its shutdown began: keep the shutdown
                    // waiting until the kill.
                    h.holding.notify_one();
                    std::future::pending::<()>().await;
                }
                s.record(&m).await
            }
        })
        .build()
        .await?)
}

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub(crate) async fn load(store: String, dir: PathBuf) -> Result<(), BoxError> {
    say("starting");
    let holds = Holds::new(std::env::var("SOAK_HOLD_RECOVERY").is_ok_and(|v| v == "1"));
    let token = holds.token;
    let bus = bus(&store, &dir, holds.clone()).await?;
    let stats = bus.stats().await?;
    say(&format!(
        "backlog {}",
        stats.deliveries.pending + stats.deliveries.leased
    ));
    say("ready");
    let committed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..16u64 {
        let (bus, committed) = (bus.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let body = json!({"worker": worker, "n": n, "proc": token});
                let result = if n.is_multiple_of(3) {
                    bus.publish(Event::new("soak.job", body)).await.map(drop)
                } else if n.is_multiple_of(7) {
                    bus.publish(Event::new("soak.slow", body)).await.map(drop)
                } else {
                    match bus
                        .transact([
                            Event::new("soak.tx", body.clone()).module("app"),
                            Event::new("audit.soak", body).module("audit"),
                        ])
                        .await
                    {
                        Ok(op) if n.is_multiple_of(2) => op.outcome().await.map(drop),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok(()) => {
                        let c = committed.fetch_add(1, Ordering::Relaxed) + 1;
                        if c.is_multiple_of(100) {
                            say(&format!("committed {c}"));
                        }
                    }
                    // Shutting down: stop committing.
                    Err(txbus::Error::ShuttingDown) => return Ok(()),
                    Err(e) => return Err(BoxError::from(e)),
                }
            }
        }));
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "shutdown" {
            break;
        }
    }
    // An attempt that will not end in this process: the shutdown below waits for it.
    bus.publish(Event::new("soak.hold", json!({"proc": token})))
        .await?;
    tokio::time::timeout(Duration::from_secs(60), holds.holding.notified())
        .await
        .map_err(|_| "the hold handler did not start within 60 s")?;
    say("shutting-down");
    let report = bus.shutdown(Duration::from_secs(30)).await?;
    for t in tasks {
        t.await??;
    }
    say(&format!("stopped {report:?}"));
    Ok(())
}

pub(crate) async fn drain(store: String, dir: PathBuf) -> Result<(), BoxError> {
    let bus = bus(&store, &dir, Holds::new(false)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let stats = loop {
        let stats = bus.stats().await?;
        if stats.deliveries.pending == 0
            && stats.deliveries.leased == 0
            && stats.pending_operations == 0
        {
            break stats;
        }
        if tokio::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let verify = bus.verify().await?;
    let mut messages = Vec::new();
    let mut operations = (0u64, 0u64, 0u64, 0u64); // (finished ok, failed, pending, unknown)
    let mut failures = Vec::new();
    let mut after = 0;
    let mut commits = 0u64;
    loop {
        let page = bus.read_log(after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        commits += page.len() as u64;
        for commit in &page {
            for m in &commit.messages {
                messages.push(json!([m.id.to_string(), m.event_type, m.module]));
            }
            match bus.outcome(commit.operation_id).await? {
                Some(OperationState::Finished(o)) if o.is_ok() => operations.0 += 1,
                Some(OperationState::Finished(o)) => {
                    operations.1 += 1;
                    if failures.len() < 5 {
                        failures.push(format!("{o:?}"));
                    }
                }
                Some(_) => operations.2 += 1,
                None => operations.3 += 1,
            }
        }
    }
    let dead = bus.dead_letters(Default::default()).await?.len();
    let report = json!({
        "messages": messages,
        "commits": commits,
        "operations_ok": operations.0,
        "operations_failed": operations.1,
        "operations_pending": operations.2,
        "operations_unknown": operations.3,
        "failures": failures,
        "dead_letters": dead,
        "pending": stats.deliveries.pending,
        "leased": stats.deliveries.leased,
        "rejected": stats.deliveries.rejected,
        "dead": stats.deliveries.dead,
        "pending_operations": stats.pending_operations,
        "verified": verify.verified,
        "intact": verify.is_intact(),
        "first_broken": verify.first_broken.map(|b| format!("{b:?}")),
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec(&report)?)?;
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
