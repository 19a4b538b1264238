//! Inspection: per-handler counters and per-minute buckets kept by the writer lanes, and the
//! bounded, indexed reads behind [`txbus_core::inspect::Inspect`].
//!
//! Finished deliveries are counted, not looked for: each lane adds its batch's applied
//! completions (in the statement that records them, see [`crate::complete`]) and dead letters
//! replayed, discarded or pruned to `inspect_counters` and `inspect_minutes` in the batch's
//! own transaction, one multi-row upsert each. Lanes of every
//! process write at once, so counter rows are sharded by the writing session
//! (`pg_backend_pid() % SHARDS`): two lanes rarely touch one row, and when they do, rows are
//! taken in handler order and last in the transaction, so they wait and never deadlock.
//! Readers sum the shards. Open deliveries (pending, leased) are counted through the partial
//! index `deliveries_open`, up to a cap, and those leased on their commit's row (see
//! [`crate::inline`]) through `commits_inline_open`; an operation's deliveries are found by
//! `deliveries_commit` and on its commit row.

use std::collections::BTreeMap;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use txbus_core::inspect::{
    minute_of, minutes_floor, DeliveryDetail, DeliveryStatus, EventDetail, HandlerCounts,
    HandlerMinute, MinuteCounts, OperationDetail, OperationPage, OperationQuery, OperationStatus,
    OperationSummary, Tally, OPEN_COUNT_CAP, SEARCH_WINDOW,
};
use txbus_core::store::{DeadLetter, Error};
use txbus_core::{Failure, OperationId};

use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::read::{dead_letter as dead_letter_row, hash, DEAD_LETTER_COLUMNS};
use crate::row::{kind, small, unsigned, MessageRow};
use crate::schema::Schema;
use crate::writer::{Op, Out, Request};

/// The schema this module reads and writes (a migration of `schema.rs`). Counters start from
/// the deliveries the store holds when it is migrated.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE {s}.inspect_counters (
    handler   TEXT     NOT NULL,
    shard     SMALLINT NOT NULL,
    succeeded BIGINT   NOT NULL,
    retried   BIGINT   NOT NULL,
    rejected  BIGINT   NOT NULL,
    died      BIGINT   NOT NULL,
    dead      BIGINT   NOT NULL,
    PRIMARY KEY (handler, shard)
);

CREATE TABLE {s}.inspect_minutes (
    minute    BIGINT   NOT NULL,
    handler   TEXT     NOT NULL,
    shard     SMALLINT NOT NULL,
    succeeded BIGINT   NOT NULL,
    retried   BIGINT   NOT NULL,
    rejected  BIGINT   NOT NULL,
    died      BIGINT   NOT NULL,
    PRIMARY KEY (minute, handler, shard)
);

INSERT INTO {s}.inspect_counters (handler, shard, succeeded, retried, rejected, died, dead)
SELECT handler, 0, count(*) FILTER (WHERE status = 2), 0, count(*) FILTER (WHERE status = 3),
       count(*) FILTER (WHERE status = 4), count(*) FILTER (WHERE status = 4)
FROM {s}.deliveries WHERE status >= 2 GROUP BY handler;

-- Pending and leased deliveries by handler, and the oldest due.
CREATE INDEX deliveries_open ON {s}.deliveries (handler, status, next_at) WHERE status <= 1;
-- One operation's deliveries.
CREATE INDEX deliveries_commit ON {s}.deliveries (commit_id);
"#;

/// Counter rows per handler (and per handler and minute) at most: the writing session's shard.
pub(crate) const SHARDS: i32 = 64;

/// A dead-letter action, run by a writer lane.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Back to pending, attempts reset.
    Replay(Vec<i64>),
    /// Removed for good.
    Discard(Vec<i64>),
}

/// What an action did: the dead letters it acted on, with their handlers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acted {
    pub(crate) done: Vec<(i64, String)>,
    /// True when deliveries became pending (bus processes should claim).
    pub(crate) work: bool,
}

impl Acted {
    pub(crate) fn ids(&self) -> Vec<i64> {
        self.done.iter().map(|(id, _)| *id).collect()
    }
}

