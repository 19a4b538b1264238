//! A child process commits transacts and publishes under load and is killed with SIGKILL at
//! random moments, several times, then restarted to drain. Afterwards every committed event
//! must have reached every matching handler at least once, every operation must have an
//! outcome, and no delivery may be left leased or pending. Duplicates are counted and reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = env!("CARGO_BIN_EXE_txbus-crash");

fn wait_for_commits(db: &Path, at_least: i64, deadline: Instant) {
    while Instant::now() < deadline {
        let n = rusqlite::Connection::open(db)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM commits", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0);
        if n >= at_least {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the child committed fewer than {at_least} commits in time");
}

/// Which handlers subscribe to a message, exactly as the child registers them.
fn expected_handlers(event_type: &str, module: Option<&str>) -> Vec<&'static str> {
    let mut h = Vec::new();
    if event_type == "crash.tx" && module == Some("app") {
        h.push("writer");
    }
    if module == Some("audit") {
        h.push("audit");
    }
    if event_type == "crash.job" {
        h.push("jobs");
    }
    h
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_leaves_nothing_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let bus_db = dir.path().join("bus.db");
    let mut committed_before_kill = 0i64;
    for round in 0..5 {
        let mut child = Command::new(CHILD)
            .arg("load")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the child");
        // Let it get going (more commits than before), then kill it at a random moment.
        wait_for_commits(
            &bus_db,
            committed_before_kill + 50,
            Instant::now() + Duration::from_secs(60),
        );
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..600)));
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child must have been killed"
        );
        committed_before_kill = rusqlite::Connection::open(&bus_db)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM commits", [], |r| r.get(0))
            .unwrap();
    }

    // Restart and let it finish everything.
    let mut drain = Command::new(CHILD)
        .arg("drain")
        .arg(dir.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
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

    let bus = rusqlite::Connection::open(&bus_db).unwrap();
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

    let mut stmt = bus
        .prepare("SELECT id, event_type, module FROM messages")
        .unwrap();
    let mut messages = 0u64;
    let mut expected = 0u64;
    let mut lost = Vec::new();
    let mut duplicates = 0i64;
    for row in stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .unwrap()
    {
        let (id, event_type, module) = row.unwrap();
        let id = uuid_string(&id);
        messages += 1;
        for handler in expected_handlers(&event_type, module.as_deref()) {
            expected += 1;
            match times.get(&(id.clone(), handler.to_owned())) {
                Some(t) => duplicates += t - 1,
                None => lost.push((id.clone(), handler)),
            }
        }
    }
    assert!(
        messages > 250,
        "too little work was committed to mean anything: {messages}"
    );
    assert!(
        lost.is_empty(),
        "{} deliveries never reached their handler, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );

    let not_finished: i64 = bus
        .query_row(
            "SELECT COUNT(*) FROM commits WHERE op_status NOT IN (1, 3)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(not_finished, 0, "every operation must have succeeded");
    let open: i64 = bus
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE status IN (0, 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(open, 0, "no delivery may stay pending or leased");
    let dead: i64 = bus
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE status IN (3, 4)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dead, 0, "no delivery should have failed");

    println!(
        "crash test: 5 SIGKILLs, {messages} messages, {expected} deliveries, 0 lost, {duplicates} duplicates ({:.3}%)",
        duplicates as f64 * 100.0 / expected as f64
    );
}

fn uuid_string(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
