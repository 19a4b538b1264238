//! Recording the attempts of one batch: success, retry or failure, each fenced, and the
//! outcomes of the operations they finish, in a few multi-row statements.
//!
//! The batch is applied as if its completions ran one after the other. Completions of one
//! delivery that arrive together are applied in rounds, one per round, so that a multi-row
//! update never meets the same row twice; within a round failures go before successes (an
//! operation that has a failing delivery cannot be finished by its successes, so the order
//! changes no result).

use std::collections::HashMap;

use sqlx::PgConnection;
use txbus_core::store::{Completion, CompletionEffect, Conflict, DeliveryResult, Error};
use txbus_core::{OperationId, Outcome};

use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::{int, signed};
use crate::schema::{op_status, status, Schema};

/// What the completions of a batch did.
pub(crate) struct Completed {
    /// One list of effects per request, in the order of its completions.
    pub(crate) effects: Vec<Vec<CompletionEffect>>,
    /// Operations these completions finished.
    pub(crate) finished: Vec<OperationId>,
}

/// Applies every completion of `requests` in the caller's transaction.
pub(crate) async fn complete_all(
    conn: &mut PgConnection,
    schema: &Schema,
    requests: &[&[Completion]],
    now: i64,
) -> Result<Completed, Error> {
    let flat: Vec<&Completion> = requests.iter().flat_map(|r| r.iter()).collect();
    let mut effects: Vec<CompletionEffect> = vec![CompletionEffect::Stale; flat.len()];
    let mut finished = Vec::new();

    // Commit rows are locked in id order up front, as the sealer locks them, so that a batch
    // and the sealer (or another batch) never wait for each other in a cycle.
    let mut commit_ids: Vec<i64> = flat.iter().map(|c| signed(c.commit_id)).collect();
    commit_ids.sort_unstable();
    commit_ids.dedup();
    sqlx::query(&schema.sql(
        "SELECT 1 FROM {s}.commits WHERE id = ANY($1) AND op_status = 0 ORDER BY id FOR UPDATE",
    ))
    .bind(&commit_ids)
    .execute(&mut *conn)
    .await
    .map_err(db("locking operations"))?;

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
    for round in &rounds {
        apply_round(conn, schema, &flat, round, now, &mut effects, &mut finished).await?;
    }

    let mut effects = effects.into_iter();
    let per_request = requests
        .iter()
        .map(|r| effects.by_ref().take(r.len()).collect())
        .collect();
    Ok(Completed {
        effects: per_request,
        finished,
    })
}

/// Applies completions `round` (of distinct deliveries) of `flat`.
async fn apply_round(
    conn: &mut PgConnection,
    schema: &Schema,
    flat: &[&Completion],
    round: &[usize],
    now: i64,
    effects: &mut [CompletionEffect],
    finished: &mut Vec<OperationId>,
) -> Result<(), Error> {
    let mut succeeded = Vec::new();
    let mut retried = Vec::new();
    let mut failed = Vec::new();
    for &i in round {
        match &flat[i].result {
            DeliveryResult::Succeeded => succeeded.push(i),
            DeliveryResult::Retry { .. } => retried.push(i),
            DeliveryResult::Failed { .. } => failed.push(i),
        }
    }
    if !failed.is_empty() {
        fail(conn, schema, flat, &failed, now, effects, finished).await?;
    }
    if !succeeded.is_empty() {
        succeed(conn, schema, flat, &succeeded, now, effects, finished).await?;
    }
    if !retried.is_empty() {
        retry(conn, schema, flat, &retried, now, effects).await?;
    }
    Ok(())
}