/// Runs a dead-letter action in the lane's transaction.
pub(crate) async fn act(
    conn: &mut PgConnection,
    schema: &Schema,
    action: &Action,
    now: i64,
) -> Result<Acted, Error> {
    let (sql, ids, replay) = match action {
        Action::Replay(ids) => (
            "UPDATE {s}.deliveries SET status = 0, attempts = 0, owner = NULL, next_at = $2,
                 last_error = NULL, updated_at = $2
             WHERE id = ANY($1) AND status = 4 RETURNING id, handler",
            ids,
            true,
        ),
        Action::Discard(ids) => (
            "DELETE FROM {s}.deliveries WHERE id = ANY($1) AND status = 4 RETURNING id, handler",
            ids,
            false,
        ),
    };
    let sql = schema.sql(sql);
    let mut query = sqlx::query_as(&sql).bind(ids);
    if replay {
        query = query.bind(now);
    }
    let mut done: Vec<(i64, String)> = query
        .fetch_all(&mut *conn)
        .await
        .map_err(db("acting on dead letters"))?;
    done.sort_unstable();
    let work = replay && !done.is_empty();
    Ok(Acted { done, work })
}

/// Counts what the batch did and writes it to the counters and minute buckets, in the batch's
/// transaction: the lane calls it once per batch, after every request is applied.
pub(crate) async fn record_batch(
    conn: &mut PgConnection,
    schema: &Schema,
    batch: &[Request],
    outs: &[Option<Out>],
    now: i64,
) -> Result<(), Error> {
    let mut tally = Tally::new();
    for (req, out) in batch.iter().zip(outs) {
        // Completions, and acknowledgements carried by commits, are counted by the statement
        // that records them (see `crate::complete`).
        match (&req.op, out) {
            (Op::Inspect(_), Some(Out::Acted(acted))) => {
                for (_, handler) in &acted.done {
                    tally.dead_removed(handler, 1);
                }
            }
            (Op::Prune(_), Some(Out::Prune(step))) => tally.merge(&step.tally),
            _ => {}
        }
    }
    write(conn, schema, &tally, now).await
}

/// Writes a tally: one multi-row upsert of the counters and one of the minute buckets (rows in
/// handler order). Buckets past [`txbus_core::inspect::MINUTES_KEPT`] are removed by
/// retention (see [`forget_old_minutes`]).
pub(crate) async fn write(
    conn: &mut PgConnection,
    schema: &Schema,
    tally: &Tally,
    now: i64,
) -> Result<(), Error> {
    if tally.is_empty() {
        return Ok(());
    }
    let mut handlers = Vec::new();
    let mut cols: [Vec<i64>; 5] = Default::default();
    let mut minute_handlers = Vec::new();
    let mut minute_cols: [Vec<i64>; 4] = Default::default();
    for (h, d) in tally.deltas() {
        handlers.push(h.to_owned());
        for (col, v) in cols
            .iter_mut()
            .zip([d.succeeded, d.retried, d.rejected, d.died, d.dead])
        {
            col.push(v);
        }
        if d.touches_minute() {
            minute_handlers.push(h.to_owned());
            for (col, v) in minute_cols
                .iter_mut()
                .zip([d.succeeded, d.retried, d.rejected, d.died])
            {
                col.push(v);
            }
        }
    }
    sqlx::query(&schema.sql(
        "INSERT INTO {s}.inspect_counters AS t
             (handler, shard, succeeded, retried, rejected, died, dead)
         SELECT v.h, (pg_backend_pid() % $7)::SMALLINT, v.s, v.r, v.j, v.x, v.d
         FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[])
              WITH ORDINALITY AS v(h, s, r, j, x, d, n)
         ORDER BY v.n
         ON CONFLICT (handler, shard) DO UPDATE SET
             succeeded = t.succeeded + excluded.succeeded, retried = t.retried + excluded.retried,
             rejected = t.rejected + excluded.rejected, died = t.died + excluded.died,
             dead = t.dead + excluded.dead",
    ))
    .bind(&handlers)
    .bind(&cols[0])
    .bind(&cols[1])
    .bind(&cols[2])
    .bind(&cols[3])
    .bind(&cols[4])
    .bind(SHARDS)
    .execute(&mut *conn)
    .await
    .map_err(db("updating the counters"))?;
    if minute_handlers.is_empty() {
        return Ok(());
    }
    sqlx::query(&schema.sql(
        "INSERT INTO {s}.inspect_minutes AS t
             (minute, handler, shard, succeeded, retried, rejected, died)
         SELECT $1, v.h, (pg_backend_pid() % $7)::SMALLINT, v.s, v.r, v.j, v.x
         FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[])
              WITH ORDINALITY AS v(h, s, r, j, x, n)
         ORDER BY v.n
         ON CONFLICT (minute, handler, shard) DO UPDATE SET
             succeeded = t.succeeded + excluded.succeeded, retried = t.retried + excluded.retried,
             rejected = t.rejected + excluded.rejected, died = t.died + excluded.died",
    ))
    .bind(minute_of(now))
    .bind(&minute_handlers)
    .bind(&minute_cols[0])
    .bind(&minute_cols[1])
    .bind(&minute_cols[2])
    .bind(&minute_cols[3])
    .bind(SHARDS)
    .execute(&mut *conn)
    .await
    .map_err(db("updating the minute buckets"))?;
    Ok(())
}

