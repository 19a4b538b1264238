//! The writer: one thread owns the write connection and commits every request that is waiting
//! in one transaction (group commit), so many concurrent commits and acks share one fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};
use txbus_core::chain::{self, Hash};
use txbus_core::store::{
    AppendReceipt, ClaimedDelivery, Completion, CompletionEffect, DeliveryResult, Error,
    LogMessage, NewCommit, OwnerId,
};
use txbus_core::{
    Failure, FailureKind, OperationId, Outcome, PruneReport, Retention, StoredMessage,
};

use crate::error::sql;
use crate::row::{op_id, MessageRow};
use crate::schema::{op_status, status};

/// A write to perform.
pub(crate) enum Op {
    Append(NewCommit),
    Complete(Vec<Completion>),
    Claim {
        owner: OwnerId,
        handlers: Vec<String>,
        limit: usize,
        lease_ttl: Duration,
    },
    Heartbeat(OwnerId),
    Release(OwnerId),
    Replay(i64),
    Prune(Retention),
}

/// A write's result.
pub(crate) enum Out {
    Append(AppendReceipt),
    Complete(Vec<CompletionEffect>),
    Claim(Vec<ClaimedDelivery>),
    Count(u64),
    Flag(bool),
    Prune(PruneReport),
    Unit,
}

pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Out, Error>>,
}

/// The end of the log, as the writer tracks it between transactions.
#[derive(Clone, Copy)]
struct Head {
    position: u64,
    chain: Hash,
    next_delivery_id: i64,
}

pub(crate) struct Writer {
    conn: Connection,
    head: Head,
    max_batch: usize,
    /// When the last scan for leases of dead owners ran.
    last_abandoned_scan: Option<Instant>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Most rows one pruning step deletes, so that pruning never holds the writer for long.
const PRUNE_CHUNK: i64 = 5_000;

impl Writer {
    pub(crate) fn new(conn: Connection, max_batch: usize) -> Result<Self, Error> {
        let head = conn
            .query_row(
                "SELECT position, chain_hash FROM commits ORDER BY position DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()
            .map_err(sql("reading the end of the log"))?;
        let (position, chain) = match head {
            Some((p, h)) => {
                let chain: Hash = h.try_into().map_err(|_| {
                    Error::Corrupt(format!("commit {p}: chain hash is not 32 bytes"))
                })?;
                (u64::try_from(p).unwrap_or(0), chain)
            }
            None => (0, chain::GENESIS),
        };
        let max_id: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM deliveries", [], |r| {
                r.get(0)
            })
            .map_err(sql("reading the last delivery id"))?;
        Ok(Self {
            conn,
            head: Head {
                position,
                chain,
                next_delivery_id: max_id + 1,
            },
            max_batch: max_batch.max(1),
            last_abandoned_scan: None,
        })
    }

