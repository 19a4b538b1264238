//! Leasing due deliveries: pending ones, and those of buses that stopped sending heartbeats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, OptionalExtension, Transaction};
use txbus_core::store::{ClaimedDelivery, Error, OwnerId};
use txbus_core::{Failure, FailureKind, OperationId, StoredMessage};

use crate::complete::fail_operation;
use crate::error::sql;
use crate::row::{op_id, MessageRow};
use crate::writer::{ms, State};

/// What to lease.
pub(crate) struct Claim<'a> {
    pub(crate) owner: OwnerId,
    pub(crate) handlers: &'a [String],
    pub(crate) limit: usize,
    pub(crate) lease_ttl: Duration,
}

/// Leases up to `limit` due deliveries. Leases of owners whose heartbeat is older than the
/// ttl are looked for only when `scan_abandoned` (the writer throttles it): that search has
/// no index to use, and on the embedded store stale owners are rare, because opening the
/// store already frees every lease left in the file.
pub(crate) fn claim(
    tx: &Transaction<'_>,
    state: &State,
    req: &Claim<'_>,
    scan_abandoned: bool,
    now: i64,
) -> Result<Vec<ClaimedDelivery>, Error> {
    let owner = req.owner;
    let handlers_json = serde_json::to_string(req.handlers).unwrap_or_else(|_| "[]".into());
    let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
    let mut ids: Vec<i64> = tx
        .prepare_cached(
            "SELECT id FROM deliveries
             WHERE status = 0 AND next_at <= ?1 AND handler IN (SELECT value FROM json_each(?2))
             ORDER BY next_at, id LIMIT ?3",
        )
        .and_then(|mut s| {
            s.query_map(params![now, handlers_json, limit], |r| r.get(0))?
                .collect()
        })
        .map_err(sql("finding pending deliveries"))?;
    let pending = ids.len();
    let mut stale_owners: Vec<Vec<u8>> = Vec::new();
    if scan_abandoned && (ids.len() as i64) < limit {
        stale_owners = tx
            .prepare_cached("SELECT owner FROM owners WHERE heartbeat_at < ?1 AND owner != ?2")
            .and_then(|mut s| {
                s.query_map(params![now - ms(req.lease_ttl), owner.as_bytes()], |r| {
                    r.get(0)
                })?
                .collect()
            })
            .map_err(sql("finding stopped buses"))?;
        for stale in &stale_owners {
            let room = limit - ids.len() as i64;
            if room <= 0 {
                break;
            }
            if let Ok(owner) = OwnerId::from_slice(stale) {
                crate::inline::materialize_owner(tx, Some(&owner), now)?;
            }
            let more: Vec<i64> = tx
                .prepare_cached(
                    "SELECT id FROM deliveries
                     WHERE status = 1 AND owner = ?1 AND next_at <= ?2
                       AND handler IN (SELECT value FROM json_each(?3))
                     ORDER BY id LIMIT ?4",
                )
                .and_then(|mut s| {
                    s.query_map(params![stale, now, handlers_json, room], |r| r.get(0))?
                        .collect()
                })
                .map_err(sql("finding abandoned leases"))?;
            if !more.is_empty() {
                tracing::info!(
                    count = more.len(),
                    "taking over leases of a bus that stopped"
                );
            }
            ids.extend(more);
        }
    }
    let mut cache: HashMap<(i64, i64), Loaded> = HashMap::new();
    let mut claimed = Vec::with_capacity(ids.len());
    for (k, id) in ids.into_iter().enumerate() {
        // Ids past the pending ones were taken from stopped owners: one more interruption.
        let taken_over = i64::from(k >= pending);
        let (position, idx, handler, attempts, fence, interruptions): (
            i64,
            i64,
            String,
            i64,
            i64,
            i64,
        ) = tx
            .prepare_cached(
                "UPDATE deliveries SET status = 1, owner = ?2, fence = fence + 1, updated_at = ?3,
                     interruptions = interruptions + ?4
                 WHERE id = ?1 RETURNING position, idx, handler, attempts, fence, interruptions",
            )
            .and_then(|mut s| {
                s.query_row(params![id, owner.as_bytes(), now, taken_over], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
            })
            .map_err(sql("leasing a delivery"))?;
        let loaded = match cache.get(&(position, idx)) {
            Some(v) => v.clone(),
            None => {
                let v = load_message(tx, position, idx)?;
                cache.insert((position, idx), v.clone());
                v
            }
        };
        match loaded {
            Ok((message, operation_id)) => claimed.push(ClaimedDelivery {
                id,
                fence,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                interruptions: u32::try_from(interruptions).unwrap_or(u32::MAX),
                commit_id: u64::try_from(position).unwrap_or(0),
                operation_id,
                message_index: u32::try_from(idx).unwrap_or(u32::MAX),
                handler,
                message,
            }),
            Err(reason) => {
                // A message that cannot be read back can never be handled: dead-letter it
                // and fail its operation rather than leave it stuck.
                tracing::error!(delivery = id, %reason, "dead-lettering an unreadable message");
                tx.execute(
                    "UPDATE deliveries SET status = 4, owner = NULL, last_error = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, reason, now],
                )
                .map_err(sql("dead-lettering an unreadable message"))?;
                crate::inspect::died(tx, &handler, now)?;
                let failure = Failure {
                    event_index: u32::try_from(idx).unwrap_or(u32::MAX),
                    event_type: String::new(),
                    handler,
                    kind: FailureKind::Rejected,
                    reason,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                };
                fail_operation(tx, state, position, &failure, now)?;
            }
        }
    }
    for stale in &stale_owners {
        tx.prepare_cached(
            "DELETE FROM owners WHERE owner = ?1
             AND NOT EXISTS (SELECT 1 FROM deliveries WHERE status = 1 AND owner = ?1)",
        )
        .and_then(|mut s| s.execute(params![stale]))
        .map_err(sql("forgetting a stopped bus"))?;
    }
    Ok(claimed)
}

type Loaded = Result<(Arc<StoredMessage>, OperationId), String>;

fn load_message(tx: &Transaction<'_>, position: i64, idx: i64) -> Result<Loaded, Error> {
    let row = tx
        .prepare_cached(
            "SELECT m.id, m.event_type, m.module, m.payload, m.headers, c.op_id
             FROM messages m JOIN commits c ON c.position = m.position
             WHERE m.position = ?1 AND m.idx = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![position, idx], |r| {
                Ok((MessageRow::read(r, 0)?, r.get::<_, Vec<u8>>(5)?))
            })
            .optional()
        })
        .map_err(sql("reading a message"))?;
    let Some((message, op)) = row else {
        return Ok(Err(format!(
            "message {idx} of commit {position} is missing"
        )));
    };
    let op = match op_id(&op) {
        Ok(op) => op,
        Err(e) => return Ok(Err(e.to_string())),
    };
    Ok(message.parse().map(|m| (Arc::new(m), op)))
}
