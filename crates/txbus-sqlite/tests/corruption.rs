//! A damaged store file: a flipped byte in a payload, a truncated file, overwritten pages, a
//! deleted write-ahead log. Opening either fails with an error that says the file is damaged,
//! or recovers; nothing panics; `verify` names the commit whose content changed.
//!
//! Everything goes through the public API; the only knowledge of the file format is in
//! [`tamper`]: where a payload's bytes sit (found by searching the file for them) and the page
//! size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use txbus_core::chain::Broken;
use txbus_core::store::Store;
use txbus_core::{Bus, Event, Message, On};
use txbus_sqlite::SqliteStore;

/// Hand edits of a store file, in one place.
mod tamper {
    use std::path::Path;

    /// SQLite's page size as the store creates it.
    pub const PAGE: usize = 4096;

    /// The offset of the only occurrence of `needle` in the file.
    pub fn find(path: &Path, needle: &[u8]) -> usize {
        let bytes = std::fs::read(path).unwrap();
        let hits: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{:?} must occur once in the file",
            String::from_utf8_lossy(needle)
        );
        hits[0]
    }

    /// XORs the byte at `offset` with `mask`.
    pub fn flip(path: &Path, offset: usize, mask: u8) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[offset] ^= mask;
        std::fs::write(path, bytes).unwrap();
    }

    /// Cuts the file to `len` bytes.
    pub fn truncate(path: &Path, len: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len).unwrap();
        f.sync_all().unwrap();
    }

    /// Overwrites whole pages (counted from 1, as SQLite does) with pseudo-random bytes.
    pub fn scribble_pages(path: &Path, pages: std::ops::Range<usize>, seed: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        for page in pages {
            let start = (page - 1) * PAGE;
            let end = (start + PAGE).min(bytes.len());
            if start < end {
                rng.fill(&mut bytes[start..end]);
            }
        }
        std::fs::write(path, bytes).unwrap();
    }
}

fn marker(i: usize) -> String {
    format!("marker-{i:05}-payload")
}

