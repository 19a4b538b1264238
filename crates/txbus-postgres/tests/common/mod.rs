//! What the PostgreSQL store's tests share: the server's URL, fresh schemas that are dropped
//! afterwards, commits to append, and waiting for the sealer.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use txbus_core::store::{CommitKind, CommitRecord, NewCommit, NewDelivery, Store};
use txbus_core::{OperationId, StoredMessage};
use txbus_postgres::{PostgresOptions, PostgresStore};

/// The test server, from `TXBUS_PG_URL`.
pub fn url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url()` with an `application_name`, so that a test can find (and end) its own sessions
/// without touching those of tests running beside it.
pub fn url_named(name: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}application_name={name}")
}

/// A fresh schema name; the schema is dropped when this is dropped (even when the test fails).
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    pub fn new() -> Self {
        Self {
            name: format!("t_{:016x}", fastrand::u64(..)),
        }
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which must not block: a thread of its own with
        // a runtime of its own does the work.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_schema(&name));
        })
        .join();
        if done.is_err() {
            eprintln!("dropping schema {} failed", self.name);
        }
    }
}

/// Drops `name` with everything in it.
pub async fn drop_schema(name: &str) {
    let mut conn = raw().await;
    conn.execute("SET lock_timeout = '10s'").await.unwrap();
    conn.execute(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE").as_str())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// Options for a store in `schema`, sized for tests that run side by side.
pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new(url())
        .schema(schema)
        .max_connections(4)
        .writer_lanes(2)
}

/// Options for a store in `schema` whose sessions carry `application_name = app`.
pub fn options_named(schema: &str, app: &str) -> PostgresOptions {
    PostgresOptions::new(url_named(app))
        .schema(schema)
        .max_connections(4)
        .writer_lanes(2)
}

/// Ends every session whose `application_name` is `app`, as a server restart or a network
/// failure would; returns how many there were.
pub async fn terminate(app: &str) -> i64 {
    let mut conn = raw().await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(app)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    n
}

/// A store in `schema`.
pub async fn open(schema: &str) -> PostgresStore {
    options(schema).connect().await.unwrap()
}

/// A connection of the test's own, outside any store.
pub async fn raw() -> PgConnection {
    PgConnection::connect(&url()).await.unwrap()
}

pub fn message(n: u64) -> Arc<StoredMessage> {
    let payload = json!({"n": n});
    Arc::new(StoredMessage {
        id: txbus_core::MessageId::new(),
        event_type: "thing.happened".into(),
        module: Some("things".into()),
        payload_json: payload.to_string(),
        payload,
        headers: Default::default(),
        headers_json: "{}".into(),
    })
}

/// A commit of one message with one delivery to handler `h`.
pub fn commit(n: u64, lease_to: Option<uuid::Uuid>) -> NewCommit {
    NewCommit {
        operation_id: OperationId::new(),
        kind: CommitKind::Transact,
        created_at_ms: 1_700_000_000_000 + n as i64,
        messages: vec![message(n)],
        deliveries: vec![NewDelivery {
            message_index: 0,
            handler: Arc::from("h"),
            leased: true,
        }],
        lease_to,
        streams: Vec::new(),
        kv: Vec::new(),
        acks: Vec::new(),
    }
}

/// The sealed log once it holds at least `count` commits; gives up after 30 s.
pub async fn wait_sealed(store: &dyn Store, count: usize) -> Vec<CommitRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut log = Vec::new();
        loop {
            let after = log.last().map_or(0, |c: &CommitRecord| c.position);
            let page = store.read_log(after, 10_000).await.unwrap();
            if page.is_empty() {
                break;
            }
            log.extend(page);
        }
        if log.len() >= count {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} commits were sealed within 30 s",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
