//! The audit trail: every action (replay, discard) with who did it, what, and when, kept in
//! the store's key–value space as a ring of bounded size.
//!
//! Records are `dashboard/audit/<sequence, 20 digits>`; the key `dashboard/audit-seq` holds
//! the last sequence number. Each record is written in one atomic write with the sequence
//! (compare-and-set) and the removal of the record `capacity` places before it, so the trail
//! never holds more than `capacity` records, whatever process writes it.

use serde::{Deserialize, Serialize};
use txbus_core::{Bus, Conflict, Error, KvExpect, KvWrite};

const SEQ_KEY: &str = "dashboard/audit-seq";
const PREFIX: &str = "dashboard/audit/";

/// One action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its sequence number (1, 2, …).
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Who (the dashboard user's name).
    pub user: String,
    /// The action: `replay` or `discard`.
    pub action: String,
    /// The delivery ids asked for.
    pub requested: Vec<i64>,
    /// Those the action applied to (the others were not dead letters).
    pub applied: Vec<i64>,
}

fn key(seq: u64) -> String {
    format!("{PREFIX}{seq:020}")
}

/// Appends a record, keeping at most `capacity`.
pub(crate) async fn record(
    bus: &Bus,
    capacity: u64,
    user: &str,
    action: &str,
    requested: &[i64],
    applied: &[i64],
) -> Result<AuditRecord, Error> {
    loop {
        let current = bus.kv_get(SEQ_KEY).await?;
        let (last, expect) = match &current {
            Some(e) => (
                String::from_utf8_lossy(&e.value)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0),
                KvExpect::Version(e.version),
            ),
            None => (0, KvExpect::Absent),
        };
        let rec = AuditRecord {
            seq: last + 1,
            at_ms: txbus_core::time::now_ms(),
            user: user.to_owned(),
            action: action.to_owned(),
            requested: requested.to_vec(),
            applied: applied.to_vec(),
        };
        let value = serde_json::to_vec(&rec)
            .map_err(|e| Error::Config(format!("an audit record does not serialize: {e}")))?;
        let mut writes = vec![
            KvWrite::put(SEQ_KEY, rec.seq.to_string().into_bytes()).expect(expect),
            KvWrite::put(key(rec.seq), value),
        ];
        if rec.seq > capacity {
            writes.push(KvWrite::delete(key(rec.seq - capacity)));
        }
        match bus.kv_write(writes).await {
            Ok(_) => return Ok(rec),
            // Another writer took this sequence number: take the next.
            Err(Error::Conflict(Conflict::Key { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The newest `limit` records (at most the capacity), newest first.
pub async fn recent(bus: &Bus, limit: usize) -> Result<Vec<AuditRecord>, Error> {
    let last = match bus.kv_get(SEQ_KEY).await? {
        Some(e) => String::from_utf8_lossy(&e.value)
            .trim()
            .parse::<u64>()
            .unwrap_or(0),
        None => return Ok(Vec::new()),
    };
    let limit = limit.clamp(1, 1000);
    let from = last.saturating_sub(limit as u64);
    let after = (from > 0).then(|| key(from));
    let entries = bus.kv_scan(PREFIX, after.as_deref(), limit).await?;
    let mut out: Vec<AuditRecord> = entries
        .iter()
        .filter_map(|e| match serde_json::from_slice(&e.value) {
            Ok(r) => Some(r),
            Err(err) => {
                tracing::warn!(key = %e.key, error = %err, "unreadable audit record skipped");
                None
            }
        })
        .collect();
    out.reverse();
    Ok(out)
}