/// A store holding `n` commits of one event each (payload `{"m": marker(i), "pad": …}`),
/// shut down cleanly, so that everything is in the main file.
async fn filled(dir: &Path, n: usize, pad: usize) -> PathBuf {
    let path = dir.join("bus.db");
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    for i in 0..n {
        let op = bus
            .transact([Event::new(
                "t.e",
                json!({"m": marker(i), "pad": "p".repeat(pad)}),
            )])
            .await
            .unwrap();
        op.outcome().await.unwrap();
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    path
}

/// The position of the commit whose payload holds `marker`, read through the store.
async fn position_of(path: &Path, marker: &str) -> u64 {
    let store = SqliteStore::open(path).unwrap();
    let log = store.read_log(0, 10_000).await.unwrap();
    store.close().await.unwrap();
    log.iter()
        .find(|c| c.messages.iter().any(|m| m.payload_json.contains(marker)))
        .map(|c| c.position)
        .expect("the marked commit")
}

/// What opening a damaged file and verifying it came to; panics if anything panicked.
#[derive(Debug)]
enum Opened {
    /// Open (or a first read) failed with this error.
    Refused(String),
    /// It opened and the chain verified up to here.
    Verified(txbus_core::VerifyReport),
    /// It opened, but reading the log failed with this error.
    VerifyFailed(String),
}

async fn open_and_verify(path: &Path) -> Opened {
    let path = path.to_owned();
    // Open on a thread of its own, so that a panic anywhere is caught and reported.
    let outcome = tokio::spawn(async move {
        let store = match SqliteStore::open(&path) {
            Ok(s) => s,
            Err(e) => return Opened::Refused(e.to_string()),
        };
        let bus = match Bus::builder().store(store).build().await {
            Ok(b) => b,
            Err(e) => return Opened::Refused(e.to_string()),
        };
        let opened = match bus.verify().await {
            Ok(report) => Opened::Verified(report),
            Err(e) => Opened::VerifyFailed(e.to_string()),
        };
        let _ = bus.shutdown(Duration::from_secs(5)).await;
        opened
    })
    .await;
    outcome.expect("opening a damaged store must not panic")
}

/// A refusal must say that the file is damaged.
fn says_damaged(error: &str) -> bool {
    error.contains("damaged") || error.contains("corrupt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_payload_is_named_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), 30, 10).await;
    let target = marker(17);
    let position = position_of(&path, &target).await;
    // A flip that keeps the text valid UTF-8: "marker" becomes "narker".
    let at = tamper::find(&path, target.as_bytes());
    tamper::flip(&path, at, 0x03);
    match open_and_verify(&path).await {
        Opened::Verified(report) => {
            assert_eq!(
                report.first_broken,
                Some((position, Broken::DataMismatch)),
                "{report:?}"
            );
            assert_eq!(report.verified, position - 1);
        }
        other => panic!("the store must open and verify must name commit {position}: {other:?}"),
    }
    // A flip that leaves bytes that are not UTF-8: still named, not an unreadable log.
    let target = marker(5);
    let position = position_of(&path, &target).await;
    let at = tamper::find(&path, target.as_bytes());
    tamper::flip(&path, at + 2, 0x80);
    match open_and_verify(&path).await {
        Opened::Verified(report) => assert_eq!(
            report.first_broken,
            Some((position, Broken::DataMismatch)),
            "{report:?}"
        ),
        other => panic!("verify must name commit {position}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_payload_of_a_pending_delivery_is_dead_lettered_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    // Commit with handlers paused, so that the delivery is still pending at shutdown.
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .start_paused(true)
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new("t.e", json!({"m": marker(1)}))])
        .await
        .unwrap();
    let op_id = op.id();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    // Break the JSON itself: the opening quote of the value becomes a byte that is not UTF-8.
    let at = tamper::find(&path, marker(1).as_bytes());
    tamper::flip(&path, at - 1, 0x80);
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .poll_interval(Duration::from_millis(20))
        .handler("h", On::event("t.e"), move |_m: Message| {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok(()) }
        })
        .build()
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), bus.wait(op_id))
        .await
        .expect("the operation must finish")
        .unwrap();
    let failure = outcome.error.expect("the operation fails");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    assert!(failure.reason.contains("stored"), "{failure:?}");
    let dead = bus.dead_letters(Default::default()).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_refused_as_damaged_or_reports_where_the_log_breaks() {
    for keep in [0.75, 0.5, 0.1] {
        let dir = tempfile::tempdir().unwrap();
        let path = filled(dir.path(), 150, 400).await;
        let len = std::fs::metadata(&path).unwrap().len();
        tamper::truncate(&path, (len as f64 * keep) as u64);
        match open_and_verify(&path).await {
            Opened::Refused(e) | Opened::VerifyFailed(e) => {
                assert!(says_damaged(&e), "kept {keep}: {e}")
            }
            Opened::Verified(report) => {
                assert!(report.first_broken.is_some(), "kept {keep}: {report:?}")
            }
        }
    }
    // Cut inside the header: not a database at all.
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), 3, 10).await;
    tamper::truncate(&path, 50);
    match open_and_verify(&path).await {
        Opened::Refused(e) => assert!(says_damaged(&e), "{e}"),
        other => panic!("a 50-byte file must be refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_pages_are_refused_as_damaged_or_reported_by_verify() {
    let pages_of = |path: &Path| std::fs::metadata(path).unwrap().len() as usize / tamper::PAGE;
    for (seed, which) in [(1u64, "first"), (2, "middle"), (3, "last")] {
        let dir = tempfile::tempdir().unwrap();
        let path = filled(dir.path(), 150, 400).await;
        let pages = pages_of(&path);
        let range = match which {
            "first" => 1..2,
            "middle" => pages / 2..pages / 2 + 3,
            _ => pages - 2..pages + 1,
        };
        tamper::scribble_pages(&path, range.clone(), seed);
        match open_and_verify(&path).await {
            Opened::Refused(e) | Opened::VerifyFailed(e) => {
                assert!(says_damaged(&e), "pages {range:?}: {e}")
            }
            Opened::Verified(report) => {
                assert!(report.first_broken.is_some(), "pages {range:?}: {report:?}")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_write_ahead_log_loses_only_what_was_not_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let path = live.join("bus.db");
    // Long intervals: nothing but the commits below writes while the files are copied.
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .lease_ttl(Duration::from_secs(3600))
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    for i in 0..40 {
        let op = bus
            .transact([Event::new("t.e", json!({ "m": marker(i) }))])
            .await
            .unwrap();
        op.outcome().await.unwrap();
        if i == 19 {
            // Half of them reach the main file, as SQLite's automatic checkpoints do.
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
                .unwrap();
        }
    }
    let committed = bus.stats().await.unwrap().commits;
    // What a crash leaves on disk: the database file and its WAL, fsync'd, never checkpointed
    // at close. Copy them while the bus is still running.
    let image = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["bus.db", "bus.db-wal"] {
            std::fs::copy(live.join(f), to.join(f)).unwrap();
        }
        to.join("bus.db")
    };
    let with_wal = image("with-wal");
    let without_wal = image("without-wal");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    std::fs::remove_file(without_wal.with_extension("db-wal")).unwrap();

    // The crash image itself is whole.
    match open_and_verify(&with_wal).await {
        Opened::Verified(report) => {
            assert!(report.is_intact(), "{report:?}");
            assert!(report.verified >= committed, "{report:?} vs {committed}");
        }
        other => panic!("the crash image must open: {other:?}"),
    }
    // Without its WAL the file opens at its last checkpoint: a shorter log, still intact,
    // and the bus works on it.
    match open_and_verify(&without_wal).await {
        Opened::Verified(report) => {
            assert!(report.is_intact(), "{report:?}");
            assert!(report.verified < committed, "{report:?} vs {committed}");
            assert!(
                report.verified >= 20,
                "the checkpointed commits stay: {report:?}"
            );
        }
        other => panic!("the file without its WAL must open: {other:?}"),
    }
    let bus = Bus::builder()
        .store(SqliteStore::open(&without_wal).unwrap())
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new("t.e", json!({"after": true}))])
        .await
        .unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
