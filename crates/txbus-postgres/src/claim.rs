//! Leasing due deliveries: pending ones, and those of buses that stopped sending heartbeats.
//!
//! Claims run on the pool, each in its own transaction, beside the writer lanes:
//! `FOR UPDATE SKIP LOCKED` lets any number of them (in any process) run at once without ever
//! leasing one delivery twice or waiting for each other.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use txbus_core::store::{ClaimedDelivery, Error, OwnerId};
use txbus_core::{Failure, FailureKind, OperationId, StoredMessage};

use crate::clock::ms;
use crate::complete::fail_operations;
use crate::context::Shared;
use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::{small, unsigned, MessageRow};
use crate::schema::Schema;

/// What to lease.
pub(crate) struct Claim<'a> {
    pub(crate) owner: OwnerId,
    pub(crate) handlers: &'a [String],
    pub(crate) limit: usize,
    pub(crate) lease_ttl: Duration,
}

/// A leased row: id, fence, attempts, commit id, message index, handler, interruptions.
type Leased = (i64, i64, i32, i64, i32, String, i32);

/// Leases up to `limit` due deliveries. Leases of stopped buses are looked for at most every
/// quarter of the ttl per store: that search reads every leased row.
pub(crate) async fn claim(
    shared: &Shared,
    req: &Claim<'_>,
    now: i64,
) -> Result<Vec<ClaimedDelivery>, Error> {
    if req.limit == 0 || req.handlers.is_empty() {
        return Ok(Vec::new());
    }
    let schema = &shared.schema;
    let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
    let ttl = ms(req.lease_ttl);
    let mut tx = shared.pool.begin().await.map_err(db("starting a claim"))?;
    let mut leased: Vec<Leased> = sqlx::query_as(&schema.sql(
        "WITH picked AS (
             SELECT id FROM {s}.deliveries
             WHERE status = 0 AND next_at <= $2 AND handler = ANY($3)
             ORDER BY next_at, id LIMIT $4
             FOR UPDATE SKIP LOCKED)
         UPDATE {s}.deliveries d SET status = 1, owner = $1, fence = d.fence + 1, updated_at = $2
         FROM picked WHERE d.id = picked.id
         RETURNING d.id, d.fence, d.attempts, d.commit_id, d.idx, d.handler, d.interruptions",
    ))
    .bind(PgUuid(req.owner))
    .bind(now)
    .bind(req.handlers)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("leasing pending deliveries"))?;

    let room = limit - i64::try_from(leased.len()).unwrap_or(i64::MAX);
    let every = (ttl / 4).max(5);
    let last = shared.last_abandoned_scan.load(Ordering::Relaxed);
    if room > 0 && now - last >= every {
        shared.last_abandoned_scan.store(now, Ordering::Relaxed);
        // Leases a stopped bus held on its commits' rows become rows first (see
        // `crate::inline`), then are taken over like every other.
        sqlx::query_scalar::<_, i64>(&schema.sql(crate::inline::ABANDONED))
            .bind(PgUuid(req.owner))
            .bind(now)
            .bind(req.handlers)
            .bind(room)
            .bind(ttl)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("materializing leases of stopped buses"))?;
        let taken: Vec<Leased> = sqlx::query_as(&schema.sql(
            "WITH alive AS (
                 SELECT owner FROM {s}.owners WHERE heartbeat_at >= $2 - $5),
             picked AS (
                 SELECT id FROM {s}.deliveries
                 WHERE status = 1 AND owner <> $1 AND next_at <= $2 AND handler = ANY($3)
                   AND owner NOT IN (SELECT owner FROM alive)
                 ORDER BY id LIMIT $4
                 FOR UPDATE SKIP LOCKED)
             UPDATE {s}.deliveries d SET owner = $1, fence = d.fence + 1, updated_at = $2,
                 interruptions = d.interruptions + 1
             FROM picked WHERE d.id = picked.id
             RETURNING d.id, d.fence, d.attempts, d.commit_id, d.idx, d.handler, d.interruptions",
        ))
        .bind(PgUuid(req.owner))
        .bind(now)
        .bind(req.handlers)
        .bind(room)
        .bind(ttl)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("taking over leases of stopped buses"))?;
        if !taken.is_empty() {
            tracing::info!(
                count = taken.len(),
                "taking over leases of a bus that stopped"
            );
        }
        leased.extend(taken);
        // Buses that stopped without releasing and hold nothing any more are forgotten.
        sqlx::query(&schema.sql(
            "DELETE FROM {s}.owners o
             WHERE o.heartbeat_at < $1 - $2 AND o.owner <> $3
               AND NOT EXISTS (SELECT 1 FROM {s}.deliveries d
                               WHERE d.status = 1 AND d.owner = o.owner)
               AND NOT EXISTS (SELECT 1 FROM {s}.commits c
                               WHERE c.inline_open <> 0 AND c.inline_owner = o.owner)",
        ))
        .bind(now)
        .bind(ttl)
        .bind(PgUuid(req.owner))
        .execute(&mut *tx)
        .await
        .map_err(db("forgetting stopped buses"))?;
    }
    if leased.is_empty() {
        tx.commit().await.map_err(db("committing a claim"))?;
        return Ok(Vec::new());
    }

    let messages = load_messages(&mut tx, schema, &leased).await?;
    let mut claimed = Vec::with_capacity(leased.len());
    let mut unreadable: Vec<(i64, Failure)> = Vec::new();
    for (id, fence, attempts, commit, idx, handler, interruptions) in leased {
        match messages.get(&(commit, idx)) {
            Some(Ok((message, operation_id))) => claimed.push(ClaimedDelivery {
                id,
                fence,
                attempts: small(attempts),
                interruptions: small(interruptions),
                commit_id: unsigned(commit),
                operation_id: *operation_id,
                message_index: small(idx),
                handler,
                message: Arc::clone(message),
            }),
            other => {
                let reason = match other {
                    Some(Err(reason)) => reason.clone(),
                    _ => format!("message {idx} of commit {commit} is missing"),
                };
                // A message that cannot be read back can never be handled: dead-letter it and
                // fail its operation rather than leave it stuck.
                tracing::error!(delivery = id, %reason, "dead-lettering an unreadable message");
                sqlx::query(&schema.sql(
                    "UPDATE {s}.deliveries SET status = 4, owner = NULL, last_error = $2,
                         updated_at = $3
                     WHERE id = $1",
                ))
                .bind(id)
                .bind(&reason)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db("dead-lettering an unreadable message"))?;
                unreadable.push((
                    commit,
                    Failure {
                        event_index: small(idx),
                        event_type: String::new(),
                        handler,
                        kind: FailureKind::Rejected,
                        reason,
                        attempts: small(attempts),
                    },
                ));
            }
        }
    }
    if !unreadable.is_empty() {
        let mut commits = Vec::new();
        let mut errors = Vec::new();
        for (commit, failure) in &unreadable {
            if commits.contains(commit) {
                continue;
            }
            commits.push(*commit);
            errors.push(
                serde_json::to_string(failure)
                    .map_err(|e| Error::Corrupt(format!("a failure does not serialize: {e}")))?,
            );
        }
        let done = fail_operations(&mut tx, schema, &commits, &errors, now).await?;
        let ops: Vec<String> = done.iter().map(|(_, op)| op.to_string()).collect();
        crate::notify::finished(&mut tx, schema, &ops).await?;
        let handlers: Vec<&str> = unreadable.iter().map(|(_, f)| f.handler.as_str()).collect();
        crate::inspect::died(&mut tx, schema, &handlers, now).await?;
    }
    tx.commit().await.map_err(db("committing a claim"))?;
    Ok(claimed)
}

