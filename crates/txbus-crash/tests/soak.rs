//! The crash soak: a child process under load (quick, transiently failing and slow handlers)
//! is killed with SIGKILL twenty times — under load, during start-up recovery, and during a
//! graceful shutdown — on SQLite and on PostgreSQL, then restarted to drain. Afterwards every
//! committed operation must have finished and succeeded, every handler's effect must be
//! recorded at least once, nothing may be pending or leased, and the chain must verify.
//! Duplicates (effects recorded more than once) are counted and must stay under 1 % of the
//! deliveries.
//!
//! The checks read the store only through the bus's public API (the drain child's report)
//! and the handlers' own records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const CHILD: &str = env!("CARGO_BIN_EXE_txbus-crash");
const KILLS: usize = 20;

/// A running child and the lines it prints.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    ready: bool,
}

impl Running {
    fn start(store: &str, dir: &Path) -> Self {
        let mut child = Command::new(CHILD)
            .arg("soak-load")
            .arg(store)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            ready: false,
        }
    }

    /// Waits for a line that satisfies `want`; `false` if the child ended first.
    fn wait_for(&mut self, want: impl Fn(&str) -> bool, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the child printed nothing expected in time"
            );
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if line == "ready" {
                        self.ready = true;
                    }
                    if want(&line) {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Notes whether `ready` was printed before now.
    fn catch_up(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            if line == "ready" {
                self.ready = true;
            }
        }
    }

    /// SIGKILL; `true` when the child was still running.
    fn kill(mut self) -> bool {
        let alive = self.child.try_wait().unwrap().is_none();
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        if alive {
            assert!(!status.success(), "a killed child must not exit cleanly");
        } else {
            assert!(status.success(), "the child failed on its own: {status}");
        }
        alive
    }
}

fn committed(at_least: u64) -> impl Fn(&str) -> bool {
    move |line| {
        line.strip_prefix("committed ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= at_least)
    }
}

/// Which handlers subscribe to a message, exactly as the child registers them.
fn expected_handlers(event_type: &str, module: Option<&str>) -> Vec<&'static str> {
    let mut h = Vec::new();
    if event_type == "soak.tx" && module == Some("app") {
        h.push("writer");
    }
    if module == Some("audit") {
        h.push("audit");
    }
    if event_type == "soak.job" {
        h.push("flaky");
    }
    if event_type == "soak.slow" {
        h.push("slow");
    }
    h
}

#[derive(Default, Debug)]
struct Kills {
    under_load: usize,
    at_start: usize,
    at_start_before_ready: usize,
    in_shutdown: usize,
    in_shutdown_cut_short: usize,
}

