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
use crate::notify::Announcements;
use crate::pg_uuid::PgUuid;
use crate::row::{int, unsigned};
use crate::schema::{op_status, status, Schema};

/// One statement for the whole batch, and a plan that cannot go wrong: it reads no table. Ids
/// come from the sequences into two arrays, one commit id per commit and one block of 64
/// delivery ids per started 64 deliveries (the deliveries sequence counts in steps of 64, so
/// the ids of a commit's first 64 deliveries are its `first_delivery_id` plus 0 to 63); rows
/// point into the arrays by subscript, so nothing is joined. Deliveries leased to the
/// committing bus among a commit's first 63 are kept on its row (see [`crate::inline`]); the
/// others get rows of their own. Data-modifying CTEs all run, referenced or not.
const APPEND: &str = "
WITH ids AS MATERIALIZED (
         SELECT ARRAY(SELECT nextval('{s}.commits_id_seq') FROM generate_series(1, $1::INT)) AS c,
                ARRAY(SELECT nextval('{s}.deliveries_id_seq') FROM generate_series(1, $2::INT))
                    AS b),
     c AS (
         INSERT INTO {s}.commits (id, op_id, kind, created_at, message_count, data_hash,
                                  op_status, op_remaining, op_finished_at, first_delivery_id,
                                  inline_idx, inline_handler, inline_owner, inline_open)
         SELECT ids.c[v.o], v.op_id, v.kind, v.created_at, v.message_count, v.data_hash,
                v.op_status, v.op_remaining, v.finished_at, ids.b[v.first_block],
                CASE WHEN v.inline_len > 0
                     THEN ($16::INT[])[v.inline_from : v.inline_from + v.inline_len - 1] END,
                CASE WHEN v.inline_len > 0
                     THEN ($17::TEXT[])[v.inline_from : v.inline_from + v.inline_len - 1] END,
                v.inline_owner, v.inline_open
         FROM ids,
              UNNEST($3::UUID[], $4::SMALLINT[], $5::BIGINT[], $6::INT[], $7::BYTEA[],
                     $8::SMALLINT[], $9::INT[], $10::BIGINT[], $11::INT[], $12::INT[],
                     $13::INT[], $14::UUID[], $15::BIGINT[])
              WITH ORDINALITY AS v(op_id, kind, created_at, message_count, data_hash,
                                   op_status, op_remaining, finished_at, first_block,
                                   inline_from, inline_len, inline_owner, inline_open, o)),
     m AS (
         INSERT INTO {s}.messages (commit_id, idx, id, event_type, module, payload, headers)
         SELECT ids.c[v.commit_o], v.idx, v.id, v.event_type, v.module, v.payload, v.headers
         FROM ids,
              UNNEST($18::INT[], $19::INT[], $20::UUID[], $21::TEXT[], $22::TEXT[],
                     $23::TEXT[], $24::TEXT[])
              AS v(commit_o, idx, id, event_type, module, payload, headers)),
     d AS (
         INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts, fence,
                                     owner, next_at, updated_at)
         SELECT ids.b[v.block] + v.off, ids.c[v.commit_o], v.idx, v.handler, v.status, 0,
                v.fence, v.owner, $33, $33
         FROM ids,
              UNNEST($25::INT[], $26::INT[], $27::INT[], $28::INT[], $29::TEXT[],
                     $30::SMALLINT[], $31::BIGINT[], $32::UUID[])
              AS v(commit_o, block, off, idx, handler, status, fence, owner))";

/// The stream rows, added to [`APPEND`] only when the transaction has any.
const STREAMS: &str = ",
     st AS (
         INSERT INTO {s}.streams (stream, version, commit_id, idx)
         SELECT v.stream, v.version, ids.c[v.commit_o], v.idx
         FROM ids, UNNEST($36::INT[], $37::TEXT[], $38::BIGINT[], $39::INT[])
                   AS v(commit_o, stream, version, idx))";

/// What [`APPEND`] returns: the commit ids and the delivery id blocks, in order; and it sends
/// the notifications it is given (only when it writes into the caller's own transaction, see
/// [`crate::notify`]).
const RETURNING: &str = "
SELECT ids.c, ids.b,
       (SELECT count(pg_notify(n.channel, n.payload))
        FROM UNNEST($34::TEXT[], $35::TEXT[]) AS n(channel, payload))
