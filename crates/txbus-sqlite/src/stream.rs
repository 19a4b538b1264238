//! Streams: the version index over the log's messages, checked and extended inside appends.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use txbus_core::store::{Conflict, Error};
use txbus_core::stream::{Direction, StreamAppend, StreamEvent};

use crate::error::sql;
use crate::row::MessageRow;

fn version_of(c: &Connection, stream: &str) -> Result<u64, Error> {
    let v: Option<i64> = c
        .prepare_cached("SELECT MAX(version) FROM streams WHERE stream = ?1")
        .and_then(|mut s| s.query_row([stream], |r| r.get(0)).optional())
        .map_err(sql("reading a stream's version"))?
        .flatten();
    Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
}

/// Checks every stream's expected version; writes nothing. Returns each stream's current
/// version, in the order of `streams`.
pub(crate) fn check(tx: &Transaction<'_>, streams: &[StreamAppend]) -> Result<Vec<u64>, Error> {
    let mut versions = Vec::with_capacity(streams.len());
    for s in streams {
        let actual = version_of(tx, &s.stream)?;
        if !s.expected.admits(actual) {
            return Err(Error::Conflict(Conflict::Stream {
                stream: s.stream.clone(),
                expected: s.expected,
                actual,
            }));
        }
        versions.push(actual);
    }
    Ok(versions)
}

/// Records the commit's stream events after `check` passed with `versions`.
pub(crate) fn append(
    tx: &Transaction<'_>,
    position: i64,
    streams: &[StreamAppend],
    versions: &[u64],
) -> Result<(), Error> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO streams (stream, version, position, idx) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(sql("preparing a stream insert"))?;
    for (s, &base) in streams.iter().zip(versions) {
        for (k, &idx) in s.message_indexes.iter().enumerate() {
            let version = i64::try_from(base + k as u64 + 1)
                .map_err(|_| Error::Invalid(format!("stream {:?}: version overflow", s.stream)))?;
            stmt.execute(params![s.stream, version, position, idx])
                .map_err(sql("recording a stream event"))?;
        }
    }
    Ok(())
}

/// The version of a stream's last event (0 = none).
pub(crate) fn version(c: &Connection, stream: &str) -> Result<u64, Error> {
    version_of(c, stream)
}

/// Reads a stream from `from` in `direction`.
pub(crate) fn read(
    c: &Connection,
    stream: &str,
    from: u64,
    direction: Direction,
    limit: usize,
) -> Result<Vec<StreamEvent>, Error> {
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit.clamp(1, 100_000)).unwrap_or(1);
    let q = match direction {
        Direction::Forward => {
            "SELECT s.version, s.position, m.id, m.event_type, m.module, m.payload, m.headers
             FROM streams s JOIN messages m ON m.position = s.position AND m.idx = s.idx
             WHERE s.stream = ?1 AND s.version >= ?2 ORDER BY s.version LIMIT ?3"
        }
        Direction::Backward => {
            "SELECT s.version, s.position, m.id, m.event_type, m.module, m.payload, m.headers
             FROM streams s JOIN messages m ON m.position = s.position AND m.idx = s.idx
             WHERE s.stream = ?1 AND s.version <= ?2 ORDER BY s.version DESC LIMIT ?3"
        }
    };
    let mut stmt = c
        .prepare_cached(q)
        .map_err(sql("preparing a stream read"))?;
    let rows: Vec<(i64, i64, MessageRow)> = stmt
        .query_map(params![stream, from, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, MessageRow::read(r, 2)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("reading a stream"))?;
    rows.into_iter()
        .map(|(version, position, row)| {
            let message = row
                .parse()
                .map_err(|e| Error::Corrupt(format!("stream {stream:?} version {version}: {e}")))?;
            Ok(StreamEvent {
                stream: stream.to_owned(),
                version: u64::try_from(version).unwrap_or(0),
                commit_id: u64::try_from(position).unwrap_or(0),
                message,
            })
        })
        .collect()
}
