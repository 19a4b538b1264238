//! The key–value space: reads on the pool, and the one statement that writes what a
//! transaction's checked key writes leave (see [`crate::condition`]).

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};
use txbus_core::kv::KvEntry;
use txbus_core::store::Error;

use crate::condition::FinalKey;
use crate::error::db;
use crate::row::unsigned;
use crate::schema::Schema;

/// Most entries one scan returns.
const MAX_SCAN: usize = 10_000;

type EntryRow = (String, Vec<u8>, i64, Option<i64>);

fn entry((key, value, version, expires_at_ms): EntryRow) -> KvEntry {
    KvEntry {
        key,
        value,
        version: unsigned(version),
        expires_at_ms,
    }
}

/// Reads one live key at `now`.
pub(crate) async fn get(
    pool: &PgPool,
    schema: &Schema,
    key: &str,
    now: i64,
) -> Result<Option<KvEntry>, Error> {
    // PostgreSQL text holds no NUL, so no stored key does either.
    if key.contains('\0') {
        return Ok(None);
    }
    let row: Option<EntryRow> = sqlx::query_as(&schema.sql(
        "SELECT key, value, version, expires_at FROM {s}.kv
         WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)",
    ))
    .bind(key)
    .bind(now)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a key"))?;
    Ok(row.map(entry))
}

/// The least string greater than every string that starts with `prefix` (in code point order,
/// which is UTF-8 byte order and the keys' collation); `None` when there is none.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) + 1 {
            0xD800 => 0xE000,
            n => n,
        };
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Lists up to `limit` live keys that start with `prefix` literally, in key order, after
/// `after`. A range on the primary key, not a pattern: no character of the prefix is special.
pub(crate) async fn scan(
    pool: &PgPool,
    schema: &Schema,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    now: i64,
) -> Result<Vec<KvEntry>, Error> {
    if limit == 0 || prefix.contains('\0') {
        return Ok(Vec::new());
    }
    // Keys hold no NUL, and a key is greater than "x\0…" exactly when it is greater than "x".
    let after = after.map(|a| a.split('\0').next().unwrap_or_default());
    let end = prefix_end(prefix);
    let limit = i64::try_from(limit.min(MAX_SCAN)).unwrap_or(1);
    let rows: Vec<EntryRow> = sqlx::query_as(&schema.sql(
        "SELECT key, value, version, expires_at FROM {s}.kv
         WHERE key >= $1 AND ($2::TEXT IS NULL OR key < $2) AND ($3::TEXT IS NULL OR key > $3)
           AND (expires_at IS NULL OR expires_at > $4)
         ORDER BY key LIMIT $5",
    ))
    .bind(prefix)
    .bind(end.as_deref())
    .bind(after)
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db("scanning keys"))?;
    Ok(rows.into_iter().map(entry).collect())
}

/// Writes every key as the transaction leaves it (set, or removed), in the caller's
/// transaction. Each key appears once, so the upsert never touches a row twice.
pub(crate) async fn write(
    conn: &mut PgConnection,
    schema: &Schema,
    keys: &BTreeMap<&str, FinalKey<'_>>,
) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut set_key = Vec::with_capacity(keys.len());
    let mut set_value = Vec::with_capacity(keys.len());
    let mut set_version = Vec::with_capacity(keys.len());
    let mut set_expires = Vec::with_capacity(keys.len());
    let mut removed = Vec::new();
    for (&key, state) in keys {
        match state {
            Some((value, version, expires)) => {
                set_key.push(key);
                set_value.push(*value);
                set_version.push(*version);
                set_expires.push(*expires);
            }
            None => removed.push(key),
        }
    }
    sqlx::query(&schema.sql(
        "WITH set AS (
             INSERT INTO {s}.kv (key, value, version, expires_at)
             SELECT * FROM UNNEST($1::TEXT[], $2::BYTEA[], $3::BIGINT[], $4::BIGINT[])
             ON CONFLICT (key) DO UPDATE
                 SET value = excluded.value, version = excluded.version,
                     expires_at = excluded.expires_at)
         DELETE FROM {s}.kv WHERE key = ANY($5::TEXT[])",
    ))
    .bind(&set_key)
    .bind(&set_value)
    .bind(&set_version)
    .bind(&set_expires)
    .bind(&removed)
    .execute(&mut *conn)
    .await
    .map_err(db("writing keys"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_end_of_a_prefix_bounds_exactly_the_keys_that_start_with_it() {
        assert_eq!(prefix_end("scan/").as_deref(), Some("scan0"));
        assert_eq!(prefix_end("p%_").as_deref(), Some("p%`"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        let end = prefix_end("ab").unwrap();
        for k in ["ab", "ab\u{10FFFF}\u{10FFFF}", "abz", "ab\u{1}"] {
            assert!(k >= "ab" && k < end.as_str(), "{k:?}");
        }
        for k in ["aa\u{10FFFF}", "ac", "b"] {
            assert!(!(k >= "ab" && k < end.as_str()), "{k:?}");
        }
    }
}
