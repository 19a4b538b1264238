//! Retention: removing finished deliveries and outcomes beyond their bounds, exactly, and
//! expired keys, in bounded steps.
//!
//! The bounds are worked out once per pass on the pool: by count, the row beyond the newest
//! `max_count`; by age, the cutoff time. Then the writer lanes remove what lies beyond them,
//! at most [`CHUNK`] rows per statement, step after step, so that no transaction grows large.
//! Each statement finds its rows through a partial index (finished deliveries, finished
//! outcomes) and skips rows another transaction holds.

use sqlx::{PgConnection, PgPool};
use txbus_core::inspect::Tally;
use txbus_core::store::Error;
use txbus_core::{PruneReport, Retention};

use crate::clock::ms;
use crate::error::db;
use crate::schema::Schema;

/// Rows one statement removes at most.
const CHUNK: i64 = 5_000;

/// What lies beyond retention, as of when the pass started.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bounds {
    /// Succeeded deliveries with an id up to this one are beyond the count bound.
    succeeded_upto: Option<i64>,
    /// Succeeded deliveries finished before this are too old.
    succeeded_before: i64,
    /// Failed deliveries up to this (finish time, id) are beyond the count bound.
    failed_upto: Option<(i64, i64)>,
    /// Failed deliveries finished before this are too old.
    failed_before: i64,
    /// Outcomes of commits with an id up to this one are beyond the count bound.
    outcomes_upto: Option<i64>,
    /// Outcomes of operations finished before this are too old.
    outcomes_before: i64,
    /// Keys that expired before this are removed.
    keys_expired_by: i64,
}

/// One step's result.
#[derive(Debug, Clone, Default)]
pub(crate) struct Step {
    pub(crate) report: PruneReport,
    /// The dead letters it removed, for the counters.
    pub(crate) tally: Tally,
    /// True when a statement removed a full chunk: call again.
    pub(crate) more: bool,
}

fn keep(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Works out the bounds: the newest `max_count` of each kind are kept, and none finished
/// before `now - max_age`.
pub(crate) async fn bounds(
    pool: &PgPool,
    schema: &Schema,
    r: &Retention,
    now: i64,
) -> Result<Bounds, Error> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(db("computing retention bounds"))?;
    let succeeded_upto: Option<i64> =
        sqlx::query_scalar(&schema.sql(
            "SELECT id FROM {s}.deliveries WHERE status = 2 ORDER BY id DESC OFFSET $1 LIMIT 1",
        ))
        .bind(keep(r.succeeded.max_count))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("computing the succeeded bound"))?;
    let failed_upto: Option<(i64, i64)> = sqlx::query_as(&schema.sql(
        "SELECT updated_at, id FROM {s}.deliveries WHERE status >= 3
         ORDER BY updated_at DESC, id DESC OFFSET $1 LIMIT 1",
    ))
    .bind(keep(r.failed.max_count))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("computing the failed bound"))?;
    let outcomes_upto: Option<i64> = sqlx::query_scalar(&schema.sql(
        "SELECT id FROM {s}.commits WHERE op_status IN (1, 2) ORDER BY id DESC OFFSET $1 LIMIT 1",
    ))
    .bind(keep(r.outcomes.max_count))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("computing the outcome bound"))?;
    Ok(Bounds {
        succeeded_upto,
        succeeded_before: now.saturating_sub(ms(r.succeeded.max_age)),
        failed_upto,
        failed_before: now.saturating_sub(ms(r.failed.max_age)),
        outcomes_upto,
        outcomes_before: now.saturating_sub(ms(r.outcomes.max_age)),
        keys_expired_by: now,
    })
}

/// Runs one statement that removes at most [`CHUNK`] rows; returns how many it removed.
async fn chunk(
    conn: &mut PgConnection,
    sql: &str,
    binds: (i64, Option<i64>),
    doing: &'static str,
) -> Result<u64, Error> {
    let mut q = sqlx::query(sql).bind(binds.0);
    if let Some(second) = binds.1 {
        q = q.bind(second);
    }
    let done = q.bind(CHUNK).execute(&mut *conn).await.map_err(db(doing))?;
    Ok(done.rows_affected())
}

