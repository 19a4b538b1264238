//! Crash safety: a saga survives SIGKILL during a step and during a compensation, and resumes
//! where it was. A child process (`saga-crash`) is killed while a step (or compensation)
//! blocks, then restarted on the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "sqlite")]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use txbus_saga::{SagaEvent, SagaId, Sagas};

/// Starts the child, waits until its blocking step or compensation runs, kills it with
/// SIGKILL; then runs it again to the end and returns what it printed.
async fn kill_then_resume(dir: &Path, scenario: &str) -> String {
    let exe = env!("CARGO_BIN_EXE_saga-crash");
    let mut child = Command::new(exe)
        .arg(dir)
        .arg(scenario)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let marker = dir.join("blocked");
    tokio::time::timeout(common::HANG, async {
        while !marker.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the child exited before blocking: {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the child reached the blocking point");
    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited");

    let out = tokio::time::timeout(
        common::HANG,
        Command::new(exe)
            .arg(dir)
            .arg(scenario)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the restarted child finished")
    .unwrap();
    assert!(
        out.status.success(),
        "restarted child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Reads the counts and the history from the store, once the child is gone.
async fn inspect(dir: &Path) -> (impl Fn(&str) -> u64, Vec<SagaEvent>) {
    let bus = common::bus_builder(dir).build().await.unwrap();
    let sagas = Sagas::builder().build().unwrap();
    let runtime = sagas.attach(bus.clone());
    let mut counts = std::collections::HashMap::new();
    for e in bus.kv_scan("crash/runs/", None, 100).await.unwrap() {
        let n: u64 = String::from_utf8(e.value).unwrap().parse().unwrap();
        counts.insert(e.key.trim_start_matches("crash/runs/").to_owned(), n);
    }
    let history = runtime
        .history(&SagaId::new("crash-1").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.event)
        .collect();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    (
        move |what: &str| counts.get(what).copied().unwrap_or(0),
        history,
    )
}

fn completions(history: &[SagaEvent], step_name: &str) -> usize {
    history
        .iter()
        .filter(|e| matches!(e, SagaEvent::StepCompleted { name, .. } if name == step_name))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_killed_during_a_step_resumes_that_step_only() {
    let dir = tempfile::tempdir().unwrap();
    let status = kill_then_resume(dir.path(), "step").await;
    assert_eq!(status, "completed");

    let (runs, history) = inspect(dir.path()).await;
    assert_eq!(
        runs("a"),
        1,
        "a completed before the kill and is not run again"
    );
    assert_eq!(
        runs("b"),
        2,
        "b was interrupted, so it runs again (at least once)"
    );
    assert_eq!(runs("c"), 1);
    assert_eq!(runs("undo-a") + runs("undo-b"), 0);
    for step in ["a", "b", "c"] {
        assert_eq!(
            completions(&history, step),
            1,
            "{step} completed once in the saga"
        );
    }
    assert!(matches!(history.last(), Some(SagaEvent::Completed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_killed_during_a_compensation_resumes_compensating() {
    let dir = tempfile::tempdir().unwrap();
    let status = kill_then_resume(dir.path(), "compensation").await;
    assert_eq!(status, "failed");

    let (runs, history) = inspect(dir.path()).await;
    assert_eq!(
        (runs("a"), runs("b"), runs("c")),
        (1, 1, 1),
        "no step runs again"
    );
    assert_eq!(runs("undo-b"), 2, "the interrupted compensation runs again");
    assert_eq!(runs("undo-a"), 1, "then the next one, once");
    let compensated: Vec<&str> = history
        .iter()
        .filter_map(|e| match e {
            SagaEvent::Compensated { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(compensated, vec!["b", "a"]);
    assert!(matches!(history.last(), Some(SagaEvent::Failed { .. })));
}
