//! Retention: removing finished deliveries and outcomes beyond their bounds, in small steps.
//!
//! Succeeded deliveries and outcomes have no index of their own: one would cost every
//! acknowledgement an extra index write. Instead the writer keeps a floor for each: everything
//! below it has been pruned, and whatever finishes below it later is dropped as it finishes.
//! The read connection works out how far the floors may move (so the writer never scans); the
//! writer moves them in bounded steps. Failed deliveries are rare and keep a partial index, so
//! their bounds are exact by finish time.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use txbus_core::inspect::Tally;
use txbus_core::store::Error;
use txbus_core::{Keep, PruneReport, Retention};

use crate::error::sql;
use crate::writer::{ms, State};

/// Ids and positions below which finished work may go.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bounds {
    /// Succeeded delivery rows with a smaller id are past retention.
    pub(crate) succeeded_below: i64,
    /// Succeeded deliveries kept on the rows of commits at a smaller position are past
    /// retention.
    pub(crate) succeeded_below_pos: i64,
    /// Outcomes of commits at a smaller position are past retention.
    pub(crate) outcomes_below: i64,
}

/// One pruning step's result.
pub(crate) struct Step {
    pub(crate) report: PruneReport,
    /// The dead letters it removed, for the counters.
    pub(crate) tally: Tally,
    /// True when the bounds are not reached yet: call again.
    pub(crate) more: bool,
}

/// Rows (ids or positions) one step covers at most.
const SPAN: i64 = 5_000;

fn one_i64(c: &Connection, q: &str, p: impl rusqlite::Params) -> Result<Option<i64>, Error> {
    c.prepare_cached(q)
        .and_then(|mut s| s.query_row(p, |r| r.get::<_, Option<i64>>(0)).optional())
        .map(Option::flatten)
        .map_err(sql("computing retention bounds"))
}