/// One bounded step, in the caller's transaction.
pub(crate) async fn step(
    conn: &mut PgConnection,
    schema: &Schema,
    b: &Bounds,
) -> Result<Step, Error> {
    let mut removed = [0u64; 7];
    if let Some(upto) = b.succeeded_upto {
        removed[0] = chunk(
            conn,
            &schema.sql(
                "DELETE FROM {s}.deliveries WHERE id IN (
                     SELECT id FROM {s}.deliveries WHERE status = 2 AND id <= $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            ),
            (upto, None),
            "pruning succeeded deliveries by count",
        )
        .await?;
    }
    removed[1] = chunk(
        conn,
        &schema.sql(
            "DELETE FROM {s}.deliveries WHERE id IN (
                 SELECT id FROM {s}.deliveries WHERE status = 2 AND updated_at < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        (b.succeeded_before, None),
        "pruning succeeded deliveries by age",
    )
    .await?;
    let mut tally = Tally::new();
    if let Some((at, id)) = b.failed_upto {
        let sql = schema.sql(
            "DELETE FROM {s}.deliveries WHERE id IN (
                 SELECT id FROM {s}.deliveries
                 WHERE status >= 3 AND (updated_at, id) <= ($1, $2)
                 LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING handler, status",
        );
        let q = sqlx::query_as(&sql).bind(at).bind(id).bind(CHUNK);
        removed[2] =
            failed_chunk(conn, q, &mut tally, "pruning failed deliveries by count").await?;
    }
    let sql = schema.sql(
        "DELETE FROM {s}.deliveries WHERE id IN (
             SELECT id FROM {s}.deliveries WHERE status >= 3 AND updated_at < $1
             LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING handler, status",
    );
    let q = sqlx::query_as(&sql).bind(b.failed_before).bind(CHUNK);
    removed[3] = failed_chunk(conn, q, &mut tally, "pruning failed deliveries by age").await?;
    if let Some(upto) = b.outcomes_upto {
        removed[4] = chunk(
            conn,
            &schema.sql(
                "UPDATE {s}.commits SET op_status = 3, op_error = NULL WHERE id IN (
                     SELECT id FROM {s}.commits WHERE op_status IN (1, 2) AND id <= $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            ),
            (upto, None),
            "pruning outcomes by count",
        )
        .await?;
    }
    removed[5] = chunk(
        conn,
        &schema.sql(
            "UPDATE {s}.commits SET op_status = 3, op_error = NULL WHERE id IN (
                 SELECT id FROM {s}.commits WHERE op_status IN (1, 2) AND op_finished_at < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        (b.outcomes_before, None),
        "pruning outcomes by age",
    )
    .await?;
    // Expired keys read as absent already; removing them only reclaims the space. A key that
    // a writer holds right now is left for a later pass.
    removed[6] = chunk(
        conn,
        &schema.sql(
            "DELETE FROM {s}.kv WHERE key IN (
                 SELECT key FROM {s}.kv WHERE expires_at <= $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        (b.keys_expired_by, None),
        "pruning expired keys",
    )
    .await?;
    let full = u64::try_from(CHUNK).unwrap_or(u64::MAX);
    Ok(Step {
        report: PruneReport {
            succeeded: removed[0] + removed[1],
            failed: removed[2] + removed[3],
            outcomes: removed[4] + removed[5],
            expired_keys: removed[6],
        },
        tally,
        more: removed.iter().any(|&n| n >= full),
    })
}

type FailedRows<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, (String, i16), sqlx::postgres::PgArguments>;

/// Runs a delete of failed deliveries that returns their handler and status; counts the dead
/// letters among them in `tally`. Returns how many rows it removed.
async fn failed_chunk(
    conn: &mut PgConnection,
    q: FailedRows<'_>,
    tally: &mut Tally,
    doing: &'static str,
) -> Result<u64, Error> {
    let rows = q.fetch_all(&mut *conn).await.map_err(db(doing))?;
    for (handler, status) in &rows {
        if *status == crate::schema::status::DEAD {
            tally.dead_removed(handler, 1);
        }
    }
    Ok(rows.len() as u64)
}