/// Removes up to [`CHUNK`](crate::prune) minute buckets older than
/// [`txbus_core::inspect::MINUTES_KEPT`] that no other transaction holds; returns how many.
pub(crate) async fn forget_old_minutes(
    conn: &mut PgConnection,
    schema: &Schema,
    now: i64,
    limit: i64,
) -> Result<u64, Error> {
    let done = sqlx::query(&schema.sql(
        "DELETE FROM {s}.inspect_minutes WHERE (minute, handler, shard) IN (
             SELECT minute, handler, shard FROM {s}.inspect_minutes WHERE minute < $1
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
    ))
    .bind(minutes_floor(now))
    .bind(limit)
    .execute(&mut *conn)
    .await
    .map_err(db("removing old minute buckets"))?;
    Ok(done.rows_affected())
}

/// Counts deliveries dead-lettered outside of a completion (when claimed, their message could
/// not be read back), at the end of the claim's transaction.
pub(crate) async fn died(
    conn: &mut PgConnection,
    schema: &Schema,
    handlers: &[&str],
    now: i64,
) -> Result<(), Error> {
    let mut tally = Tally::new();
    for h in handlers {
        tally.died(h);
    }
    write(conn, schema, &tally, now).await
}

/// Handlers are listed up to this many.
const MAX_HANDLERS: i64 = 10_000;

type CounterRow = (String, i64, i64, i64, i64, i64);

