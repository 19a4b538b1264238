//! Reading streams, on the pool: by version through the streams table's primary key, joined to
//! the messages. A stream event is readable as soon as its commit is, sealed or not: streams
//! are read by version, not by log position.

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use txbus_core::store::Error;
use txbus_core::stream::{Direction, StreamEvent};

use crate::error::db;
use crate::row::{signed, unsigned, MessageRow};
use crate::schema::Schema;

/// Most events one read returns.
const MAX_READ: usize = 10_000;

const FORWARD: &str = "
SELECT s.version, s.commit_id, m.id, m.event_type, m.module, m.payload, m.headers
FROM {s}.streams s JOIN {s}.messages m ON m.commit_id = s.commit_id AND m.idx = s.idx
WHERE s.stream = $1 AND s.version >= $2
ORDER BY s.version LIMIT $3";

const BACKWARD: &str = "
SELECT s.version, s.commit_id, m.id, m.event_type, m.module, m.payload, m.headers
FROM {s}.streams s JOIN {s}.messages m ON m.commit_id = s.commit_id AND m.idx = s.idx
WHERE s.stream = $1 AND s.version <= $2
ORDER BY s.version DESC LIMIT $3";

fn event(stream: &str, r: &PgRow) -> Result<StreamEvent, Error> {
    let version: i64 = r.try_get(0).map_err(db("reading a stream event"))?;
    let commit_id: i64 = r.try_get(1).map_err(db("reading a stream event"))?;
    let message = MessageRow::read(r, 2)
        .map_err(db("reading a stream event"))?
        .parse()
        .map_err(|e| {
            Error::Corrupt(format!(
                "stream {stream:?} version {version}: the stored message is unreadable: {e}"
            ))
        })?;
    Ok(StreamEvent {
        stream: stream.to_owned(),
        version: unsigned(version),
        commit_id: unsigned(commit_id),
        message,
    })
}

/// Up to `limit` events of `stream` from version `from`, in `direction`.
pub(crate) async fn read(
    pool: &PgPool,
    schema: &Schema,
    stream: &str,
    from: u64,
    direction: Direction,
    limit: usize,
) -> Result<Vec<StreamEvent>, Error> {
    // PostgreSQL text holds no NUL, so no stored stream id does either.
    if limit == 0 || stream.contains('\0') {
        return Ok(Vec::new());
    }
    let sql = match direction {
        Direction::Forward => FORWARD,
        Direction::Backward => BACKWARD,
    };
    let limit = i64::try_from(limit.min(MAX_READ)).unwrap_or(1);
    let rows: Vec<PgRow> = sqlx::query(&schema.sql(sql))
        .bind(stream)
        .bind(signed(from))
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(db("reading a stream"))?;
    rows.iter().map(|r| event(stream, r)).collect()
}

/// The version of the stream's last event; 0 when it has none.
pub(crate) async fn version(pool: &PgPool, schema: &Schema, stream: &str) -> Result<u64, Error> {
    if stream.contains('\0') {
        return Ok(0);
    }
    let v: i64 = sqlx::query_scalar(
        &schema.sql("SELECT COALESCE(MAX(version), 0)::BIGINT FROM {s}.streams WHERE stream = $1"),
    )
    .bind(stream)
    .fetch_one(pool)
    .await
    .map_err(db("reading a stream's version"))?;
    Ok(unsigned(v))
}
