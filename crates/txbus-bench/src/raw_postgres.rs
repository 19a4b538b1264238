//! The storage limit of PostgreSQL, with the same client library (sqlx) as the store: the
//! message rows of txbus inserted as plain statements, in a schema of their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::Line;
use crate::scenarios::BoxError;
use crate::Args;

/// Connections for `raw-postgres-commit`, as the issue that defines it says.
const CONNECTIONS: usize = 32;

async fn insert_one(pool: &sqlx::PgPool, insert: &str, n: u64) -> Result<u64, BoxError> {
    let t = Instant::now();
    sqlx::query(insert)
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(json!({"caller": 1, "n": n}).to_string())
        .execute(pool)
        .await?;
    Ok(t.elapsed().as_nanos() as u64)
}

/// One-row commits from `connections` connections for `secs`.
async fn commits(
    pool: &sqlx::PgPool,
    insert: &str,
    connections: usize,
    secs: Duration,
) -> Result<(u64, Duration, Vec<u64>), BoxError> {
    let deadline = Instant::now() + secs;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (pool, insert) = (pool.clone(), insert.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                lat.push(insert_one(&pool, &insert, n).await?);
            }
            Ok::<_, BoxError>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as u64, start.elapsed(), all))
}

/// `raw-postgres-commit` (one-row commits from 32 connections), `raw-postgres-commit-1` (the
/// same from one connection) and `raw-postgres-batch` (1000 rows per insert).
pub async fn raw_postgres(args: &Args, url: &str) -> Result<Vec<Line>, BoxError> {
    let schema = format!("raw_{:016x}", fastrand::u64(..));
    let pool = Arc::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(CONNECTIONS as u32)
            .connect(url)
            .await?,
    );
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&*pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".messages (
             commit_id BIGSERIAL, idx INT NOT NULL DEFAULT 0, id UUID NOT NULL,
             event_type TEXT NOT NULL, module TEXT, payload TEXT NOT NULL, headers TEXT NOT NULL,
             PRIMARY KEY (commit_id, idx))"
    ))
    .execute(&*pool)
    .await?;
    let insert = format!(
        "INSERT INTO \"{schema}\".messages (id, event_type, module, payload, headers)
         VALUES ($1::uuid, 'bench.event', NULL, $2, '{{}}')"
    );
    let secs = args.secs.min(Duration::from_secs(3));
    let (ops, elapsed, lat) = commits(&pool, &insert, CONNECTIONS, secs).await?;
    let many =
        Line::new("raw-postgres-commit", ops, elapsed, lat).with("connections", CONNECTIONS as f64);
    let (ops, elapsed, lat) = commits(&pool, &insert, 1, secs).await?;
    let one = Line::new("raw-postgres-commit-1", ops, elapsed, lat);

    let batch_insert = format!(
        "INSERT INTO \"{schema}\".messages (id, event_type, module, payload, headers)
         SELECT id::uuid, 'bench.event', NULL, payload, '{{}}' FROM UNNEST($1::text[], $2::text[]) AS t(id, payload)"
    );
    let start = Instant::now();
    let mut rows = 0u64;
    let mut lat = Vec::new();
    while start.elapsed() < secs {
        let ids: Vec<String> = (0..1000)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect();
        let payloads: Vec<String> = (0..1000)
            .map(|n| json!({"caller": 1, "n": n}).to_string())
            .collect();
        let t = Instant::now();
        sqlx::query(&batch_insert)
            .bind(&ids)
            .bind(&payloads)
            .execute(&*pool)
            .await?;
        lat.push(t.elapsed().as_nanos() as u64);
        rows += 1000;
    }
    let batch =
        Line::new("raw-postgres-batch", rows, start.elapsed(), lat).with("rows_per_insert", 1000.0);
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&*pool)
        .await?;
    pool.close().await;
    Ok(vec![many, one, batch])
}

/// One-row commits into a schema of their own, kept open so that they can be measured in
/// slices alternating with another scenario (see `scenarios::paired`).
pub struct RawCommits {
    pool: sqlx::PgPool,
    schema: String,
    insert: String,
}

impl RawCommits {
    /// Creates the schema and a pool of [`CONNECTIONS`] connections.
    pub async fn open(url: &str) -> Result<Self, BoxError> {
        let schema = format!("raw_{:016x}", fastrand::u64(..));
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(CONNECTIONS as u32)
            .connect(url)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&pool)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE \"{schema}\".messages (
                 commit_id BIGSERIAL, idx INT NOT NULL DEFAULT 0, id UUID NOT NULL,
                 event_type TEXT NOT NULL, module TEXT, payload TEXT NOT NULL, headers TEXT NOT NULL,
                 PRIMARY KEY (commit_id, idx))"
        ))
        .execute(&pool)
        .await?;
        let insert = format!(
            "INSERT INTO \"{schema}\".messages (id, event_type, module, payload, headers)
             VALUES ($1::uuid, 'bench.event', NULL, $2, '{{}}')"
        );
        Ok(Self {
            pool,
            schema,
            insert,
        })
    }

    /// One-row commits from `connections` connections for `secs`: count, time, latencies.
    pub async fn run(
        &self,
        connections: usize,
        secs: Duration,
    ) -> Result<(u64, Duration, Vec<u64>), BoxError> {
        commits(&self.pool, &self.insert, connections, secs).await
    }

    /// Drops the schema.
    pub async fn close(self) -> Result<(), BoxError> {
        sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .execute(&self.pool)
            .await?;
        self.pool.close().await;
        Ok(())
    }
}
