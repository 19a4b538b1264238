//! Reads, on their own connection: they never wait for the writer.

use rusqlite::{params, Connection, OptionalExtension};
use txbus_core::chain::Hash;
use txbus_core::store::operation_state;
use txbus_core::store::{
    CommitKind, CommitRecord, DeadLetter, DeadLetterQuery, DeliveryCounts, Error, Stats,
};
use txbus_core::{OperationId, OperationState};

use crate::error::sql;
use crate::row::{op_id, MessageRow};
use crate::schema::status;

pub(crate) fn operation(c: &Connection, id: OperationId) -> Result<Option<OperationState>, Error> {
    let row: Option<(i64, i64, Option<String>, Option<i64>)> = c
        .prepare_cached("SELECT op_status, op_remaining, op_error, op_finished_at FROM commits WHERE op_id = ?1")
        .and_then(|mut s| {
            s.query_row(params![id.0.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()
        })
        .map_err(sql("reading an operation"))?;
    let Some((st, remaining, error, finished_at)) = row else {
        return Ok(None);
    };
    operation_state(id, st, remaining, error.as_deref(), finished_at)
}

/// The columns a dead letter is read from, for `FROM deliveries d JOIN messages m JOIN
/// commits c` (see [`dead_row`]).
pub(crate) const DEAD_LETTER_COLUMNS: &str =
    "d.id, c.op_id, d.position, d.idx, d.handler, d.attempts, d.last_error, d.updated_at,
     m.id, m.event_type, m.module, m.payload, m.headers";

pub(crate) struct DeadRow {
    id: i64,
    op: Vec<u8>,
    position: i64,
    idx: i64,
    handler: String,
    attempts: i64,
    error: Option<String>,
    at: i64,
    message: MessageRow,
}

/// Reads the [`DEAD_LETTER_COLUMNS`] of a row.
pub(crate) fn dead_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadRow> {
    Ok(DeadRow {
        id: r.get(0)?,
        op: r.get(1)?,
        position: r.get(2)?,
        idx: r.get(3)?,
        handler: r.get(4)?,
        attempts: r.get(5)?,
        error: r.get(6)?,
        at: r.get(7)?,
        message: MessageRow::read(r, 8)?,
    })
}

impl DeadRow {
    pub(crate) fn into_dead_letter(self) -> Result<DeadLetter, Error> {
        Ok(DeadLetter {
            delivery_id: self.id,
            operation_id: op_id(&self.op)?,
            commit_id: u64::try_from(self.position).unwrap_or(0),
            message_index: u32::try_from(self.idx).unwrap_or(0),
            handler: self.handler,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            error: self.error.unwrap_or_default(),
            failed_at_ms: self.at,
            message: self.message.raw()?,
        })
    }
}

pub(crate) fn dead_letters(c: &Connection, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, Error> {
    let limit = q.limit.clamp(1, 1000) as i64;
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {DEAD_LETTER_COLUMNS}
             FROM deliveries d
             JOIN messages m ON m.position = d.position AND m.idx = d.idx
             JOIN commits c ON c.position = d.position
             WHERE d.status = ?1 AND d.id > ?2 AND (?3 IS NULL OR d.handler = ?3)
             ORDER BY d.id LIMIT ?4"
        ))
        .map_err(sql("preparing the dead-letter query"))?;
    let rows = stmt
        .query_map(
            params![status::DEAD, q.after_id.unwrap_or(0), q.handler, limit],
            dead_row,
        )
        .map_err(sql("listing dead letters"))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(
            row.map_err(sql("reading a dead letter"))?
                .into_dead_letter()?,
        );
    }
    Ok(out)
}

pub(crate) fn hash(v: Vec<u8>, position: i64) -> Result<Hash, Error> {
    v.try_into()
        .map_err(|_| Error::Corrupt(format!("commit {position}: a hash is not 32 bytes")))
}

struct CommitRow {
    position: i64,
    op: Vec<u8>,
    kind: i64,
    created_at: i64,
    data: Vec<u8>,
    chain: Vec<u8>,
}