FROM ids";

/// Delivery ids come in blocks of this many (the step of the deliveries sequence).
pub(crate) const BLOCK: usize = 64;

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
///
/// What the transaction's commits have to announce — their finished operations, and work when
/// they leave deliveries for whichever bus claims them or `wake_sealers` is set (no sealer of
/// this process will seal them of its own accord) — is added to `announce`, or, when that is
/// `None`, sent by the transaction itself.
pub(crate) async fn write(
    conn: &mut PgConnection,
    schema: &Schema,
    writes: &[Write<'_>],
    now: i64,
    wake_sealers: bool,
    announce: Option<&mut Announcements>,
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
        append_all(
            conn,
            schema,
            &commits,
            &stream_rows,
            now,
            wake_sealers,
            announce,
        )
        .await?
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

/// Where a delivery of a commit goes: kept on the commit row, or a row of its own with this
/// status, fence and owner.
fn placement(c: &NewCommit, k: usize) -> Option<(i16, i64, Option<PgUuid>)> {
    let d = &c.deliveries[k];
    match c.lease_to {
        Some(_) if d.leased && k < crate::inline::MAX_INLINE => None,
        Some(owner) if d.leased => Some((status::LEASED, 1, Some(PgUuid(owner)))),
        _ => Some((status::PENDING, 0, None)),
    }
}

/// Appends `commits` (each with its data hash) and their stream rows in the caller's
/// transaction, sends their notifications, and returns the receipts in order.
async fn append_all(
    conn: &mut PgConnection,
    schema: &Schema,
    commits: &[(&NewCommit, &Hash)],
    streams: &[StreamRow<'_>],
    now: i64,
    wake_sealers: bool,
    announce: Option<&mut Announcements>,
) -> Result<Vec<AppendReceipt>, Error> {
    let n = commits.len();
    let message_count: usize = commits.iter().map(|(c, _)| c.messages.len()).sum();
    let blocks_of = |c: &NewCommit| c.deliveries.len().div_ceil(BLOCK);
    let block_count: usize = commits.iter().map(|(c, _)| blocks_of(c)).sum();

    let mut c_op = Vec::with_capacity(n);
    let mut c_kind = Vec::with_capacity(n);
    let mut c_created = Vec::with_capacity(n);
    let mut c_messages = Vec::with_capacity(n);
    let mut c_hash = Vec::with_capacity(n);
    let mut c_status = Vec::with_capacity(n);
    let mut c_remaining = Vec::with_capacity(n);
    let mut c_finished = Vec::with_capacity(n);
    let mut c_first_block: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut c_inline_from: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut c_inline_len = Vec::with_capacity(n);
    let mut c_inline_owner: Vec<Option<PgUuid>> = Vec::with_capacity(n);
    let mut c_inline_open = Vec::with_capacity(n);
    let mut i_idx = Vec::new();
    let mut i_handler: Vec<&str> = Vec::new();

    let mut m_commit = Vec::with_capacity(message_count);
    let mut m_idx = Vec::with_capacity(message_count);
    let mut m_id = Vec::with_capacity(message_count);
    let mut m_type = Vec::with_capacity(message_count);
    let mut m_module = Vec::with_capacity(message_count);
    let mut m_payload = Vec::with_capacity(message_count);
    let mut m_headers = Vec::with_capacity(message_count);

    let mut d_commit = Vec::new();
    let mut d_block = Vec::new();
    let mut d_off = Vec::new();
    let mut d_idx = Vec::new();
    let mut d_handler: Vec<&str> = Vec::new();
    let mut d_status = Vec::new();
    let mut d_fence = Vec::new();
    let mut d_owner: Vec<Option<PgUuid>> = Vec::new();

    let mut finished_ops = Vec::new();
    let mut pending_rows = false;

    // Blocks are numbered from 1 across the batch, like the array they index.
    let mut next_block = 1usize;
    for (j, &(c, data)) in commits.iter().enumerate() {
        // Ordinals start at 1, like WITH ORDINALITY and array subscripts.
        let o = count(j + 1);
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
        if finished {
            finished_ops.push(c.operation_id);
        }

        for (i, m) in c.messages.iter().enumerate() {
            m_commit.push(o);
            m_idx.push(count(i));
            m_id.push(PgUuid(m.id.0));
            m_type.push(m.event_type.as_str());
            m_module.push(m.module.as_deref());
            m_payload.push(m.payload_json.as_str());
            m_headers.push(m.headers_json.as_str());
        }

        let first_block = next_block;
        next_block += blocks_of(c);
        c_first_block.push((!finished).then(|| count(first_block)));
        // Inline entries cover the deliveries up to the last one kept on the row.
        let kept = (0..c.deliveries.len().min(crate::inline::MAX_INLINE))
            .filter(|&k| placement(c, k).is_none())
            .fold((0usize, 0i64), |(_, mask), k| (k + 1, mask | (1i64 << k)));
        let (inline_len, open) = kept;
        if inline_len > 0 {
            c_inline_from.push(Some(count(i_idx.len() + 1)));
            for d in &c.deliveries[..inline_len] {
                i_idx.push(int(d.message_index));
                i_handler.push(&d.handler);
            }
            c_inline_owner.push(c.lease_to.map(PgUuid));
        } else {
            c_inline_from.push(None);
            c_inline_owner.push(None);
        }
        c_inline_len.push(count(inline_len));
        c_inline_open.push(open);

        for (k, d) in c.deliveries.iter().enumerate() {
            let Some((st, fence, owner)) = placement(c, k) else {
                continue;
            };
            pending_rows |= st == status::PENDING;
            d_commit.push(o);
            d_block.push(count(first_block + k / BLOCK));
            d_off.push(count(k % BLOCK));
            d_idx.push(int(d.message_index));
            d_handler.push(&d.handler);
            d_status.push(st);
            d_fence.push(fence);
            d_owner.push(owner);
        }
    }
    let what = Announcements {
        work: pending_rows || wake_sealers,
        sealed: false,
        finished: finished_ops,
    };
    let (channels, payloads) = match announce {
        Some(announce) => {
            announce.merge(what);
            (Vec::new(), Vec::new())
        }
        None => what.notifications(schema),
    };

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
        .bind(count(n))
        .bind(count(block_count))
        .bind(&c_op)
        .bind(&c_kind)
        .bind(&c_created)
        .bind(&c_messages)
        .bind(&c_hash)
        .bind(&c_status)
        .bind(&c_remaining)
        .bind(&c_finished)
        .bind(&c_first_block)
        .bind(&c_inline_from)
        .bind(&c_inline_len)
        .bind(&c_inline_owner)
        .bind(&c_inline_open)
        .bind(&i_idx)
        .bind(&i_handler)
        .bind(&m_commit)
        .bind(&m_idx)
        .bind(&m_id)
        .bind(&m_type)
        .bind(&m_module)
        .bind(&m_payload)
        .bind(&m_headers)
        .bind(&d_commit)
        .bind(&d_block)
        .bind(&d_off)
        .bind(&d_idx)
        .bind(&d_handler)
        .bind(&d_status)
        .bind(&d_fence)
        .bind(&d_owner)
        .bind(now)
        .bind(&channels)
        .bind(&payloads);
    if !streams.is_empty() {
        query = query
            .bind(&s_commit)
            .bind(&s_stream)
            .bind(&s_version)
            .bind(&s_idx);
    }
    let (commit_ids, blocks, _): (Vec<i64>, Vec<i64>, i64) = query
        .fetch_one(&mut *conn)
        .await
        .map_err(db("appending commits"))?;
    if commit_ids.len() != n || blocks.len() != block_count {
        return Err(Error::Corrupt(
            "the database allocated a different number of ids than asked for".into(),
        ));
    }

    let mut next_block = 0usize;
    Ok(commits
        .iter()
        .zip(commit_ids)
        .map(|((c, _), id)| {
            let mine = &blocks[next_block..next_block + blocks_of(c)];
            next_block += mine.len();
            AppendReceipt {
                commit_id: unsigned(id),
                delivery_ids: (0..c.deliveries.len())
                    .map(|k| mine[k / BLOCK] + (k % BLOCK) as i64)
                    .collect(),
                chain_hash: None,
                finished: c.deliveries.is_empty().then_some(Outcome {
                    operation_id: c.operation_id,
                    error: None,
                    finished_at_ms: now,
                }),
                acked: Vec::new(),
            }
        })
        .collect())
}
