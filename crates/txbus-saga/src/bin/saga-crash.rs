//! The child process of the saga crash tests.
//!
//! `saga-crash DIR SCENARIO` runs a bus with the saga `crash` on `DIR/bus.db`, starts the saga
//! `crash-1` (once: a restart finds it started), and runs until the saga settles, then prints
//! its status and exits. The step (scenario `step`) or the compensation (scenario
//! `compensation`) named `b` blocks on its first run, after creating `DIR/blocked`, so that
//! the test can kill the process there. Every run of every action and compensation is counted
//! durably in the store's key–value space (`crash/runs/<what>`), before it does anything else.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use txbus_core::{Backoff, Bus, HandlerError, KvExpect, KvWrite};
use txbus_saga::{Error, Saga, SagaId, Sagas, StartOptions, Step, StepContext};
use txbus_sqlite::SqliteStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts one run of `what`; returns how many there were, this one included.
async fn count(bus: &Bus, what: &str) -> Result<u64, HandlerError> {
    let key = format!("crash/runs/{what}");
    loop {
        let current = bus.kv_get(&key).await.map_err(HandlerError::transient)?;
        let (n, expect) = match &current {
            Some(e) => (
                String::from_utf8_lossy(&e.value)
                    .parse::<u64>()
                    .unwrap_or(0),
                KvExpect::Version(e.version),
            ),
            None => (0, KvExpect::Absent),
        };
        let write = KvWrite::put(key.clone(), (n + 1).to_string().into_bytes()).expect(expect);
        match bus.kv_write(vec![write]).await {
            Ok(_) => return Ok(n + 1),
            Err(txbus_core::Error::Conflict(_)) => continue,
            Err(e) => return Err(HandlerError::transient(e)),
        }
    }
}

/// Counts the run; on the first run of the blocking one, marks the spot and blocks.
async fn run(
    ctx: &StepContext,
    what: &'static str,
    blocks: bool,
    marker: &Path,
) -> Result<(), HandlerError> {
    let n = count(ctx.bus(), what).await?;
    if blocks && n == 1 {
        std::fs::write(marker, what).map_err(HandlerError::transient)?;
        // Until the test kills this process.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    Ok(())
}

fn saga(dir: &Path, scenario: &str) -> Result<Saga, Error> {
    let marker = dir.join("blocked");
    let block_step = scenario == "step";
    let block_compensation = scenario == "compensation";
    let mut builder = Saga::builder("crash");
    for (name, undo) in [("a", "undo-a"), ("b", "undo-b")] {
        let (m1, m2) = (marker.clone(), marker.clone());
        let blocks = name == "b";
        builder = builder.step(
            Step::action(name, move |ctx: StepContext| {
                let m = m1.clone();
                async move {
                    run(&ctx, name, blocks && block_step, &m).await?;
                    Ok(json!({"done": name}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let m = m2.clone();
                async move { run(&ctx, undo, blocks && block_compensation, &m).await }
            })
            .timeout(Duration::from_secs(7200))
            .compensation_timeout(Duration::from_secs(7200))
            .backoff(Backoff::fixed(Duration::from_millis(10)))
            .compensation_backoff(Backoff::fixed(Duration::from_millis(10))),
        );
    }
    let fails = block_compensation;
    builder = builder.step(Step::action("c", move |ctx: StepContext| async move {
        count(ctx.bus(), "c").await?;
        if fails {
            return Err(HandlerError::reject(
                "c fails so that a and b are compensated",
            ));
        }
        Ok(json!({"done": "c"}))
    }));
    builder.build()
}

async fn main_async(dir: PathBuf, scenario: String) -> Result<(), BoxError> {
    let sagas = Sagas::builder().saga(saga(&dir, &scenario)?).build()?;
    let bus = sagas
        .install(
            Bus::builder()
                .store(SqliteStore::open(dir.join("bus.db"))?)
                .poll_interval(Duration::from_millis(50)),
        )
        .build()
        .await?;
    let runtime = sagas.attach(bus.clone());
    let id = SagaId::new("crash-1")?;
    match runtime
        .start_with(
            "crash",
            json!({"scenario": scenario}),
            StartOptions::default().id(id.clone()),
        )
        .await
    {
        Ok(_) | Err(Error::AlreadyStarted(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let state = runtime.wait(&id).await?;
    println!("{}", state.status);
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(scenario)) = (args.next(), args.next()) else {
        eprintln!("usage: saga-crash DIR step|compensation");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("saga-crash: no runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(main_async(PathBuf::from(dir), scenario)) {
        eprintln!("saga-crash: {e}");
        std::process::exit(1);
    }
}
