//! A batch import killed with SIGKILL mid-run, three times, then run to its end: every row is
//! in the log exactly once — none duplicated by a redone chunk, none skipped — and the
//! checkpoint agrees with the log. On SQLite, and on PostgreSQL with the feature `postgres`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

/// Whether the child at `path` runs, with every store this test needs.
fn usable(path: &std::path::Path) -> bool {
    let Ok(out) = Command::new(path).arg("stores").output() else {
        return false;
    };
    let stores = String::from_utf8_lossy(&out.stdout);
    out.status.success() && (!cfg!(feature = "postgres") || stores.contains("postgres"))
}

/// The child program: this crate's `batch_import` example, built beside the tests (again, with
/// the feature `postgres`, when the one there lacks a store the tests need).
fn child_program() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test> -> target/<profile>/examples/batch_import
            let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
            let path = profile_dir
                .join("examples")
                .join(format!("batch_import{}", std::env::consts::EXE_SUFFIX));
            if !usable(&path) {
                let mut build = Command::new(env!("CARGO"));
                build
                    .args(["build", "-p", "txbus", "--example", "batch_import"])
                    .arg("--target-dir")
                    .arg(profile_dir.parent().unwrap());
                if cfg!(feature = "postgres") {
                    build.args(["--features", "postgres"]);
                }
                if profile_dir.ends_with("release") {
                    build.arg("--release");
                }
                assert!(
                    build.status().unwrap().success(),
                    "building the child failed"
                );
            }
            assert!(usable(&path), "{} does not run", path.display());
            path
        })
        .clone()
}

fn lines(child: &mut Child) -> mpsc::Receiver<String> {
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
    rx
}

/// The next line from the child, with a hang guard.
fn next_line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the child said nothing more: {e}"))
}

/// How many rows a `progress <done>/<total>` line says are done.
fn done_of(line: &str) -> Option<u64> {
    line.strip_prefix("progress ")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// The child's command line for `mode` on `store` (a file, or a URL with `--schema`).
fn child(mode: &str, store: &[String], rest: &[String]) -> Command {
    let mut c = Command::new(child_program());
    c.arg(mode).arg(&store[0]).args(rest).args(&store[1..]);
    c
}

/// Three runs of `rows` rows in chunks of `chunk`, each killed with SIGKILL once it has
/// committed two chunks of its own, then a run to the end and a check of the log.
fn kill_resume_and_check(store: &[String], rows: u64, chunk: u64) {
    let run_args = [rows.to_string(), chunk.to_string()];
    let mut resumed_from = Vec::new();
    for round in 0..3 {
        let mut child = child("run", store, &run_args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child");
        let rx = lines(&mut child);
        // The first progress line is where this run starts (the checkpoint it read); kill it
        // once it has committed two chunks of its own.
        let start = loop {
            if let Some(done) = done_of(&next_line(&rx)) {
                break done;
            }
        };
        resumed_from.push(start);
        loop {
            let line = next_line(&rx);
            assert!(
                !line.starts_with("finished"),
                "round {round}: finished before the kill"
            );
            if done_of(&line).is_some_and(|d| d >= start + 2 * chunk) {
                break;
            }
        }
        child.kill().expect("SIGKILL the child");
        assert!(
            !child.wait().unwrap().success(),
            "round {round}: the child was killed"
        );
    }
    // Each run resumed past the previous one's durable chunks.
    assert!(
        resumed_from.windows(2).all(|w| w[1] > w[0]),
        "{resumed_from:?}"
    );

    let mut last = child("run", store, &run_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the last run");
    let rx = lines(&mut last);
    let finished = loop {
        let line = next_line(&rx);
        if let Some(n) = line.strip_prefix("finished ") {
            break n.parse::<u64>().unwrap();
        }
    };
    assert!(last.wait().unwrap().success());
    assert_eq!(finished, rows);

    let mut check = child("check", store, &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the check");
    let rx = lines(&mut check);
    let report: serde_json::Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert!(check.wait().unwrap().success());
    eprintln!("runs resumed from {resumed_from:?}; {report}");
    assert_eq!(report["rows"], rows, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["first_missing"], rows, "{report}");
    assert_eq!(report["checkpoint_done"], rows, "{report}");
    assert_eq!(report["finished"], true, "{report}");
    assert_eq!(report["intact"], true, "{report}");
}

#[test]
fn a_batch_killed_mid_run_resumes_without_duplicates_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("import.db");
    kill_resume_and_check(&[db.to_str().unwrap().to_owned()], 120_000, 500);
}

/// A schema of its own on the test database, dropped when the test ends (failed or not).
#[cfg(feature = "postgres")]
struct PgSchema {
    url: String,
    name: String,
}

#[cfg(feature = "postgres")]
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

#[cfg(feature = "postgres")]
#[test]
fn a_batch_on_postgres_killed_mid_run_resumes_without_duplicates_or_gaps() {
    let url = std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = PgSchema {
        name: format!("batch_crash_{}", uuid::Uuid::now_v7().simple()),
        url,
    };
    kill_resume_and_check(
        &[
            schema.url.clone(),
            "--schema".to_owned(),
            schema.name.clone(),
        ],
        30_000,
        250,
    );
}
