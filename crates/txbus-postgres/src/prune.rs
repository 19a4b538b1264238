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
    /// When the pass started.
    now: i64,
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
    // Succeeded deliveries are rows and bits of commit rows (see `crate::inline`); the newest
    // `max_count` of both together are kept. Each side needs at most as many as it may keep
    // plus one: a commit row holds at least one succeeded delivery, and the ids of one commit
    // never interleave with another's.
    let succeeded_upto: Option<i64> = sqlx::query_scalar(&schema.sql(
        "SELECT id FROM (
             (SELECT id FROM {s}.deliveries WHERE status = 2 ORDER BY id DESC LIMIT $2)
             UNION ALL
             (SELECT c.first_delivery_id + k
              FROM (SELECT first_delivery_id, inline_done FROM {s}.commits
                    WHERE inline_done <> 0
                    ORDER BY first_delivery_id DESC LIMIT $2) AS c,
                   generate_series(0, 62) AS k
              WHERE c.inline_done & (1::BIGINT << k) <> 0)) AS succeeded
         ORDER BY id DESC OFFSET $1 LIMIT 1",
    ))
    .bind(keep(r.succeeded.max_count))
    .bind(keep(r.succeeded.max_count).saturating_add(1))
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
        now,
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
    let (mut inline_removed, mut inline_more) = (0u64, false);
    if let Some(upto) = b.succeeded_upto {
        let (cleared, full) = inline_chunk(
            conn,
            &schema.sql(INLINE_UPTO),
            upto,
            "pruning succeeded inline deliveries by count",
        )
        .await?;
        inline_removed += cleared;
        inline_more |= full;
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
    let (cleared, full) = inline_chunk(
        conn,
        &schema.sql(INLINE_BEFORE),
        b.succeeded_before,
        "pruning succeeded inline deliveries by age",
    )
    .await?;
    inline_removed += cleared;
    inline_more |= full;
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
    // Inspection's minute buckets past the window it shows go too.
    let minutes = crate::inspect::forget_old_minutes(conn, schema, b.now, CHUNK).await?;
    let full = u64::try_from(CHUNK).unwrap_or(u64::MAX);
    Ok(Step {
        report: PruneReport {
            succeeded: removed[0] + removed[1] + inline_removed,
            failed: removed[2] + removed[3],
            outcomes: removed[4] + removed[5],
            expired_keys: removed[6],
        },
        tally,
        more: removed.iter().any(|&n| n >= full) || minutes >= full || inline_more,
    })
}

/// Clears the succeeded inline deliveries with ids up to `$1` from at most `$2` commit rows
/// (bits of other deliveries of a commit stay); returns how many it cleared, per row.
const INLINE_UPTO: &str = "
WITH lk AS (
         SELECT id, inline_done,
                CASE WHEN $1 - first_delivery_id >= 62 THEN 0::BIGINT
                     ELSE inline_done & ~((1::BIGINT << ($1 - first_delivery_id + 1)::INT) - 1)
                END AS kept
         FROM {s}.commits
         WHERE inline_done <> 0 AND first_delivery_id <= $1
         ORDER BY first_delivery_id LIMIT $2 FOR UPDATE SKIP LOCKED),
     u AS (
         UPDATE {s}.commits c SET inline_done = lk.kept FROM lk WHERE c.id = lk.id)
SELECT (bit_count(lk.inline_done::BIT(64)) - bit_count(lk.kept::BIT(64)))::BIGINT FROM lk";

/// Clears every succeeded inline delivery of at most `$2` commit rows whose last one finished
/// before `$1` (they age together: a commit's bits stay until its last succeeded delivery is
/// old enough); returns how many it cleared, per row.
const INLINE_BEFORE: &str = "
WITH lk AS (
         SELECT id, inline_done FROM {s}.commits
         WHERE inline_done <> 0 AND inline_done_at < $1
         LIMIT $2 FOR UPDATE SKIP LOCKED),
     u AS (
         UPDATE {s}.commits c SET inline_done = 0 FROM lk WHERE c.id = lk.id)
SELECT bit_count(lk.inline_done::BIT(64))::BIGINT FROM lk";

/// Runs one of [`INLINE_UPTO`] and [`INLINE_BEFORE`]; returns how many deliveries it cleared,
/// and whether it met a full chunk of rows (the pass then goes on).
async fn inline_chunk(
    conn: &mut PgConnection,
    sql: &str,
    bound: i64,
    doing: &'static str,
) -> Result<(u64, bool), Error> {
    let cleared: Vec<i64> = sqlx::query_scalar(sql)
        .bind(bound)
        .bind(CHUNK)
        .fetch_all(&mut *conn)
        .await
        .map_err(db(doing))?;
    let full = i64::try_from(cleared.len()).unwrap_or(i64::MAX) >= CHUNK;
    let total = cleared
        .iter()
        .map(|&n| u64::try_from(n).unwrap_or(0))
        .sum::<u64>();
    Ok((total, full))
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
