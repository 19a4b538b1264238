//! Helpers of the NATS tests: unique names, the child process, reading the stream.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;

pub const NODE: &str = env!("CARGO_BIN_EXE_txbus-nats-node");

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

pub async fn connect() -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect("127.0.0.1:4222")
        .await
        .expect("NATS with JetStream must run on 127.0.0.1:4222");
    let js = jetstream::new(client.clone());
    // A stream that is never deleted: the server (2.9) removes its account's stream directory
    // when the last stream goes, racing with a stream being created at the same moment by a
    // test running in parallel. With this one always there, the directory stays.
    txbus_nats::StreamSpec::new("TXBUS_TESTS_ANCHOR", ["txbus-tests-anchor"])
        .ensure(&js)
        .await
        .expect("creating the tests' anchor stream");
    (client, js)
}

/// A child process that is killed when dropped.
pub struct Node {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Node {
    /// Starts `txbus-nats-node` with `args` and waits until it prints `ready`.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(NODE)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start txbus-nats-node");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let node = Self { child, lines: rx };
        node.expect_line("ready", Duration::from_secs(60));
        node
    }

    /// Waits for a line starting with `prefix`; returns it.
    pub fn expect_line(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("the child did not print {prefix:?}: {e}"),
            }
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL the child");
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "the child must have been killed");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of the remote handler's `seen.log` that start with `what ` and name `id`.
pub fn seen(dir: &Path, what: &str, id: &str) -> usize {
    std::fs::read_to_string(dir.join("seen.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == format!("{what} {id}"))
        .count()
}

/// Waits until `f` holds, polling; panics after `within` (a hang guard, not a timing claim).
pub async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number of messages stored in stream `name`.
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Reads every message of `stream` in order with an ephemeral ordered consumer, until `count`
/// have arrived.
pub async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    count: usize,
) -> Vec<async_nats::jetstream::Message> {
    let stream = js.get_stream(stream).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("messages keep arriving")
            .expect("the stream goes on")
            .expect("a message");
        out.push(next);
    }
    out
}

/// Deletes a test's stream (streams are kept on disk by the server otherwise).
pub async fn delete_stream(js: &jetstream::Context, name: &str) {
    let _ = js.delete_stream(name).await;
}
