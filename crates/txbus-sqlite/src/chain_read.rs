//! The streaming read `verify` walks the log with: commits and their messages in one ordered
//! scan, stored text kept as it is and not parsed (the hashes cover the text).

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};
use txbus_core::chain::Hash;
use txbus_core::store::{CommitKind, CommitRecord, Error};
use txbus_core::{Headers, StoredMessage};

use crate::error::sql;
use crate::row::{message_id, op_id};

fn hash(v: Vec<u8>, position: i64) -> Result<Hash, Error> {
    v.try_into()
        .map_err(|_| Error::Corrupt(format!("commit {position}: a hash is not 32 bytes")))
}

/// A text column as it is stored: text that is not UTF-8 (a damaged file) is read lossily, so
/// that it fails the hash check of its commit instead of the whole read.
fn text(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<String>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
        ValueRef::Integer(n) => Some(n.to_string()),
        ValueRef::Real(x) => Some(x.to_string()),
    })
}

/// Up to `limit` commits after `after`, for hashing: payloads and headers are left unparsed
/// (`payload` null, `headers` empty); `payload_json` and `headers_json` hold the stored text.
pub(crate) fn read(c: &Connection, after: u64, limit: usize) -> Result<Vec<CommitRecord>, Error> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit.clamp(1, 10_000)).unwrap_or(1);
    let mut stmt = c
        .prepare_cached(
            "SELECT c.position, c.op_id, c.kind, c.created_at, c.data_hash, c.chain_hash,
                    m.id, m.event_type, m.module, m.payload, m.headers
             FROM (SELECT * FROM commits WHERE position > ?1 ORDER BY position LIMIT ?2) c
             LEFT JOIN messages m ON m.position = c.position
             ORDER BY c.position, m.idx",
        )
        .map_err(sql("preparing the chain read"))?;
    let mut rows = stmt
        .query(params![after, limit])
        .map_err(sql("reading the chain"))?;
    let mut out: Vec<CommitRecord> = Vec::new();
    while let Some(r) = rows.next().map_err(sql("reading the chain"))? {
        let get = sql("reading the chain");
        let position: i64 = r.get(0).map_err(&get)?;
        let op: Vec<u8> = r.get(1).map_err(&get)?;
        let kind: i64 = r.get(2).map_err(&get)?;
        let created_at: i64 = r.get(3).map_err(&get)?;
        let data: Vec<u8> = r.get(4).map_err(&get)?;
        let chain: Vec<u8> = r.get(5).map_err(&get)?;
        let id: Option<Vec<u8>> = r.get(6).map_err(&get)?;
        let event_type = text(r, 7).map_err(&get)?;
        let module = text(r, 8).map_err(&get)?;
        let payload = text(r, 9).map_err(&get)?;
        let headers = text(r, 10).map_err(&get)?;
        let pos = u64::try_from(position).unwrap_or(0);
        if out.last().is_none_or(|c| c.position != pos) {
            out.push(CommitRecord {
                position: pos,
                operation_id: op_id(&op)?,
                kind: CommitKind::from_u8(u8::try_from(kind).unwrap_or(0)).ok_or_else(|| {
                    Error::Corrupt(format!("commit {position}: unknown kind {kind}"))
                })?,
                created_at_ms: created_at,
                messages: Vec::new(),
                data_hash: hash(data, position)?,
                chain_hash: hash(chain, position)?,
                kv: Vec::new(),
                signature: None,
            });
        }
        if let (Some(id), Some(event_type), Some(payload_json), Some(headers_json)) =
            (id, event_type, payload, headers)
        {
            if let Some(record) = out.last_mut() {
                record.messages.push(StoredMessage {
                    id: message_id(&id)?,
                    event_type,
                    module,
                    payload: serde_json::Value::Null,
                    payload_json,
                    headers: Headers::default(),
                    headers_json,
                });
            }
        }
    }
    drop(rows);
    crate::commit_meta::attach(c, &mut out)?;
    Ok(out)
}
