//! Saga scenarios, on the embedded store with its default (durable) settings, one caller:
//!
//! - `saga-start`: the latency of starting a saga — the durable commit of its `started`
//!   change, its first step's request and its status entry. The steps' handlers are paused,
//!   so that only the start is measured.
//! - `saga-3-steps`: from start to completed, three no-op steps: each step's completion is
//!   committed with the next step's request, the last with the completion.
//! - `saga`: both.

use std::time::{Duration, Instant};

use serde_json::json;
use txbus::{Bus, SqliteStore};
use txbus_saga::{Saga, SagaRuntime, SagaStatus, Sagas, Step, StepContext};

use crate::report::{print_check, Line};
use crate::scenarios::{workdir, BoxError};
use crate::Args;

/// Runs a saga scenario; `None` when `args` names another.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "saga-start" => saga_start(args).await.map(|l| report(args, &[l])),
        "saga-3-steps" => saga_3_steps(args).await.map(|l| report(args, &[l])),
        "saga" => match saga_start(args).await {
            Ok(start) => saga_3_steps(args)
                .await
                .map(|steps| report(args, &[start, steps])),
            Err(e) => Err(e),
        },
        _ => return None,
    };
    Some(result)
}

fn report(args: &Args, lines: &[Line]) {
    for line in lines {
        line.print(args.json);
        let (name, target) = match line.scenario.as_str() {
            "saga-start" => ("saga-start p50 ms", 1.0),
            _ => ("saga-3-steps p50 ms", 3.0),
        };
        let p50 = line.percentile_ms(0.50);
        print_check(args.json, name, p50, &format!("<= {target}"), p50 <= target);
        // Steps are durable commits: against the raw commit of the same run (when measured).
        if let Some(raw) = crate::report::RAW_COMMIT_P50_MS.get() {
            if line.scenario == "saga-3-steps" {
                let r = p50 / raw;
                print_check(
                    args.json,
                    "saga-3-steps p50 / raw-sqlite-commit p50",
                    r,
                    "<= 6",
                    r <= 6.0,
                );
            }
        }
    }
}

/// The report prints p50, p99 and p99.9; the saga targets speak of p90 too.
fn with_p90(line: Line) -> Line {
    let p90 = line.percentile_ms(0.90);
    line.with("p90_ms", p90)
}

fn three_steps() -> Result<Sagas, BoxError> {
    let mut saga = Saga::builder("bench");
    for name in ["one", "two", "three"] {
        saga = saga.step(Step::action(name, |_ctx: StepContext| async {
            Ok(json!(null))
        }));
    }
    Ok(Sagas::builder().saga(saga.build()?).build()?)
}

async fn runtime(
    args: &Args,
    paused: bool,
) -> Result<(tempfile::TempDir, Bus, SagaRuntime), BoxError> {
    let dir = workdir(args)?;
    let sagas = three_steps()?;
    let bus = sagas
        .install(
            Bus::builder()
                .store(SqliteStore::open(dir.path().join("saga.db"))?)
                .start_paused(paused),
        )
        .build()
        .await?;
    let runtime = sagas.attach(bus.clone());
    Ok((dir, bus, runtime))
}

/// Latency of `start`: one durable commit.
async fn saga_start(args: &Args) -> Result<Line, BoxError> {
    let (_dir, bus, runtime) = runtime(args, true).await?;
    for i in 0..50 {
        runtime.start("bench", json!({"n": i})).await?;
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < args.secs {
        let t = Instant::now();
        runtime.start("bench", json!({"n": i})).await?;
        lat.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    let elapsed = start.elapsed();
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(with_p90(Line::new(
        "saga-start",
        lat.len() as u64,
        elapsed,
        lat,
    )))
}

/// Latency from start to completed, three no-op steps.
async fn saga_3_steps(args: &Args) -> Result<Line, BoxError> {
    let (_dir, bus, runtime) = runtime(args, false).await?;
    let once = |i: u64| {
        let runtime = runtime.clone();
        async move {
            let id = runtime.start("bench", json!({"n": i})).await?;
            let state = runtime.wait(&id).await?;
            if state.status != SagaStatus::Completed {
                return Err::<(), BoxError>(format!("saga {id} ended {}", state.status).into());
            }
            Ok(())
        }
    };
    for i in 0..50 {
        once(i).await?;
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < args.secs {
        let t = Instant::now();
        once(i).await?;
        lat.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    let elapsed = start.elapsed();
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(with_p90(Line::new(
        "saga-3-steps",
        lat.len() as u64,
        elapsed,
        lat,
    )))
}
