//! The scenarios. Each runs on a fresh store in its own directory, with default (durable)
//! settings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use txbus::{Bus, Event, Message, On};

use crate::raw_postgres::raw_postgres;
use crate::raw_sqlite::raw_sqlite;
use crate::store::Target;

use crate::report::{print_check, Line};
use crate::Args;

/// Any error, for the benchmark's own plumbing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A fresh directory for one scenario's files.
pub fn workdir(args: &Args) -> Result<tempfile::TempDir, BoxError> {
    Ok(match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    })
}

/// Runs the scenario named in `args`.
pub async fn run(args: &Args) -> Result<(), BoxError> {
    match args.scenario.as_str() {
        "transact" => transact(args).await?.print(args.json),
        "transact-latency" => transact_latency(args).await?.print(args.json),
        "publish" => {
            for line in publish(args).await? {
                line.print(args.json);
            }
        }
        "raw-sqlite" => {
            for line in raw_sqlite(args)? {
                line.print(args.json);
            }
        }
        "raw-postgres" => {
            for line in raw_postgres(args, &pg_url(args)).await? {
                line.print(args.json);
            }
        }
        "pending-memory" => pending_memory(args).await?.print(args.json),
        "transact-metrics" => crate::metrics_overhead::transact_metrics(args).await?,
        "all" => all(args).await?,
        "transact-callers" => transact_callers(args).await?,
        other => return Err(format!("unknown scenario {other:?}\n{}", crate::USAGE).into()),
    }
    Ok(())
}

/// The bus scenarios that `all` runs on either store, printed as they finish.
async fn bus_scenarios(args: &Args) -> Result<(Line, Line, Vec<Line>), BoxError> {
    let tx = transact(args).await?;
    tx.print(args.json);
    let lat = transact_latency(args).await?;
    lat.print(args.json);
    let publ = publish(args).await?;
    for l in &publ {
        l.print(args.json);
    }
    Ok((tx, lat, publ))
}

