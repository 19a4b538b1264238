//! Inspection: per-handler counters and per-minute buckets kept by the writer, and the
//! bounded, indexed reads behind [`txbus_core::inspect::Inspect`].
//!
//! Finished deliveries are counted, not looked for: the writer adds each batch's applied
//! completions (and dead letters replayed, discarded or pruned) to `inspect_counters` and
//! `inspect_minutes` in the batch's own transaction, one upsert per handler and minute
//! touched. Open deliveries (pending, leased) are counted through the partial index
//! `deliveries_open`, up to a cap. Operations are found by id through the unique index, and
//! listed by position within a bounded window; one operation's deliveries are found by a
//! binary search over delivery ids, which follow positions.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use txbus_core::inspect::{
    minute_of, minutes_floor, DeliveryDetail, DeliveryStatus, EventDetail, HandlerCounts,
    HandlerMinute, MinuteCounts, OperationDetail, OperationPage, OperationQuery, OperationStatus,
    OperationSummary, Tally, OPEN_COUNT_CAP, SEARCH_WINDOW,
};
use txbus_core::store::{CommitKind, DeadLetter, Error};
use txbus_core::{Failure, OperationId};

use crate::error::sql;
use crate::read::{dead_row, hash, DEAD_LETTER_COLUMNS};
use crate::row::{op_id, MessageRow};
use crate::writer::{Op, Out, Request};

/// The schema this module reads and writes (a migration of `schema.rs`): the counters, the
/// minute buckets, and the index of open deliveries by handler. Counters start from the
/// deliveries the store holds when it is migrated.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE inspect_counters (
    handler   TEXT    PRIMARY KEY,
    succeeded INTEGER NOT NULL,
    retried   INTEGER NOT NULL,
    rejected  INTEGER NOT NULL,
    died      INTEGER NOT NULL,
    dead      INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE inspect_minutes (
    minute    INTEGER NOT NULL,
    handler   TEXT    NOT NULL,
    succeeded INTEGER NOT NULL,
    retried   INTEGER NOT NULL,
    rejected  INTEGER NOT NULL,
    died      INTEGER NOT NULL,
    PRIMARY KEY (minute, handler)
) WITHOUT ROWID;

INSERT INTO inspect_counters (handler, succeeded, retried, rejected, died, dead)
SELECT handler, SUM(status = 2), 0, SUM(status = 3), SUM(status = 4), SUM(status = 4)
FROM deliveries WHERE status >= 2 GROUP BY handler;

CREATE INDEX deliveries_open ON deliveries (handler, status, next_at) WHERE status <= 1;
"#;

/// A dead-letter action, run by the writer.
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
}

impl Acted {
    pub(crate) fn ids(&self) -> Vec<i64> {
        self.done.iter().map(|(id, _)| *id).collect()
    }
}

/// Runs a dead-letter action in the writer's transaction.
pub(crate) fn act(tx: &Transaction<'_>, action: &Action, now: i64) -> Result<Acted, Error> {
    let mut acted = Acted::default();
    match action {
        Action::Replay(ids) => {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE deliveries SET status = 0, attempts = 0, owner = NULL, next_at = ?2,
                         last_error = NULL, updated_at = ?2
                     WHERE id = ?1 AND status = 4 RETURNING handler",
                )
                .map_err(sql("preparing a replay"))?;
            for &id in ids {
                let handler: Option<String> = stmt
                    .query_row(params![id, now], |r| r.get(0))
                    .optional()
                    .map_err(sql("replaying a dead letter"))?;
                acted.done.extend(handler.map(|h| (id, h)));
            }
        }
        Action::Discard(ids) => {
            let mut stmt = tx
                .prepare_cached(
                    "DELETE FROM deliveries WHERE id = ?1 AND status = 4 RETURNING handler",
                )
                .map_err(sql("preparing a discard"))?;
            for &id in ids {
                let handler: Option<String> = stmt
                    .query_row([id], |r| r.get(0))
                    .optional()
                    .map_err(sql("discarding a dead letter"))?;
                acted.done.extend(handler.map(|h| (id, h)));
            }
        }
    }
    Ok(acted)
}