type Loaded = Result<(Arc<StoredMessage>, OperationId), String>;

/// The messages of the leased deliveries, each read once, by (commit id, index).
async fn load_messages(
    conn: &mut PgConnection,
    schema: &Schema,
    leased: &[Leased],
) -> Result<HashMap<(i64, i32), Loaded>, Error> {
    let mut keys: Vec<(i64, i32)> = leased.iter().map(|l| (l.3, l.4)).collect();
    keys.sort_unstable();
    keys.dedup();
    let (commits, idxs): (Vec<i64>, Vec<i32>) = keys.into_iter().unzip();
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(
        "SELECT m.commit_id, m.idx, m.id, m.event_type, m.module, m.payload, m.headers, c.op_id
         FROM UNNEST($1::BIGINT[], $2::INT[]) AS k(commit_id, idx)
         JOIN {s}.messages m ON m.commit_id = k.commit_id AND m.idx = k.idx
         JOIN {s}.commits c ON c.id = k.commit_id",
    ))
    .bind(&commits)
    .bind(&idxs)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading claimed messages"))?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let read = || -> Result<_, sqlx::Error> {
            Ok((
                r.try_get::<i64, _>(0)?,
                r.try_get::<i32, _>(1)?,
                MessageRow::read(&r, 2)?,
                r.try_get::<PgUuid, _>(7)?,
            ))
        };
        let (commit, idx, message, op) = read().map_err(db("reading a claimed message"))?;
        let loaded = message.parse().map(|m| (Arc::new(m), OperationId(op.0)));
        out.insert((commit, idx), loaded);
    }
    Ok(out)
}