/// The PostgreSQL database of `--store`, or the local test database.
fn pg_url(args: &Args) -> String {
    args.store
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Every scenario on PostgreSQL, beside its raw limit, and the targets of the PostgreSQL store.
async fn all_postgres(args: &Args) -> Result<(), BoxError> {
    let short = Args {
        secs: args.secs.min(Duration::from_secs(5)),
        ..args.clone()
    };
    let raw = raw_postgres(&short, &pg_url(args)).await?;
    for l in &raw {
        l.print(args.json);
    }
    let (tx, lat, publish) = bus_scenarios(&short).await?;
    postgres_checks(args.json, &raw, &tx, &lat, &publish[0]);
    Ok(())
}

/// The PostgreSQL targets, from figures of one run: `raw` is what [`raw_postgres`] measured
/// (commit with 32 connections, commit with one, batch).
fn postgres_checks(json: bool, raw: &[Line], tx: &Line, lat: &Line, publish: &Line) {
    let (raw_commit, raw_commit_1, raw_batch) = (&raw[0], &raw[1], &raw[2]);
    let r = tx.ops_per_sec() / raw_commit.ops_per_sec();
    print_check(
        json,
        "transact ops/s / raw-postgres-commit commits/s",
        r,
        ">= 1.5",
        r >= 1.5,
    );
    let r = lat.percentile_ms(0.5) / raw_commit_1.percentile_ms(0.5);
    print_check(
        json,
        "transact-latency p50 / raw-postgres-commit-1 p50",
        r,
        "<= 3",
        r <= 3.0,
    );
    let r = publish.ops_per_sec() / raw_batch.ops_per_sec();
    print_check(
        json,
        "publish ops/s / raw-postgres-batch rows/s",
        r,
        ">= 0.25",
        r >= 0.25,
    );
}

/// Callers of `transact-callers`.
const CALLERS: [usize; 3] = [1, 32, 256];

/// `transact` on PostgreSQL at 1, 32 and 256 callers, then `transact-latency` and `publish`,
/// each printed beside the raw limit of the same server measured first in the same run (its
/// ratio to it as an extra field), and the targets checked. `transact` lines keep their name
/// and carry `callers`.
async fn transact_callers(args: &Args) -> Result<(), BoxError> {
    let Some(url) = args.store.clone() else {
        return Err(
            "transact-callers compares with PostgreSQL's raw commit rate: give \
                    --store postgres://…"
                .into(),
        );
    };
    let short = Args {
        secs: args.secs.min(Duration::from_secs(5)),
        ..args.clone()
    };
    let raw = raw_postgres(&short, &url).await?;
    for l in &raw {
        l.print(args.json);
    }
    let (raw_commit, raw_commit_1, raw_batch) = (&raw[0], &raw[1], &raw[2]);
    let mut at_default = None;
    for callers in CALLERS {
        let line = transact(&Args {
            callers,
            ..short.clone()
        })
        .await?;
        let (rate, p50) = (line.ops_per_sec(), line.percentile_ms(0.5));
        let line = line
            .with("vs_raw_commit", rate / raw_commit.ops_per_sec())
            .with("p50_vs_raw_commit_1", p50 / raw_commit_1.percentile_ms(0.5));
        line.print(args.json);
        if callers == 256 {
            at_default = Some(line);
        }
    }
    let lat = transact_latency(&short).await?;
    let p50 = lat.percentile_ms(0.5);
    let lat = lat.with("p50_vs_raw_commit_1", p50 / raw_commit_1.percentile_ms(0.5));
    lat.print(args.json);
    let mut publ = publish(&short).await?.into_iter();
    let first = publ.next().ok_or("publish measured nothing")?;
    let rate = first.ops_per_sec();
    let first = first.with("vs_raw_batch", rate / raw_batch.ops_per_sec());
    first.print(args.json);
    for l in publ {
        l.print(args.json);
    }
    let tx = at_default.ok_or("no transact line at 256 callers")?;
    postgres_checks(args.json, &raw, &tx, &lat, &first);

    // The same comparisons again, the bus and the raw baseline taking turns in short slices:
    // on a shared machine the disk's flush time can change several-fold within seconds, and
    // only figures that met the same disk compare.
    let (raw_commit, tx) = paired(&short, &url, 256, 32).await?;
    let r = tx.ops_per_sec() / raw_commit.ops_per_sec();
    raw_commit.print(args.json);
    tx.clone().with("vs_raw_commit", r).print(args.json);
    let (raw_commit_1, lat) = paired(&short, &url, 1, 1).await?;
    let p = lat.percentile_ms(0.5) / raw_commit_1.percentile_ms(0.5);
    raw_commit_1.print(args.json);
    lat.clone().with("p50_vs_raw_commit_1", p).print(args.json);
    print_check(
        args.json,
        "paired: transact ops/s / raw-postgres-commit commits/s",
        r,
        ">= 1.5",
        r >= 1.5,
    );
    print_check(
        args.json,
        "paired: transact-latency p50 / raw-postgres-commit-1 p50",
        p,
        "<= 3",
        p <= 3.0,
    );
    Ok(())
}

/// Slices one scenario and its raw baseline take in turn, and how long each lasts.
const SLICES: u32 = 10;
const SLICE: Duration = Duration::from_millis(400);

/// `transact` with `callers` callers (one bus, kept across slices) and one-row raw commits from
/// `connections` connections, alternating in [`SLICES`] slices of [`SLICE`] each; the lines
/// are named `raw-postgres-commit-paired` (or `-1-paired` for one connection) and
/// `transact-paired` (or `transact-latency-paired` for one caller).
async fn paired(
    args: &Args,
    url: &str,
    callers: usize,
    connections: usize,
) -> Result<(Line, Line), BoxError> {
    let raw = crate::raw_postgres::RawCommits::open(url).await?;
    let target = Target::new(args).await?;
    let bus = bus_with_noop(&target, false).await?;
    // Warm up the bus, its connections and the raw pool.
    for i in 0..50 {
        bus.transact([Event::new("bench.event", json!({"n": i}))])
            .await?
            .outcome()
            .await?;
    }
    raw.run(connections, Duration::from_millis(100)).await?;
    let (mut raw_ops, mut raw_time, mut raw_lat) = (0u64, Duration::ZERO, Vec::new());
    let (mut tx_ops, mut tx_time, mut tx_lat) = (0u64, Duration::ZERO, Vec::new());
    for _ in 0..SLICES {
        let (ops, elapsed, lat) = raw.run(connections, SLICE).await?;
        raw_ops += ops;
        raw_time += elapsed;
        raw_lat.extend(lat);
        let deadline = Instant::now() + SLICE;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..callers {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let op = bus
                        .transact([Event::new("bench.event", json!({"caller": c, "n": i}))])
                        .await?;
                    op.outcome().await?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    i += 1;
                }
                Ok::<_, BoxError>(lat)
            }));
        }
        for t in tasks {
            let lat = t.await??;
            tx_ops += lat.len() as u64;
            tx_lat.extend(lat);
        }
        tx_time += start.elapsed();
    }
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    raw.close().await?;
    let (raw_name, tx_name) = if callers == 1 {
        ("raw-postgres-commit-1-paired", "transact-latency-paired")
    } else {
        ("raw-postgres-commit-paired", "transact-paired")
    };
    Ok((
        Line::new(raw_name, raw_ops, raw_time, raw_lat).with("connections", connections as f64),
        Line::new(tx_name, tx_ops, tx_time, tx_lat).with("callers", callers as f64),
    ))
}