/// Counts what the batch did and writes it to the counters and minute buckets, in the batch's
/// transaction: the writer calls it once per batch, after every request is applied.
pub(crate) fn record_batch(
    tx: &Transaction<'_>,
    batch: &[Request],
    outs: &[Result<Out, Error>],
    now: i64,
) -> Result<(), Error> {
    let mut tally = Tally::new();
    for (req, out) in batch.iter().zip(outs) {
        match (&req.op, out) {
            (Op::Complete(completions), Ok(Out::Complete(effects))) => {
                tally.completions(completions, effects);
            }
            (Op::Append(commit, _), Ok(Out::Append(receipt))) => {
                tally.completions(&commit.acks, &receipt.acked);
            }
            (Op::Inspect(_), Ok(Out::Acted(acted))) => {
                for (_, handler) in &acted.done {
                    tally.dead_removed(handler, 1);
                }
            }
            (Op::Prune { .. }, Ok(Out::Prune(step))) => tally.merge(&step.tally),
            _ => {}
        }
    }
    write(tx, &tally, now)
}

/// Writes a tally: one upsert per handler and one per (minute, handler), then removes the
/// buckets that are past [`txbus_core::inspect::MINUTES_KEPT`].
pub(crate) fn write(tx: &Transaction<'_>, tally: &Tally, now: i64) -> Result<(), Error> {
    if tally.is_empty() {
        return Ok(());
    }
    let minute = minute_of(now);
    let mut counters = tx
        .prepare_cached(
            "INSERT INTO inspect_counters (handler, succeeded, retried, rejected, died, dead)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (handler) DO UPDATE SET
                 succeeded = succeeded + excluded.succeeded, retried = retried + excluded.retried,
                 rejected = rejected + excluded.rejected, died = died + excluded.died,
                 dead = dead + excluded.dead",
        )
        .map_err(sql("preparing the counter update"))?;
    let mut minutes = tx
        .prepare_cached(
            "INSERT INTO inspect_minutes (minute, handler, succeeded, retried, rejected, died)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (minute, handler) DO UPDATE SET
                 succeeded = succeeded + excluded.succeeded, retried = retried + excluded.retried,
                 rejected = rejected + excluded.rejected, died = died + excluded.died",
        )
        .map_err(sql("preparing the minute update"))?;
    let mut touched_minute = false;
    for (handler, d) in tally.deltas() {
        counters
            .execute(params![
                handler,
                d.succeeded,
                d.retried,
                d.rejected,
                d.died,
                d.dead
            ])
            .map_err(sql("updating the counters"))?;
        if d.touches_minute() {
            touched_minute = true;
            minutes
                .execute(params![
                    minute,
                    handler,
                    d.succeeded,
                    d.retried,
                    d.rejected,
                    d.died
                ])
                .map_err(sql("updating a minute bucket"))?;
        }
    }
    if touched_minute {
        tx.prepare_cached("DELETE FROM inspect_minutes WHERE minute < ?1")
            .and_then(|mut s| s.execute([minutes_floor(now)]))
            .map_err(sql("removing old minute buckets"))?;
    }
    Ok(())
}

