//! Recording attempts: success, retry or failure, fenced, and the operation's outcome.

use rusqlite::{params, OptionalExtension, Transaction};
use txbus_core::store::{Completion, CompletionEffect, Conflict, DeliveryResult, Error};
use txbus_core::{Failure, Outcome};

use crate::error::sql;
use crate::inline;
use crate::row::op_id;
use crate::schema::{op_status, status};
use crate::writer::State;

pub(crate) fn complete(
    tx: &Transaction<'_>,
    state: &State,
    completions: &[Completion],
    now: i64,
) -> Result<Vec<CompletionEffect>, Error> {
    let mut effects = Vec::with_capacity(completions.len());
    for c in completions {
        let pos = i64::try_from(c.commit_id).unwrap_or(i64::MAX);
        // A delivery still open on its commit row holds its first lease (fence 1). Its
        // success is one update of that row; anything else gives it its row first.
        if c.fence == 1 {
            if let DeliveryResult::Succeeded = c.result {
                if let Some(effect) = succeed_inline(tx, state, c, pos, now)? {
                    effects.push(effect);
                    continue;
                }
            } else {
                inline::materialize_one(tx, pos, c.delivery_id, now)?;
            }
        }
        let effect = match &c.result {
            DeliveryResult::Succeeded => {
                // Below the retention floor the row is already past retention: remove it.
                let n = if c.delivery_id < state.succeeded_floor {
                    tx.prepare_cached("DELETE FROM deliveries WHERE id = ?1 AND fence = ?2 AND status = 1")
                        .and_then(|mut s| s.execute(params![c.delivery_id, c.fence]))
                } else {
                    tx.prepare_cached(
                        "UPDATE deliveries SET status = 2, attempts = ?3, owner = NULL, last_error = NULL, updated_at = ?4
                         WHERE id = ?1 AND fence = ?2 AND status = 1",
                    )
                    .and_then(|mut s| s.execute(params![c.delivery_id, c.fence, c.attempts, now]))
                }
                .map_err(sql("recording a success"))?;
                if n == 0 {
                    CompletionEffect::Stale
                } else {
                    let done: Option<(i64, Vec<u8>)> = tx
                        .prepare_cached(
                            "UPDATE commits SET op_remaining = op_remaining - 1,
                                 op_status = CASE WHEN op_remaining > 1 THEN 0 WHEN ?3 THEN 3 ELSE 1 END,
                                 op_finished_at = CASE WHEN op_remaining <= 1 THEN ?2 ELSE NULL END
                             WHERE position = ?1 AND op_status = 0
                             RETURNING op_status, op_id",
                        )
                        .and_then(|mut s| {
                            s.query_row(params![pos, now, pos < state.outcome_floor], |r| Ok((r.get(0)?, r.get(1)?)))
                                .optional()
                        })
                        .map_err(sql("updating an operation"))?;
                    CompletionEffect::Applied(match done {
                        Some((st, id)) if st != op_status::PENDING => Some(Outcome {
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
                    CompletionEffect::Applied(fail_operation(tx, state, pos, failure, now)?)
                }
            }
        };
        effects.push(effect);
    }
    Ok(effects)
}

/// `first_delivery`, `inline_open`, `inline_done`, `op_status`, `op_remaining`, `op_id`.
type OperationRow = (Option<i64>, i64, i64, i64, i64, Vec<u8>);

/// Records the success of a delivery that is open on its commit row: clears its open bit,
/// keeps it as succeeded (unless that is already past retention), and counts it off its
/// operation — one row read, one row written. `None` when it is not open there.
///
/// The row is read and then written with the values worked out here rather than updated with
/// `RETURNING`, which SQLite serves through a temporary table on every call.
fn succeed_inline(
    tx: &Transaction<'_>,
    state: &State,
    c: &Completion,
    pos: i64,
    now: i64,
) -> Result<Option<CompletionEffect>, Error> {
    let row: Option<OperationRow> = tx
        .prepare_cached(
            "SELECT first_delivery, inline_open, inline_done, op_status, op_remaining, op_id
             FROM commits WHERE position = ?1",
        )
        .and_then(|mut s| {
            s.query_row([pos], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .optional()
        })
        .map_err(sql("reading an operation"))?;
    let Some((Some(first), open, done, op, remaining, id)) = row else {
        return Ok(None);
    };
    let offset = c.delivery_id - first;
    if !(0..inline::MAX_INLINE as i64).contains(&offset) {
        return Ok(None);
    }
    let b = inline::bit(offset as u32);
    if open & b == 0 {
        return Ok(None);
    }
    // Below the retention floor the success is already past retention: it is not kept.
    let done = if pos < state.succeeded_floor_pos {
        done
    } else {
        done | b
    };
    // The operation counts this delivery off only while it is pending (a failed one keeps
    // its count); the last one finishes it.
    let (op, remaining, finished_at, finished) = if op != op_status::PENDING {
        (op, remaining, None, false)
    } else if remaining > 1 {
        (op_status::PENDING, remaining - 1, None, false)
    } else {
        let st = if pos < state.outcome_floor {
            op_status::PRUNED
        } else {
            op_status::SUCCEEDED
        };
        (st, 0, Some(now), true)
    };
    tx.prepare_cached(
        "UPDATE commits SET inline_open = ?2, inline_done = ?3, op_status = ?4, op_remaining = ?5,
                            op_finished_at = COALESCE(?6, op_finished_at)
         WHERE position = ?1",
    )
    .and_then(|mut s| s.execute(params![pos, open & !b, done, op, remaining, finished_at]))
    .map_err(sql("recording a success"))?;
    Ok(Some(CompletionEffect::Applied(if finished {
        Some(Outcome {
            operation_id: op_id(&id)?,
            error: None,
            finished_at_ms: now,
        })
    } else {
        None
    })))
}

/// Checks, without writing, that every completion's attempt still holds its lease: a commit
/// that carries acknowledgements is refused with [`Conflict::Lease`] before it writes anything
/// when one does not.
pub(crate) fn check_leases(tx: &Transaction<'_>, completions: &[Completion]) -> Result<(), Error> {
    for c in completions {
        let pos = i64::try_from(c.commit_id).unwrap_or(i64::MAX);
        let current = (c.fence == 1 && inline::is_open(tx, pos, c.delivery_id)?)
            || tx
                .prepare_cached(
                    "SELECT 1 FROM deliveries WHERE id = ?1 AND fence = ?2 AND status = 1",
                )
                .and_then(|mut s| s.exists(params![c.delivery_id, c.fence]))
                .map_err(sql("checking a lease"))?;
        if !current {
            return Err(Error::Conflict(Conflict::Lease {
                delivery_id: c.delivery_id,
            }));
        }
    }
    Ok(())
}

pub(crate) fn fail_operation(
    tx: &Transaction<'_>,
    state: &State,
    pos: i64,
    failure: &Failure,
    now: i64,
) -> Result<Option<Outcome>, Error> {
    let error = serde_json::to_string(failure)
        .map_err(|e| Error::Corrupt(format!("failure does not serialize: {e}")))?;
    let id: Option<Vec<u8>> = tx
        .prepare_cached(
            "UPDATE commits SET op_status = ?4, op_error = CASE WHEN ?4 = 2 THEN ?2 END, op_finished_at = ?3
             WHERE position = ?1 AND op_status = 0 RETURNING op_id",
        )
        .and_then(|mut s| {
            // Below the retention floor the outcome is already past retention.
            let st = if pos < state.outcome_floor { op_status::PRUNED } else { op_status::FAILED };
            s.query_row(params![pos, error, now, st], |r| r.get(0)).optional()
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
