//! Deliveries kept on their commit's row.
//!
//! Most deliveries are leased, at commit time, to the bus that made the commit, and succeed on
//! their first attempt. Such a delivery needs no row of its own: its commit row records it
//! (its offset among the commit's delivery ids, its message, its handler) with a bit in
//! `inline_open` while it is leased and a bit in `inline_done` once it has succeeded (kept, as
//! a succeeded delivery, until retention prunes it). Its acknowledgement is one update of that
//! row, which the operation's own update needed anyway.
//!
//! Whatever needs more than that — a retry, a failure, a lease taken over or released, the
//! store opened after a crash — first *materializes* the delivery: its row is written as it
//! would have been at commit time (leased, fence 1, no attempt), its open bit cleared, and the
//! row's usual logic runs from there. So every guarantee of a delivery row holds, and rows
//! exist only for deliveries that need them.
//!
//! A commit's deliveries take consecutive ids from `first_delivery`, in the order the commit
//! listed them; inline ones are those at offsets below [`MAX_INLINE`].

use rusqlite::{params, OptionalExtension, Transaction};
use txbus_core::store::{Error, OwnerId};

use crate::error::sql;
use crate::schema::status;

/// Deliveries at offsets below this stay on the commit row; the others get rows. Bits 0..62
/// of a signed 64-bit integer, so that shifts never reach the sign bit.
pub(crate) const MAX_INLINE: usize = 62;

/// One inline delivery as the commit row lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its offset among the commit's delivery ids (its id is `first_delivery + offset`).
    pub(crate) offset: u32,
    /// The message's index in the commit.
    pub(crate) idx: u32,
    /// The handler.
    pub(crate) handler: String,
}

/// The stored list: `[[offset, idx, handler], …]`.
pub(crate) fn encode(entries: &[Entry]) -> String {
    let rows: Vec<(u32, u32, &str)> = entries
        .iter()
        .map(|e| (e.offset, e.idx, e.handler.as_str()))
        .collect();
    serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into())
}

/// Reads a stored list back.
pub(crate) fn decode(position: i64, text: &str) -> Result<Vec<Entry>, Error> {
    let rows: Vec<(u32, u32, String)> = serde_json::from_str(text).map_err(|e| {
        Error::Corrupt(format!(
            "commit {position}: its list of inline deliveries is unreadable: {e}"
        ))
    })?;
    Ok(rows
        .into_iter()
        .map(|(offset, idx, handler)| Entry {
            offset,
            idx,
            handler,
        })
        .collect())
}

/// The bit of `offset`.
pub(crate) fn bit(offset: u32) -> i64 {
    1i64 << offset
}

/// The commit row's inline columns.
struct Inline {
    first: i64,
    entries: Vec<Entry>,
    open: i64,
    owner: Option<Vec<u8>>,
}

/// `first_delivery`, `inline`, `inline_open`, `inline_owner` as stored.
type InlineColumns = (Option<i64>, Option<String>, i64, Option<Vec<u8>>);