/// The smallest key in `lo..=hi` whose value (non-decreasing in the key) is at least `target`,
/// or `hi + 1` when there is none.
fn first_at_least(
    lo: i64,
    hi: i64,
    target: i64,
    value_at: impl Fn(i64) -> Result<Option<i64>, Error>,
) -> Result<i64, Error> {
    let (mut lo, mut hi) = (lo, hi + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match value_at(mid)? {
            Some(v) if v >= target => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// The first position committed at or after `cutoff` (commit times follow positions).
fn first_position_since(c: &Connection, cutoff: i64) -> Result<i64, Error> {
    let (Some(lo), Some(hi)) = (
        one_i64(c, "SELECT MIN(position) FROM commits", [])?,
        one_i64(c, "SELECT MAX(position) FROM commits", [])?,
    ) else {
        return Ok(0);
    };
    first_at_least(lo, hi, cutoff, |p| {
        one_i64(
            c,
            "SELECT created_at FROM commits WHERE position >= ?1 ORDER BY position LIMIT 1",
            [p],
        )
    })
}

/// The first delivery id whose commit is at or after `position` (ids follow positions).
fn first_delivery_from(c: &Connection, position: i64) -> Result<i64, Error> {
    let (Some(lo), Some(hi)) = (
        one_i64(c, "SELECT MIN(id) FROM deliveries", [])?,
        one_i64(c, "SELECT MAX(id) FROM deliveries", [])?,
    ) else {
        return Ok(0);
    };
    first_at_least(lo, hi, position, |id| {
        one_i64(
            c,
            "SELECT position FROM deliveries WHERE id >= ?1 ORDER BY id LIMIT 1",
            [id],
        )
    })
}

/// The first delivery id of the commits at or after `position` (ids follow positions).
fn first_commit_delivery_from(c: &Connection, position: i64) -> Result<Option<i64>, Error> {
    one_i64(
        c,
        "SELECT first_delivery FROM commits WHERE position >= ?1 AND first_delivery IS NOT NULL
         ORDER BY position LIMIT 1",
        [position],
    )
}

/// By count: walking back from the newest commit, the first (position, delivery id) at which
/// more than `keep` succeeded deliveries — rows and those kept on commit rows — lie at or
/// above; everything below it goes, so at most `keep` are kept. Whole commits are kept or go
/// together. `(0, 0)` when there are no more than `keep`.
fn succeeded_by_count(c: &Connection, keep: u64) -> Result<(i64, i64), Error> {
    let mut commits = c
        .prepare_cached(
            "SELECT position, first_delivery, delivery_count, inline_done FROM commits
             WHERE first_delivery IS NOT NULL ORDER BY position DESC",
        )
        .map_err(sql("computing retention bounds"))?;
    let mut rows = c
        .prepare_cached("SELECT COUNT(*) FROM deliveries WHERE id >= ?1 AND id < ?2 AND status = 2")
        .map_err(sql("computing retention bounds"))?;
    let mut walk = commits
        .query([])
        .map_err(sql("computing retention bounds"))?;
    let mut kept = 0u64;
    while let Some(r) = walk.next().map_err(sql("computing retention bounds"))? {
        let (position, first, n, done): (i64, i64, i64, i64) =
            (|| Ok::<_, rusqlite::Error>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))()
                .map_err(sql("computing retention bounds"))?;
        let in_rows: i64 = rows
            .query_row(params![first, first + n], |r| r.get(0))
            .map_err(sql("computing retention bounds"))?;
        kept += u64::from(done.count_ones()) + u64::try_from(in_rows).unwrap_or(0);
        if kept > keep {
            return Ok((position + 1, first + n));
        }
    }
    Ok((0, 0))
}

/// Works out the bounds on the read connection: by count, the newest `max_count` are kept;
/// by age, what was committed before `now - max_age` goes. The larger bound wins.
pub(crate) fn bounds(c: &Connection, r: &Retention, now: i64) -> Result<Bounds, Error> {
    let count = |keep: &Keep| i64::try_from(keep.max_count).unwrap_or(i64::MAX);
    let (by_count_pos, by_count_id) = succeeded_by_count(c, r.succeeded.max_count)?;
    let by_age_pos = first_position_since(c, now - ms(r.succeeded.max_age))?;
    // Rows of commits written before deliveries had id ranges are found by their own ids.
    let by_age_id = match first_commit_delivery_from(c, by_age_pos)? {
        Some(id) => id.min(first_delivery_from(c, by_age_pos)?),
        None => first_delivery_from(c, by_age_pos)?,
    };
    let outcomes_by_count = one_i64(
        c,
        "SELECT position FROM commits WHERE op_status IN (1, 2) ORDER BY position DESC LIMIT 1 OFFSET ?1",
        [count(&r.outcomes)],
    )?
    .map_or(0, |p| p + 1);
    let outcomes_by_age = first_position_since(c, now - ms(r.outcomes.max_age))?;
    Ok(Bounds {
        succeeded_below: by_count_id.max(by_age_id),
        succeeded_below_pos: by_count_pos.max(by_age_pos),
        outcomes_below: outcomes_by_count.max(outcomes_by_age),
    })
}

/// One bounded step on the writer: moves the floors towards the bounds and prunes failed
/// deliveries beyond their own bounds.
pub(crate) fn step(
    tx: &Transaction<'_>,
    state: &mut State,
    bounds: &Bounds,
    failed: &Keep,
    now: i64,
) -> Result<Step, Error> {
    let mut report = PruneReport::default();
    let mut more = false;
    if state.succeeded_floor < bounds.succeeded_below {
        let end = bounds
            .succeeded_below
            .min(state.succeeded_floor.saturating_add(SPAN));
        report.succeeded = tx
            .prepare_cached("DELETE FROM deliveries WHERE id >= ?1 AND id < ?2 AND status = 2")
            .and_then(|mut s| s.execute(params![state.succeeded_floor, end]))
            .map_err(sql("pruning succeeded deliveries"))? as u64;
        state.succeeded_floor = end;
        more |= end < bounds.succeeded_below;
    }
    if state.succeeded_floor_pos < bounds.succeeded_below_pos {
        let end = bounds
            .succeeded_below_pos
            .min(state.succeeded_floor_pos.saturating_add(SPAN));
        let range = params![state.succeeded_floor_pos, end];
        let done: Vec<i64> = tx
            .prepare_cached(
                "SELECT inline_done FROM commits
                 WHERE position >= ?1 AND position < ?2 AND inline_done != 0",
            )
            .and_then(|mut s| s.query_map(range, |r| r.get(0))?.collect())
            .map_err(sql("pruning succeeded deliveries"))?;
        if !done.is_empty() {
            tx.prepare_cached(
                "UPDATE commits SET inline_done = 0
                 WHERE position >= ?1 AND position < ?2 AND inline_done != 0",
            )
            .and_then(|mut s| s.execute(range))
            .map_err(sql("pruning succeeded deliveries"))?;
        }
        report.succeeded += done.iter().map(|d| u64::from(d.count_ones())).sum::<u64>();
        state.succeeded_floor_pos = end;
        more |= end < bounds.succeeded_below_pos;
    }
    if state.outcome_floor < bounds.outcomes_below {
        let end = bounds
            .outcomes_below
            .min(state.outcome_floor.saturating_add(SPAN));
        report.outcomes = tx
            .prepare_cached(
                "UPDATE commits SET op_status = 3, op_error = NULL
                 WHERE position >= ?1 AND position < ?2 AND op_status IN (1, 2)",
            )
            .and_then(|mut s| s.execute(params![state.outcome_floor, end]))
            .map_err(sql("pruning outcomes"))? as u64;
        state.outcome_floor = end;
        more |= end < bounds.outcomes_below;
    }
    let keep = i64::try_from(failed.max_count).unwrap_or(i64::MAX);
    let mut tally = Tally::new();
    let by_count = delete_failed(
        tx,
        "DELETE FROM deliveries WHERE id IN (
             SELECT id FROM deliveries WHERE status >= 3
             ORDER BY updated_at DESC, id DESC LIMIT ?2 OFFSET ?1)
         RETURNING handler, status",
        params![keep, SPAN],
        &mut tally,
    )
    .map_err(sql("pruning failed deliveries by count"))?;
    let by_age = delete_failed(
        tx,
        "DELETE FROM deliveries WHERE id IN (
             SELECT id FROM deliveries WHERE status >= 3 AND updated_at < ?1 LIMIT ?2)
         RETURNING handler, status",
        params![now - ms(failed.max_age), SPAN],
        &mut tally,
    )
    .map_err(sql("pruning failed deliveries by age"))?;
    report.failed = (by_count + by_age) as u64;
    more |= by_count as i64 == SPAN || by_age as i64 == SPAN;
    report.expired_keys = crate::kv::prune_expired(tx, now, SPAN)?;
    more |= report.expired_keys as i64 == SPAN;
    Ok(Step {
        report,
        tally,
        more,
    })
}

