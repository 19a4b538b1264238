//! `dashboard-overview`: the dashboard's overview page, over real HTTP, with 1,000,000
//! finished deliveries and 10,000 dead letters in an embedded store (retention set to keep
//! them), beside the raw cost of counting those deliveries on the same file
//! (`raw-sqlite-count-deliveries`: one pass over every finished delivery's record — the rows
//! of deliveries that needed one, and the commit rows that keep the others — what a dashboard
//! without counters would run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbus::{Bus, Event, HandlerError, Keep, Message, On, Retention, SqliteStore};
use txbus_dashboard::{Dashboard, Role};

use crate::report::Line;
use crate::scenarios::{workdir, BoxError};
use crate::Args;

const FINISHED: u64 = 1_000_000;
const DEAD: u64 = 10_000;
const PER_COMMIT: u64 = 100;
const RENDERS: usize = 300;
const PASSWORD: &str = "benchmark-password";

/// Runs `dashboard-overview` when `args` names it.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    match args.scenario.as_str() {
        "dashboard-overview" => Some(overview(args).await.map(|lines| {
            for l in &lines {
                l.print(args.json);
            }
        })),
        _ => None,
    }
}

async fn fill(bus: &Bus) -> Result<(), BoxError> {
    // Commits of 100 events each, 32 callers at once: 990,000 succeed, 10,000 die.
    let next = Arc::new(AtomicU64::new(0));
    let commits = (FINISHED + DEAD) / PER_COMMIT;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let bus = bus.clone();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= commits {
                    return Ok::<(), BoxError>(());
                }
                let doomed = c < DEAD / PER_COMMIT;
                let events = (0..PER_COMMIT).map(|i| {
                    let kind = if doomed { "job.doomed" } else { "job" };
                    Event::new(kind, json!({"commit": c, "i": i}))
                });
                let op = bus.transact(events).await?;
                op.outcome().await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn get(addr: std::net::SocketAddr, path: &str, auth: &str) -> Result<usize, BoxError> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    if !raw.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "the overview answered {}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        )
        .into());
    }
    Ok(raw.len())
}

fn basic(user: &str, password: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let mut out = String::new();
    for chunk in input.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(A[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    format!("Basic {out}")
}

async fn overview(args: &Args) -> Result<Vec<Line>, BoxError> {
    let dir = workdir(args)?;
    let path = dir.path().join("dashboard.db");
    let keep_all = Retention {
        succeeded: Keep::new(2 * FINISHED, Duration::from_secs(7 * 24 * 3600)),
        failed: Keep::new(2 * DEAD, Duration::from_secs(30 * 24 * 3600)),
        ..Retention::default()
    };
    let bus = Bus::builder()
        .store(SqliteStore::open(&path)?)
        .retention(keep_all)
        .max_retries(0)
        .handler("worker", On::event("job"), |_m: Message| async { Ok(()) })
        .handler("doomed", On::event("job.doomed"), |_m: Message| async {
            Err(HandlerError::transient("the downstream is gone"))
        })
        .build()
        .await?;
    let started = Instant::now();
    fill(&bus).await?;
    let stats = bus.stats().await?;
    eprintln!(
        "dashboard-overview: {} succeeded and {} dead deliveries in the store (filled in {:.1} s)",
        stats.deliveries.succeeded,
        stats.deliveries.dead,
        started.elapsed().as_secs_f64()
    );

    let dashboard = Dashboard::builder(bus.clone())
        .user("bench", PASSWORD, Role::Viewer)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = dashboard.mount(axum::Router::new(), "/admin/queues");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let auth = basic("bench", PASSWORD);
    get(addr, "/admin/queues", &auth).await?;
    let mut latencies = Vec::with_capacity(RENDERS);
    let mut bytes = 0;
    let t = Instant::now();
    for _ in 0..RENDERS {
        let one = Instant::now();
        bytes = get(addr, "/admin/queues", &auth).await?;
        latencies.push(u64::try_from(one.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let page = Line::new("dashboard-overview", RENDERS as u64, t.elapsed(), latencies);
    server.abort();

    // The raw cost on the same file: counting the finished deliveries, as the store's `stats`
    // does — every delivery row, and every commit row that keeps deliveries of its own.
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut raw = Vec::new();
    let t = Instant::now();
    for _ in 0..10 {
        let one = Instant::now();
        let _: (i64, i64) = conn.query_row(
            "SELECT (SELECT COALESCE(SUM(status = 2), 0) FROM deliveries)
                    + (SELECT COUNT(*) FROM commits WHERE inline_done != 0),
                    (SELECT COALESCE(SUM(status = 4), 0) FROM deliveries)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        raw.push(u64::try_from(one.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let raw = Line::new("raw-sqlite-count-deliveries", 10, t.elapsed(), raw);
    let ratio = page.percentile_ms(0.50) / raw.percentile_ms(0.50).max(f64::MIN_POSITIVE);
    let page = page
        .with("succeeded_deliveries", stats.deliveries.succeeded as f64)
        .with("dead_letters", stats.deliveries.dead as f64)
        .with("page_bytes", bytes as f64)
        .with("raw_count_p50_ms", raw.percentile_ms(0.50))
        .with("p50_vs_raw_count", ratio)
        .with("target_p50_ms", 50.0);
    drop(conn);
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(vec![raw, page])
}