async fn all(args: &Args) -> Result<(), BoxError> {
    if args.store.is_some() {
        return all_postgres(args).await;
    }
    let short = Args {
        secs: args.secs.min(Duration::from_secs(5)),
        ..args.clone()
    };
    let raw = raw_sqlite(&short)?;
    for l in &raw {
        l.print(args.json);
    }
    let (tx, lat, publ) = bus_scenarios(&short).await?;
    let mem = pending_memory(args).await?;
    mem.print(args.json);

    let raw_commit = &raw[0];
    let raw_batch = &raw[1];
    let r = tx.ops_per_sec() / raw_batch.ops_per_sec();
    print_check(
        args.json,
        "transact ops/s / raw-sqlite-batch rows/s",
        r,
        ">= 0.2",
        r >= 0.2,
    );
    let r = lat.percentile_ms(0.5) / raw_commit.percentile_ms(0.5);
    print_check(
        args.json,
        "transact-latency p50 / raw-sqlite-commit p50",
        r,
        "<= 3",
        r <= 3.0,
    );
    let p99 = lat.percentile_ms(0.99);
    print_check(
        args.json,
        "transact-latency p99 ms",
        p99,
        "<= 1.5",
        p99 <= 1.5,
    );
    let r = publ[0].ops_per_sec() / raw_batch.ops_per_sec();
    print_check(
        args.json,
        "publish ops/s / raw-sqlite-batch rows/s",
        r,
        ">= 0.25",
        r >= 0.25,
    );
    let rss = mem
        .extra
        .iter()
        .find(|(k, _)| *k == "peak_rss_mib")
        .map(|(_, v)| *v)
        .unwrap_or(f64::MAX);
    print_check(
        args.json,
        "pending-memory peak RSS MiB",
        rss,
        "< 128",
        rss < 128.0,
    );
    Ok(())
}

async fn bus_with_noop(target: &Target, paused: bool) -> Result<Bus, BoxError> {
    Ok(Bus::builder()
        .shared_store(target.open().await?)
        .handler("noop", On::event("bench.event"), |_m: Message| async {
            Ok(())
        })
        .start_paused(paused)
        .build()
        .await?)
}

/// Many callers, each committing one event and awaiting its outcome, over and over.
async fn transact(args: &Args) -> Result<Line, BoxError> {
    transact_with(args, "transact", |_| None).await
}

/// The `transact` scenario under the name `scenario`; `setup` sees the bus before the load
/// starts and may leave a task running beside it (stopped at the end).
pub(crate) async fn transact_with(
    args: &Args,
    scenario: &str,
    setup: impl FnOnce(&Bus) -> Option<tokio::task::AbortHandle>,
) -> Result<Line, BoxError> {
    let target = Target::new(args).await?;
    let bus = bus_with_noop(&target, false).await?;
    let beside = setup(&bus);
    let deadline = Instant::now() + args.secs;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let op = bus
                    .transact([Event::new("bench.event", json!({"caller": c, "n": i}))])
                    .await?;
                let outcome = op.outcome().await?;
                if !outcome.is_ok() {
                    return Err::<Vec<u64>, BoxError>(
                        format!("operation failed: {outcome:?}").into(),
                    );
                }
                lat.push(t.elapsed().as_nanos() as u64);
                i += 1;
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    if let Some(task) = beside {
        task.abort();
    }
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    Ok(Line::new(scenario, all.len() as u64, elapsed, all).with("callers", args.callers as f64))
}

