//! Recording the attempts of one batch: success, retry or failure, each fenced, the outcomes of
//! the operations they finish and the counters of finished deliveries, in one statement.
//!
//! The batch is applied as if its completions ran one after the other. Completions of one
//! delivery that arrive together are applied in rounds, one statement per round, so that a
//! statement never meets the same row twice; within a round a failure decides its operation
//! even when a success of the same operation comes with it (an operation that has a failing
//! delivery cannot be finished by its successes, so the order changes no result).

use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use txbus_core::inspect::minute_of;
use txbus_core::store::{Completion, CompletionEffect, Conflict, DeliveryResult, Error};
use txbus_core::{OperationId, Outcome};

use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::{int, signed};
use crate::schema::{op_status, status, Schema};

/// One round of completions (of distinct deliveries), in one statement.
///
/// - `lk` locks the operations' commit rows, in id order as every writer does, and reads them
///   as they are now.
/// - `vi` are the completions of open inline deliveries (fence 1, bit set): a success of the
///   first attempt is only a bit to flip; anything else is materialized by `mat` as a row in
///   the state the attempt leaves it.
/// - `r` applies the completions of deliveries with rows, when their lease is current.
/// - `per` sums what the applied completions do to each operation, and `c` writes it in one
///   update of the commit row: bits, count of remaining deliveries, outcome.
/// - `cnt` and `mins` add the applied completions to the per-handler counters and minute
///   buckets (after the commit rows, which every writer locks before counter rows).
/// - The result lists the applied completions (by place in the batch) and the operations
///   finished (with the completion that finished each: an operation's last success, or its
///   first failure, in batch order), to be announced once the transaction commits.
///
/// Every table is reached by keys given as parameters (`= ANY`), so that the plan made once
/// per connection stays an index lookup whatever the tables hold. The lease is checked
/// against a column of `v` (`d.status = v.leased`), not a constant: with `status = 1` the
/// planner could prefer to scan the partial index of every leased delivery, a plan that is
/// cheap only while few are.
pub(crate) const ROUND: &str = "
WITH v AS MATERIALIZED (
         SELECT v.*, 1::SMALLINT AS leased
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::INT[], $5::SMALLINT[],
                     $6::BIGINT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $14::BIGINT[])
              AS v(id, fence, commit_id, attempts, kind, next_at, error, failure, handler, pos)),
     lk AS MATERIALIZED (
         SELECT c.id, c.op_id, c.op_status, c.op_remaining, c.first_delivery_id, c.inline_open,
                c.inline_owner, c.inline_idx, c.inline_handler, c.created_at
         FROM {s}.commits c WHERE c.id = ANY ($10::BIGINT[])
         ORDER BY c.id FOR UPDATE),
     vi AS MATERIALIZED (
         SELECT v.*, lk.inline_owner, lk.created_at,
                lk.inline_idx[(v.id - lk.first_delivery_id + 1)::INT] AS idx,
                lk.inline_handler[(v.id - lk.first_delivery_id + 1)::INT] AS stored_handler,
                (1::BIGINT << (v.id - lk.first_delivery_id)::INT) AS bit,
                v.kind = 2 AND v.attempts = 1 AS fast
         FROM v JOIN lk ON lk.id = v.commit_id
         WHERE v.fence = 1 AND v.id >= lk.first_delivery_id
           AND v.id < lk.first_delivery_id + 63
           AND lk.inline_open & (1::BIGINT << (v.id - lk.first_delivery_id)::INT) <> 0),
     mat AS (
         INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts, fence, owner,
                                     next_at, last_error, updated_at, interruptions)
         SELECT vi.id, vi.commit_id, vi.idx, vi.stored_handler,
                CASE WHEN vi.kind = 1 THEN 1 ELSE vi.kind END, vi.attempts, 1,
                CASE WHEN vi.kind = 1 THEN vi.inline_owner END,
                CASE WHEN vi.kind = 1 THEN vi.next_at ELSE vi.created_at END,
                vi.error, $11, 0
         FROM vi WHERE NOT vi.fast),
     r AS (
         UPDATE {s}.deliveries d
         SET status = CASE WHEN v.kind = 1 THEN 1 ELSE v.kind END,
             attempts = v.attempts,
             owner = CASE WHEN v.kind = 1 THEN d.owner END,
             next_at = CASE WHEN v.kind = 1 THEN v.next_at ELSE d.next_at END,
             last_error = v.error,
             updated_at = $11
         FROM v
         WHERE d.id = ANY ($1::BIGINT[]) AND d.id = v.id AND d.fence = v.fence
           AND d.status = v.leased
         RETURNING v.pos, v.commit_id, v.kind, v.failure, v.handler),
     done AS MATERIALIZED (
         SELECT pos, commit_id, kind, failure, handler, 0::BIGINT AS fast_bit, 0::BIGINT AS bit
         FROM r
         UNION ALL
         SELECT pos, commit_id, kind, failure, handler,
                CASE WHEN fast THEN bit ELSE 0 END, bit
         FROM vi),
     per AS (
         SELECT commit_id,
                count(*) FILTER (WHERE kind = 2) AS ok,
                min(pos) FILTER (WHERE kind >= 3) AS first_fail,
                (array_agg(failure ORDER BY pos) FILTER (WHERE kind >= 3))[1] AS failure,
                max(pos) FILTER (WHERE kind = 2) AS last_ok,
                bit_or(fast_bit) AS fast, bit_or(bit) AS cleared
         FROM done GROUP BY commit_id),
     c AS (
         UPDATE {s}.commits c
         SET inline_open = c.inline_open & ~per.cleared,
             inline_done = c.inline_done | per.fast,
             inline_done_at = CASE WHEN per.fast <> 0 THEN $11 ELSE c.inline_done_at END,
             op_remaining = CASE WHEN c.op_status = 0 AND per.first_fail IS NULL
                                 THEN c.op_remaining - per.ok ELSE c.op_remaining END,
             op_status = CASE WHEN c.op_status <> 0 THEN c.op_status
                              WHEN per.first_fail IS NOT NULL THEN 2
                              WHEN c.op_remaining - per.ok <= 0 THEN 1
                              ELSE 0 END,
             op_error = CASE WHEN c.op_status = 0 AND per.first_fail IS NOT NULL
                             THEN per.failure ELSE c.op_error END,
             op_finished_at = CASE WHEN c.op_status = 0
                                        AND (per.first_fail IS NOT NULL
                                             OR c.op_remaining - per.ok <= 0)
                                   THEN $11 ELSE c.op_finished_at END
         FROM per JOIN lk ON lk.id = per.commit_id
         WHERE c.id = ANY ($10::BIGINT[]) AND c.id = per.commit_id
         RETURNING c.op_id, lk.op_status AS before, c.op_status AS after, per.first_fail,
                   per.last_ok),
     cnt AS (
         INSERT INTO {s}.inspect_counters AS t
             (handler, shard, succeeded, retried, rejected, died, dead)
         SELECT handler, (pg_backend_pid() % $12)::SMALLINT,
                count(*) FILTER (WHERE kind = 2), count(*) FILTER (WHERE kind = 1),
                count(*) FILTER (WHERE kind = 3), count(*) FILTER (WHERE kind = 4),
                count(*) FILTER (WHERE kind = 4)
         FROM done WHERE (SELECT count(*) FROM c) >= 0
         GROUP BY handler ORDER BY handler
         ON CONFLICT (handler, shard) DO UPDATE SET
             succeeded = t.succeeded + excluded.succeeded, retried = t.retried + excluded.retried,
             rejected = t.rejected + excluded.rejected, died = t.died + excluded.died,
             dead = t.dead + excluded.dead
         RETURNING 1),
     mins AS (
         INSERT INTO {s}.inspect_minutes AS t
             (minute, handler, shard, succeeded, retried, rejected, died)
         SELECT $13, handler, (pg_backend_pid() % $12)::SMALLINT,
                count(*) FILTER (WHERE kind = 2), count(*) FILTER (WHERE kind = 1),
                count(*) FILTER (WHERE kind = 3), count(*) FILTER (WHERE kind = 4)
         FROM done WHERE (SELECT count(*) FROM cnt) >= 0
         GROUP BY handler ORDER BY handler
         ON CONFLICT (minute, handler, shard) DO UPDATE SET
             succeeded = t.succeeded + excluded.succeeded, retried = t.retried + excluded.retried,
             rejected = t.rejected + excluded.rejected, died = t.died + excluded.died)
