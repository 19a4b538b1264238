//! The SQLite store on a small filesystem that fills up: `transact` fails with an error that
//! says the disk is full, writes nothing (the log is counted before and after every call),
//! the chain stays intact, and the bus carries on once space returns.
//!
//! The filesystem is a tmpfs of a few MiB mounted for the test (this needs root, as CI has);
//! it is unmounted when the test ends, failed or not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Error, Event, Message, On};
use txbus_sqlite::SqliteStore;

/// A tmpfs of `size` mounted on a fresh directory; unmounted (lazily, so that files still
/// open do not keep it) when dropped.
struct SmallDisk {
    _parent: tempfile::TempDir,
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs on {} failed ({status}): this test needs root",
            dir.display()
        );
        Self {
            _parent: parent,
            dir,
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes a file until the filesystem refuses more, down to single bytes; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut chunk = 1 << 20;
    while chunk > 0 {
        let buf = vec![0xAAu8; chunk];
        loop {
            match f.write_all(&buf) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        chunk /= 2;
    }
    let _ = f.sync_all();
    path
}

async fn commits(bus: &Bus) -> u64 {
    bus.stats().await.unwrap().commits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_transact_cleanly_and_the_bus_recovers_when_space_returns() {
    let disk = SmallDisk::mount("8m");
    let path = disk.dir.join("bus.db");
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .poll_interval(Duration::from_millis(50))
        .handler("h", On::event("t.e"), move |_m: Message| {
            h.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .build()
        .await
        .unwrap();
    let payload = |i: usize| json!({ "i": i, "blob": "z".repeat(64 * 1024) });
    let mut accepted = 0u64;
    for i in 0..5 {
        let op = bus.transact([Event::new("t.e", payload(i))]).await.unwrap();
        assert!(op.outcome().await.unwrap().is_ok());
        accepted += 1;
    }

    let filler = fill(&disk.dir);
    // Commits go on only as long as SQLite finds room in pages it already has; each call
    // either commits whole or fails and writes nothing.
    let mut refused = Vec::new();
    for i in 5..400 {
        let before = commits(&bus).await;
        match bus.transact([Event::new("t.e", payload(i))]).await {
            Ok(_) => {
                accepted += 1;
                assert_eq!(commits(&bus).await, before + 1);
            }
            Err(e) => {
                assert_eq!(
                    commits(&bus).await,
                    before,
                    "a refused commit wrote something"
                );
                refused.push(e);
                if refused.len() == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused.len(), 5, "the disk never filled up");
    for e in &refused {
        assert!(matches!(e, Error::Store(_)), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("disk is full"), "{text}");
    }
    assert!(bus.verify().await.unwrap().is_intact());

    // Space returns: the bus takes commits again and runs their handlers, and everything
    // accepted while the disk was full is there.
    std::fs::remove_file(&filler).unwrap();
    let op = tokio::time::timeout(
        Duration::from_secs(60),
        bus.transact([Event::new("t.e", payload(1000))]),
    )
    .await
    .expect("transact hung")
    .unwrap();
    accepted += 1;
    let outcome = tokio::time::timeout(Duration::from_secs(60), op.outcome())
        .await
        .expect("the outcome hung")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while bus.stats().await.unwrap().pending_operations > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "operations stayed pending after space returned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = bus.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.verified, commits(&bus).await);
    assert!(commits(&bus).await >= accepted);
    assert!(handled.load(Ordering::SeqCst) >= accepted);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // And the file opens again, whole.
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .build()
        .await
        .unwrap();
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(disk);
}
