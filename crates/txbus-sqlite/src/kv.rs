//! The key–value space: conditional writes inside the writer's transactions, reads on the read
//! connection, expired entries removed by retention.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use txbus_core::kv::{expiry, KvEntry, KvOp, KvWrite};
use txbus_core::store::{Conflict, Error};

use crate::error::sql;

/// The live version of `key` (expired entries count as absent).
fn live_version(c: &Connection, key: &str, now: i64) -> Result<Option<u64>, Error> {
    let v: Option<i64> = c
        .prepare_cached(
            "SELECT version FROM kv WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        )
        .and_then(|mut s| s.query_row(params![key, now], |r| r.get(0)).optional())
        .map_err(sql("reading a key's version"))?;
    Ok(v.and_then(|v| u64::try_from(v).ok()))
}

/// Checks every write's condition; writes nothing. Returns each key's live version.
pub(crate) fn check(
    tx: &Transaction<'_>,
    writes: &[KvWrite],
    now: i64,
) -> Result<Vec<Option<u64>>, Error> {
    txbus_core::kv::check_writes(writes).map_err(Error::Invalid)?;
    let mut versions = Vec::with_capacity(writes.len());
    for w in writes {
        let actual = live_version(tx, &w.key, now)?;
        if !w.expect.admits(actual) {
            return Err(Error::Conflict(Conflict::Key {
                key: w.key.clone(),
                expected: w.expect,
                actual,
            }));
        }
        versions.push(actual);
    }
    Ok(versions)
}

/// Applies writes whose conditions `check` accepted with `versions`; returns new versions.
pub(crate) fn apply(
    tx: &Transaction<'_>,
    writes: &[KvWrite],
    versions: &[Option<u64>],
    now: i64,
) -> Result<Vec<u64>, Error> {
    let mut out = Vec::with_capacity(writes.len());
    for (w, current) in writes.iter().zip(versions) {
        match &w.op {
            KvOp::Put { value, ttl } => {
                let version = current.map_or(1, |v| v + 1);
                tx.prepare_cached(
                    "INSERT INTO kv (key, value, version, expires_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                         version = excluded.version, expires_at = excluded.expires_at",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        w.key,
                        value,
                        i64::try_from(version).unwrap_or(i64::MAX),
                        expiry(now, *ttl)
                    ])
                })
                .map_err(sql("writing a key"))?;
                out.push(version);
            }
            KvOp::Delete => {
                tx.prepare_cached("DELETE FROM kv WHERE key = ?1")
                    .and_then(|mut s| s.execute([&w.key]))
                    .map_err(sql("deleting a key"))?;
                out.push(0);
            }
        }
    }
    Ok(out)
}

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<KvEntry> {
    Ok(KvEntry {
        key: r.get(0)?,
        value: r.get(1)?,
        version: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        expires_at_ms: r.get(3)?,
    })
}

/// Reads one live entry.
pub(crate) fn get(c: &Connection, key: &str, now: i64) -> Result<Option<KvEntry>, Error> {
    c.prepare_cached(
        "SELECT key, value, version, expires_at FROM kv
         WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
    )
    .and_then(|mut s| s.query_row(params![key, now], entry).optional())
    .map_err(sql("reading a key"))
}

/// Live entries under a literal prefix, in key order, after `after`.
pub(crate) fn scan(
    c: &Connection,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    now: i64,
) -> Result<Vec<KvEntry>, Error> {
    let limit = i64::try_from(limit.clamp(1, 10_000)).unwrap_or(1);
    // Keys that start with the prefix sort at or after it, before any that do not: read in
    // key order from the prefix and stop at the first key outside it.
    let start = match after {
        Some(a) if a >= prefix => a,
        _ => prefix,
    };
    let strict = after.is_some_and(|a| a >= prefix);
    let mut stmt = c
        .prepare_cached(
            "SELECT key, value, version, expires_at FROM kv
             WHERE (key > ?1 OR (?2 = 0 AND key = ?1))
               AND (expires_at IS NULL OR expires_at > ?3)
             ORDER BY key LIMIT ?4",
        )
        .map_err(sql("preparing a key scan"))?;
    let rows: Vec<KvEntry> = stmt
        .query_map(params![start, i64::from(strict), now, limit], entry)
        .and_then(|rows| rows.collect())
        .map_err(sql("scanning keys"))?;
    Ok(rows
        .into_iter()
        .take_while(|e| e.key.starts_with(prefix))
        .collect())
}

/// Removes up to `limit` expired entries; returns how many.
pub(crate) fn prune_expired(tx: &Transaction<'_>, now: i64, limit: i64) -> Result<u64, Error> {
    let n = tx
        .prepare_cached(
            "DELETE FROM kv WHERE key IN (
                 SELECT key FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![now, limit]))
        .map_err(sql("removing expired keys"))?;
    Ok(n as u64)
}
