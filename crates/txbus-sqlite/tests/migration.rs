//! A store file written by an earlier version (`fixtures/schema-v5.db`, described in
//! `fixtures/README.md`) opens with the current one: the schema is migrated on open and nothing
//! is lost (the case, shared with the PostgreSQL store, is
//! `txbus_core::conformance::a_store_written_at_schema_5_migrates_and_loses_nothing`); new work
//! keeps a first-attempt success on its commit's row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use txbus_core::store::Store;
use txbus_sqlite::SqliteStore;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema-v5.db");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_schema_version_5_migrates_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    std::fs::copy(FIXTURE, &path).unwrap();

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let bus =
        txbus_core::conformance::a_store_written_at_schema_5_migrates_and_loses_nothing(store)
            .await;
    // The 13 rows the old version wrote (the replayed dead letter among them), and none for
    // the new delivery that succeeded on its first attempt.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 13);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
