//! A projection killed with SIGKILL mid-work, several times, then restarted: its read model
//! equals one rebuilt from zero, and the counts taken from the log directly. The read model's
//! writes commit together with the checkpoint, so no event is applied twice or lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The child program: the crate's `projection_child` example, built beside the tests.
fn child_program() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/examples/projection_child
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("projection_child{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        // `cargo test -p txbus-es` builds the examples; a run of this test alone does not.
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "-p", "txbus-es", "--example", "projection_child"])
            .arg("--target-dir")
            .arg(profile_dir.parent().unwrap());
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "building the child failed"
        );
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Reads the child's stdout lines on a thread, so that waiting for one can time out.
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

/// Waits (with a hang guard) for a line starting with `prefix`.
fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no {prefix:?} line from the child: {e}"));
        if line.starts_with(prefix) {
            return line;
        }
    }
}

#[test]
fn a_projection_killed_mid_work_resumes_to_the_same_read_model_as_a_rebuild() {
    let program = child_program();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("es.db");
    for round in 0..4 {
        let mut child = Command::new(&program)
            .arg("load")
            .arg(&db)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child");
        let rx = lines(&mut child);
        wait_line(&rx, "ready");
        wait_line(&rx, "appended");
        std::thread::sleep(Duration::from_millis(fastrand::u64(20..400)));
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child must have been killed"
        );
    }

    let mut verify = Command::new(&program)
        .arg("verify")
        .arg(&db)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the verifier");
    let rx = lines(&mut verify);
    let report = wait_line(&rx, "{");
    assert!(verify.wait().unwrap().success());
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    eprintln!(
        "checkpoint after the last kill {}, head {}",
        report["checkpoint_at_start"], report["head"]
    );
    // The last kill left the projection behind the writer: the restart had pages to redo.
    assert!(report["checkpoint_at_start"].as_u64().unwrap() < report["head"].as_u64().unwrap());
    assert!(
        !report["direct"].as_object().unwrap().is_empty(),
        "the log holds events"
    );
    assert_eq!(
        report["live"], report["direct"],
        "live read model vs the log"
    );
    assert_eq!(
        report["rebuilt"], report["direct"],
        "rebuilt read model vs the log"
    );
}