/// Counts one delivery dead-lettered outside of a completion (when it is claimed and its
/// message cannot be read back): rare, so written at once.
pub(crate) fn died(tx: &Transaction<'_>, handler: &str, now: i64) -> Result<(), Error> {
    let mut tally = Tally::new();
    tally.died(handler);
    write(tx, &tally, now)
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Handlers are listed up to this many.
const MAX_HANDLERS: usize = 10_000;

pub(crate) fn handler_counts(c: &Connection) -> Result<Vec<HandlerCounts>, Error> {
    let mut by_name: std::collections::BTreeMap<String, HandlerCounts> = c
        .prepare_cached(
            "SELECT handler, succeeded, retried, rejected, died, dead FROM inspect_counters
             ORDER BY handler LIMIT ?1",
        )
        .and_then(|mut s| {
            s.query_map([MAX_HANDLERS as i64], |r| {
                Ok(HandlerCounts {
                    handler: r.get(0)?,
                    succeeded: count(r.get(1)?),
                    retried: count(r.get(2)?),
                    rejected: count(r.get(3)?),
                    died: count(r.get(4)?),
                    dead: count(r.get(5)?),
                    ..HandlerCounts::default()
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql("reading the counters"))?
        .into_iter()
        .map(|h| (h.handler.clone(), h))
        .collect();
    // Handlers with open deliveries, one index seek each (a loose index scan).
    let mut next = c
        .prepare_cached(
            "SELECT handler FROM deliveries WHERE status <= 1 AND handler > ?1
             ORDER BY handler LIMIT 1",
        )
        .map_err(sql("preparing the open-handler query"))?;
    let mut after = String::new();
    for _ in 0..MAX_HANDLERS {
        let found: Option<String> = next
            .query_row([&after], |r| r.get(0))
            .optional()
            .map_err(sql("listing handlers with open deliveries"))?;
        let Some(handler) = found else { break };
        by_name
            .entry(handler.clone())
            .or_insert_with(|| HandlerCounts {
                handler: handler.clone(),
                ..HandlerCounts::default()
            });
        after = handler;
    }
    // Deliveries open on their commit rows are leased: found through the partial index of
    // commits with open ones (as many as the running buses hold in memory).
    let mut inline_leased: std::collections::HashMap<String, u64> = Default::default();
    {
        let mut stmt = c
            .prepare_cached(
                "SELECT position, inline, inline_open FROM commits WHERE inline_open != 0 LIMIT ?1",
            )
            .map_err(sql("preparing the inline delivery query"))?;
        let mut rows = stmt
            .query([i64::try_from(OPEN_COUNT_CAP).unwrap_or(i64::MAX)])
            .map_err(sql("reading inline deliveries"))?;
        while let Some(r) = rows.next().map_err(sql("reading inline deliveries"))? {
            let (position, list, open): (i64, Option<String>, i64) = (
                r.get(0).map_err(sql("reading inline deliveries"))?,
                r.get(1).map_err(sql("reading inline deliveries"))?,
                r.get(2).map_err(sql("reading inline deliveries"))?,
            );
            for e in crate::inline::decode(position, list.as_deref().unwrap_or("[]"))? {
                if open & crate::inline::bit(e.offset) != 0 {
                    *inline_leased.entry(e.handler).or_default() += 1;
                }
            }
        }
    }
    for handler in inline_leased.keys() {
        by_name
            .entry(handler.clone())
            .or_insert_with(|| HandlerCounts {
                handler: handler.clone(),
                ..HandlerCounts::default()
            });
    }
    // The repeated `status <= 1` lets the planner use the partial index.
    let mut open = c
        .prepare_cached(
            "SELECT
                 (SELECT COUNT(*) FROM (SELECT 1 FROM deliveries
                      WHERE handler = ?1 AND status = 0 AND status <= 1 LIMIT ?2)),
                 (SELECT COUNT(*) FROM (SELECT 1 FROM deliveries
                      WHERE handler = ?1 AND status = 1 AND status <= 1 LIMIT ?2)),
                 (SELECT MIN(next_at) FROM deliveries
                      WHERE handler = ?1 AND status = 0 AND status <= 1)",
        )
        .map_err(sql("preparing the open-delivery counts"))?;
    let cap = i64::try_from(OPEN_COUNT_CAP).unwrap_or(i64::MAX);
    for h in by_name.values_mut() {
        let (pending, leased, oldest): (i64, i64, Option<i64>) = open
            .query_row(params![h.handler, cap], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sql("counting open deliveries"))?;
        let inline = inline_leased.get(&h.handler).copied().unwrap_or(0);
        h.pending = count(pending);
        h.leased = (count(leased) + inline).min(OPEN_COUNT_CAP);
        h.open_capped = pending >= cap || leased >= cap || h.leased >= OPEN_COUNT_CAP;
        h.oldest_pending_due_ms = oldest;
    }
    Ok(by_name.into_values().collect())
}

pub(crate) fn minutes(
    c: &Connection,
    since_ms: i64,
    handler: Option<&str>,
) -> Result<Vec<HandlerMinute>, Error> {
    c.prepare_cached(
        "SELECT minute, handler, succeeded, retried, rejected, died FROM inspect_minutes
         WHERE minute >= ?1 AND (?2 IS NULL OR handler = ?2) ORDER BY minute, handler LIMIT ?3",
    )
    .and_then(|mut s| {
        s.query_map(
            params![since_ms, handler, (MAX_HANDLERS * 60) as i64],
            |r| {
                Ok(HandlerMinute {
                    handler: r.get(1)?,
                    counts: MinuteCounts {
                        minute_ms: r.get(0)?,
                        succeeded: count(r.get(2)?),
                        retried: count(r.get(3)?),
                        rejected: count(r.get(4)?),
                        died: count(r.get(5)?),
                    },
                })
            },
        )?
        .collect()
    })
    .map_err(sql("reading minute buckets"))
}

pub(crate) fn head(c: &Connection) -> Result<u64, Error> {
    c.prepare_cached("SELECT COALESCE(MAX(position), 0) FROM commits")
        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
        .map(count)
        .map_err(sql("reading the head of the log"))
}

fn one(c: &Connection, q: &str, p: impl rusqlite::Params) -> Result<Option<i64>, Error> {
    c.prepare_cached(q)
        .and_then(|mut s| s.query_row(p, |r| r.get::<_, Option<i64>>(0)).optional())
        .map(Option::flatten)
        .map_err(sql("searching the log"))
}

/// The first position whose commit was made at or after `at_ms` (commit times follow
/// positions on this store), by binary search; one past the end when there is none.
fn first_position_at(c: &Connection, at_ms: i64) -> Result<i64, Error> {
    let (Some(mut lo), Some(hi)) = (
        one(c, "SELECT MIN(position) FROM commits", [])?,
        one(c, "SELECT MAX(position) FROM commits", [])?,
    ) else {
        return Ok(1);
    };
    let mut hi = hi + 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let created = one(
            c,
            "SELECT created_at FROM commits WHERE position >= ?1 ORDER BY position LIMIT 1",
            [mid],
        )?;
        match created {
            Some(t) if t >= at_ms => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

const SUMMARY_COLUMNS: &str = "c.position, c.op_id, c.kind, c.created_at, c.message_count,
     c.op_status, c.op_remaining, c.op_error, c.op_finished_at,
     (SELECT m.event_type FROM messages m WHERE m.position = c.position AND m.idx = 0)";

struct SummaryRow {
    position: i64,
    op: Vec<u8>,
    kind: i64,
    created_at: i64,
    message_count: i64,
    status: i64,
    remaining: i64,
    error: Option<String>,
    finished_at: Option<i64>,
    first_event_type: Option<String>,
}

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SummaryRow> {
    Ok(SummaryRow {
        position: r.get(0)?,
        op: r.get(1)?,
        kind: r.get(2)?,
        created_at: r.get(3)?,
        message_count: r.get(4)?,
        status: r.get(5)?,
        remaining: r.get(6)?,
        error: r.get(7)?,
        finished_at: r.get(8)?,
        first_event_type: r.get(9)?,
    })
}

impl SummaryRow {
    fn into_summary(self) -> Result<OperationSummary, Error> {
        let position = self.position;
        let status = OperationStatus::from_code(self.status).ok_or_else(|| {
            Error::Corrupt(format!(
                "commit {position}: unknown operation status {}",
                self.status
            ))
        })?;
        let failure = match (&self.error, status) {
            (Some(text), OperationStatus::Failed) => {
                Some(serde_json::from_str::<Failure>(text).map_err(|e| {
                    Error::Corrupt(format!(
                        "commit {position}: stored failure is unreadable: {e}"
                    ))
                })?)
            }
            _ => None,
        };
        Ok(OperationSummary {
            operation_id: op_id(&self.op)?,
            commit_id: count(position),
            position: Some(count(position)),
            kind: CommitKind::from_u8(u8::try_from(self.kind).unwrap_or(0)).ok_or_else(|| {
                Error::Corrupt(format!("commit {position}: unknown kind {}", self.kind))
            })?,
            created_at_ms: self.created_at,
            status,
            remaining: u32::try_from(self.remaining).unwrap_or(0),
            finished_at_ms: self.finished_at,
            message_count: u32::try_from(self.message_count).unwrap_or(0),
            first_event_type: self.first_event_type,
            failure,
        })
    }
}

pub(crate) fn operations(c: &Connection, q: &OperationQuery) -> Result<OperationPage, Error> {
    let limit = q.page_size();
    let mut below = q
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    if let Some(to) = q.to_ms {
        below = below.min(first_position_at(c, to)?);
    }
    let floor = match q.from_ms {
        Some(from) => first_position_at(c, from)?,
        None => 1,
    };
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM commits c
             WHERE c.position < ?1 AND c.position >= ?2 ORDER BY c.position DESC LIMIT ?3"
        ))
        .map_err(sql("preparing the operation search"))?;
    let window = i64::try_from(SEARCH_WINDOW).unwrap_or(i64::MAX);
    let mut rows = stmt
        .query(params![below, floor, window])
        .map_err(sql("searching operations"))?;
    let want = q.status.map(OperationStatus::code);
    let mut page = OperationPage::default();
    let mut scanned = 0usize;
    let mut lowest = below;
    while let Some(r) = rows.next().map_err(sql("reading an operation"))? {
        let row = summary_row(r).map_err(sql("reading an operation"))?;
        scanned += 1;
        lowest = row.position;
        if want.is_some_and(|s| s != row.status) {
            continue;
        }
        page.operations.push(row.into_summary()?);
        if page.operations.len() == limit {
            break;
        }
    }
    let more_below = lowest > floor;
    if more_below && (page.operations.len() == limit || scanned == SEARCH_WINDOW) {
        page.next_before = Some(count(lowest));
    }
    Ok(page)
}

/// Deliveries shown for one operation, at most.
const MAX_TREE_DELIVERIES: i64 = 10_000;

pub(crate) fn operation_detail(
    c: &Connection,
    id: OperationId,
) -> Result<Option<OperationDetail>, Error> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS}, c.data_hash, c.chain_hash FROM commits c WHERE c.op_id = ?1"
        ))
        .and_then(|mut s| {
            s.query_row([id.0.as_bytes()], |r| {
                Ok((
                    summary_row(r)?,
                    r.get::<_, Vec<u8>>(10)?,
                    r.get::<_, Vec<u8>>(11)?,
                ))
            })
            .optional()
        })
        .map_err(sql("reading an operation"))?;
    let Some((row, data, chain)) = row else {
        return Ok(None);
    };
    let position = row.position;
    let summary = row.into_summary()?;
    let messages: Vec<MessageRow> = c
        .prepare_cached(
            "SELECT id, event_type, module, payload, headers FROM messages
             WHERE position = ?1 ORDER BY idx",
        )
        .and_then(|mut s| {
            s.query_map([position], |r| MessageRow::read(r, 0))?
                .collect()
        })
        .map_err(sql("reading an operation's messages"))?;
    let mut events: Vec<EventDetail> = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(EventDetail {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                message: m.raw()?,
                deliveries: Vec::new(),
            })
        })
        .collect::<Result<_, Error>>()?;
    for d in deliveries_of(c, position)? {
        let (idx, detail) = d;
        if let Some(e) = usize::try_from(idx).ok().and_then(|i| events.get_mut(i)) {
            e.deliveries.push(detail);
        }
    }
    Ok(Some(OperationDetail {
        summary,
        data_hash: hash(data, position)?,
        chain_hash: Some(hash(chain, position)?),
        events,
    }))
}