    /// Serves requests until every sender is gone, then checkpoints the WAL.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
    }

    fn process(&mut self, batch: &mut Vec<Request>) {
        match self.apply_all(batch) {
            Ok(outs) => {
                for (req, out) in batch.drain(..).zip(outs) {
                    let _ = req.reply.send(Ok(out));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(req) = batch.pop() {
                    let _ = req.reply.send(Err(e));
                }
            }
            Err(e) => {
                // One request spoiled the batch: run each alone so only that one fails.
                tracing::debug!(error = %e, "batch failed; retrying its requests one by one");
                for req in std::mem::take(batch) {
                    let mut one = vec![req];
                    self.process(&mut one);
                }
            }
        }
    }

    /// Applies the batch in one transaction; on any error nothing of it is kept.
    fn apply_all(&mut self, batch: &[Request]) -> Result<Vec<Out>, Error> {
        let mut head = self.head;
        let now = now_ms();
        let abandoned_due = batch.iter().any(|r| match &r.op {
            Op::Claim { lease_ttl, .. } => self
                .last_abandoned_scan
                .is_none_or(|t| t.elapsed() >= (*lease_ttl / 4).max(Duration::from_millis(5))),
            _ => false,
        });
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("starting a write transaction"))?;
        let mut outs = Vec::with_capacity(batch.len());
        for req in batch {
            let out = match &req.op {
                Op::Append(commit) => Out::Append(append(&tx, &mut head, commit, now)?),
                Op::Complete(completions) => Out::Complete(complete(&tx, completions, now)?),
                Op::Claim {
                    owner,
                    handlers,
                    limit,
                    lease_ttl,
                } => Out::Claim(claim(
                    &tx,
                    *owner,
                    handlers,
                    *limit,
                    *lease_ttl,
                    abandoned_due,
                    now,
                )?),
                Op::Heartbeat(owner) => {
                    tx.prepare_cached(
                        "INSERT INTO owners (owner, heartbeat_at) VALUES (?1, ?2)
                         ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                    )
                    .and_then(|mut s| s.execute(params![owner.as_bytes(), now]))
                    .map_err(sql("recording a heartbeat"))?;
                    Out::Unit
                }
                Op::Release(owner) => {
                    let n = tx
                        .prepare_cached(
                            "UPDATE deliveries SET status = 0, owner = NULL, updated_at = ?2
                             WHERE owner = ?1 AND status = 1",
                        )
                        .and_then(|mut s| s.execute(params![owner.as_bytes(), now]))
                        .map_err(sql("releasing leases"))?;
                    tx.execute(
                        "DELETE FROM owners WHERE owner = ?1",
                        params![owner.as_bytes()],
                    )
                    .map_err(sql("forgetting an owner"))?;
                    Out::Count(n as u64)
                }
                Op::Replay(id) => {
                    let n = tx
                        .execute(
                            "UPDATE deliveries SET status = 0, attempts = 0, owner = NULL, next_at = ?2,
                                 last_error = NULL, updated_at = ?2
                             WHERE id = ?1 AND status = 4",
                            params![id, now],
                        )
                        .map_err(sql("replaying a dead letter"))?;
                    Out::Flag(n == 1)
                }
                Op::Prune(retention) => Out::Prune(prune(&tx, retention, now)?),
            };
            outs.push(out);
        }
        tx.commit().map_err(sql("committing"))?;
        self.head = head;
        if abandoned_due {
            self.last_abandoned_scan = Some(Instant::now());
        }
        Ok(outs)
    }
}

fn append(
    tx: &Transaction<'_>,
    head: &mut Head,
    c: &NewCommit,
    now: i64,
) -> Result<AppendReceipt, Error> {
    let position = head.position + 1;
    let data = chain::data_hash(
        &c.operation_id.0,
        c.kind,
        c.created_at_ms,
        c.messages.iter().map(|m| LogMessage::from(&**m)),
    );
    let chain_hash = chain::chain_hash(&data, &head.chain);
    let remaining = c.deliveries.len();
    let finished = remaining == 0;
    let pos =
        i64::try_from(position).map_err(|_| Error::Corrupt("log position overflow".into()))?;
    tx.prepare_cached(
        "INSERT INTO commits (position, op_id, kind, created_at, message_count, data_hash, chain_hash,
                              op_status, op_remaining, op_finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .and_then(|mut s| {
        s.execute(params![
            pos,
            c.operation_id.0.as_bytes(),
            c.kind as u8,
            c.created_at_ms,
            c.messages.len() as i64,
            &data[..],
            &chain_hash[..],
            if finished { op_status::SUCCEEDED } else { op_status::PENDING },
            remaining as i64,
            finished.then_some(now),
        ])
    })
    .map_err(sql("inserting a commit"))?;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO messages (position, idx, id, event_type, module, payload, headers)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(sql("preparing a message insert"))?;
        for (i, m) in c.messages.iter().enumerate() {
            stmt.execute(params![
                pos,
                i as i64,
                m.id.0.as_bytes(),
                m.event_type,
                m.module,
                m.payload_json,
                m.headers_json
            ])
            .map_err(sql("inserting a message"))?;
        }
    }
    let mut delivery_ids = Vec::with_capacity(c.deliveries.len());
    if !c.deliveries.is_empty() {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, position, idx, handler, status, attempts, fence, owner, next_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?8)",
            )
            .map_err(sql("preparing a delivery insert"))?;
        let (st, fence, owner) = match &c.lease_to {
            Some(owner) => (status::LEASED, 1, Some(owner.as_bytes().as_slice())),
            None => (status::PENDING, 0, None),
        };
        for d in &c.deliveries {
            let id = head.next_delivery_id;
            head.next_delivery_id += 1;
            stmt.execute(params![
                id,
                pos,
                d.message_index,
                &*d.handler,
                st,
                fence,
                owner,
                now
            ])
            .map_err(sql("inserting a delivery"))?;
            delivery_ids.push(id);
        }
    }
    head.position = position;
    head.chain = chain_hash;
    Ok(AppendReceipt {
        position,
        delivery_ids,
        chain_hash,
        finished: finished.then_some(Outcome {
            operation_id: c.operation_id,
            error: None,
            finished_at_ms: now,
        }),
    })
}

