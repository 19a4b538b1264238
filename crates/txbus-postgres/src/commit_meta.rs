//! What the log keeps with a commit besides its messages: its key–value writes (so that the
//! data hash covers them and past states can be rebuilt) and, on the last commit of each
//! sealing round when a signer is set, the signature of its chain hash (written by the
//! sealer, see [`crate::seal`]).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sqlx::PgConnection;
use txbus_core::chain::Hash;
use txbus_core::kv::{KvExpect, KvOp, KvWrite};
use txbus_core::signing::{CommitSignature, CommitSigner};
use txbus_core::store::{AppendReceipt, CommitRecord, Error, NewCommit};

use crate::error::db;
use crate::row::signed;
use crate::schema::Schema;

/// The signer shared by the store handle (which sets it) and the sealer (which signs).
pub(crate) type SharedSigner = Arc<RwLock<Option<Arc<CommitSigner>>>>;

pub(crate) fn current(signer: &SharedSigner) -> Option<Arc<CommitSigner>> {
    signer
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Keeps the key–value writes of the appended commits with them, in one statement (none when
/// no commit has any).
pub(crate) async fn insert_kv(
    conn: &mut PgConnection,
    schema: &Schema,
    commits: &[(&NewCommit, &Hash)],
    receipts: &[AppendReceipt],
) -> Result<(), Error> {
    let mut key = Vec::new();
    let mut commit_id = Vec::new();
    let mut idx = Vec::new();
    let mut op = Vec::new();
    let mut value: Vec<Option<&[u8]>> = Vec::new();
    let mut ttl_ms: Vec<Option<i64>> = Vec::new();
    let mut expires_at: Vec<Option<i64>> = Vec::new();
    let mut expect = Vec::new();
    let mut expect_version: Vec<Option<i64>> = Vec::new();
    for ((c, _), receipt) in commits.iter().zip(receipts) {
        for (i, w) in c.kv.iter().enumerate() {
            key.push(w.key.as_str());
            commit_id.push(signed(receipt.commit_id));
            idx.push(i32::try_from(i).unwrap_or(i32::MAX));
            let ttl = match &w.op {
                KvOp::Put { value: v, ttl } => {
                    op.push(1i16);
                    value.push(Some(v.as_slice()));
                    ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
                }
                KvOp::Delete => {
                    op.push(2i16);
                    value.push(None);
                    None
                }
            };
            ttl_ms.push(ttl);
            expires_at.push(ttl.map(|t| c.created_at_ms.saturating_add(t)));
            let (e, v) = match w.expect {
                KvExpect::Any => (0i16, None),
                KvExpect::Absent => (1, None),
                KvExpect::Version(v) => (2, Some(signed(v))),
            };
            expect.push(e);
            expect_version.push(v);
        }
    }
    if key.is_empty() {
        return Ok(());
    }
    sqlx::query(&schema.sql(
        "INSERT INTO {s}.commit_kv (key, commit_id, idx, op, value, ttl_ms, expires_at, expect,
                                    expect_version)
         SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::INT[], $4::SMALLINT[], $5::BYTEA[],
                              $6::BIGINT[], $7::BIGINT[], $8::SMALLINT[], $9::BIGINT[])",
    ))
    .bind(&key)
    .bind(&commit_id)
    .bind(&idx)
    .bind(&op)
    .bind(&value)
    .bind(&ttl_ms)
    .bind(&expires_at)
    .bind(&expect)
    .bind(&expect_version)
    .execute(&mut *conn)
    .await
    .map_err(db("keeping commits' key writes"))?;
    Ok(())
}

type KvRow = (
    i64,
    String,
    i16,
    Option<Vec<u8>>,
    Option<i64>,
    i16,
    Option<i64>,
);

fn write_from_row(row: KvRow) -> Result<(i64, KvWrite), Error> {
    let (commit, key, op, value, ttl_ms, expect, expect_version) = row;
    let corrupt = |what: &str| Error::Corrupt(format!("commit {commit}: key {key:?}: {what}"));
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
    Ok((
        commit,
        KvWrite {
            key: key.clone(),
            op,
            expect,
        },
    ))
}

/// Fills in the key–value writes and signatures of a page of commits; `ids[i]` is the row id
/// of `records[i]`.
pub(crate) async fn attach(
    conn: &mut PgConnection,
    schema: &Schema,
    ids: &[i64],
    records: &mut [CommitRecord],
) -> Result<(), Error> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(());
    };
    let (first, last) = (signed(first.position), signed(last.position));
    let by_id: HashMap<i64, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let rows: Vec<KvRow> = sqlx::query_as(&schema.sql(
        "SELECT commit_id, key, op, value, ttl_ms, expect, expect_version FROM {s}.commit_kv
         WHERE commit_id = ANY($1) ORDER BY commit_id, idx",
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading commits' key writes"))?;
    for row in rows {
        let (commit, write) = write_from_row(row)?;
        if let Some(&i) = by_id.get(&commit) {
            records[i].kv.push(write);
        }
    }
    let sigs: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(&schema.sql(
        "SELECT position, key_id, signature FROM {s}.commit_signatures
         WHERE position BETWEEN $1 AND $2",
    ))
    .bind(first)
    .bind(last)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading commit signatures"))?;
    let by_position: HashMap<i64, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (signed(r.position), i))
        .collect();
    for (position, key_id, signature) in sigs {
        if let Some(&i) = by_position.get(&position) {
            // A signature of the wrong length is kept as zeros: it fails verification there.
            let signature: [u8; 64] = signature.try_into().unwrap_or([0u8; 64]);
            records[i].signature = Some(CommitSignature { key_id, signature });
        }
    }
    Ok(())
}