/// One caller, one operation at a time: commit, handle, outcome.
async fn transact_latency(args: &Args) -> Result<Line, BoxError> {
    let target = Target::new(args).await?;
    let bus = bus_with_noop(&target, false).await?;
    // Warm up the page cache and prepared statements.
    for i in 0..50 {
        bus.transact([Event::new("bench.event", json!({"n": i}))])
            .await?
            .outcome()
            .await?;
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < args.secs {
        let t = Instant::now();
        let op = bus
            .transact([Event::new("bench.event", json!({"n": i}))])
            .await?;
        op.outcome().await?;
        lat.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    let elapsed = start.elapsed();
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    Ok(Line::new(
        "transact-latency",
        lat.len() as u64,
        elapsed,
        lat,
    ))
}

/// Many callers publishing; the handler records when each event was handled.
async fn publish(args: &Args) -> Result<Vec<Line>, BoxError> {
    let target = Target::new(args).await?;
    let origin = Instant::now();
    let handled = Arc::new(AtomicU64::new(0));
    let last_handled_ns = Arc::new(AtomicU64::new(0));
    let handled_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    let (h, l, hl) = (
        handled.clone(),
        last_handled_ns.clone(),
        handled_lat.clone(),
    );
    let bus = Bus::builder()
        .shared_store(target.open().await?)
        .handler("recorder", On::event("bench.event"), move |m: Message| {
            let (h, l, hl) = (h.clone(), l.clone(), hl.clone());
            async move {
                let now = origin.elapsed().as_nanos() as u64;
                let sent = m.payload()["t"].as_u64().unwrap_or(now);
                hl.lock().map(|mut v| v.push(now.saturating_sub(sent))).ok();
                h.fetch_add(1, Ordering::Relaxed);
                l.fetch_max(now, Ordering::Relaxed);
                Ok(())
            }
        })
        .build()
        .await?;
    let deadline = Instant::now() + args.secs;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.callers {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let sent = origin.elapsed().as_nanos() as u64;
                bus.publish(Event::new("bench.event", json!({"t": sent})))
                    .await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, BoxError>(lat)
        }));
    }
    let mut enqueue = Vec::new();
    for t in tasks {
        enqueue.extend(t.await??);
    }
    let enqueue_elapsed = start.elapsed();
    let published = enqueue.len() as u64;
    let wait_until = Instant::now() + Duration::from_secs(120);
    while handled.load(Ordering::Relaxed) < published && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = handled.load(Ordering::Relaxed);
    if done < published {
        return Err(format!(
            "only {done} of {published} published events were handled within 120 s"
        )
        .into());
    }
    let start_ns = start.duration_since(origin).as_nanos() as u64;
    let handled_elapsed = Duration::from_nanos(
        last_handled_ns
            .load(Ordering::Relaxed)
            .saturating_sub(start_ns),
    );
    let lat = std::mem::take(&mut *handled_lat.lock().map_err(|_| "poisoned")?);
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    Ok(vec![
        Line::new("publish", published, enqueue_elapsed, enqueue)
            .with("callers", args.callers as f64),
        Line::new("publish-handled", done, handled_elapsed, lat),
    ])
}

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Publishes `--pending` events with handlers paused and reports resident memory.
async fn pending_memory(args: &Args) -> Result<Line, BoxError> {
    let target = Target::new(args).await?;
    // Reset the peak-RSS mark so that earlier scenarios of the same run do not count.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let bus = bus_with_noop(&target, true).await?;
    let total = args.pending;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.callers.clamp(1, 256) {
        let (bus, next) = (bus.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, BoxError>(());
                }
                bus.publish(Event::new("bench.event", json!({"n": n})))
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let stats = bus.stats().await?;
    let pending = stats.deliveries.pending + stats.deliveries.leased;
    let line = Line::new("pending-memory", total, elapsed, Vec::new())
        .with("pending_deliveries", pending as f64)
        .with("rss_mib", rss_mib("VmRSS:"))
        .with("peak_rss_mib", rss_mib("VmHWM:"));
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    Ok(line)
}
