//! What the log keeps with a commit besides its messages: its key–value writes (so that the
//! data hash covers them and past states can be rebuilt) and, on the last commit of each group
//! commit when a signer is set, the signature of its chain hash.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rusqlite::{params, Connection, Transaction};
use txbus_core::kv::{KvExpect, KvOp, KvWrite};
use txbus_core::signing::{CommitSignature, CommitSigner};
use txbus_core::store::{CommitRecord, Error};

use crate::error::sql;

/// The signer shared by the store handle (which sets it) and the writer (which signs).
pub(crate) type SharedSigner = Arc<RwLock<Option<Arc<CommitSigner>>>>;

pub(crate) fn current(signer: &SharedSigner) -> Option<Arc<CommitSigner>> {
    signer
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Stored numbering of a write's operation and condition.
fn op_code(op: &KvOp) -> i64 {
    match op {
        KvOp::Put { .. } => 1,
        KvOp::Delete => 2,
    }
}

fn expect_code(e: KvExpect) -> (i64, Option<i64>) {
    match e {
        KvExpect::Any => (0, None),
        KvExpect::Absent => (1, None),
        KvExpect::Version(v) => (2, Some(i64::try_from(v).unwrap_or(i64::MAX))),
    }
}

/// Keeps the commit's key–value writes with it in the log.
pub(crate) fn insert_kv(
    tx: &Transaction<'_>,
    position: i64,
    created_at_ms: i64,
    writes: &[KvWrite],
) -> Result<(), Error> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO commit_kv (key, position, idx, op, value, ttl_ms, expires_at, expect, expect_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(sql("preparing a commit key insert"))?;
    for (i, w) in writes.iter().enumerate() {
        let (value, ttl_ms) = match &w.op {
            KvOp::Put { value, ttl } => (
                Some(value.as_slice()),
                ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            ),
            KvOp::Delete => (None, None),
        };
        let expires_at = ttl_ms.map(|t| created_at_ms.saturating_add(t));
        let (expect, expect_version) = expect_code(w.expect);
        stmt.execute(params![
            w.key,
            position,
            i as i64,
            op_code(&w.op),
            value,
            ttl_ms,
            expires_at,
            expect,
            expect_version
        ])
        .map_err(sql("keeping a commit's key write"))?;
    }
    Ok(())
}

/// Signs the chain hash of the last commit of this transaction, when a signer is set and the
/// transaction appended anything.
pub(crate) fn sign_last(
    tx: &Transaction<'_>,
    signer: &SharedSigner,
    appended: bool,
    position: u64,
    chain: &txbus_core::chain::Hash,
) -> Result<(), Error> {
    if !appended {
        return Ok(());
    }
    let Some(signer) = current(signer) else {
        return Ok(());
    };
    let sig = signer.sign(position, chain);
    tx.prepare_cached(
        "INSERT INTO commit_signatures (position, key_id, signature) VALUES (?1, ?2, ?3)",
    )
    .and_then(|mut s| {
        s.execute(params![
            i64::try_from(position).unwrap_or(i64::MAX),
            sig.key_id,
            &sig.signature[..]
        ])
    })
    .map_err(sql("storing a commit signature"))?;
    Ok(())
}

fn write_from_row(
    position: i64,
    key: String,
    op: i64,
    value: Option<Vec<u8>>,
    ttl_ms: Option<i64>,
    expect: i64,
    expect_version: Option<i64>,
) -> Result<KvWrite, Error> {
    let corrupt = |what: &str| Error::Corrupt(format!("commit {position}: key {key:?}: {what}"));
    let op = match (op, value) {
        (1, Some(value)) => KvOp::Put {
            value,
            ttl: ttl_ms
                .map(|t| u64::try_from(t).map(Duration::from_millis))
                .transpose()
                .map_err(|_| corrupt("negative time to live"))?,
        },
        (2, None) => KvOp::Delete,
        _ => return Err(corrupt("unknown write")),
    };
    let expect = match (expect, expect_version) {
        (0, None) => KvExpect::Any,
        (1, None) => KvExpect::Absent,
        (2, Some(v)) => {
            KvExpect::Version(u64::try_from(v).map_err(|_| corrupt("negative expected version"))?)
        }
        _ => return Err(corrupt("unknown condition")),
    };
    Ok(KvWrite {
        key: key.clone(),
        op,
        expect,
    })
}

type KvRow = (
    i64,
    String,
    i64,
    Option<Vec<u8>>,
    Option<i64>,
    i64,
    Option<i64>,
);

/// Fills in the key–value writes and signatures of a page of commits (in position order).
pub(crate) fn attach(c: &Connection, records: &mut [CommitRecord]) -> Result<(), Error> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(());
    };
    let (first, last) = (
        i64::try_from(first.position).unwrap_or(i64::MAX),
        i64::try_from(last.position).unwrap_or(i64::MAX),
    );
    let index: HashMap<i64, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (i64::try_from(r.position).unwrap_or(i64::MAX), i))
        .collect();
    let rows: Vec<KvRow> = c
        .prepare_cached(
            "SELECT position, key, op, value, ttl_ms, expect, expect_version FROM commit_kv
             WHERE position BETWEEN ?1 AND ?2 ORDER BY position, idx",
        )
        .and_then(|mut s| {
            s.query_map(params![first, last], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })?
            .collect()
        })
        .map_err(sql("reading commits' key writes"))?;
    for (position, key, op, value, ttl, expect, expect_version) in rows {
        if let Some(&i) = index.get(&position) {
            let w = write_from_row(position, key, op, value, ttl, expect, expect_version)?;
            records[i].kv.push(w);
        }
    }
    let sigs: Vec<(i64, String, Vec<u8>)> = c
        .prepare_cached(
            "SELECT position, key_id, signature FROM commit_signatures
             WHERE position BETWEEN ?1 AND ?2",
        )
        .and_then(|mut s| {
            s.query_map(params![first, last], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect()
        })
        .map_err(sql("reading commit signatures"))?;
    for (position, key_id, signature) in sigs {
        if let Some(&i) = index.get(&position) {
            // A signature of the wrong length is kept as zeros: it fails verification there.
            let signature: [u8; 64] = signature.try_into().unwrap_or([0u8; 64]);
            records[i].signature = Some(CommitSignature { key_id, signature });
        }
    }
    Ok(())
}