/// The deliveries of the commit at `position`: those kept on its row (open, or succeeded and
/// not yet past retention), then those with rows of their own, in id order.
fn deliveries_of(c: &Connection, position: i64) -> Result<Vec<(i64, DeliveryDetail)>, Error> {
    let mut out = inline_deliveries_of(c, position)?;
    out.extend(row_deliveries_of(c, position)?);
    out.sort_by_key(|(_, d)| d.delivery_id);
    Ok(out)
}

/// `first_delivery`, `inline`, `inline_open`, `inline_done`, `created_at`, `op_finished_at`.
type InlineSummary = (Option<i64>, Option<String>, i64, i64, i64, Option<i64>);

/// The deliveries kept on the commit row at `position`. A succeeded one has no time of its
/// own: its operation's finish (or the commit's) stands for it.
fn inline_deliveries_of(
    c: &Connection,
    position: i64,
) -> Result<Vec<(i64, DeliveryDetail)>, Error> {
    let row: Option<InlineSummary> = c
        .prepare_cached(
            "SELECT first_delivery, inline, inline_open, inline_done, created_at, op_finished_at
             FROM commits WHERE position = ?1",
        )
        .and_then(|mut s| {
            s.query_row([position], |r| {
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
        .map_err(sql("reading a commit's inline deliveries"))?;
    let Some((Some(first), Some(list), open, done, created, finished)) = row else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in crate::inline::decode(position, &list)? {
        let b = crate::inline::bit(e.offset);
        let (status, attempts, updated) = if open & b != 0 {
            (DeliveryStatus::Leased, 0, created)
        } else if done & b != 0 {
            (DeliveryStatus::Succeeded, 1, finished.unwrap_or(created))
        } else {
            continue;
        };
        out.push((
            i64::from(e.idx),
            DeliveryDetail {
                delivery_id: first + i64::from(e.offset),
                handler: e.handler,
                status,
                attempts,
                interruptions: 0,
                last_error: None,
                next_at_ms: created,
                updated_at_ms: updated,
            },
        ));
    }
    Ok(out)
}

/// The deliveries of the commit at `position` that have rows: delivery ids follow positions,
/// so the commit's first id (or a binary search, for commits written before they were
/// recorded) finds the first, and they lie together from there.
fn row_deliveries_of(c: &Connection, position: i64) -> Result<Vec<(i64, DeliveryDetail)>, Error> {
    let (Some(mut lo), Some(hi)) = (
        one(c, "SELECT MIN(id) FROM deliveries", [])?,
        one(c, "SELECT MAX(id) FROM deliveries", [])?,
    ) else {
        return Ok(Vec::new());
    };
    if let Some(first) = one(
        c,
        "SELECT first_delivery FROM commits WHERE position = ?1",
        [position],
    )? {
        lo = lo.max(first);
    }
    let mut hi = hi + 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = one(
            c,
            "SELECT position FROM deliveries WHERE id >= ?1 ORDER BY id LIMIT 1",
            [mid],
        )?;
        match at {
            Some(p) if p >= position => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    let mut stmt = c
        .prepare_cached(
            "SELECT id, position, idx, handler, status, attempts, interruptions, last_error,
                    next_at, updated_at
             FROM deliveries WHERE id >= ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sql("preparing the delivery query"))?;
    let mut rows = stmt
        .query(params![lo, MAX_TREE_DELIVERIES])
        .map_err(sql("reading an operation's deliveries"))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sql("reading a delivery"))? {
        let at: i64 = r.get(1).map_err(sql("reading a delivery"))?;
        if at != position {
            break;
        }
        let code: i64 = r.get(4).map_err(sql("reading a delivery"))?;
        let id: i64 = r.get(0).map_err(sql("reading a delivery"))?;
        let status = DeliveryStatus::from_code(code)
            .ok_or_else(|| Error::Corrupt(format!("delivery {id}: unknown status {code}")))?;
        let detail = (|| -> rusqlite::Result<(i64, DeliveryDetail)> {
            Ok((
                r.get(2)?,
                DeliveryDetail {
                    delivery_id: id,
                    handler: r.get(3)?,
                    status,
                    attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    interruptions: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    last_error: r.get(7)?,
                    next_at_ms: r.get(8)?,
                    updated_at_ms: r.get(9)?,
                },
            ))
        })()
        .map_err(sql("reading a delivery"))?;
        out.push(detail);
    }
    Ok(out)
}

pub(crate) fn dead_letter(c: &Connection, id: i64) -> Result<Option<DeadLetter>, Error> {
    c.prepare_cached(&format!(
        "SELECT {DEAD_LETTER_COLUMNS}
         FROM deliveries d
         JOIN messages m ON m.position = d.position AND m.idx = d.idx
         JOIN commits c ON c.position = d.position
         WHERE d.id = ?1 AND d.status = 4"
    ))
    .and_then(|mut s| s.query_row([id], dead_row).optional())
    .map_err(sql("reading a dead letter"))?
    .map(crate::read::DeadRow::into_dead_letter)
    .transpose()
}

#[async_trait::async_trait]
impl txbus_core::Inspect for crate::SqliteStore {
    async fn handler_counts(&self) -> Result<Vec<HandlerCounts>, Error> {
        self.read(handler_counts).await
    }

    async fn minutes(
        &self,
        since_ms: i64,
        handler: Option<&str>,
    ) -> Result<Vec<HandlerMinute>, Error> {
        let handler = handler.map(str::to_owned);
        self.read(move |c| minutes(c, since_ms, handler.as_deref()))
            .await
    }

    async fn operations(&self, query: &OperationQuery) -> Result<OperationPage, Error> {
        let query = query.clone();
        self.read(move |c| operations(c, &query)).await
    }

    async fn operation_detail(&self, id: OperationId) -> Result<Option<OperationDetail>, Error> {
        self.read(move |c| operation_detail(c, id)).await
    }

    async fn dead_letter(&self, delivery_id: i64) -> Result<Option<DeadLetter>, Error> {
        self.read(move |c| dead_letter(c, delivery_id)).await
    }

    async fn replay_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        self.act_on(Action::Replay(ids.to_vec())).await
    }

    async fn discard_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        self.act_on(Action::Discard(ids.to_vec())).await
    }

    async fn head(&self) -> Result<u64, Error> {
        self.read(head).await
    }
}

impl crate::SqliteStore {
    async fn act_on(&self, action: Action) -> Result<Vec<i64>, Error> {
        let ids = match &action {
            Action::Replay(ids) | Action::Discard(ids) => ids,
        };
        txbus_core::inspect::check_action_ids(ids)?;
        if ids.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(c: &Connection, q: &str) -> String {
        let mut s = c.prepare(&format!("EXPLAIN QUERY PLAN {q}")).unwrap();
        let rows: Vec<String> = s
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows.join("\n")
    }

    #[test]
    fn open_counts_use_the_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("s.db")).unwrap();
        crate::schema::migrate(&mut c).unwrap();
        for q in [
            "SELECT handler FROM deliveries WHERE status <= 1 AND handler > 'a' ORDER BY handler LIMIT 1",
            "SELECT 1 FROM deliveries WHERE handler = 'a' AND status = 0 AND status <= 1 LIMIT 5",
            "SELECT MIN(next_at) FROM deliveries WHERE handler = 'a' AND status = 0 AND status <= 1",
        ] {
            let p = plan(&c, q);
            assert!(p.contains("deliveries_open"), "{q}: {p}");
        }
    }
}