/// Checks (and locks until the transaction ends) that every completion's attempt still holds
/// its lease: the conflict that refuses a commit carrying `acks` when one does not.
pub(crate) async fn check_leases(
    conn: &mut PgConnection,
    schema: &Schema,
    acks: &[Completion],
) -> Result<Option<Conflict>, Error> {
    if acks.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = acks.iter().map(|a| a.delivery_id).collect();
    let held: Vec<(i64, i64)> = sqlx::query_as(&schema.sql(
        "SELECT id, fence FROM {s}.deliveries WHERE id = ANY($1) AND status = 1
         ORDER BY id FOR UPDATE",
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("checking leases"))?;
    Ok(acks
        .iter()
        .find(|a| !held.contains(&(a.delivery_id, a.fence)))
        .map(|a| Conflict::Lease {
            delivery_id: a.delivery_id,
        }))
}

/// Completion index by delivery id, for mapping returned rows back.
fn by_delivery(flat: &[&Completion], idxs: &[usize]) -> HashMap<i64, usize> {
    idxs.iter().map(|&i| (flat[i].delivery_id, i)).collect()
}

async fn succeed(
    conn: &mut PgConnection,
    schema: &Schema,
    flat: &[&Completion],
    idxs: &[usize],
    now: i64,
    effects: &mut [CompletionEffect],
    finished: &mut Vec<OperationId>,
) -> Result<(), Error> {
    let ids: Vec<i64> = idxs.iter().map(|&i| flat[i].delivery_id).collect();
    let fences: Vec<i64> = idxs.iter().map(|&i| flat[i].fence).collect();
    let attempts: Vec<i32> = idxs.iter().map(|&i| int(flat[i].attempts)).collect();
    let applied: Vec<(i64, i64)> = sqlx::query_as(&schema.sql(
        "UPDATE {s}.deliveries d
         SET status = 2, attempts = v.attempts, owner = NULL, last_error = NULL, updated_at = $4
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::INT[]) AS v(id, fence, attempts)
         WHERE d.id = v.id AND d.fence = v.fence AND d.status = 1
         RETURNING d.id, d.commit_id",
    ))
    .bind(&ids)
    .bind(&fences)
    .bind(&attempts)
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("recording successes"))?;
    if applied.is_empty() {
        return Ok(());
    }
    let index = by_delivery(flat, idxs);
    // Per operation: how many of its deliveries succeeded here, and which completion came last
    // (the one that finishes it, if any does).
    let mut per_commit: HashMap<i64, (i32, usize)> = HashMap::new();
    for (delivery, commit) in applied {
        let Some(&i) = index.get(&delivery) else {
            continue;
        };
        effects[i] = CompletionEffect::Applied(None);
        let entry = per_commit.entry(commit).or_insert((0, i));
        entry.0 += 1;
        entry.1 = entry.1.max(i);
    }
    let (commits, counts): (Vec<i64>, Vec<i32>) =
        per_commit.iter().map(|(&c, &(n, _))| (c, n)).unzip();
    let done: Vec<(i64, PgUuid, i16)> = sqlx::query_as(&schema.sql(
        "UPDATE {s}.commits c
         SET op_remaining = c.op_remaining - v.n,
             op_status = CASE WHEN c.op_remaining - v.n <= 0 THEN 1 ELSE 0 END,
             op_finished_at = CASE WHEN c.op_remaining - v.n <= 0 THEN $3 END
         FROM UNNEST($1::BIGINT[], $2::INT[]) AS v(id, n)
         WHERE c.id = v.id AND c.op_status = 0
         RETURNING c.id, c.op_id, c.op_status",
    ))
    .bind(&commits)
    .bind(&counts)
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("updating operations"))?;
    for (commit, op, st) in done {
        if st != op_status::SUCCEEDED {
            continue;
        }
        if let Some(&(_, last)) = per_commit.get(&commit) {
            let operation_id = OperationId(op.0);
            effects[last] = CompletionEffect::Applied(Some(Outcome {
                operation_id,
                error: None,
                finished_at_ms: now,
            }));
            finished.push(operation_id);
        }
    }
    Ok(())
}

