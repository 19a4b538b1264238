//! Fuzz targets for the parts of txbus that read input it does not control: events handed to
//! the bus (validation, schema checks), messages read back from a store, messages received
//! from a broker (the relay wire format, NATS headers, AMQP headers, Redis stream entries) and
//! HTTP requests through the idempotency layer.
//!
//! Each target takes raw bytes, turns them into a structured input, and checks the properties
//! that must hold for any input: no panic, and for what is accepted, that it reads back as it
//! was. The same targets run under libFuzzer (the `fuzz/` directory beside the workspace, with
//! `cargo fuzz`) and, on stable, from a fixed seed for a bounded time ([`run`], used by this
//! crate's tests).
//!
//! ```
//! let execs = txbus_fuzz::run(txbus_fuzz::targets::stored, 7, std::time::Duration::from_millis(50), 200);
//! assert!(execs > 0);
//! ```

pub mod input;
pub mod targets;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// A fuzz target: any bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets` names them.
pub const TARGETS: &[(&str, Target)] = &[
    ("event", targets::event),
    ("schema", targets::schema),
    ("stored", targets::stored),
    ("wire", targets::wire),
    ("nats", targets::nats),
    ("rabbitmq", targets::rabbitmq),
    ("redis", targets::redis),
    ("idempotency_http", targets::idempotency_http),
];

/// Mutates `input` in place: bit flips, random bytes, insertions, deletions, copies,
/// splices with `other`, truncation.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..rng.usize(1..6) {
        let len = input.len();
        match rng.u8(0..8) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                input[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                input[i] = rng.u8(..);
            }
            2 => {
                let at = rng.usize(..=len);
                let n = rng.usize(1..32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..64)).min(len);
                input.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..64)).min(len);
                let copy = input[start..end].to_vec();
                let at = rng.usize(..=input.len());
                input.splice(at..at, copy);
            }
            5 if !other.is_empty() => {
                let start = rng.usize(..other.len());
                let end = (start + rng.usize(1..256)).min(other.len());
                let at = rng.usize(..=len);
                input.splice(at..at, other[start..end].iter().copied());
            }
            6 if len > 0 => input.truncate(rng.usize(..len)),
            _ => input.push(rng.u8(..)),
        }
    }
    input.truncate(64 * 1024);
}

/// Runs `target` on inputs made from a fixed `seed` until `budget` has passed or `max_execs`
/// inputs have run, whichever comes first; returns how many ran. Inputs start as random bytes
/// of every length and are mutated from there. A panic is reported with the input that caused
/// it (in hex, to add to the corpus) and goes on unwinding.
pub fn run(target: Target, seed: u64, budget: Duration, max_execs: u64) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut corpus: Vec<Vec<u8>> = (0..64)
        .map(|i| (0..(i * i) % 2048).map(|_| rng.u8(..)).collect())
        .collect();
    let start = Instant::now();
    let mut execs = 0u64;
    while execs < max_execs && start.elapsed() < budget {
        let mut input = corpus[rng.usize(..corpus.len())].clone();
        let other = corpus[rng.usize(..corpus.len())].clone();
        mutate(&mut rng, &mut input, &other);
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            report_failure(&hex, execs);
            resume_unwind(panic);
        }
        execs += 1;
        if rng.u8(..) < 16 {
            if corpus.len() >= 512 {
                let i = rng.usize(..corpus.len());
                corpus[i] = input;
            } else {
                corpus.push(input);
            }
        }
    }
    execs
}

#[allow(clippy::print_stderr)]
fn report_failure(hex: &str, execs: u64) {
    eprintln!("fuzz input that failed after {execs} runs (hex): {hex}");
}
