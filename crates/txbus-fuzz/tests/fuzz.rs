//! Every fuzz target from a fixed seed, for a bounded time each (`TXBUS_FUZZ_SECS`, default 6
//! seconds; at most 200 000 inputs): the stable, reproducible part of the fuzzing that CI
//! runs. The long runs use libFuzzer on the same targets (see `fuzz/README.md`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Duration;

fn budget() -> Duration {
    let secs = std::env::var("TXBUS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6.0);
    Duration::from_secs_f64(secs)
}

fn fuzz(name: &str) {
    let (_, target) = txbus_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a target of that name");
    // One seed per target, fixed: a failure reproduces with the same inputs.
    let seed = name.bytes().fold(0x7478_6275_u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    let execs = txbus_fuzz::run(*target, seed, budget(), 200_000);
    println!("fuzz {name}: {execs} inputs, 0 failures");
    assert!(
        execs >= 50,
        "{name}: too few inputs ran ({execs}) to mean anything"
    );
}

#[test]
fn fuzz_event_validation() {
    fuzz("event");
}

#[test]
fn fuzz_schema_checks() {
    fuzz("schema");
}

#[test]
fn fuzz_stored_message_decoding() {
    fuzz("stored");
}

#[test]
fn fuzz_relay_wire_format() {
    fuzz("wire");
}

#[test]
fn fuzz_nats_messages() {
    fuzz("nats");
}

#[test]
fn fuzz_rabbitmq_deliveries() {
    fuzz("rabbitmq");
}

#[test]
fn fuzz_redis_entries() {
    fuzz("redis");
}

#[test]
fn fuzz_idempotency_http_requests() {
    fuzz("idempotency_http");
}

/// Inputs that once broke a target (found by the long libFuzzer runs), kept under
/// `tests/regressions/<target>/` and run on every test run.
#[test]
fn inputs_that_once_failed_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let mut ran = 0;
    for (name, target) in txbus_fuzz::TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(name)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            target(&input);
            println!("regression {name}/{}: passes", path.display());
            ran += 1;
        }
    }
    assert!(
        ran > 0,
        "no regression inputs found under {}",
        dir.display()
    );
}