pub(crate) async fn handler_counts(
    pool: &PgPool,
    schema: &Schema,
) -> Result<Vec<HandlerCounts>, Error> {
    let mut conn = pool.acquire().await.map_err(db("reading the counters"))?;
    let rows: Vec<CounterRow> = sqlx::query_as(&schema.sql(
        "SELECT handler, sum(succeeded)::BIGINT, sum(retried)::BIGINT, sum(rejected)::BIGINT,
                sum(died)::BIGINT, sum(dead)::BIGINT
         FROM {s}.inspect_counters GROUP BY handler ORDER BY handler LIMIT $1",
    ))
    .bind(MAX_HANDLERS)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading the counters"))?;
    let mut by_name: BTreeMap<String, HandlerCounts> = rows
        .into_iter()
        .map(|(handler, succeeded, retried, rejected, died, dead)| {
            (
                handler.clone(),
                HandlerCounts {
                    handler,
                    succeeded: unsigned(succeeded),
                    retried: unsigned(retried),
                    rejected: unsigned(rejected),
                    died: unsigned(died),
                    dead: unsigned(dead),
                    ..HandlerCounts::default()
                },
            )
        })
        .collect();
    // Handlers with open deliveries: a loose index scan, one seek per handler.
    let open: Vec<String> = sqlx::query_scalar(&schema.sql(
        "WITH RECURSIVE h(handler, n) AS (
             (SELECT handler, 1 FROM {s}.deliveries WHERE status <= 1 ORDER BY handler LIMIT 1)
             UNION ALL
             SELECT (SELECT d.handler FROM {s}.deliveries d
                     WHERE d.status <= 1 AND d.handler > h.handler ORDER BY d.handler LIMIT 1),
                    h.n + 1
             FROM h WHERE h.handler IS NOT NULL AND h.n < $1)
         SELECT handler FROM h WHERE handler IS NOT NULL",
    ))
    .bind(MAX_HANDLERS)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("listing handlers with open deliveries"))?;
    // Leased deliveries kept on their commits' rows (see `crate::inline`), by handler: as many
    // as the buses' buffers hold, found through the partial index of open ones.
    let inline: Vec<(String, i64)> = sqlx::query_as(&schema.sql(
        "SELECT c.inline_handler[k], count(*)::BIGINT
         FROM {s}.commits c, generate_subscripts(c.inline_handler, 1) AS k
         WHERE c.inline_open <> 0 AND c.inline_open & (1::BIGINT << (k - 1)::INT) <> 0
         GROUP BY 1 ORDER BY 1 LIMIT $1",
    ))
    .bind(MAX_HANDLERS)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("counting leased inline deliveries"))?;
    for handler in open
        .into_iter()
        .chain(inline.iter().map(|(h, _)| h.clone()))
    {
        by_name
            .entry(handler.clone())
            .or_insert_with(|| HandlerCounts {
                handler,
                ..HandlerCounts::default()
            });
    }
    let cap = i64::try_from(OPEN_COUNT_CAP).unwrap_or(i64::MAX);
    let names: Vec<String> = by_name.keys().cloned().collect();
    let counts: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(&schema.sql(
        "SELECT n.handler,
                (SELECT count(*) FROM (SELECT 1 FROM {s}.deliveries d
                     WHERE d.handler = n.handler AND d.status = 0 AND d.status <= 1 LIMIT $2) p),
                (SELECT count(*) FROM (SELECT 1 FROM {s}.deliveries d
                     WHERE d.handler = n.handler AND d.status = 1 AND d.status <= 1 LIMIT $2) l),
                (SELECT min(d.next_at) FROM {s}.deliveries d
                     WHERE d.handler = n.handler AND d.status = 0 AND d.status <= 1)
         FROM UNNEST($1::TEXT[]) AS n(handler)",
    ))
    .bind(&names)
    .bind(cap)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("counting open deliveries"))?;
    let inline: std::collections::HashMap<String, i64> = inline.into_iter().collect();
    for (handler, pending, leased, oldest) in counts {
        let leased = (leased + inline.get(&handler).copied().unwrap_or(0)).min(cap);
        if let Some(h) = by_name.get_mut(&handler) {
            h.pending = unsigned(pending);
            h.leased = unsigned(leased);
            h.open_capped = pending >= cap || leased >= cap;
            h.oldest_pending_due_ms = oldest;
        }
    }
    Ok(by_name.into_values().collect())
}

type MinuteRow = (i64, String, i64, i64, i64, i64);

pub(crate) async fn minutes(
    pool: &PgPool,
    schema: &Schema,
    since_ms: i64,
    handler: Option<&str>,
) -> Result<Vec<HandlerMinute>, Error> {
    let rows: Vec<MinuteRow> = sqlx::query_as(&schema.sql(
        "SELECT minute, handler, sum(succeeded)::BIGINT, sum(retried)::BIGINT,
                sum(rejected)::BIGINT, sum(died)::BIGINT
         FROM {s}.inspect_minutes
         WHERE minute >= $1 AND ($2::TEXT IS NULL OR handler = $2)
         GROUP BY minute, handler ORDER BY minute, handler LIMIT $3",
    ))
    .bind(since_ms)
    .bind(handler)
    .bind(MAX_HANDLERS * 60)
    .fetch_all(pool)
    .await
    .map_err(db("reading minute buckets"))?;
    Ok(rows
        .into_iter()
        .map(
            |(minute, handler, succeeded, retried, rejected, died)| HandlerMinute {
                handler,
                counts: MinuteCounts {
                    minute_ms: minute,
                    succeeded: unsigned(succeeded),
                    retried: unsigned(retried),
                    rejected: unsigned(rejected),
                    died: unsigned(died),
                },
            },
        )
        .collect())
}

