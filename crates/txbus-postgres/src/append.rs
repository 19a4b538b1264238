//! Appending the commits of one transaction: their rows (with data hashes, unsealed), their
//! messages, their deliveries and their stream versions, in one statement, and the
//! announcement of the work they bring; with the key writes of the transaction when it has
//! any, after their conditions were checked (see [`crate::condition`]).
//!
//! A transaction whose commits have no stream and no key writes runs that one statement and
//! nothing else.

use sqlx::PgConnection;
use txbus_core::chain::{self, Hash};
use txbus_core::kv::KvWrite;
use txbus_core::store::{AppendReceipt, Conflict, Error, LogMessage, NewCommit};
use txbus_core::Outcome;

use crate::condition::{self, Granted, Input};
use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::{int, unsigned};
use crate::schema::{op_status, status, Schema};

/// One statement for the whole batch. Ids come from the sequences, one per row, numbered by
/// ordinal (`o`) so that each receipt gets exactly its own whatever order `nextval` ran in; the
/// arrays of messages and deliveries point at their commit by its ordinal. Data-modifying CTEs
/// all run, referenced or not.
const APPEND: &str = "
WITH cid AS MATERIALIZED (
         SELECT o, nextval('{s}.commits_id_seq') AS id FROM generate_series(1, $1::INT) AS o),
     did AS MATERIALIZED (
         SELECT o, nextval('{s}.deliveries_id_seq') AS id FROM generate_series(1, $2::INT) AS o),
     c AS (
         INSERT INTO {s}.commits (id, op_id, kind, created_at, message_count, data_hash,
                                  op_status, op_remaining, op_finished_at)
         SELECT cid.id, v.op_id, v.kind, v.created_at, v.message_count, v.data_hash,
                v.op_status, v.op_remaining, v.finished_at
         FROM UNNEST($3::UUID[], $4::SMALLINT[], $5::BIGINT[], $6::INT[], $7::BYTEA[],
                     $8::SMALLINT[], $9::INT[], $10::BIGINT[])
              WITH ORDINALITY AS v(op_id, kind, created_at, message_count, data_hash,
                                   op_status, op_remaining, finished_at, o)
         JOIN cid ON cid.o = v.o),
     m AS (
         INSERT INTO {s}.messages (commit_id, idx, id, event_type, module, payload, headers)
         SELECT cid.id, v.idx, v.id, v.event_type, v.module, v.payload, v.headers
         FROM UNNEST($11::INT[], $12::INT[], $13::UUID[], $14::TEXT[], $15::TEXT[], $16::TEXT[],
                     $17::TEXT[]) AS v(commit_o, idx, id, event_type, module, payload, headers)
         JOIN cid ON cid.o = v.commit_o),
     d AS (
         INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts, fence,
                                     owner, next_at, updated_at)
         SELECT did.id, cid.id, v.idx, v.handler, v.status, 0, v.fence, v.owner, $23, $23
         FROM UNNEST($18::INT[], $19::INT[], $20::TEXT[], $21::SMALLINT[], $22::BIGINT[],
                     $24::UUID[])
              WITH ORDINALITY AS v(commit_o, idx, handler, status, fence, owner, o)
         JOIN cid ON cid.o = v.commit_o
         JOIN did ON did.o = v.o)";

/// The stream rows, added to [`APPEND`] only when the transaction has any.
const STREAMS: &str = ",
     st AS (
         INSERT INTO {s}.streams (stream, version, commit_id, idx)
         SELECT v.stream, v.version, cid.id, v.idx
         FROM UNNEST($26::INT[], $27::TEXT[], $28::BIGINT[], $29::INT[])
              AS v(commit_o, stream, version, idx)
         JOIN cid ON cid.o = v.commit_o)";

/// What [`APPEND`] returns: the ids, in order.
const RETURNING: &str = "
SELECT ARRAY(SELECT id FROM cid ORDER BY o), ARRAY(SELECT id FROM did ORDER BY o)
FROM pg_notify($25, '')";

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The data hash of a commit: what the sealer links into the chain and `verify` checks.
pub(crate) fn data_hash(c: &NewCommit) -> Hash {
    chain::data_hash(
        &c.operation_id.0,
        c.kind,
        c.created_at_ms,
        c.messages.iter().map(|m| LogMessage::from(&**m)),
        &c.kv,
    )
}

/// One stream row of a transaction: the commit's place in the transaction's list, the stream,
/// the version, the message's index in its commit.
type StreamRow<'a> = (usize, &'a str, i64, i32);