pub(crate) fn log(c: &Connection, after: u64, limit: usize) -> Result<Vec<CommitRecord>, Error> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit.clamp(1, 10_000)).unwrap_or(1);
    let mut stmt = c
        .prepare_cached(
            "SELECT position, op_id, kind, created_at, data_hash, chain_hash FROM commits
             WHERE position > ?1 ORDER BY position LIMIT ?2",
        )
        .map_err(sql("preparing the log query"))?;
    let rows: Vec<CommitRow> = stmt
        .query_map(params![after, limit], |r| {
            Ok(CommitRow {
                position: r.get(0)?,
                op: r.get(1)?,
                kind: r.get(2)?,
                created_at: r.get(3)?,
                data: r.get(4)?,
                chain: r.get(5)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("reading the log"))?;
    let mut msgs = c
        .prepare_cached(
            "SELECT id, event_type, module, payload, headers FROM messages WHERE position = ?1 ORDER BY idx",
        )
        .map_err(sql("preparing the message query"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let position = row.position;
        let raw: Vec<MessageRow> = msgs
            .query_map(params![position], |r| MessageRow::read(r, 0))
            .and_then(|rows| rows.collect())
            .map_err(sql("reading messages"))?;
        // Stored text is kept as it is, so that the hash check sees exactly what is on disk.
        let at = |e: Error| match e {
            Error::Corrupt(what) => Error::Corrupt(format!("commit {position}: {what}")),
            other => other,
        };
        let messages = raw
            .into_iter()
            .map(MessageRow::raw)
            .collect::<Result<Vec<_>, _>>()
            .map_err(at)?;
        out.push(CommitRecord {
            position: u64::try_from(position).unwrap_or(0),
            operation_id: op_id(&row.op).map_err(at)?,
            kind: CommitKind::from_u8(u8::try_from(row.kind).unwrap_or(0)).ok_or_else(|| {
                Error::Corrupt(format!("commit {position}: unknown kind {}", row.kind))
            })?,
            created_at_ms: row.created_at,
            messages,
            data_hash: hash(row.data, position)?,
            chain_hash: hash(row.chain, position)?,
            kv: Vec::new(),
            signature: None,
        });
    }
    crate::commit_meta::attach(c, &mut out)?;
    Ok(out)
}

pub(crate) fn stats(c: &Connection) -> Result<Stats, Error> {
    let count = |q: &str| -> Result<u64, Error> {
        c.query_row(q, [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(sql("counting"))
    };
    // One pass, no sorter: a GROUP BY over an unindexed column would sort every row in memory.
    let counts: [i64; 5] = c
        .query_row(
            "SELECT COALESCE(SUM(status = 0), 0), COALESCE(SUM(status = 1), 0), COALESCE(SUM(status = 2), 0),
                    COALESCE(SUM(status = 3), 0), COALESCE(SUM(status = 4), 0)
             FROM deliveries",
            [],
            |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?]),
        )
        .map_err(sql("counting deliveries"))?;
    let n = |i: i64| u64::try_from(counts[usize::try_from(i).unwrap_or(0)]).unwrap_or(0);
    // Deliveries kept on commit rows: leased while open, succeeded once done.
    let (mut open, mut done) = (0u64, 0u64);
    {
        let mut stmt = c
            .prepare_cached(
                "SELECT inline_open, inline_done FROM commits
                 WHERE inline_open != 0 OR inline_done != 0",
            )
            .map_err(sql("counting inline deliveries"))?;
        let mut rows = stmt.query([]).map_err(sql("counting inline deliveries"))?;
        while let Some(r) = rows.next().map_err(sql("counting inline deliveries"))? {
            let (o, d): (i64, i64) = (
                r.get(0).map_err(sql("counting inline deliveries"))?,
                r.get(1).map_err(sql("counting inline deliveries"))?,
            );
            open += u64::from(o.count_ones());
            done += u64::from(d.count_ones());
        }
    }
    let deliveries = DeliveryCounts {
        pending: n(status::PENDING),
        leased: n(status::LEASED) + open,
        succeeded: n(status::SUCCEEDED) + done,
        rejected: n(status::REJECTED),
        dead: n(status::DEAD),
    };
    Ok(Stats {
        commits: count("SELECT COUNT(*) FROM commits")?,
        messages: count("SELECT COUNT(*) FROM messages")?,
        deliveries,
        pending_operations: count("SELECT COUNT(*) FROM commits WHERE op_status = 0")?,
    })
}
