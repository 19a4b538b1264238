//! The writer: one thread owns the write connection and commits every request that is waiting
//! in one transaction (group commit), so many concurrent commits and acks share one fsync.

use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use txbus_core::chain::{self, Hash};
use txbus_core::store::{
    AppendReceipt, ClaimedDelivery, Completion, CompletionEffect, Error, NewCommit, OwnerId,
};
use txbus_core::Keep;

use crate::append::append;
use crate::claim::{claim, Claim};
use crate::complete::complete;
use crate::error::sql;
use crate::prune::{self, Bounds, Step};

/// A write to perform.
pub(crate) enum Op {
    /// A commit and its data hash (worked out by the caller's task, not the writer).
    Append(NewCommit, Hash),
    Complete(Vec<Completion>),
    Claim {
        owner: OwnerId,
        handlers: Vec<String>,
        limit: usize,
        lease_ttl: Duration,
    },
    Heartbeat(OwnerId),
    Release(OwnerId),
    Inspect(crate::inspect::Action),
    Prune {
        bounds: Bounds,
        failed: Keep,
    },
    Kv(Vec<txbus_core::KvWrite>),
}

/// A write's result.
pub(crate) enum Out {
    Append(AppendReceipt),
    Complete(Vec<CompletionEffect>),
    Claim(Vec<ClaimedDelivery>),
    Count(u64),
    Prune(Step),
    Acted(crate::inspect::Acted),
    Versions(Vec<u64>),
    Unit,
}

pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Out, Error>>,
}

/// What the writer tracks between transactions; a transaction works on a copy, kept only
/// when it commits.
#[derive(Clone, Copy)]
pub(crate) struct State {
    /// The last position in the log.
    pub(crate) position: u64,
    /// The last commit's chain hash.
    pub(crate) chain: Hash,
    /// The next delivery id.
    pub(crate) next_delivery_id: i64,
    /// Succeeded delivery rows below this id are past retention (see `prune`).
    pub(crate) succeeded_floor: i64,
    /// Succeeded deliveries kept on commit rows below this position are past retention.
    pub(crate) succeeded_floor_pos: i64,
    /// Outcomes of commits below this position are past retention.
    pub(crate) outcome_floor: i64,
}

pub(crate) struct Writer {
    conn: Connection,
    /// Wakes the checkpointer as transactions commit.
    nudge: crate::checkpoint::Nudge,
    signer: crate::commit_meta::SharedSigner,
    state: State,
    max_batch: usize,
    /// When the last scan for leases of dead owners ran.
    last_abandoned_scan: Option<Instant>,
}

pub(crate) use txbus_core::time::{millis as ms, now_ms};

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        max_batch: usize,
        signer: crate::commit_meta::SharedSigner,
        nudge: crate::checkpoint::Nudge,
    ) -> Result<Self, Error> {
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
        // Ids are taken by commits whether or not their deliveries have rows.
        let max_id: i64 = conn
            .query_row(
                "SELECT MAX(COALESCE((SELECT MAX(id) FROM deliveries), 0),
                            COALESCE((SELECT first_delivery + delivery_count - 1 FROM commits
                                      WHERE first_delivery IS NOT NULL
                                      ORDER BY position DESC LIMIT 1), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(sql("reading the last delivery id"))?;
        // Retention floors start at the oldest row still there, so that pruning never walks
        // ranges that are long gone.
        let succeeded_floor: i64 = conn
            .query_row(
                "SELECT COALESCE(MIN(id), ?1) FROM deliveries",
                [max_id + 1],
                |r| r.get(0),
            )
            .map_err(sql("reading the first delivery id"))?;
        let succeeded_floor_pos: i64 = conn
            .query_row(
                "SELECT COALESCE(MIN(position), ?1) FROM commits WHERE inline_done != 0",
                [i64::try_from(position)
                    .unwrap_or(i64::MAX)
                    .saturating_add(1)],
                |r| r.get(0),
            )
            .map_err(sql("reading the first succeeded inline delivery"))?;
        let outcome_floor: i64 = conn
            .query_row(
                "SELECT COALESCE(MIN(position), ?1) FROM commits WHERE op_status IN (0, 1, 2)",
                [i64::try_from(position)
                    .unwrap_or(i64::MAX)
                    .saturating_add(1)],
                |r| r.get(0),
            )
            .map_err(sql("reading the first outcome"))?;
        Ok(Self {
            conn,
            nudge,
            signer,
            state: State {
                position,
                chain,
                next_delivery_id: max_id + 1,
                succeeded_floor,
                succeeded_floor_pos,
                outcome_floor,
            },
            max_batch: max_batch.max(1),
            last_abandoned_scan: None,
        })
    }

    /// Serves requests until every sender is gone, then checkpoints the WAL.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let group_commits = txbus_core::metrics::GroupCommitMetrics::new("sqlite");
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            group_commits.record(batch.len());
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
                    let _ = req.reply.send(out);
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

    /// Applies the batch in one transaction; on any error nothing of it is kept, except a
    /// request's own conflict (or invalid input), found before it wrote anything: that fails
    /// the one request and the rest of the batch commits.
    fn apply_all(&mut self, batch: &[Request]) -> Result<Vec<Result<Out, Error>>, Error> {
        let mut state = self.state;
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
                Op::Append(commit, data) => match append(&tx, &mut state, commit, data, now) {
                    Ok(receipt) => Out::Append(receipt),
                    Err(e @ (Error::Conflict(_) | Error::Invalid(_))) => {
                        outs.push(Err(e));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Op::Kv(writes) => match crate::kv::check(&tx, writes, now) {
                    Ok(versions) => Out::Versions(crate::kv::apply(&tx, writes, &versions, now)?),
                    Err(e @ (Error::Conflict(_) | Error::Invalid(_))) => {
                        outs.push(Err(e));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Op::Complete(completions) => {
                    Out::Complete(complete(&tx, &state, completions, now)?)
                }
                Op::Claim {
                    owner,
                    handlers,
                    limit,
                    lease_ttl,
                } => {
                    let req = Claim {
                        owner: *owner,
                        handlers,
                        limit: *limit,
                        lease_ttl: *lease_ttl,
                    };
                    Out::Claim(claim(&tx, &state, &req, abandoned_due, now)?)
                }
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
                    crate::inline::materialize_owner(&tx, Some(owner), now)?;
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
                Op::Inspect(action) => Out::Acted(crate::inspect::act(&tx, action, now)?),
                Op::Prune { bounds, failed } => {
                    Out::Prune(prune::step(&tx, &mut state, bounds, failed, now)?)
                }
            };
            outs.push(Ok(out));
        }
        crate::inspect::record_batch(&tx, batch, &outs, now)?;
        let appended = state.position != self.state.position;
        crate::commit_meta::sign_last(&tx, &self.signer, appended, state.position, &state.chain)?;
        tx.commit().map_err(sql("committing"))?;
        self.nudge.committed();
        self.state = state;
        if abandoned_due {
            self.last_abandoned_scan = Some(Instant::now());
        }
        Ok(outs)
    }
}
