//! Appending a commit: its row with the data and chain hashes, its messages, its deliveries.

use rusqlite::{params, Transaction};
use txbus_core::chain::{self, Hash};
use txbus_core::store::{AppendReceipt, CompletionEffect, Error, LogMessage, NewCommit};
use txbus_core::Outcome;

use crate::error::sql;
use crate::inline;
use crate::schema::{op_status, status};
use crate::writer::State;

/// The data hash of a commit: what the writer links into the chain and `verify` checks.
pub(crate) fn data_hash(c: &NewCommit) -> Hash {
    chain::data_hash(
        &c.operation_id.0,
        c.kind,
        c.created_at_ms,
        c.messages.iter().map(|m| LogMessage::from(&**m)),
        &c.kv,
    )
}

pub(crate) fn append(
    tx: &Transaction<'_>,
    state: &mut State,
    c: &NewCommit,
    data: &Hash,
    now: i64,
) -> Result<AppendReceipt, Error> {
    // Conditions first: a conflict returns before anything is written, so it fails only this
    // commit and not the group commit around it.
    let stream_versions = crate::stream::check(tx, &c.streams)?;
    let kv_versions = crate::kv::check(tx, &c.kv, now)?;
    crate::complete::check_leases(tx, &c.acks)?;
    let position = state.position + 1;
    let chain_hash = chain::chain_hash(data, &state.chain);
    let remaining = c.deliveries.len();
    let finished = remaining == 0;
    let pos =
        i64::try_from(position).map_err(|_| Error::Corrupt("log position overflow".into()))?;
    // The deliveries take consecutive ids; those leased to the committing bus stay on the
    // commit row (see `inline`), the others get rows below.
    let first_delivery = state.next_delivery_id;
    let mut entries = Vec::new();
    let mut open = 0i64;
    if c.lease_to.is_some() {
        for (k, d) in c.deliveries.iter().enumerate().take(inline::MAX_INLINE) {
            if d.leased {
                let offset = k as u32;
                open |= inline::bit(offset);
                entries.push(inline::Entry {
                    offset,
                    idx: d.message_index,
                    handler: d.handler.to_string(),
                });
            }
        }
    }
    tx.prepare_cached(
        "INSERT INTO commits (position, op_id, kind, created_at, message_count, data_hash, chain_hash,
                              op_status, op_remaining, op_finished_at, first_delivery,
                              delivery_count, inline, inline_open, inline_owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )
    .and_then(|mut s| {
        s.execute(params![
            pos,
            c.operation_id.0.as_bytes(),
            c.kind as u8,
            c.created_at_ms,
            c.messages.len() as i64,
            &data[..],
            &chain_hash[..],
            if finished { op_status::SUCCEEDED } else { op_status::PENDING },
            remaining as i64,
            finished.then_some(now),
            (!finished).then_some(first_delivery),
            remaining as i64,
            (!entries.is_empty()).then(|| inline::encode(&entries)),
            open,
            c.lease_to
                .as_ref()
                .filter(|_| open != 0)
                .map(|o| o.as_bytes().as_slice()),
        ])
    })
    .map_err(sql("inserting a commit"))?;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO messages (position, idx, id, event_type, module, payload, headers)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(sql("preparing a message insert"))?;
        for (i, m) in c.messages.iter().enumerate() {
            stmt.execute(params![
                pos,
                i as i64,
                m.id.0.as_bytes(),
                m.event_type,
                m.module,
                m.payload_json,
                m.headers_json
            ])
            .map_err(sql("inserting a message"))?;
        }
    }
    if !c.streams.is_empty() {
        crate::stream::append(tx, pos, &c.streams, &stream_versions)?;
    }
    if !c.kv.is_empty() {
        crate::kv::apply(tx, &c.kv, &kv_versions, now)?;
        crate::commit_meta::insert_kv(tx, pos, c.created_at_ms, &c.kv)?;
    }
    let delivery_ids: Vec<i64> = (first_delivery..).take(c.deliveries.len()).collect();
    state.next_delivery_id += c.deliveries.len() as i64;
    if entries.len() < c.deliveries.len() {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, position, idx, handler, status, attempts, fence, owner, next_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?8)",
            )
            .map_err(sql("preparing a delivery insert"))?;
        for (k, (d, &id)) in c.deliveries.iter().zip(&delivery_ids).enumerate() {
            if k < inline::MAX_INLINE && open & inline::bit(k as u32) != 0 {
                continue;
            }
            let (st, fence, owner) = match &c.lease_to {
                Some(owner) if d.leased => (status::LEASED, 1, Some(owner.as_bytes().as_slice())),
                _ => (status::PENDING, 0, None),
            };
            stmt.execute(params![
                id,
                pos,
                d.message_index,
                &*d.handler,
                st,
                fence,
                owner,
                now
            ])
            .map_err(sql("inserting a delivery"))?;
        }
    }
    state.position = position;
    state.chain = chain_hash;
    // The handler's acknowledgements ride in the same transaction; their leases were checked
    // above and nothing else writes between, so each applies.
    let acked = crate::complete::complete(tx, state, &c.acks, now)?;
    if acked.contains(&CompletionEffect::Stale) {
        return Err(Error::Corrupt(
            "an acknowledgement checked as current did not apply".into(),
        ));
    }
    Ok(AppendReceipt {
        commit_id: position,
        delivery_ids,
        chain_hash: Some(chain_hash),
        finished: finished.then_some(Outcome {
            operation_id: c.operation_id,
            error: None,
            finished_at_ms: now,
        }),
        acked,
    })
}