fn complete(
    tx: &Transaction<'_>,
    completions: &[Completion],
    now: i64,
) -> Result<Vec<CompletionEffect>, Error> {
    let mut effects = Vec::with_capacity(completions.len());
    for c in completions {
        let pos = i64::try_from(c.position).unwrap_or(i64::MAX);
        let effect = match &c.result {
            DeliveryResult::Succeeded => {
                let n = tx
                    .prepare_cached(
                        "UPDATE deliveries SET status = 2, attempts = ?3, owner = NULL, last_error = NULL, updated_at = ?4
                         WHERE id = ?1 AND fence = ?2 AND status = 1",
                    )
                    .and_then(|mut s| s.execute(params![c.delivery_id, c.fence, c.attempts, now]))
                    .map_err(sql("recording a success"))?;
                if n == 0 {
                    CompletionEffect::Stale
                } else {
                    let done: Option<(i64, Vec<u8>)> = tx
                        .prepare_cached(
                            "UPDATE commits SET op_remaining = op_remaining - 1,
                                 op_status = CASE WHEN op_remaining <= 1 THEN 1 ELSE 0 END,
                                 op_finished_at = CASE WHEN op_remaining <= 1 THEN ?2 ELSE NULL END
                             WHERE position = ?1 AND op_status = 0
                             RETURNING op_status, op_id",
                        )
                        .and_then(|mut s| {
                            s.query_row(params![pos, now], |r| Ok((r.get(0)?, r.get(1)?)))
                                .optional()
                        })
                        .map_err(sql("updating an operation"))?;
                    CompletionEffect::Applied(match done {
                        Some((op_status::SUCCEEDED, id)) => Some(Outcome {
                            operation_id: op_id(&id)?,
                            error: None,
                            finished_at_ms: now,
                        }),
                        _ => None,
                    })
                }
            }
            DeliveryResult::Retry { next_at_ms, error } => {
                let n = tx
                    .prepare_cached(
                        "UPDATE deliveries SET attempts = ?3, next_at = ?4, last_error = ?5, updated_at = ?6
                         WHERE id = ?1 AND fence = ?2 AND status = 1",
                    )
                    .and_then(|mut s| s.execute(params![c.delivery_id, c.fence, c.attempts, next_at_ms, error, now]))
                    .map_err(sql("recording a retry"))?;
                if n == 0 {
                    CompletionEffect::Stale
                } else {
                    CompletionEffect::Applied(None)
                }
            }
            DeliveryResult::Failed { failure, dead } => {
                let st = if *dead {
                    status::DEAD
                } else {
                    status::REJECTED
                };
                let n = tx
                    .prepare_cached(
                        "UPDATE deliveries SET status = ?3, attempts = ?4, owner = NULL, last_error = ?5, updated_at = ?6
                         WHERE id = ?1 AND fence = ?2 AND status = 1",
                    )
                    .and_then(|mut s| {
                        s.execute(params![c.delivery_id, c.fence, st, c.attempts, failure.reason, now])
                    })
                    .map_err(sql("recording a failure"))?;
                if n == 0 {
                    CompletionEffect::Stale
                } else {
                    CompletionEffect::Applied(fail_operation(tx, pos, failure, now)?)
                }
            }
        };
        effects.push(effect);
    }
    Ok(effects)
}