fn soak(store: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x50a6);
    let mut kills = Kills::default();
    let minute = || Instant::now() + Duration::from_secs(60);
    for round in 0..KILLS {
        let mut child = Running::start(store, dir.path());
        match round % 4 {
            // During start-up recovery: the backlog left by the previous kill is being
            // recovered (leases taken over, deliveries claimed and run).
            0 if round > 0 => {
                if rng.bool() {
                    std::thread::sleep(Duration::from_millis(rng.u64(0..15)));
                } else {
                    assert!(child.wait_for(|l| l == "ready", minute()), "round {round}");
                    std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
                }
                child.catch_up();
                kills.at_start += 1;
                if !child.ready {
                    kills.at_start_before_ready += 1;
                }
                assert!(child.kill(), "round {round}: the child must still run");
            }
            // During a graceful shutdown, with attempts still running.
            1 => {
                assert!(child.wait_for(committed(300), minute()), "round {round}");
                let stdin = child.stdin.as_mut().unwrap();
                stdin.write_all(b"shutdown\n").unwrap();
                stdin.flush().unwrap();
                assert!(
                    child.wait_for(|l| l == "shutting-down", minute()),
                    "round {round}"
                );
                std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
                kills.in_shutdown += 1;
                if child.kill() {
                    kills.in_shutdown_cut_short += 1;
                }
            }
            // Under load, at a random moment.
            _ => {
                assert!(child.wait_for(committed(1500), minute()), "round {round}");
                std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
                kills.under_load += 1;
                assert!(child.kill(), "round {round}: the child must still run");
            }
        }
    }

    // Restart and let it finish everything.
    let mut drain = Command::new(CHILD)
        .arg("soak-drain")
        .arg(store)
        .arg(dir.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = drain.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            drain.kill().unwrap();
            panic!("the drain run did not finish: something is stuck");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the drain run failed: {status}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };

    let seen = rusqlite::Connection::open(dir.path().join("seen.db")).unwrap();
    let mut times: HashMap<(String, String), i64> = HashMap::new();
    let mut stmt = seen
        .prepare("SELECT message_id, handler, times FROM seen")
        .unwrap();
    for row in stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
    {
        let (m, h, t): (String, String, i64) = row.unwrap();
        times.insert((m, h), t);
    }

    let mut messages = 0u64;
    let mut deliveries = 0u64;
    let mut lost = Vec::new();
    let mut duplicates = 0i64;
    for m in report["messages"].as_array().unwrap() {
        let id = m[0].as_str().unwrap().to_owned();
        let event_type = m[1].as_str().unwrap();
        let module = m[2].as_str();
        messages += 1;
        for handler in expected_handlers(event_type, module) {
            deliveries += 1;
            match times.get(&(id.clone(), handler.to_owned())) {
                Some(t) => duplicates += t - 1,
                None => lost.push((id.clone(), handler)),
            }
        }
    }
    let ratio = duplicates as f64 * 100.0 / deliveries.max(1) as f64;
    println!(
        "crash soak ({name}): {KILLS} SIGKILLs {kills:?}; {messages} messages, {deliveries} deliveries, \
         {} lost, {} operations ok, {} failed, {} pending; {duplicates} duplicates ({ratio:.3} %, {:.1} per kill)",
        lost.len(),
        n("operations_ok"),
        n("operations_failed"),
        n("operations_pending"),
        duplicates as f64 / KILLS as f64,
    );
    assert!(
        deliveries > 2000,
        "too little work was committed to mean anything: {deliveries}"
    );
    assert!(
        lost.is_empty(),
        "{} deliveries never reached their handler, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(report["intact"].as_bool().unwrap(), "the chain: {report:?}");
    assert_eq!(n("verified"), n("commits"), "every commit verified");
    assert_eq!(n("pending"), 0, "deliveries left pending");
    assert_eq!(n("leased"), 0, "deliveries left leased");
    assert_eq!(n("pending_operations"), 0, "operations left unfinished");
    assert_eq!(n("operations_pending"), 0, "operations left unfinished");
    assert_eq!(n("operations_unknown"), 0, "operations without an outcome");
    assert_eq!(
        n("operations_failed"),
        0,
        "every operation must succeed: {:?}",
        report["failures"]
    );
    assert_eq!(n("dead") + n("rejected"), 0, "no delivery may have failed");
    assert!(
        ratio <= 1.0,
        "duplicates are {ratio:.3} % of deliveries, above 1 %"
    );
    assert_eq!(kills.under_load + kills.at_start + kills.in_shutdown, KILLS);
}

#[test]
fn soak_sqlite_twenty_kills_under_load_at_start_and_in_shutdown_lose_nothing() {
    soak("sqlite", "sqlite");
}

/// A schema of its own, dropped when the test ends (failed or not).
struct PgSchema {
    url: String,
    name: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&self.url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

#[test]
fn soak_postgres_twenty_kills_under_load_at_start_and_in_shutdown_lose_nothing() {
    let url = std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = PgSchema {
        name: format!("soak_{:016x}", fastrand::u64(..)),
        url,
    };
    soak(&format!("{}#{}", schema.url, schema.name), "postgres");
}