SELECT 0::SMALLINT, pos, NULL::UUID, NULL::SMALLINT FROM done
UNION ALL
SELECT 1::SMALLINT, CASE WHEN c.after = 1 THEN c.last_ok ELSE c.first_fail END, c.op_id, c.after
FROM c WHERE c.before = 0 AND c.after <> 0";

/// What the completions of a batch did.
pub(crate) struct Completed {
    /// One list of effects per request, in the order of its completions.
    pub(crate) effects: Vec<Vec<CompletionEffect>>,
}

/// Which acknowledgements still hold their leases, locking their deliveries' rows and their
/// operations' commit rows until the transaction ends: a delivery with a row, leased under
/// the acknowledgement's fence; or one kept on its commit's row, open under fence 1. Every row
/// is reached by its key, as in [`ROUND`].
const HELD: &str = "
WITH a AS (
         SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS a(id, fence, commit_id)),
     d AS MATERIALIZED (
         SELECT d.id, d.fence, d.status FROM {s}.deliveries d
         WHERE d.id = ANY ($1::BIGINT[]) ORDER BY d.id FOR UPDATE),
     lk AS MATERIALIZED (
         SELECT c.id, c.first_delivery_id, c.inline_open FROM {s}.commits c
         WHERE c.id = ANY ($4::BIGINT[]) ORDER BY c.id FOR UPDATE)
