//! Benchmarks txbus on its embedded store against the raw limit of the same storage, measured
//! in the same run.
//!
//! ```text
//! cargo run --release -p txbus-bench -- <scenario> [--json] [--secs N] [--callers N] [--dir PATH]
//! ```
//!
//! Scenarios: `transact`, `transact-latency`, `publish`, `raw-sqlite`, `raw-postgres`,
//! `pending-memory`, `transact-metrics` (`transact` with the Prometheus exporter on and off,
//! alternating in one run, and their ratio), `all`; over NATS JetStream: `relay-nats` and `raw-nats` (run together),
//! `transact-remote`. `--store postgres://…` runs the bus scenarios on PostgreSQL;
//! `transact-callers --store postgres://…` runs `transact` at 1, 32 and 256 callers,
//! `transact-latency` and `publish` beside the raw figures of the same server, with the
//! PostgreSQL targets checked.
//!
//! Sagas (`txbus-saga`): `saga-start`, `saga-3-steps`, and `saga` for both.
//!
//! Relays to RabbitMQ and Redis Streams, beside the raw publish rate of the same client:
//! `relay-rabbitmq` with `raw-rabbitmq`, `relay-redis` with `raw-redis` (each pair runs
//! together).
//!
//! Event sourcing (`txbus-es`): `append`, `append-batch-100`, `load-aggregate-10k`, and `es`
//! for the three.
//!
//! CQRS (`txbus-cqrs`): `command` (a command through the command bus to an aggregate
//! repository) and `query-cached` (query cache hits), and `cqrs` for both.
//!
//! The dashboard (`txbus-dashboard`): `dashboard-overview`, the overview page over HTTP with
//! 1,000,000 finished deliveries and 10,000 dead letters in the store, beside
//! `raw-sqlite-count-deliveries` on the same file.
//!
//! The Tx/Commit model: `transact-signed` (beside unsigned `transact`), `verify` (an unsigned
//! and a signed log beside a raw read of the same rows), `state-at` (the state 100 000 commits
//! back), and `commits` for the three.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod commits;
mod cqrs;
mod dashboard;
mod es;
mod metrics_overhead;
mod raw_postgres;
mod raw_sqlite;
mod relay_brokers;
mod relay_nats;
mod report;
mod saga;
mod scenarios;
mod store;

use std::path::PathBuf;
use std::time::Duration;

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Args {
    scenario: String,
    json: bool,
    secs: Duration,
    callers: usize,
    dir: Option<PathBuf>,
    pending: u64,
    store: Option<String>,
}

const USAGE: &str =
    "usage: txbus-bench <scenario> [--json] [--secs N] [--callers N] [--dir PATH] [--pending N]
scenarios: transact, transact-latency, publish, raw-sqlite, pending-memory, transact-metrics, all,
           relay-nats, raw-nats, transact-remote, transact-callers (with --store postgres://…)";

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        scenario: String::new(),
        json: false,
        secs: Duration::from_secs(5),
        callers: 256,
        dir: None,
        pending: 1_000_000,
        store: None,
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--json" => out.json = true,
            "--secs" => {
                let v = value("--secs")?;
                out.secs = Duration::from_secs_f64(
                    v.parse()
                        .map_err(|_| format!("--secs {v:?} is not a number"))?,
                );
            }
            "--callers" => {
                let v = value("--callers")?;
                out.callers = v
                    .parse()
                    .map_err(|_| format!("--callers {v:?} is not a count"))?;
            }
            "--pending" => {
                let v = value("--pending")?;
                out.pending = v
                    .parse()
                    .map_err(|_| format!("--pending {v:?} is not a count"))?;
            }
            "--dir" => out.dir = Some(PathBuf::from(value("--dir")?)),
            "--store" => out.store = Some(value("--store")?),
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s if out.scenario.is_empty() => out.scenario = s.to_owned(),
            s => return Err(format!("unexpected argument {s}\n{USAGE}")),
        }
    }
    if out.scenario.is_empty() {
        return Err(USAGE.into());
    }
    Ok(out)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // The pattern scenarios on the embedded store are latencies of durable commits: measure
    // the raw commit of the same storage first, in the same run, and compare with it.
    const AGAINST_RAW_COMMIT: &[&str] = &[
        "es",
        "append",
        "append-batch-100",
        "load-aggregate-10k",
        "cqrs",
        "command",
        "query-cached",
        "saga",
        "saga-start",
        "saga-3-steps",
    ];
    if args.store.is_none() && AGAINST_RAW_COMMIT.contains(&args.scenario.as_str()) {
        match raw_sqlite::raw_sqlite(&args) {
            Ok(lines) => {
                if let Some(commit) = lines.iter().find(|l| l.scenario == "raw-sqlite-commit") {
                    commit.print(args.json);
                    let _ = report::RAW_COMMIT_P50_MS.set(commit.percentile_ms(0.50));
                }
            }
            Err(e) => {
                eprintln!("txbus-bench: raw-sqlite baseline: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(result) = rt.block_on(dashboard::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(result) = rt.block_on(commits::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(result) = rt.block_on(saga::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(result) = rt.block_on(cqrs::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(result) = rt.block_on(relay_brokers::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(result) = rt.block_on(es::run(&args)) {
        if let Err(e) = result {
            eprintln!("txbus-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    let result = rt.block_on(async {
        match relay_nats::run(&args).await {
            Some(result) => result,
            None => scenarios::run(&args).await,
        }
    });
    if let Err(e) = result {
        eprintln!("txbus-bench: {e}");
        std::process::exit(1);
    }
}