fn fail_operation(
    tx: &Transaction<'_>,
    pos: i64,
    failure: &Failure,
    now: i64,
) -> Result<Option<Outcome>, Error> {
    let error = serde_json::to_string(failure)
        .map_err(|e| Error::Corrupt(format!("failure does not serialize: {e}")))?;
    let id: Option<Vec<u8>> = tx
        .prepare_cached(
            "UPDATE commits SET op_status = 2, op_error = ?2, op_finished_at = ?3
             WHERE position = ?1 AND op_status = 0 RETURNING op_id",
        )
        .and_then(|mut s| {
            s.query_row(params![pos, error, now], |r| r.get(0))
                .optional()
        })
        .map_err(sql("failing an operation"))?;
    id.map(|id| {
        Ok(Outcome {
            operation_id: op_id(&id)?,
            error: Some(failure.clone()),
            finished_at_ms: now,
        })
    })
    .transpose()
}

#[allow(clippy::too_many_arguments)]
fn claim(
    tx: &Transaction<'_>,
    owner: OwnerId,
    handlers: &[String],
    limit: usize,
    lease_ttl: Duration,
    scan_abandoned: bool,
    now: i64,
) -> Result<Vec<ClaimedDelivery>, Error> {
    let handlers_json = serde_json::to_string(handlers).unwrap_or_else(|_| "[]".into());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut ids: Vec<i64> = tx
        .prepare_cached(
            "SELECT id FROM deliveries
             WHERE status = 0 AND next_at <= ?1 AND handler IN (SELECT value FROM json_each(?2))
             ORDER BY next_at, id LIMIT ?3",
        )
        .and_then(|mut s| {
            s.query_map(params![now, handlers_json, limit], |r| r.get(0))?
                .collect()
        })
        .map_err(sql("finding pending deliveries"))?;
    if scan_abandoned && (ids.len() as i64) < limit {
        let more: Vec<i64> = tx
            .prepare_cached(
                "SELECT id FROM deliveries
                 WHERE status = 1 AND owner != ?1 AND next_at <= ?2
                   AND handler IN (SELECT value FROM json_each(?3))
                   AND owner NOT IN (SELECT owner FROM owners WHERE heartbeat_at >= ?4)
                 ORDER BY id LIMIT ?5",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![
                        owner.as_bytes(),
                        now,
                        handlers_json,
                        now - ms(lease_ttl),
                        limit - ids.len() as i64
                    ],
                    |r| r.get(0),
                )?
                .collect()
            })
            .map_err(sql("finding abandoned leases"))?;
        if !more.is_empty() {
            tracing::info!(
                count = more.len(),
                "taking over leases of a bus that stopped"
            );
        }
        ids.extend(more);
    }
    let mut cache: HashMap<(i64, i64), Loaded> = HashMap::new();
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        let (position, idx, handler, attempts, fence): (i64, i64, String, i64, i64) = tx
            .prepare_cached(
                "UPDATE deliveries SET status = 1, owner = ?2, fence = fence + 1, updated_at = ?3
                 WHERE id = ?1 RETURNING position, idx, handler, attempts, fence",
            )
            .and_then(|mut s| {
                s.query_row(params![id, owner.as_bytes(), now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
            })
            .map_err(sql("leasing a delivery"))?;
        let loaded = match cache.get(&(position, idx)) {
            Some(v) => v.clone(),
            None => {
                let v = load_message(tx, position, idx)?;
                cache.insert((position, idx), v.clone());
                v
            }
        };
        match loaded {
            Ok((message, operation_id)) => claimed.push(ClaimedDelivery {
                id,
                fence,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                position: u64::try_from(position).unwrap_or(0),
                operation_id,
                message_index: u32::try_from(idx).unwrap_or(u32::MAX),
                handler,
                message,
            }),
            Err(reason) => {
                // A message that cannot be read back can never be handled: dead-letter it
                // and fail its operation rather than leave it stuck.
                tracing::error!(delivery = id, %reason, "dead-lettering an unreadable message");
                tx.execute(
                    "UPDATE deliveries SET status = 4, owner = NULL, last_error = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, reason, now],
                )
                .map_err(sql("dead-lettering an unreadable message"))?;
                let failure = Failure {
                    event_index: u32::try_from(idx).unwrap_or(u32::MAX),
                    event_type: String::new(),
                    handler,
                    kind: FailureKind::Rejected,
                    reason,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                };
                fail_operation(tx, position, &failure, now)?;
            }
        }
    }
    Ok(claimed)
}