SELECT a.id, a.fence FROM a
WHERE EXISTS (SELECT 1 FROM d WHERE d.id = a.id AND d.fence = a.fence AND d.status = 1)
   OR EXISTS (SELECT 1 FROM lk
              WHERE lk.id = a.commit_id AND a.fence = 1 AND a.id >= lk.first_delivery_id
                AND a.id < lk.first_delivery_id + 63
                AND lk.inline_open & (1::BIGINT << (a.id - lk.first_delivery_id)::INT) <> 0)";

/// For each list of acknowledgements (those a commit carries), the conflict that refuses its
/// commit when one of them no longer holds its lease; `None` when all do. The leases stay
/// locked until the transaction ends, so that what was checked holds when they are applied.
pub(crate) async fn check_leases(
    conn: &mut PgConnection,
    schema: &Schema,
    lists: &[&[Completion]],
) -> Result<Vec<Option<Conflict>>, Error> {
    let all: Vec<&Completion> = lists.iter().flat_map(|l| l.iter()).collect();
    if all.is_empty() {
        return Ok(lists.iter().map(|_| None).collect());
    }
    let ids: Vec<i64> = all.iter().map(|a| a.delivery_id).collect();
    let fences: Vec<i64> = all.iter().map(|a| a.fence).collect();
    let commits: Vec<i64> = all.iter().map(|a| signed(a.commit_id)).collect();
    let mut distinct = commits.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let held: Vec<(i64, i64)> = sqlx::query_as(&schema.sql(HELD))
        .bind(&ids)
        .bind(&fences)
        .bind(&commits)
        .bind(&distinct)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("checking leases"))?;
    let held: std::collections::HashSet<(i64, i64)> = held.into_iter().collect();
    Ok(lists
        .iter()
        .map(|list| {
            list.iter()
                .find(|a| !held.contains(&(a.delivery_id, a.fence)))
                .map(|a| Conflict::Lease {
                    delivery_id: a.delivery_id,
                })
        })
        .collect())
}

/// How many statements the completions of `requests` take: one per round, as many rounds as
/// the delivery that appears most often.
pub(crate) fn rounds_needed(requests: &[&[Completion]]) -> usize {
    let mut occurrences: HashMap<i64, usize> = HashMap::new();
    let mut most = 0;
    for c in requests.iter().flat_map(|r| r.iter()) {
        let n = occurrences.entry(c.delivery_id).or_insert(0);
        *n += 1;
        most = most.max(*n);
    }
    most
}

/// Applies every completion of `requests` in the caller's transaction (or as the one
/// statement of its own when [`rounds_needed`] is 1) and counts them.
pub(crate) async fn complete_all(
    conn: &mut PgConnection,
    schema: &Schema,
    requests: &[&[Completion]],
    now: i64,
) -> Result<Completed, Error> {
    let flat: Vec<&Completion> = requests.iter().flat_map(|r| r.iter()).collect();
    let mut effects: Vec<CompletionEffect> = vec![CompletionEffect::Stale; flat.len()];

    let mut occurrences: HashMap<i64, usize> = HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, c) in flat.iter().enumerate() {
        let n = occurrences.entry(c.delivery_id).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    for round in &mut rounds {
        // Rows are met in (commit, delivery) order, the same in every transaction.
        round.sort_by_key(|&i| (flat[i].commit_id, flat[i].delivery_id, i));
        apply_round(conn, schema, &flat, round, now, &mut effects).await?;
    }

    let mut effects = effects.into_iter();
    let per_request = requests
        .iter()
        .map(|r| effects.by_ref().take(r.len()).collect())
        .collect();
    Ok(Completed {
        effects: per_request,
    })
}

/// How a completion's result is stored: its kind (the delivery status it leaves, retry = 1),
/// next time, error text and failure (the operation's outcome, as JSON).
type Columns<'a> = (i16, Option<i64>, Option<&'a str>, Option<String>);

