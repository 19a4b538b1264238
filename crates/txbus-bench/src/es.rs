//! Event sourcing scenarios (`txbus-es`): appends to a stream with an exact expected version,
//! one event or a hundred at a time, and loading an aggregate of 10 000 events, replayed or
//! from a snapshot. One caller, latency; each on a fresh store with default (durable)
//! settings.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Bus, ExpectedVersion, TypedEvent};
use txbus_es::{Aggregate, EventStore, Repository};

use crate::report::{print_check, Line};
use crate::scenarios::BoxError;
use crate::store::Target;
use crate::Args;

/// Runs the scenario named in `args` when it is one of these; `None` otherwise.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "append" => append(args, "append", 1, 0.5).await,
        "append-batch-100" => append(args, "append-batch-100", 100, 2.0).await,
        "load-aggregate-10k" => load_aggregate(args).await,
        "es" => all(args).await,
        _ => return None,
    };
    Some(result)
}

/// Every event sourcing scenario.
async fn all(args: &Args) -> Result<(), BoxError> {
    append(args, "append", 1, 0.5).await?;
    append(args, "append-batch-100", 100, 2.0).await?;
    load_aggregate(args).await
}

/// What the aggregate of the benchmark records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Incremented {
    by: u64,
}

impl TypedEvent for Incremented {
    const EVENT_TYPE: &'static str = "bench.incremented";
}

/// A counter: the sum and count of its events.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    count: u64,
    sum: u64,
}

/// A counter refuses nothing.
#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl Aggregate for Counter {
    const KIND: &'static str = "counter";
    type Event = Incremented;
    type Command = u64;
    type Error = Never;

    fn create(_id: &str) -> Self {
        Self::default()
    }
    fn handle(&self, by: &u64) -> Result<Vec<Incremented>, Never> {
        Ok(vec![Incremented { by: *by }])
    }
    fn apply(&mut self, e: &Incremented) {
        self.count += 1;
        self.sum += e.by;
    }
}

async fn open(target: &Target) -> Result<Bus, BoxError> {
    Ok(Bus::builder()
        .shared_store(target.open().await?)
        .build()
        .await?)
}

/// The line of a latency scenario, with p90 beside the report's usual quantiles.
fn line(name: &str, lat: Vec<u64>, elapsed: Duration) -> Line {
    let l = Line::new(name, lat.len() as u64, elapsed, lat);
    let p90 = l.percentile_ms(0.90);
    l.with("p90_ms", p90)
}

/// One caller appends `batch` events at a time to one stream, with the exact version.
async fn append(args: &Args, name: &str, batch: usize, target_p50_ms: f64) -> Result<(), BoxError> {
    let target = Target::new(args).await?;
    let bus = open(&target).await?;
    let store = EventStore::new(bus.clone());
    let stream = "counter-append";
    let mut version = 0u64;
    let events = |n: u64| -> Vec<Incremented> {
        (0..batch as u64)
            .map(|i| Incremented { by: n + i })
            .collect()
    };
    // Warm up the page cache and prepared statements.
    for n in 0..50 {
        version = store
            .append_typed(stream, ExpectedVersion::Exact(version), &events(n))
            .await?
            .version;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < args.secs {
        let batch = events(n);
        let t = Instant::now();
        version = store
            .append_typed(stream, ExpectedVersion::Exact(version), &batch)
            .await?
            .version;
        lat.push(t.elapsed().as_nanos() as u64);
        n += 1;
    }
    let elapsed = start.elapsed();
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    let l = line(name, lat, elapsed);
    l.print(args.json);
    let p50 = l.percentile_ms(0.5);
    print_check(
        args.json,
        &format!("{name} p50 ms"),
        p50,
        &format!("<= {target_p50_ms}"),
        p50 <= target_p50_ms,
    );
    Ok(())
}

/// Loads an aggregate of 10 000 events: replayed from its stream, then from a snapshot taken
/// at its last event.
async fn load_aggregate(args: &Args) -> Result<(), BoxError> {
    const EVENTS: u64 = 10_000;
    let target = Target::new(args).await?;
    let bus = open(&target).await?;
    let store = EventStore::new(bus.clone());
    let counters = Repository::<Counter>::new(store.clone());
    let stream = counters.stream_id("10k");
    for chunk in 0..EVENTS / 1000 {
        let events: Vec<Incremented> = (0..1000)
            .map(|i| Incremented {
                by: chunk * 1000 + i,
            })
            .collect();
        store
            .append_typed(&stream, ExpectedVersion::Exact(chunk * 1000), &events)
            .await?;
    }
    let expect_sum = EVENTS * (EVENTS - 1) / 2;

    let measure = |name: &'static str, snapshot: Option<u64>| {
        let counters = counters.clone();
        async move {
            let mut lat = Vec::new();
            let start = Instant::now();
            // At least 20 loads, for as long as --secs allows.
            while lat.len() < 20 || start.elapsed() < args.secs {
                let t = Instant::now();
                let loaded = counters.load("10k").await?;
                lat.push(t.elapsed().as_nanos() as u64);
                if loaded.state.count != EVENTS
                    || loaded.state.sum != expect_sum
                    || loaded.snapshot != snapshot
                {
                    return Err::<Line, BoxError>(
                        format!("{name}: loaded a wrong state: {loaded:?}").into(),
                    );
                }
            }
            Ok(line(name, lat, start.elapsed()))
        }
    };
    let replay = measure("load-aggregate-10k", None).await?;
    replay.print(args.json);
    counters.snapshot("10k").await?;
    let snap = measure("load-aggregate-10k-snapshot", Some(EVENTS)).await?;
    snap.print(args.json);
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    let p50 = snap.percentile_ms(0.5);
    print_check(
        args.json,
        "load-aggregate-10k-snapshot p50 ms",
        p50,
        "<= 1",
        p50 <= 1.0,
    );
    Ok(())
}
