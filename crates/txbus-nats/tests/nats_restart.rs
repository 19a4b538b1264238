//! Restarts the NATS server while a relay publishes and an inbox consumes, and counts: every
//! message committed at the origin is handled once at the receiver; repeats happen only as
//! broker redeliveries, which the inbox drops.
//!
//! This test stops and starts the machine's shared NATS server (with the command line it was
//! running with), so it runs alone: `cargo nextest run -E 'test(/nats_restart/)'`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use txbus_core::{Bus, Commit, Event, Message, On};
use txbus_nats::{ConsumerSpec, JetStreamPublisher, JetStreamSource, StreamSpec};
use txbus_relay::{Inbox, Relay, SubjectRoute};
use txbus_sqlite::SqliteStore;

const ADDR: &str = "127.0.0.1:4222";

/// The running NATS server: its pid, executable and arguments, read from /proc.
struct Server {
    pid: u32,
    exe: PathBuf,
    args: Vec<String>,
}

fn find_server() -> Server {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let parts: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let Some(first) = parts.first() else { continue };
        if first.ends_with("nats-server") && parts.iter().any(|a| a == "4222") {
            let exe = std::fs::read_link(entry.path().join("exe"))
                .unwrap_or_else(|_| PathBuf::from(first));
            return Server {
                pid,
                exe,
                args: parts[1..].to_vec(),
            };
        }
    }
    panic!("no nats-server process listening on port 4222 was found");
}

fn reachable() -> bool {
    TcpStream::connect_timeout(&ADDR.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

fn start_server(exe: &std::path::Path, args: &[String]) {
    let status = Command::new("start-stop-daemon")
        .args(["--start", "--oknodo", "--background", "--exec"])
        .arg(exe)
        .arg("--")
        .args(args)
        .status()
        .expect("start-stop-daemon starts nats-server");
    assert!(status.success(), "starting nats-server failed: {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reachable() {
        assert!(Instant::now() < deadline, "nats-server did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the server again if the test stops half-way, so later tests find it running.
struct Restore {
    exe: PathBuf,
    args: Vec<String>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !reachable() {
            start_server(&self.exe, &self.args);
        }
    }
}

/// Stops the server gracefully (SIGTERM to its pid), waits, and starts it with the same
/// command line.
fn restart_server() -> Restore {
    let server = find_server();
    let restore = Restore {
        exe: server.exe.clone(),
        args: server.args.clone(),
    };
    let status = Command::new("kill")
        .args(["-TERM", &server.pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{}", server.pid)).exists() {
        assert!(Instant::now() < deadline, "nats-server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Down for longer than a publish waits for its ack (5 s), under load: the relay's batches
    // in flight fail, and it sends again from its checkpoint after the restart.
    std::thread::sleep(Duration::from_secs(6));
    start_server(&server.exe, &server.args);
    restore
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load_loses_nothing_and_handles_nothing_twice() {
    const COMMITS: usize = 800;
    const PER_COMMIT: usize = 5;
    let total = COMMITS * PER_COMMIT;
    let (_client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("RESTART_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();

    let origin_dir = tempfile::tempdir().unwrap();
    let origin = Bus::builder()
        .store(SqliteStore::open(origin_dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap();
    let relay = Relay::builder(origin.clone(), "out", JetStreamPublisher::new(js.clone()))
        .route(SubjectRoute::new(prefix.clone()))
        .backoff(
            txbus_core::Backoff::exponential(Duration::from_millis(100))
                .max(Duration::from_secs(2)),
        )
        .start()
        .await
        .unwrap();

    let receiver_dir = tempfile::tempdir().unwrap();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let r = Arc::clone(&runs);
    let receiver = Bus::builder()
        .store(SqliteStore::open(receiver_dir.path().join("bus.db")).unwrap())
        .handler("count", On::in_module("shop"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                *r.lock().unwrap().entry(m.id().to_string()).or_default() += 1;
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let source = JetStreamSource::new(
        js.clone(),
        ConsumerSpec::new(&stream, "in").ack_wait(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let inbox = Inbox::builder(receiver.clone(), "in", source)
        .concurrency(32)
        .backoff(
            txbus_core::Backoff::exponential(Duration::from_millis(100))
                .max(Duration::from_secs(2)),
        )
        .start()
        .unwrap();

    // Load: commits keep coming before, during and after the restart.
    let producer = {
        let origin = origin.clone();
        tokio::spawn(async move {
            let mut sent = Vec::with_capacity(total);
            for i in 0..COMMITS {
                let events: Vec<Event> = (0..PER_COMMIT)
                    .map(|k| Event::new("order.placed", json!({"i": i, "k": k})).module("shop"))
                    .collect();
                sent.extend(events.iter().map(|e| e.id().to_string()));
                origin
                    .commit_unwatched(Commit::new().events(events))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            sent
        })
    };
    eventually(
        Duration::from_secs(60),
        "a quarter of the load handled",
        || runs.lock().unwrap().len() >= total / 4,
    )
    .await;
    let restore = tokio::task::spawn_blocking(restart_server).await.unwrap();
    let sent = producer.await.unwrap();
    assert_eq!(sent.len(), total);

    eventually(
        Duration::from_secs(180),
        "every message handled after the restart",
        || runs.lock().unwrap().len() >= total,
    )
    .await;
    let relayed = tokio::time::timeout(Duration::from_secs(120), relay.drained())
        .await
        .expect("the relay drains")
        .unwrap();
    let inbox_stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    let relay_status = relay.shutdown(Duration::from_secs(5)).await.unwrap();
    let runs = runs.lock().unwrap().clone();
    let received: usize = runs.len();
    let handled_twice = runs.values().filter(|&&n| n > 1).count();
    println!(
        "sent {total}, received {received}, handled twice {handled_twice}; relay: checkpoint {} published {} failures {}; inbox: {inbox_stats:?}",
        relayed.checkpoint, relay_status.published, relay_status.failures
    );
    for id in &sent {
        assert!(runs.contains_key(id), "message {id} was lost");
    }
    assert_eq!(received, total, "nothing lost, nothing extra");
    assert_eq!(handled_twice, 0, "no message handled twice");
    assert_eq!(
        inbox_stats.committed, total as u64,
        "each message committed once"
    );
    assert_eq!(
        inbox_stats.received,
        inbox_stats.committed
            + inbox_stats.duplicates
            + inbox_stats.retried
            + inbox_stats.discarded,
        "every delivery accounted for"
    );
    // The origin's log holds the start-up system commit before the load's commits.
    assert_eq!(relayed.checkpoint, COMMITS as u64 + 1);
    receiver.shutdown(Duration::from_secs(5)).await.unwrap();
    origin.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
    drop(restore);
}