fn columns(c: &Completion) -> Result<Columns<'_>, Error> {
    Ok(match &c.result {
        DeliveryResult::Succeeded => (status::SUCCEEDED, None, None, None),
        DeliveryResult::Retry { next_at_ms, error } => (
            status::LEASED,
            Some(*next_at_ms),
            Some(error.as_str()),
            None,
        ),
        DeliveryResult::Failed { failure, dead } => (
            if *dead {
                status::DEAD
            } else {
                status::REJECTED
            },
            None,
            Some(failure.reason.as_str()),
            Some(
                serde_json::to_string(failure)
                    .map_err(|e| Error::Corrupt(format!("a failure does not serialize: {e}")))?,
            ),
        ),
    })
}

/// Applies completions `round` (of distinct deliveries, in row order) of `flat`.
async fn apply_round(
    conn: &mut PgConnection,
    schema: &Schema,
    flat: &[&Completion],
    round: &[usize],
    now: i64,
    effects: &mut [CompletionEffect],
) -> Result<(), Error> {
    let mut ids = Vec::with_capacity(round.len());
    let mut fences = Vec::with_capacity(round.len());
    let mut commits = Vec::with_capacity(round.len());
    let mut attempts = Vec::with_capacity(round.len());
    let mut kinds = Vec::with_capacity(round.len());
    let mut next_at = Vec::with_capacity(round.len());
    let mut errors = Vec::with_capacity(round.len());
    let mut failures = Vec::with_capacity(round.len());
    let mut handlers = Vec::with_capacity(round.len());
    let mut positions = Vec::with_capacity(round.len());
    for &i in round {
        let c = flat[i];
        let (kind, next, error, failure) = columns(c)?;
        ids.push(c.delivery_id);
        fences.push(c.fence);
        commits.push(signed(c.commit_id));
        attempts.push(int(c.attempts));
        kinds.push(kind);
        next_at.push(next);
        errors.push(error);
        failures.push(failure);
        handlers.push(&*c.handler);
        positions.push(i64::try_from(i).unwrap_or(i64::MAX));
    }
    let mut distinct = commits.clone();
    distinct.dedup();
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(ROUND))
        .bind(&ids)
        .bind(&fences)
        .bind(&commits)
        .bind(&attempts)
        .bind(&kinds)
        .bind(&next_at)
        .bind(&errors)
        .bind(&failures)
        .bind(&handlers)
        .bind(&distinct)
        .bind(now)
        .bind(crate::inspect::SHARDS)
        .bind(minute_of(now))
        .bind(&positions)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("recording attempts"))?;
    // Completions are named by their place in the batch.
    let at = |pos: i64| {
        usize::try_from(pos)
            .ok()
            .filter(|&i| i < flat.len())
            .ok_or_else(|| Error::Corrupt(format!("an attempt's place {pos} is out of range")))
    };
    let mut finished: Vec<(usize, OperationId, i16)> = Vec::new();
    for r in &rows {
        let read = || -> Result<_, sqlx::Error> {
            Ok((
                r.try_get::<i16, _>(0)?,
                r.try_get::<Option<i64>, _>(1)?,
                r.try_get::<Option<PgUuid>, _>(2)?,
                r.try_get::<Option<i16>, _>(3)?,
            ))
        };
        match read().map_err(db("reading recorded attempts"))? {
            (0, Some(n), _, _) => effects[at(n)?] = CompletionEffect::Applied(None),
            (1, Some(n), Some(op), Some(st)) => finished.push((at(n)?, OperationId(op.0), st)),
            other => {
                return Err(Error::Corrupt(format!(
                    "recording attempts returned an unexpected row {other:?}"
                )))
            }
        }
    }
    for (i, operation_id, st) in finished {
        let error = match &flat[i].result {
            DeliveryResult::Failed { failure, .. } if st != op_status::SUCCEEDED => {
                Some(failure.clone())
            }
            _ => None,
        };
        effects[i] = CompletionEffect::Applied(Some(Outcome {
            operation_id,
            error,
            finished_at_ms: now,
        }));
    }
    Ok(())
}

/// Fails the pending operations of `commits` with the matching failure (as JSON); returns
/// those it finished.
pub(crate) async fn fail_operations(
    conn: &mut PgConnection,
    schema: &Schema,
    commits: &[i64],
    errors: &[String],
    now: i64,
) -> Result<Vec<(i64, OperationId)>, Error> {
    let done: Vec<(i64, PgUuid)> = sqlx::query_as(&schema.sql(
        "UPDATE {s}.commits c SET op_status = 2, op_error = v.error, op_finished_at = $3
         FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS v(id, error)
         WHERE c.id = v.id AND c.op_status = 0
         RETURNING c.id, c.op_id",
    ))
    .bind(commits)
    .bind(errors)
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("failing operations"))?;
    Ok(done
        .into_iter()
        .map(|(c, op)| (c, OperationId(op.0)))
        .collect())
}