/// One write of a transaction: a commit (with its data hash) or a batch of key writes.
#[derive(Clone, Copy)]
pub(crate) enum Write<'a> {
    Commit(&'a NewCommit, &'a Hash),
    Kv(&'a [KvWrite]),
}

impl<'a> Write<'a> {
    /// Its conditions, when it has any.
    fn conditions(self) -> Option<Input<'a>> {
        let input = match self {
            Write::Commit(c, _) => Input {
                streams: &c.streams,
                kv: &c.kv,
            },
            Write::Kv(kv) => Input { streams: &[], kv },
        };
        (!input.streams.is_empty() || !input.kv.is_empty()).then_some(input)
    }
}

/// What a write wrote.
pub(crate) enum Written {
    Commit(AppendReceipt),
    /// Each key's new version (0 for a delete).
    Kv(Vec<u64>),
}

/// Writes `writes` in the caller's transaction, in order, and returns each one's result: what
/// it wrote, or the conflict that refused it (a refused write leaves nothing; the others are
/// written all the same). An error means the transaction must not commit.
pub(crate) async fn write(
    conn: &mut PgConnection,
    schema: &Schema,
    writes: &[Write<'_>],
    now: i64,
) -> Result<Vec<Result<Written, Conflict>>, Error> {
    let conditional: Vec<(usize, Input<'_>)> = writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.conditions().map(|c| (i, c)))
        .collect();
    let mut verdicts: Vec<Option<Result<Granted<'_>, Conflict>>> =
        writes.iter().map(|_| None).collect();
    let mut keys = std::collections::BTreeMap::new();
    if !conditional.is_empty() {
        let inputs: Vec<Input<'_>> = conditional.iter().map(|(_, c)| *c).collect();
        let plan = condition::plan(conn, schema, &inputs, now).await?;
        for ((i, _), verdict) in conditional.iter().zip(plan.verdicts) {
            verdicts[*i] = Some(verdict);
        }
        keys = plan.keys;
    }

    let mut commits: Vec<(&NewCommit, &Hash)> = Vec::with_capacity(writes.len());
    let mut stream_rows: Vec<StreamRow<'_>> = Vec::new();
    for (w, verdict) in writes.iter().zip(&verdicts) {
        if let (Write::Commit(c, hash), None | Some(Ok(_))) = (w, verdict) {
            if let Some(Ok(granted)) = verdict {
                let k = commits.len();
                stream_rows.extend(granted.streams.iter().map(|&(s, v, i)| (k, s, v, i)));
            }
            commits.push((c, hash));
        }
    }
    let receipts = if commits.is_empty() {
        Vec::new()
    } else {
        append_all(conn, schema, &commits, &stream_rows, now).await?
    };
    crate::commit_meta::insert_kv(conn, schema, &commits, &receipts).await?;
    let mut receipts = receipts.into_iter();
    crate::kv::write(conn, schema, &keys).await?;

    writes
        .iter()
        .zip(verdicts)
        .map(|(w, verdict)| {
            Ok(match (w, verdict) {
                (_, Some(Err(conflict))) => Err(conflict),
                (Write::Commit(..), _) => {
                    Ok(Written::Commit(receipts.next().ok_or_else(|| {
                        Error::Corrupt("a commit of the batch got no receipt".into())
                    })?))
                }
                (Write::Kv(_), Some(Ok(granted))) => Ok(Written::Kv(granted.versions)),
                (Write::Kv(_), None) => Ok(Written::Kv(Vec::new())),
            })
        })
        .collect()
}

/// Appends `commits` (each with its data hash) and their stream rows in the caller's
/// transaction, announces work, and returns the receipts in order.
async fn append_all(
    conn: &mut PgConnection,
    schema: &Schema,
    commits: &[(&NewCommit, &Hash)],
    streams: &[StreamRow<'_>],
    now: i64,
) -> Result<Vec<AppendReceipt>, Error> {
    let delivery_count: usize = commits.iter().map(|(c, _)| c.deliveries.len()).sum();
    let message_count: usize = commits.iter().map(|(c, _)| c.messages.len()).sum();

    let mut c_op = Vec::with_capacity(commits.len());
    let mut c_kind = Vec::with_capacity(commits.len());
    let mut c_created = Vec::with_capacity(commits.len());
    let mut c_messages = Vec::with_capacity(commits.len());
    let mut c_hash = Vec::with_capacity(commits.len());
    let mut c_status = Vec::with_capacity(commits.len());
    let mut c_remaining = Vec::with_capacity(commits.len());
    let mut c_finished = Vec::with_capacity(commits.len());

    let mut m_commit = Vec::with_capacity(message_count);
    let mut m_idx = Vec::with_capacity(message_count);
    let mut m_id = Vec::with_capacity(message_count);
    let mut m_type = Vec::with_capacity(message_count);
    let mut m_module = Vec::with_capacity(message_count);
    let mut m_payload = Vec::with_capacity(message_count);
    let mut m_headers = Vec::with_capacity(message_count);

    let mut d_commit = Vec::with_capacity(delivery_count);
    let mut d_idx = Vec::with_capacity(delivery_count);
    let mut d_handler = Vec::with_capacity(delivery_count);
    let mut d_status = Vec::with_capacity(delivery_count);
    let mut d_fence = Vec::with_capacity(delivery_count);
    let mut d_owner = Vec::with_capacity(delivery_count);

    for (k, &(c, data)) in commits.iter().enumerate() {
        // Ordinals start at 1, like WITH ORDINALITY and generate_series.
        let o = count(k + 1);
        let finished = c.deliveries.is_empty();
        c_op.push(PgUuid(c.operation_id.0));
        c_kind.push(c.kind as i16);
        c_created.push(c.created_at_ms);
        c_messages.push(count(c.messages.len()));
        c_hash.push(data.to_vec());
        c_status.push(if finished {
            op_status::SUCCEEDED
        } else {
            op_status::PENDING
        });
        c_remaining.push(count(c.deliveries.len()));
        c_finished.push(finished.then_some(now));

        for (i, m) in c.messages.iter().enumerate() {
            m_commit.push(o);
            m_idx.push(count(i));
            m_id.push(PgUuid(m.id.0));
            m_type.push(m.event_type.as_str());
            m_module.push(m.module.as_deref());
            m_payload.push(m.payload_json.as_str());
            m_headers.push(m.headers_json.as_str());
        }

        for d in &c.deliveries {
            let (st, fence, owner) = match c.lease_to {
                Some(owner) if d.leased => (status::LEASED, 1i64, Some(PgUuid(owner))),
                _ => (status::PENDING, 0, None),
            };
            d_commit.push(o);
            d_idx.push(int(d.message_index));
            d_handler.push(&*d.handler);
            d_status.push(st);
            d_fence.push(fence);
            d_owner.push(owner);
        }
    }

    let sql = if streams.is_empty() {
        schema.sql(&[APPEND, RETURNING].concat())
    } else {
        schema.sql(&[APPEND, STREAMS, RETURNING].concat())
    };
    let mut s_commit = Vec::with_capacity(streams.len());
    let mut s_stream = Vec::with_capacity(streams.len());
    let mut s_version = Vec::with_capacity(streams.len());
    let mut s_idx = Vec::with_capacity(streams.len());
    for &(k, stream, version, idx) in streams {
        s_commit.push(count(k + 1));
        s_stream.push(stream);
        s_version.push(version);
        s_idx.push(idx);
    }
    let mut query = sqlx::query_as(&sql)
        .bind(count(commits.len()))
        .bind(count(delivery_count))
        .bind(&c_op)
        .bind(&c_kind)
        .bind(&c_created)
        .bind(&c_messages)
        .bind(&c_hash)
        .bind(&c_status)
        .bind(&c_remaining)
        .bind(&c_finished)
        .bind(&m_commit)
        .bind(&m_idx)
        .bind(&m_id)
        .bind(&m_type)
        .bind(&m_module)
        .bind(&m_payload)
        .bind(&m_headers)
        .bind(&d_commit)
        .bind(&d_idx)
        .bind(&d_handler)
        .bind(&d_status)
        .bind(&d_fence)
        .bind(now)
        .bind(&d_owner)
        .bind(&schema.work_channel);
    if !streams.is_empty() {
        query = query
            .bind(&s_commit)
            .bind(&s_stream)
            .bind(&s_version)
            .bind(&s_idx);
    }
    let (commit_ids, delivery_ids): (Vec<i64>, Vec<i64>) = query
        .fetch_one(&mut *conn)
        .await
        .map_err(db("appending commits"))?;
    if commit_ids.len() != commits.len() || delivery_ids.len() != delivery_count {
        return Err(Error::Corrupt(
            "the database allocated a different number of ids than asked for".into(),
        ));
    }

    let mut next_delivery = delivery_ids.into_iter();
    Ok(commits
        .iter()
        .zip(commit_ids)
        .map(|((c, _), id)| AppendReceipt {
            commit_id: unsigned(id),
            delivery_ids: next_delivery.by_ref().take(c.deliveries.len()).collect(),
            chain_hash: None,
            finished: c.deliveries.is_empty().then_some(Outcome {
                operation_id: c.operation_id,
                error: None,
                finished_at_ms: now,
            }),
            acked: Vec::new(),
        })
        .collect())
}
