//! Past states: the key–value space and stream heads as of a log position, from the key writes
//! kept with each commit and the stream version index, joined to the sealed positions. Commits
//! not sealed yet have no position and count as later than any.

use sqlx::PgPool;
use txbus_core::past_page::{self, PastPage};
use txbus_core::store::{Error, KvVersion};

use crate::error::db;
use crate::row::{signed, unsigned};
use crate::schema::Schema;

/// A kept key write: its operation, value, position and expiry.
type PastRow = (i16, Option<Vec<u8>>, i64, Option<i64>);

/// The value `key` held just after the commit at `position`.
pub(crate) async fn kv_at(
    pool: &PgPool,
    schema: &Schema,
    key: &str,
    position: u64,
) -> Result<Option<KvVersion>, Error> {
    let row: Option<PastRow> = sqlx::query_as(&schema.sql(
        "SELECT k.op, k.value, s.position, k.expires_at
         FROM {s}.commit_kv k JOIN {s}.commit_seals s ON s.commit_id = k.commit_id
         WHERE k.key = $1 AND s.position <= $2
         ORDER BY s.position DESC LIMIT 1",
    ))
    .bind(key)
    .bind(signed(position))
    .fetch_optional(pool)
    .await
    .map_err(db("reading a key's past value"))?;
    Ok(match row {
        Some((1, Some(value), at, expires_at_ms)) => Some(KvVersion {
            key: key.to_owned(),
            value,
            written_at: unsigned(at),
            expires_at_ms,
        }),
        _ => None,
    })
}

/// Keys under `prefix` after `after` with their values just after `position`: at most `limit`
/// of them, examining at most `max_examined` keys (present then or not), with the last key
/// examined to resume from when the scan stopped before the end of the prefix.
pub(crate) async fn kv_scan_at(
    pool: &PgPool,
    schema: &Schema,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    position: u64,
    max_examined: usize,
) -> Result<PastPage<KvVersion>, Error> {
    let limit = limit.clamp(1, 10_000);
    let max_examined = past_page::bounded(max_examined);
    let mut out = Vec::new();
    let (mut cursor, mut inclusive) = match after {
        Some(a) if a >= prefix => (a.to_owned(), false),
        _ => (prefix.to_owned(), true),
    };
    let from = schema.sql("SELECT key FROM {s}.commit_kv WHERE key >= $1 ORDER BY key LIMIT 1");
    let after = schema.sql("SELECT key FROM {s}.commit_kv WHERE key > $1 ORDER BY key LIMIT 1");
    let mut examined = 0usize;
    loop {
        if out.len() >= limit || examined >= max_examined {
            // Stopped by a bound: the caller continues after the last key examined.
            return Ok(PastPage::new(out, Some(cursor)));
        }
        let key: Option<String> = sqlx::query_scalar(if inclusive { &from } else { &after })
            .bind(&cursor)
            .fetch_optional(pool)
            .await
            .map_err(db("scanning past keys"))?;
        let Some(key) = key.filter(|k| k.starts_with(prefix)) else {
            return Ok(PastPage::new(out, None));
        };
        examined += 1;
        if let Some(v) = kv_at(pool, schema, &key, position).await? {
            out.push(v);
        }
        cursor = key;
        inclusive = false;
    }
}

/// The version of `stream` just after `position`: a binary search over its versions, whose
/// positions grow with them (appends to one stream are serialized, and sealed in order).
pub(crate) async fn stream_version_at(
    pool: &PgPool,
    schema: &Schema,
    stream: &str,
    position: u64,
) -> Result<u64, Error> {
    let head = crate::stream::version(pool, schema, stream).await?;
    let at = schema.sql(
        "SELECT (SELECT p.position FROM {s}.commit_seals p WHERE p.commit_id = s.commit_id)
         FROM {s}.streams s WHERE s.stream = $1 AND s.version = $2",
    );
    let p = signed(position);
    let (mut lo, mut hi) = (0i64, signed(head));
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        let pos: Option<Option<i64>> = sqlx::query_scalar(&at)
            .bind(stream)
            .bind(mid)
            .fetch_optional(pool)
            .await
            .map_err(db("reading a stream version's position"))?;
        if pos.flatten().is_some_and(|x| x <= p) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(unsigned(lo))
}

/// Streams after `after` that had events just after `position`, with their versions then: at
/// most `limit` of them, examining at most `max_examined` streams (with events then or not),
/// with the last stream examined to resume from when the scan stopped before the end.
pub(crate) async fn streams_at(
    pool: &PgPool,
    schema: &Schema,
    after: Option<&str>,
    limit: usize,
    position: u64,
    max_examined: usize,
) -> Result<PastPage<(String, u64)>, Error> {
    let limit = limit.clamp(1, 10_000);
    let max_examined = past_page::bounded(max_examined);
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_owned);
    let first = schema.sql("SELECT stream FROM {s}.streams ORDER BY stream LIMIT 1");
    let next =
        schema.sql("SELECT stream FROM {s}.streams WHERE stream > $1 ORDER BY stream LIMIT 1");
    let mut examined = 0usize;
    loop {
        if out.len() >= limit || examined >= max_examined {
            // Stopped by a bound: the caller continues after the last stream examined.
            return Ok(PastPage::new(out, cursor));
        }
        let query = match &cursor {
            None => sqlx::query_scalar(&first),
            Some(after) => sqlx::query_scalar(&next).bind(after.clone()),
        };
        let stream: Option<String> = query
            .fetch_optional(pool)
            .await
            .map_err(db("scanning past streams"))?;
        let Some(stream) = stream else {
            return Ok(PastPage::new(out, None));
        };
        examined += 1;
        let v = stream_version_at(pool, schema, &stream, position).await?;
        if v > 0 {
            out.push((stream.clone(), v));
        }
        cursor = Some(stream);
    }
}

/// The last sealed position of the log (0 when empty).
pub(crate) async fn head(pool: &PgPool, schema: &Schema) -> Result<u64, Error> {
    let p: i64 = sqlx::query_scalar(&schema.sql("SELECT position FROM {s}.chain_head"))
        .fetch_one(pool)
        .await
        .map_err(db("reading the end of the log"))?;
    Ok(unsigned(p))
}
