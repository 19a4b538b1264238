//! Past states: the key–value space and stream heads as of a log position, from the key writes
//! kept with each commit (indexed by key, then position) and the stream version index. Each
//! lookup is a few index seeks, whatever the position: no replay, so no snapshots needed.

use rusqlite::{params, Connection, OptionalExtension};
use txbus_core::past_page::{self, PastPage};
use txbus_core::store::{Error, KvVersion};

use crate::error::sql;

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A kept key write: its operation, value, position and expiry.
type PastRow = (i64, Option<Vec<u8>>, i64, Option<i64>);

/// The value `key` held just after the commit at `position`.
pub(crate) fn kv_at(c: &Connection, key: &str, position: u64) -> Result<Option<KvVersion>, Error> {
    let row: Option<PastRow> = c
        .prepare_cached(
            "SELECT op, value, position, expires_at FROM commit_kv
             WHERE key = ?1 AND position <= ?2 ORDER BY position DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row(params![key, signed(position)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })
        .map_err(sql("reading a key's past value"))?;
    Ok(match row {
        Some((1, Some(value), at, expires_at_ms)) => Some(KvVersion {
            key: key.to_owned(),
            value,
            written_at: u64::try_from(at).unwrap_or(0),
            expires_at_ms,
        }),
        _ => None,
    })
}

/// Keys under `prefix` after `after` with their values just after `position`: at most `limit`
/// of them, examining at most `max_examined` keys (present then or not), with the last key
/// examined to resume from when the scan stopped before the end of the prefix.
pub(crate) fn kv_scan_at(
    c: &Connection,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    position: u64,
    max_examined: usize,
) -> Result<PastPage<KvVersion>, Error> {
    let limit = limit.clamp(1, 10_000);
    let max_examined = past_page::bounded(max_examined);
    let mut out = Vec::with_capacity(limit.min(256));
    let mut cursor: String = match after {
        Some(a) if a >= prefix => a.to_owned(),
        _ => String::new(),
    };
    let mut inclusive = cursor.is_empty();
    if inclusive {
        cursor = prefix.to_owned();
    }
    let mut examined = 0usize;
    loop {
        if out.len() >= limit || examined >= max_examined {
            // Stopped by a bound: the caller continues after the last key examined.
            return Ok(PastPage::new(out, Some(cursor)));
        }
        // Two plain range conditions, so that each step is one seek in the key index.
        let sql_text = if inclusive {
            "SELECT key FROM commit_kv WHERE key >= ?1 ORDER BY key LIMIT 1"
        } else {
            "SELECT key FROM commit_kv WHERE key > ?1 ORDER BY key LIMIT 1"
        };
        let key: Option<String> = c
            .prepare_cached(sql_text)
            .and_then(|mut s| s.query_row(params![cursor], |r| r.get(0)).optional())
            .map_err(sql("scanning past keys"))?;
        let Some(key) = key.filter(|k| k.starts_with(prefix)) else {
            return Ok(PastPage::new(out, None));
        };
        examined += 1;
        if let Some(v) = kv_at(c, &key, position)? {
            out.push(v);
        }
        cursor = key;
        inclusive = false;
    }
}

fn position_of(c: &Connection, stream: &str, version: i64) -> Result<i64, Error> {
    c.prepare_cached("SELECT position FROM streams WHERE stream = ?1 AND version = ?2")
        .and_then(|mut s| s.query_row(params![stream, version], |r| r.get(0)))
        .map_err(sql("reading a stream version's position"))
}

/// The version of `stream` just after `position`: a binary search over its versions, whose
/// positions grow with them.
pub(crate) fn stream_version_at(c: &Connection, stream: &str, position: u64) -> Result<u64, Error> {
    let head = crate::stream::version(c, stream)?;
    let (mut lo, mut hi) = (0i64, signed(head));
    let p = signed(position);
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        if position_of(c, stream, mid)? <= p {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(u64::try_from(lo).unwrap_or(0))
}

/// Streams after `after` that had events just after `position`, with their versions then: at
/// most `limit` of them, examining at most `max_examined` streams (with events then or not),
/// with the last stream examined to resume from when the scan stopped before the end.
pub(crate) fn streams_at(
    c: &Connection,
    after: Option<&str>,
    limit: usize,
    position: u64,
    max_examined: usize,
) -> Result<PastPage<(String, u64)>, Error> {
    let limit = limit.clamp(1, 10_000);
    let max_examined = past_page::bounded(max_examined);
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_owned);
    let mut examined = 0usize;
    loop {
        if out.len() >= limit || examined >= max_examined {
            // Stopped by a bound: the caller continues after the last stream examined.
            return Ok(PastPage::new(out, cursor));
        }
        // A plain range condition, so that each step is one seek in the stream index.
        let stream: Option<String> = match &cursor {
            None => c
                .prepare_cached("SELECT stream FROM streams ORDER BY stream LIMIT 1")
                .and_then(|mut s| s.query_row([], |r| r.get(0)).optional()),
            Some(after) => c
                .prepare_cached(
                    "SELECT stream FROM streams WHERE stream > ?1 ORDER BY stream LIMIT 1",
                )
                .and_then(|mut s| s.query_row(params![after], |r| r.get(0)).optional()),
        }
        .map_err(sql("scanning past streams"))?;
        let Some(stream) = stream else {
            return Ok(PastPage::new(out, None));
        };
        examined += 1;
        let v = stream_version_at(c, &stream, position)?;
        if v > 0 {
            out.push((stream.clone(), v));
        }
        cursor = Some(stream);
    }
}

/// The last position of the log (0 when empty).
pub(crate) fn head(c: &Connection) -> Result<u64, Error> {
    let p: Option<i64> = c
        .query_row("SELECT MAX(position) FROM commits", [], |r| r.get(0))
        .map_err(sql("reading the end of the log"))?;
    Ok(p.and_then(|p| u64::try_from(p).ok()).unwrap_or(0))
}