fn load(tx: &Transaction<'_>, position: i64) -> Result<Option<Inline>, Error> {
    let row: Option<InlineColumns> = tx
        .prepare_cached(
            "SELECT first_delivery, inline, inline_open, inline_owner FROM commits
             WHERE position = ?1 AND inline_open != 0",
        )
        .and_then(|mut s| {
            s.query_row([position], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })
        .map_err(sql("reading a commit's inline deliveries"))?;
    let Some((Some(first), Some(text), open, owner)) = row else {
        return Ok(None);
    };
    Ok(Some(Inline {
        first,
        entries: decode(position, &text)?,
        open,
        owner,
    }))
}

/// Writes the rows of the open inline deliveries of the commit at `position` that `pick`
/// selects (by id), leased to the commit's owner as they were, and clears their open bits.
/// Returns how many it wrote.
fn materialize(
    tx: &Transaction<'_>,
    position: i64,
    now: i64,
    pick: impl Fn(i64) -> bool,
) -> Result<usize, Error> {
    let Some(inline) = load(tx, position)? else {
        return Ok(0);
    };
    let mut cleared = 0i64;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO deliveries (id, position, idx, handler, status, attempts, fence, owner,
                                     next_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, 1, ?6, ?7, ?7)",
        )
        .map_err(sql("preparing a delivery insert"))?;
    for e in &inline.entries {
        let id = inline.first + i64::from(e.offset);
        if inline.open & bit(e.offset) == 0 || !pick(id) {
            continue;
        }
        insert
            .execute(params![
                id,
                position,
                e.idx,
                e.handler,
                status::LEASED,
                inline.owner,
                now
            ])
            .map_err(sql("writing a delivery's row"))?;
        cleared |= bit(e.offset);
    }
    if cleared != 0 {
        tx.prepare_cached("UPDATE commits SET inline_open = inline_open & ~?2 WHERE position = ?1")
            .and_then(|mut s| s.execute(params![position, cleared]))
            .map_err(sql("clearing inline deliveries"))?;
    }
    Ok(cleared.count_ones() as usize)
}

/// Gives delivery `id` of the commit at `position` its row, if it is still open on the
/// commit row. True when it did.
pub(crate) fn materialize_one(
    tx: &Transaction<'_>,
    position: i64,
    id: i64,
    now: i64,
) -> Result<bool, Error> {
    Ok(materialize(tx, position, now, |d| d == id)? > 0)
}

/// Positions of commits with open inline deliveries leased to `owner` (all of them when
/// `None`), oldest first.
fn open_commits(tx: &Transaction<'_>, owner: Option<&OwnerId>) -> Result<Vec<i64>, Error> {
    let owner = owner.map(|o| o.as_bytes().to_vec());
    tx.prepare_cached(
        "SELECT position FROM commits
         WHERE inline_open != 0 AND (?1 IS NULL OR inline_owner = ?1) ORDER BY position",
    )
    .and_then(|mut s| s.query_map([owner], |r| r.get(0))?.collect())
    .map_err(sql("finding open inline deliveries"))
}

/// Gives every open inline delivery leased to `owner` (every one when `None`) its row,
/// leased as it was, so that releasing, taking over or recovering leases works on rows alone.
/// Returns how many it wrote.
pub(crate) fn materialize_owner(
    tx: &Transaction<'_>,
    owner: Option<&OwnerId>,
    now: i64,
) -> Result<usize, Error> {
    let mut n = 0;
    for position in open_commits(tx, owner)? {
        n += materialize(tx, position, now, |_| true)?;
    }
    Ok(n)
}

/// Whether delivery `id` of the commit at `position` is open on the commit row (so leased,
/// with fence 1).
pub(crate) fn is_open(tx: &Transaction<'_>, position: i64, id: i64) -> Result<bool, Error> {
    tx.prepare_cached(
        "SELECT 1 FROM commits
         WHERE position = ?1 AND ?2 >= first_delivery AND ?2 - first_delivery < ?3
           AND (inline_open >> (?2 - first_delivery)) & 1 = 1",
    )
    .and_then(|mut s| s.exists(params![position, id, MAX_INLINE as i64]))
    .map_err(sql("checking an inline lease"))
}

#[cfg(test)]
mod tests {
    use super::{bit, decode, encode, Entry, MAX_INLINE};

    #[test]
    fn entries_round_trip_and_bits_stay_positive() {
        let entries = vec![
            Entry {
                offset: 0,
                idx: 0,
                handler: "user-writer".into(),
            },
            Entry {
                offset: 3,
                idx: 1,
                handler: "a \"quoted\" name".into(),
            },
        ];
        assert_eq!(decode(1, &encode(&entries)).unwrap(), entries);
        assert!(decode(7, "not json").is_err());
        assert!(bit(MAX_INLINE as u32 - 1) > 0);
        let all = (0..MAX_INLINE as u32).fold(0i64, |m, o| m | bit(o));
        assert!(all > 0);
        assert_eq!(all.count_ones() as usize, MAX_INLINE);
    }
}
