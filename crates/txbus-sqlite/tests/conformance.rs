//! The store conformance suite on the embedded store, plus what only a file store has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use txbus_core::conformance::Harness;
use txbus_core::store::Store;
use txbus_sqlite::SqliteStore;

/// Fresh store files in temporary directories that live as long as the harness.
#[derive(Default)]
struct SqliteHarness {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

#[async_trait]
impl Harness for SqliteHarness {
    async fn create(&self) -> (String, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db").display().to_string();
        self.dirs.lock().unwrap().push(dir);
        let store = SqliteStore::open(&path).unwrap();
        (path, Arc::new(store))
    }

    async fn reopen(&self, key: &str) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(key).unwrap())
    }
}

txbus_core::conformance_tests!(SqliteHarness::default());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_is_opened_by_one_bus_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let first = SqliteStore::open(&path).unwrap();
    assert!(matches!(
        SqliteStore::open(&path),
        Err(txbus_core::store::Error::Locked { .. })
    ));
    first.close().await.unwrap();
    let again = SqliteStore::open(&path).unwrap();
    again.close().await.unwrap();
}
