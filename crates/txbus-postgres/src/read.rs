//! Reads, on the pool: they never wait for the writer lanes or the sealer.

use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use txbus_core::chain::Hash;
use txbus_core::store::operation_state;
use txbus_core::store::{CommitRecord, DeadLetter, DeadLetterQuery, DeliveryCounts, Error, Stats};
use txbus_core::{OperationId, OperationState, StoredMessage};

use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::{kind, signed, small, unsigned, MessageRow};
use crate::schema::{status, Schema};

pub(crate) async fn operation(
    pool: &PgPool,
    schema: &Schema,
    id: OperationId,
) -> Result<Option<OperationState>, Error> {
    let row: Option<(i16, i32, Option<String>, Option<i64>)> = sqlx::query_as(&schema.sql(
        "SELECT op_status, op_remaining, op_error, op_finished_at FROM {s}.commits
         WHERE op_id = $1",
    ))
    .bind(PgUuid(id.0))
    .fetch_optional(pool)
    .await
    .map_err(db("reading an operation"))?;
    let Some((st, remaining, error, finished_at)) = row else {
        return Ok(None);
    };
    operation_state(
        id,
        i64::from(st),
        i64::from(remaining),
        error.as_deref(),
        finished_at,
    )
}

/// The columns a dead letter is read from, for `FROM deliveries d JOIN messages m JOIN
/// commits c` (see [`dead_letter`]).
pub(crate) const DEAD_LETTER_COLUMNS: &str =
    "d.id, c.op_id, d.commit_id, d.idx, d.handler, d.attempts, d.last_error,
     d.updated_at, m.id, m.event_type, m.module, m.payload, m.headers";

/// Reads the [`DEAD_LETTER_COLUMNS`] of a row.
pub(crate) fn dead_letter(r: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    let op: PgUuid = r.try_get(1)?;
    Ok(DeadLetter {
        delivery_id: r.try_get(0)?,
        operation_id: OperationId(op.0),
        commit_id: unsigned(r.try_get(2)?),
        message_index: small(r.try_get(3)?),
        handler: r.try_get(4)?,
        attempts: small(r.try_get(5)?),
        error: r.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
        failed_at_ms: r.try_get(7)?,
        message: MessageRow::read(r, 8)?.raw(),
    })
}

pub(crate) async fn dead_letters(
    pool: &PgPool,
    schema: &Schema,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, Error> {
    let limit = i64::try_from(q.limit.clamp(1, 1000)).unwrap_or(1000);
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(&format!(
        "SELECT {DEAD_LETTER_COLUMNS}
         FROM {{s}}.deliveries d
         JOIN {{s}}.messages m ON m.commit_id = d.commit_id AND m.idx = d.idx
         JOIN {{s}}.commits c ON c.id = d.commit_id
         WHERE d.status = $1 AND d.id > $2 AND ($3::TEXT IS NULL OR d.handler = $3)
         ORDER BY d.id LIMIT $4"
    )))
    .bind(status::DEAD)
    .bind(q.after_id.unwrap_or(0))
    .bind(q.handler.as_deref())
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db("listing dead letters"))?;
    rows.iter()
        .map(|r| dead_letter(r).map_err(db("reading a dead letter")))
        .collect()
}

pub(crate) fn hash(v: Vec<u8>, position: i64) -> Result<Hash, Error> {
    v.try_into()
        .map_err(|_| Error::Corrupt(format!("commit {position}: a hash is not 32 bytes")))
}

/// A sealed commit row: id, position, op_id, kind, created_at, data_hash, chain_hash.
type CommitRow = (i64, i64, PgUuid, i16, i64, Vec<u8>, Vec<u8>);

pub(crate) async fn log(
    pool: &PgPool,
    schema: &Schema,
    after: u64,
    limit: usize,
) -> Result<Vec<CommitRecord>, Error> {
    let limit = i64::try_from(limit.clamp(1, 10_000)).unwrap_or(1);
    let mut conn = pool.acquire().await.map_err(db("reading the log"))?;
    let rows: Vec<CommitRow> = sqlx::query_as(&schema.sql(
        "SELECT c.id, s.position, c.op_id, c.kind, c.created_at, c.data_hash, s.chain_hash
         FROM {s}.commit_seals s JOIN {s}.commits c ON c.id = s.commit_id
         WHERE s.position > $1 ORDER BY s.position LIMIT $2",
    ))
    .bind(signed(after))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading the log"))?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let message_rows: Vec<PgRow> = sqlx::query(&schema.sql(
        "SELECT commit_id, id, event_type, module, payload, headers FROM {s}.messages
         WHERE commit_id = ANY($1) ORDER BY commit_id, idx",
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading the log's messages"))?;
    let mut messages: HashMap<i64, Vec<StoredMessage>> = HashMap::with_capacity(rows.len());
    for r in &message_rows {
        let commit: i64 = r.try_get(0).map_err(db("reading a message"))?;
        // Stored text is kept as it is, so that the hash check sees exactly what is stored.
        let message = MessageRow::read(r, 1)
            .map_err(db("reading a message"))?
            .raw();
        messages.entry(commit).or_default().push(message);
    }
    let mut records = rows
        .into_iter()
        .map(|(id, position, op, k, created_at, data, chain)| {
            Ok(CommitRecord {
                position: unsigned(position),
                operation_id: OperationId(op.0),
                kind: kind(k, id)?,
                created_at_ms: created_at,
                messages: messages.remove(&id).unwrap_or_default(),
                data_hash: hash(data, position)?,
                chain_hash: hash(chain, position)?,
                kv: Vec::new(),
                signature: None,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    crate::commit_meta::attach(&mut conn, schema, &ids, &mut records).await?;
    Ok(records)
}

pub(crate) async fn stats(pool: &PgPool, schema: &Schema) -> Result<Stats, Error> {
    let c: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(&schema.sql(
        "SELECT (SELECT count(*) FROM {s}.commits),
                (SELECT count(*) FROM {s}.messages),
                (SELECT count(*) FROM {s}.commits WHERE op_status = 0),
                count(*) FILTER (WHERE status = $1),
                count(*) FILTER (WHERE status = $2),
                count(*) FILTER (WHERE status = $3),
                count(*) FILTER (WHERE status = $4),
                count(*) FILTER (WHERE status = $5)
         FROM {s}.deliveries",
    ))
    .bind(status::PENDING)
    .bind(status::LEASED)
    .bind(status::SUCCEEDED)
    .bind(status::REJECTED)
    .bind(status::DEAD)
    .fetch_one(pool)
    .await
    .map_err(db("counting"))?;
    // Deliveries kept on their commit's row: open ones are leased, done ones succeeded.
    let (inline_open, inline_done): (i64, i64) = sqlx::query_as(&schema.sql(crate::inline::COUNTS))
        .fetch_one(pool)
        .await
        .map_err(db("counting inline deliveries"))?;
    Ok(Stats {
        commits: unsigned(c.0),
        messages: unsigned(c.1),
        pending_operations: unsigned(c.2),
        deliveries: DeliveryCounts {
            pending: unsigned(c.3),
            leased: unsigned(c.4) + unsigned(inline_open),
            succeeded: unsigned(c.5) + unsigned(inline_done),
            rejected: unsigned(c.6),
            dead: unsigned(c.7),
        },
    })
}
