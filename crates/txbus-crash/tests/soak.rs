//! The crash soak: a child process under load (quick, transiently failing and slow handlers)
//! is killed with SIGKILL twenty times — under load, during start-up recovery, and during a
//! graceful shutdown — on SQLite and on PostgreSQL, then restarted to drain. Afterwards every
//! committed operation must have finished and succeeded, every handler's effect must be
//! recorded at least once, nothing may be pending or leased, and the chain must verify.
//! Duplicates (effects recorded more than once) are counted and must stay under 1 % of the
//! deliveries.
//!
//! The kills meant for a shutdown or a start-up must land there, and the test checks that they
//! did from what the child printed before it died: a shutdown kill counts when the child had
//! not printed `stopped` (its shutdown was still waiting for an attempt the child holds open);
//! a start-up kill counts when the child was recovering the backlog left by the previous kill
//! (it had started a recovered delivery, or counted a backlog it could not have finished: the
//! child holds every recovered delivery open in those rounds), or had not printed `ready` yet.
//! See the child's docs in `src/soak.rs`.
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

/// What a round's kill is meant to hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// Start-up recovery: the backlog of the previous kill being taken over.
    Start,
    /// A graceful shutdown waiting for running attempts.
    Shutdown,
    /// A random moment under load.
    Load,
}

fn aim(round: usize) -> Aim {
    match round % 4 {
        0 if round > 0 => Aim::Start,
        1 => Aim::Shutdown,
        _ => Aim::Load,
    }
}

/// A running child and the lines it prints.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    said: Vec<String>,
}

impl Running {
    fn start(store: &str, dir: &Path, hold_recovery: bool) -> Self {
        let mut child = Command::new(CHILD)
            .arg("soak-load")
            .arg(store)
            .arg(dir)
            .env("SOAK_HOLD_RECOVERY", if hold_recovery { "1" } else { "0" })
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
            said: Vec::new(),
        }
    }

    /// Waits for a line that satisfies `want`; `false` if the child ended first.
    fn wait_for(&mut self, want: impl Fn(&str) -> bool, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the child printed nothing expected in time; it said {:?}",
                self.said
            );
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let wanted = want(&line);
                    self.said.push(line);
                    if wanted {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// SIGKILL. Returns whether the child was still running, and every line it printed
    /// before it died.
    fn kill(mut self) -> (bool, Vec<String>) {
        let alive = self.child.try_wait().unwrap().is_none();
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        if alive {
            assert!(!status.success(), "a killed child must not exit cleanly");
        } else {
            assert!(status.success(), "the child failed on its own: {status}");
        }
        // Its stdout is closed now: read what is left of it to the end.
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => self.said.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child's output did not end"),
            }
        }
        (alive, self.said)
    }
}

/// The backlog the child reported at start, if it got that far.
fn backlog(said: &[String]) -> Option<u64> {
    said.iter()
        .find_map(|l| l.strip_prefix("backlog ")?.parse().ok())
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
    if event_type == "soak.hold" {
        h.push("hold");
    }
    h
}

#[derive(Default, Debug)]
struct Kills {
    under_load: usize,
    at_start: usize,
    /// Start-up kills that landed before the bus was built, before it ran any of the backlog.
    at_start_before_ready: usize,
    /// Start-up kills that landed while the backlog of the previous kill was being recovered
    /// (a recovered delivery was running, or the backlog was counted and could not finish).
    at_start_in_recovery: usize,
    in_shutdown: usize,
    /// Shutdown kills that landed before the shutdown was over.
    in_shutdown_cut_short: usize,
}

fn soak(store: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x50a6);
    let mut kills = Kills::default();
    let mut late_start_kills = 0usize;
    let minute = || Instant::now() + Duration::from_secs(60);
    for round in 0..KILLS {
        let aim = aim(round);
        let mut child = Running::start(store, dir.path(), aim == Aim::Start);
        match aim {
            // During start-up recovery: the backlog left by the previous kill is being
            // recovered (leases taken over, deliveries claimed and run), or the bus is not
            // even built yet.
            Aim::Start => {
                // Alternately as soon as the process runs, and once a recovered delivery is
                // running.
                if (round / 4) % 2 == 1 {
                    assert!(
                        child.wait_for(|l| l == "starting", minute()),
                        "round {round}"
                    );
                    std::thread::sleep(Duration::from_millis(rng.u64(0..15)));
                } else {
                    late_start_kills += 1;
                    assert!(
                        child.wait_for(|l| l == "recovering" || l == "backlog 0", minute()),
                        "round {round}"
                    );
                    std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
                }
                kills.at_start += 1;
                let (alive, said) = child.kill();
                assert!(alive, "round {round}: the child must still run");
                let recovering =
                    said.iter().any(|l| l == "recovering") || backlog(&said).is_some_and(|n| n > 0);
                if recovering {
                    // Held open by the child: not one delivery of the backlog could finish.
                    kills.at_start_in_recovery += 1;
                } else if !said.iter().any(|l| l == "ready") {
                    kills.at_start_before_ready += 1;
                } else {
                    println!("round {round}: the start-up kill found no backlog: {said:?}");
                }
            }
            // During a graceful shutdown, with attempts still running.
            Aim::Shutdown => {
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
                let (alive, said) = child.kill();
                if alive && !said.iter().any(|l| l.starts_with("stopped")) {
                    kills.in_shutdown_cut_short += 1;
                } else {
                    println!("round {round}: the shutdown was over before the kill: {said:?}");
                }
            }
            // Under load, at a random moment.
            Aim::Load => {
                assert!(child.wait_for(committed(1500), minute()), "round {round}");
                std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
                kills.under_load += 1;
                let (alive, _) = child.kill();
                assert!(alive, "round {round}: the child must still run");
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
    // The kills aimed at a shutdown or a start-up landed there.
    let aimed = |a: Aim| (0..KILLS).filter(|&r| aim(r) == a).count();
    assert_eq!(kills.in_shutdown, aimed(Aim::Shutdown));
    assert_eq!(
        kills.in_shutdown_cut_short, kills.in_shutdown,
        "every shutdown kill must land before the shutdown is over: {kills:?}"
    );
    assert_eq!(kills.at_start, aimed(Aim::Start));
    assert_eq!(
        kills.at_start_before_ready + kills.at_start_in_recovery,
        kills.at_start,
        "every start-up kill must land before the bus is up or while it recovers: {kills:?}"
    );
    assert!(
        late_start_kills > 0 && kills.at_start_in_recovery >= late_start_kills,
        "the kills made once a recovered delivery ran must land in recovery: {kills:?}"
    );
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