pub(crate) async fn head(pool: &PgPool, schema: &Schema) -> Result<u64, Error> {
    let position: Option<i64> =
        sqlx::query_scalar(&schema.sql("SELECT position FROM {s}.chain_head"))
            .fetch_optional(pool)
            .await
            .map_err(db("reading the head of the log"))?;
    Ok(position.map_or(0, unsigned))
}

/// The first commit id made at or after `at_ms`, by binary search over ids (commit times
/// follow ids closely: the window's own filter on the time is exact); one past the end when
/// there is none.
async fn first_id_at(conn: &mut PgConnection, schema: &Schema, at_ms: i64) -> Result<i64, Error> {
    let bounds: (Option<i64>, Option<i64>) =
        sqlx::query_as(&schema.sql("SELECT min(id), max(id) FROM {s}.commits"))
            .fetch_one(&mut *conn)
            .await
            .map_err(db("searching the log"))?;
    let (Some(mut lo), Some(hi)) = bounds else {
        return Ok(1);
    };
    let mut hi = hi + 1;
    let probe = schema.sql("SELECT created_at FROM {s}.commits WHERE id >= $1 ORDER BY id LIMIT 1");
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let created: Option<i64> = sqlx::query_scalar(&probe)
            .bind(mid)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("searching the log"))?;
        match created {
            Some(t) if t >= at_ms => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

const SUMMARY_COLUMNS: &str = "c.id,
     (SELECT s.position FROM {s}.commit_seals s WHERE s.commit_id = c.id), c.op_id, c.kind, c.created_at, c.message_count,
     c.op_status, c.op_remaining, c.op_error, c.op_finished_at,
     (SELECT m.event_type FROM {s}.messages m WHERE m.commit_id = c.id AND m.idx = 0)";

fn summary(r: &PgRow) -> Result<OperationSummary, Error> {
    let read = || -> Result<_, sqlx::Error> {
        Ok((
            r.try_get::<i64, _>(0)?,
            r.try_get::<Option<i64>, _>(1)?,
            r.try_get::<PgUuid, _>(2)?,
            r.try_get::<i16, _>(3)?,
            r.try_get::<i64, _>(4)?,
            r.try_get::<i32, _>(5)?,
            r.try_get::<i16, _>(6)?,
            r.try_get::<i32, _>(7)?,
            r.try_get::<Option<String>, _>(8)?,
            r.try_get::<Option<i64>, _>(9)?,
            r.try_get::<Option<String>, _>(10)?,
        ))
    };
    let (id, position, op, k, created_at, count, st, remaining, error, finished, first) =
        read().map_err(db("reading an operation"))?;
    let status = OperationStatus::from_code(i64::from(st))
        .ok_or_else(|| Error::Corrupt(format!("commit {id}: unknown operation status {st}")))?;
    let failure = match (&error, status) {
        (Some(text), OperationStatus::Failed) => {
            Some(serde_json::from_str::<Failure>(text).map_err(|e| {
                Error::Corrupt(format!("commit {id}: stored failure is unreadable: {e}"))
            })?)
        }
        _ => None,
    };
    Ok(OperationSummary {
        operation_id: OperationId(op.0),
        commit_id: unsigned(id),
        position: position.map(unsigned),
        kind: kind(k, id)?,
        created_at_ms: created_at,
        status,
        remaining: small(remaining),
        finished_at_ms: finished,
        message_count: small(count),
        first_event_type: first,
        failure,
    })
}

pub(crate) async fn operations(
    pool: &PgPool,
    schema: &Schema,
    q: &OperationQuery,
) -> Result<OperationPage, Error> {
    let mut conn = pool.acquire().await.map_err(db("searching operations"))?;
    let limit = q.page_size();
    let mut below = q
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    if let Some(to) = q.to_ms {
        // Commit times follow ids only closely: look a little further, the filter is exact.
        below = below.min(
            first_id_at(&mut conn, schema, to)
                .await?
                .saturating_add(TIME_SLACK),
        );
    }
    let floor = match q.from_ms {
        Some(from) => (first_id_at(&mut conn, schema, from).await? - TIME_SLACK).max(1),
        None => 1,
    };
    let window = i64::try_from(SEARCH_WINDOW).unwrap_or(i64::MAX);
    // The window: a few columns of at most SEARCH_WINDOW commits, by id, newest first.
    let scanned: Vec<(i64, i16, i64)> = sqlx::query_as(&schema.sql(
        "SELECT id, op_status, created_at FROM {s}.commits WHERE id < $1 AND id >= $2
         ORDER BY id DESC LIMIT $3",
    ))
    .bind(below)
    .bind(floor)
    .bind(window)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("searching operations"))?;
    let want = q.status.map(OperationStatus::code);
    let mut ids = Vec::with_capacity(limit);
    let mut lowest = below;
    let mut looked = 0usize;
    for (id, st, created_at) in &scanned {
        looked += 1;
        lowest = *id;
        let matches = want.is_none_or(|w| w == i64::from(*st))
            && q.from_ms.is_none_or(|f| *created_at >= f)
            && q.to_ms.is_none_or(|t| *created_at < t);
        if matches {
            ids.push(*id);
            if ids.len() == limit {
                break;
            }
        }
    }
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM {{s}}.commits c WHERE c.id = ANY($1) ORDER BY c.id DESC"
    )))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading operations"))?;
    let mut page = OperationPage::default();
    for r in &rows {
        page.operations.push(summary(r)?);
    }
    if lowest > floor && (ids.len() == limit || looked == SEARCH_WINDOW) {
        page.next_before = Some(unsigned(lowest));
    }
    Ok(page)
}