type Loaded = Result<(Arc<StoredMessage>, OperationId), String>;

fn load_message(tx: &Transaction<'_>, position: i64, idx: i64) -> Result<Loaded, Error> {
    let row = tx
        .prepare_cached(
            "SELECT m.id, m.event_type, m.module, m.payload, m.headers, c.op_id
             FROM messages m JOIN commits c ON c.position = m.position
             WHERE m.position = ?1 AND m.idx = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![position, idx], |r| {
                Ok((MessageRow::read(r, 0)?, r.get::<_, Vec<u8>>(5)?))
            })
            .optional()
        })
        .map_err(sql("reading a message"))?;
    let Some((message, op)) = row else {
        return Ok(Err(format!(
            "message {idx} of commit {position} is missing"
        )));
    };
    let op = match op_id(&op) {
        Ok(op) => op,
        Err(e) => return Ok(Err(e.to_string())),
    };
    Ok(message.parse().map(|m| (Arc::new(m), op)))
}

fn prune_keep(
    tx: &Transaction<'_>,
    what: &str,
    keep: &txbus_core::Keep,
    now: i64,
) -> Result<u64, Error> {
    let cutoff = now - ms(keep.max_age);
    let keep_n = i64::try_from(keep.max_count).unwrap_or(i64::MAX);
    let (by_count, by_age) = match what {
        "succeeded" => (
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE status = 2 ORDER BY updated_at DESC, id DESC LIMIT ?2 OFFSET ?1)",
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE status = 2 AND updated_at < ?1 LIMIT ?2)",
        ),
        "failed" => (
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE status IN (3, 4) ORDER BY updated_at DESC, id DESC LIMIT ?2 OFFSET ?1)",
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE status IN (3, 4) AND updated_at < ?1 LIMIT ?2)",
        ),
        _ => (
            "UPDATE commits SET op_status = 3, op_error = NULL WHERE position IN (
                 SELECT position FROM commits WHERE op_status IN (1, 2)
                 ORDER BY op_finished_at DESC, position DESC LIMIT ?2 OFFSET ?1)",
            "UPDATE commits SET op_status = 3, op_error = NULL WHERE position IN (
                 SELECT position FROM commits WHERE op_status IN (1, 2) AND op_finished_at < ?1 LIMIT ?2)",
        ),
    };
    let a = tx
        .prepare_cached(by_count)
        .and_then(|mut s| s.execute(params![keep_n, PRUNE_CHUNK]))
        .map_err(sql("pruning by count"))?;
    let b = tx
        .prepare_cached(by_age)
        .and_then(|mut s| s.execute(params![cutoff, PRUNE_CHUNK]))
        .map_err(sql("pruning by age"))?;
    Ok((a + b) as u64)
}

/// One bounded pruning step; the caller repeats it while it removes a full chunk.
fn prune(tx: &Transaction<'_>, r: &Retention, now: i64) -> Result<PruneReport, Error> {
    Ok(PruneReport {
        succeeded: prune_keep(tx, "succeeded", &r.succeeded, now)?,
        failed: prune_keep(tx, "failed", &r.failed, now)?,
        outcomes: prune_keep(tx, "outcomes", &r.outcomes, now)?,
    })
}

/// The most rows one pruning step may remove per kind.
pub(crate) const PRUNE_STEP_MAX: u64 = 2 * PRUNE_CHUNK as u64;