/// Runs a delete of failed deliveries that returns their handler and status; counts the dead
/// letters among them in `tally`. Returns how many rows it removed.
fn delete_failed(
    tx: &Transaction<'_>,
    q: &str,
    p: impl rusqlite::Params,
    tally: &mut Tally,
) -> rusqlite::Result<usize> {
    let mut stmt = tx.prepare_cached(q)?;
    let mut rows = stmt.query(p)?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        n += 1;
        let (handler, status): (String, i64) = (r.get(0)?, r.get(1)?);
        if status == crate::schema::status::DEAD {
            tally.dead_removed(&handler, 1);
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::first_at_least;

    #[test]
    fn finds_the_first_key_at_or_above_the_target() {
        let values = [1, 3, 3, 5, 8];
        let at = |k: i64| Ok(values.get(k as usize).copied().map(i64::from));
        assert_eq!(first_at_least(0, 4, 0, at).unwrap(), 0);
        assert_eq!(first_at_least(0, 4, 3, at).unwrap(), 1);
        assert_eq!(first_at_least(0, 4, 4, at).unwrap(), 3);
        assert_eq!(first_at_least(0, 4, 8, at).unwrap(), 4);
        assert_eq!(first_at_least(0, 4, 9, at).unwrap(), 5);
    }
}