/// How far beyond a time bound's id a search looks: commit times follow ids only closely,
/// since several writer lanes take ids at once.
const TIME_SLACK: i64 = 1_000;

/// Deliveries shown for one operation, at most.
const MAX_TREE_DELIVERIES: i64 = 10_000;

type DeliveryRow = (i64, i32, String, i16, i32, i32, Option<String>, i64, i64);

pub(crate) async fn operation_detail(
    pool: &PgPool,
    schema: &Schema,
    id: OperationId,
) -> Result<Option<OperationDetail>, Error> {
    let mut conn = pool.acquire().await.map_err(db("reading an operation"))?;
    let row: Option<PgRow> = sqlx::query(&schema.sql(&format!(
        "SELECT {SUMMARY_COLUMNS}, c.data_hash,
             (SELECT s.chain_hash FROM {{s}}.commit_seals s WHERE s.commit_id = c.id)
         FROM {{s}}.commits c WHERE c.op_id = $1"
    )))
    .bind(PgUuid(id.0))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading an operation"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let summary = summary(&row)?;
    let commit = i64::try_from(summary.commit_id).unwrap_or(0);
    let (data, chain): (Vec<u8>, Option<Vec<u8>>) = (
        row.try_get(11).map_err(db("reading an operation"))?,
        row.try_get(12).map_err(db("reading an operation"))?,
    );
    let messages: Vec<PgRow> = sqlx::query(&schema.sql(
        "SELECT id, event_type, module, payload, headers FROM {s}.messages
         WHERE commit_id = $1 ORDER BY idx",
    ))
    .bind(commit)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading an operation's messages"))?;
    let mut events = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        events.push(EventDetail {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            message: MessageRow::read(m, 0)
                .map_err(db("reading a message"))?
                .raw(),
            deliveries: Vec::new(),
        });
    }
    let deliveries: Vec<DeliveryRow> = sqlx::query_as(&schema.sql(
        "SELECT id, idx, handler, status, attempts, interruptions, last_error, next_at, updated_at
         FROM {s}.deliveries WHERE commit_id = $1
         UNION ALL
         SELECT c.first_delivery_id + k - 1, c.inline_idx[k], c.inline_handler[k],
                CASE WHEN c.inline_open & b.bit <> 0 THEN 1 ELSE 2 END::SMALLINT,
                CASE WHEN c.inline_open & b.bit <> 0 THEN 0 ELSE 1 END, 0, NULL, c.created_at,
                CASE WHEN c.inline_open & b.bit <> 0 THEN c.created_at ELSE c.inline_done_at END
         FROM {s}.commits c, generate_subscripts(c.inline_idx, 1) AS k,
              LATERAL (SELECT 1::BIGINT << (k - 1)::INT AS bit) AS b
         WHERE c.id = $1 AND (c.inline_open | c.inline_done) & b.bit <> 0
         ORDER BY 1 LIMIT $2",
    ))
    .bind(commit)
    .bind(MAX_TREE_DELIVERIES)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading an operation's deliveries"))?;
    for (delivery_id, idx, handler, st, attempts, interruptions, last_error, next_at, updated) in
        deliveries
    {
        let status = DeliveryStatus::from_code(i64::from(st)).ok_or_else(|| {
            Error::Corrupt(format!("delivery {delivery_id}: unknown status {st}"))
        })?;
        if let Some(e) = usize::try_from(idx).ok().and_then(|i| events.get_mut(i)) {
            e.deliveries.push(DeliveryDetail {
                delivery_id,
                handler,
                status,
                attempts: small(attempts),
                interruptions: small(interruptions),
                last_error,
                next_at_ms: next_at,
                updated_at_ms: updated,
            });
        }
    }
    let position = summary
        .position
        .map_or(commit, |p| i64::try_from(p).unwrap_or(0));
    Ok(Some(OperationDetail {
        data_hash: hash(data, position)?,
        chain_hash: chain.map(|c| hash(c, position)).transpose()?,
        summary,
        events,
    }))
}

