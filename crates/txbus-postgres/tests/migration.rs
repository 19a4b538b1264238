//! A schema written by an earlier version (`fixtures/schema-v5.sql`, described in
//! `fixtures/README.md`) opens with the current one: the schema is migrated on connect and
//! nothing is lost (the case, shared with the SQLite store, is
//! `txbus_core::conformance::a_store_written_at_schema_5_migrates_and_loses_nothing`); new work
//! keeps a first-attempt success on its commit's row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Executor};
use txbus_core::store::Store;

use common::{raw, TestSchema};

const FIXTURE: &str = include_str!("fixtures/schema-v5.sql");

/// Loads the fixture into `schema` (the dump names its schema `txbus_fixture`).
async fn load_fixture(schema: &str) {
    let mut conn = raw().await;
    // Unprepared (simple protocol): the dump is many statements.
    conn.execute(FIXTURE.replace("txbus_fixture", schema).as_str())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_written_by_schema_version_5_migrates_and_loses_nothing() {
    let schema = TestSchema::new();
    load_fixture(&schema.name).await;

    let store: Arc<dyn Store> = Arc::new(common::open(&schema.name).await);
    let bus =
        txbus_core::conformance::a_store_written_at_schema_5_migrates_and_loses_nothing(store)
            .await;
    let mut conn = raw().await;
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".deliveries",
        schema.name
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, 13, "the old rows, and none for the new delivery");
    conn.close().await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
