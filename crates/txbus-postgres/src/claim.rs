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

/// Leases pending deliveries and reads their messages, in one statement: leases come with
/// their messages or not at all. A message that is missing reads as NULL columns.
const LEASE_PENDING: &str = "
WITH picked AS (
         SELECT id FROM {s}.deliveries
         WHERE status = 0 AND next_at <= $2 AND handler = ANY($3)
         ORDER BY next_at, id LIMIT $4
         FOR UPDATE SKIP LOCKED),
     leased AS (
         UPDATE {s}.deliveries d SET status = 1, owner = $1, fence = d.fence + 1, updated_at = $2
         FROM picked WHERE d.id = picked.id
         RETURNING d.id, d.fence, d.attempts, d.commit_id, d.idx, d.handler, d.interruptions)
SELECT l.id, l.fence, l.attempts, l.commit_id, l.idx, l.handler, l.interruptions,
       m.id, m.event_type, m.module, m.payload, m.headers, c.op_id
FROM leased l
LEFT JOIN {s}.messages m ON m.commit_id = l.commit_id AND m.idx = l.idx
LEFT JOIN {s}.commits c ON c.id = l.commit_id";

/// Leases up to `limit` due deliveries. Leases of stopped buses are looked for at most every
/// quarter of the ttl per store: that search reads every leased row. Without that search a
/// claim is one statement, a transaction of its own.
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
    let every = (ttl / 4).max(5);
    let last = shared.last_abandoned_scan.load(Ordering::Relaxed);
    let scan_due = now - last >= every;
    if !scan_due {
        let mut conn = shared.pool.acquire().await.map_err(db("claiming"))?;
        let leased = lease_pending(&mut conn, schema, req, now, limit).await?;
        drop(conn);
        return finish(shared, leased, now).await;
    }

    let mut tx = shared.pool.begin().await.map_err(db("starting a claim"))?;
    let mut leased = lease_pending(&mut tx, schema, req, now, limit).await?;
    let room = limit - i64::try_from(leased.len()).unwrap_or(i64::MAX);
    if room > 0 {
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
            let messages = load_messages(&mut tx, schema, &taken).await?;
            leased.extend(taken.into_iter().map(|l| {
                let loaded = messages.get(&(l.3, l.4)).cloned().unwrap_or_else(|| {
                    Err(format!("message {} of commit {} is missing", l.4, l.3))
                });
                (l, loaded)
            }));
        }
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
    tx.commit().await.map_err(db("committing a claim"))?;
    finish(shared, leased, now).await
}

/// Leases pending deliveries with their messages (see [`LEASE_PENDING`]).
async fn lease_pending(
    conn: &mut PgConnection,
    schema: &Schema,
    req: &Claim<'_>,
    now: i64,
    limit: i64,
) -> Result<Vec<(Leased, Loaded)>, Error> {
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(LEASE_PENDING))
        .bind(PgUuid(req.owner))
        .bind(now)
        .bind(req.handlers)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("leasing pending deliveries"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let read = || -> Result<_, sqlx::Error> {
            let leased: Leased = (
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
                r.try_get(6)?,
            );
            let present = r.try_get::<Option<PgUuid>, _>(7)?.is_some();
            let message = if present {
                Some((MessageRow::read(&r, 7)?, r.try_get::<PgUuid, _>(12)?))
            } else {
                None
            };
            Ok((leased, message))
        };
        let (leased, message) = read().map_err(db("reading a claimed delivery"))?;
        let loaded = match message {
            Some((message, op)) => message.parse().map(|m| (Arc::new(m), OperationId(op.0))),
            None => Err(format!(
                "message {} of commit {} is missing",
                leased.4, leased.3
            )),
        };
        out.push((leased, loaded));
    }
    Ok(out)
}

/// The claimed deliveries; those whose message cannot be read back are dead-lettered (and
/// their operations failed) in a transaction of their own.
async fn finish(
    shared: &Shared,
    leased: Vec<(Leased, Loaded)>,
    now: i64,
) -> Result<Vec<ClaimedDelivery>, Error> {
    let mut claimed = Vec::with_capacity(leased.len());
    let mut unreadable: Vec<(i64, i64, Failure)> = Vec::new();
    for ((id, fence, attempts, commit, idx, handler, interruptions), loaded) in leased {
        match loaded {
            Ok((message, operation_id)) => claimed.push(ClaimedDelivery {
                id,
                fence,
                attempts: small(attempts),
                interruptions: small(interruptions),
                commit_id: unsigned(commit),
                operation_id,
                message_index: small(idx),
                handler,
                message,
            }),
            Err(reason) => {
                // A message that cannot be read back can never be handled: dead-letter it and
                // fail its operation rather than leave it stuck.
                tracing::error!(delivery = id, %reason, "dead-lettering an unreadable message");
                unreadable.push((
                    id,
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
        dead_letter_unreadable(shared, &unreadable, now).await?;
    }
    Ok(claimed)
}

async fn dead_letter_unreadable(
    shared: &Shared,
    unreadable: &[(i64, i64, Failure)],
    now: i64,
) -> Result<(), Error> {
    let schema = &shared.schema;
    let mut tx = shared
        .pool
        .begin()
        .await
        .map_err(db("dead-lettering unreadable messages"))?;
    let ids: Vec<i64> = unreadable.iter().map(|(id, _, _)| *id).collect();
    let reasons: Vec<&str> = unreadable
        .iter()
        .map(|(_, _, f)| f.reason.as_str())
        .collect();
    sqlx::query(&schema.sql(
        "UPDATE {s}.deliveries d SET status = 4, owner = NULL, last_error = v.reason,
             updated_at = $3
         FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS v(id, reason)
         WHERE d.id = v.id",
    ))
    .bind(&ids)
    .bind(&reasons)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db("dead-lettering an unreadable message"))?;
    let mut commits = Vec::new();
    let mut errors = Vec::new();
    for (_, commit, failure) in unreadable {
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
    let handlers: Vec<&str> = unreadable
        .iter()
        .map(|(_, _, f)| f.handler.as_str())
        .collect();
    crate::inspect::died(&mut tx, schema, &handlers, now).await?;
    tx.commit()
        .await
        .map_err(db("dead-lettering unreadable messages"))?;
    Ok(())
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