pub(crate) async fn dead_letter(
    pool: &PgPool,
    schema: &Schema,
    id: i64,
) -> Result<Option<DeadLetter>, Error> {
    let row: Option<PgRow> = sqlx::query(&schema.sql(&format!(
        "SELECT {DEAD_LETTER_COLUMNS}
         FROM {{s}}.deliveries d
         JOIN {{s}}.messages m ON m.commit_id = d.commit_id AND m.idx = d.idx
         JOIN {{s}}.commits c ON c.id = d.commit_id
         WHERE d.id = $1 AND d.status = 4"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a dead letter"))?;
    row.map(|r| dead_letter_row(&r).map_err(db("reading a dead letter")))
        .transpose()
}

#[async_trait::async_trait]
impl txbus_core::Inspect for crate::PostgresStore {
    async fn handler_counts(&self) -> Result<Vec<HandlerCounts>, Error> {
        let shared = self.open()?;
        handler_counts(&shared.pool, &shared.schema).await
    }

    async fn minutes(
        &self,
        since_ms: i64,
        handler: Option<&str>,
    ) -> Result<Vec<HandlerMinute>, Error> {
        let shared = self.open()?;
        minutes(&shared.pool, &shared.schema, since_ms, handler).await
    }

    async fn operations(&self, query: &OperationQuery) -> Result<OperationPage, Error> {
        let shared = self.open()?;
        operations(&shared.pool, &shared.schema, query).await
    }

    async fn operation_detail(&self, id: OperationId) -> Result<Option<OperationDetail>, Error> {
        let shared = self.open()?;
        operation_detail(&shared.pool, &shared.schema, id).await
    }

    async fn dead_letter(&self, delivery_id: i64) -> Result<Option<DeadLetter>, Error> {
        let shared = self.open()?;
        dead_letter(&shared.pool, &shared.schema, delivery_id).await
    }

    async fn replay_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        self.act_on(Action::Replay(ids.to_vec())).await
    }

    async fn discard_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        self.act_on(Action::Discard(ids.to_vec())).await
    }

    async fn head(&self) -> Result<u64, Error> {
        let shared = self.open()?;
        head(&shared.pool, &shared.schema).await
    }
}

impl crate::PostgresStore {
    async fn act_on(&self, action: Action) -> Result<Vec<i64>, Error> {
        let ids = match &action {
            Action::Replay(ids) | Action::Discard(ids) => ids,
        };
        txbus_core::inspect::check_action_ids(ids)?;
        if ids.is_empty() {
            self.open()?;
            return Ok(Vec::new());
        }
        match self.call(Op::Inspect(action)).await? {
            Out::Acted(acted) => Ok(acted.ids()),
            _ => Err(Error::Corrupt(
                "the writer answered a different request".into(),
            )),
        }
    }
}