async fn retry(
    conn: &mut PgConnection,
    schema: &Schema,
    flat: &[&Completion],
    idxs: &[usize],
    now: i64,
    effects: &mut [CompletionEffect],
) -> Result<(), Error> {
    let mut ids = Vec::with_capacity(idxs.len());
    let mut fences = Vec::with_capacity(idxs.len());
    let mut attempts = Vec::with_capacity(idxs.len());
    let mut next_at = Vec::with_capacity(idxs.len());
    let mut errors = Vec::with_capacity(idxs.len());
    for &i in idxs {
        let c = flat[i];
        if let DeliveryResult::Retry { next_at_ms, error } = &c.result {
            ids.push(c.delivery_id);
            fences.push(c.fence);
            attempts.push(int(c.attempts));
            next_at.push(*next_at_ms);
            errors.push(error.as_str());
        }
    }
    let applied: Vec<i64> = sqlx::query_scalar(&schema.sql(
        "UPDATE {s}.deliveries d
         SET attempts = v.attempts, next_at = v.next_at, last_error = v.error, updated_at = $6
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::INT[], $4::BIGINT[], $5::TEXT[])
              AS v(id, fence, attempts, next_at, error)
         WHERE d.id = v.id AND d.fence = v.fence AND d.status = 1
         RETURNING d.id",
    ))
    .bind(&ids)
    .bind(&fences)
    .bind(&attempts)
    .bind(&next_at)
    .bind(&errors)
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("recording retries"))?;
    let index = by_delivery(flat, idxs);
    for id in applied {
        if let Some(&i) = index.get(&id) {
            effects[i] = CompletionEffect::Applied(None);
        }
    }
    Ok(())
}

async fn fail(
    conn: &mut PgConnection,
    schema: &Schema,
    flat: &[&Completion],
    idxs: &[usize],
    now: i64,
    effects: &mut [CompletionEffect],
    finished: &mut Vec<OperationId>,
) -> Result<(), Error> {
    let mut ids = Vec::with_capacity(idxs.len());
    let mut fences = Vec::with_capacity(idxs.len());
    let mut statuses = Vec::with_capacity(idxs.len());
    let mut attempts = Vec::with_capacity(idxs.len());
    let mut reasons = Vec::with_capacity(idxs.len());
    for &i in idxs {
        let c = flat[i];
        if let DeliveryResult::Failed { failure, dead } = &c.result {
            ids.push(c.delivery_id);
            fences.push(c.fence);
            statuses.push(if *dead {
                status::DEAD
            } else {
                status::REJECTED
            });
            attempts.push(int(c.attempts));
            reasons.push(failure.reason.as_str());
        }
    }
    let applied: Vec<(i64, i64)> = sqlx::query_as(&schema.sql(
        "UPDATE {s}.deliveries d
         SET status = v.status, attempts = v.attempts, owner = NULL, last_error = v.reason,
             updated_at = $6
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::SMALLINT[], $4::INT[], $5::TEXT[])
              AS v(id, fence, status, attempts, reason)
         WHERE d.id = v.id AND d.fence = v.fence AND d.status = 1
         RETURNING d.id, d.commit_id",
    ))
    .bind(&ids)
    .bind(&fences)
    .bind(&statuses)
    .bind(&attempts)
    .bind(&reasons)
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("recording failures"))?;
    if applied.is_empty() {
        return Ok(());
    }
    let index = by_delivery(flat, idxs);
    // The first failure of an operation decides it; later ones find it finished.
    let mut first: HashMap<i64, usize> = HashMap::new();
    for (delivery, commit) in applied {
        let Some(&i) = index.get(&delivery) else {
            continue;
        };
        effects[i] = CompletionEffect::Applied(None);
        let entry = first.entry(commit).or_insert(i);
        *entry = (*entry).min(i);
    }
    let mut commits = Vec::with_capacity(first.len());
    let mut errors = Vec::with_capacity(first.len());
    for (&commit, &i) in &first {
        if let DeliveryResult::Failed { failure, .. } = &flat[i].result {
            let text = serde_json::to_string(failure)
                .map_err(|e| Error::Corrupt(format!("a failure does not serialize: {e}")))?;
            commits.push(commit);
            errors.push(text);
        }
    }
    let done = fail_operations(conn, schema, &commits, &errors, now).await?;
    for (commit, operation_id) in done {
        let Some(&i) = first.get(&commit) else {
            continue;
        };
        if let DeliveryResult::Failed { failure, .. } = &flat[i].result {
            effects[i] = CompletionEffect::Applied(Some(Outcome {
                operation_id,
                error: Some(failure.clone()),
                finished_at_ms: now,
            }));
            finished.push(operation_id);
        }
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
