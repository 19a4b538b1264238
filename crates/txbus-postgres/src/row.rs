//! Rows as read back from the database, and their conversion into the core's types.

use sqlx::postgres::PgRow;
use sqlx::Row;
use txbus_core::store::{CommitKind, Error};
use txbus_core::{MessageId, StoredMessage};

use crate::pg_uuid::PgUuid;

/// The columns of one `messages` row: id, event_type, module, payload, headers (in that order,
/// starting at the given column).
pub(crate) struct MessageRow {
    pub(crate) id: PgUuid,
    pub(crate) event_type: String,
    pub(crate) module: Option<String>,
    pub(crate) payload: String,
    pub(crate) headers: String,
}

impl MessageRow {
    pub(crate) fn read(r: &PgRow, first: usize) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get(first)?,
            event_type: r.try_get(first + 1)?,
            module: r.try_get(first + 2)?,
            payload: r.try_get(first + 3)?,
            headers: r.try_get(first + 4)?,
        })
    }

    /// The stored message; an error says why the stored text does not parse.
    pub(crate) fn parse(self) -> Result<StoredMessage, String> {
        StoredMessage::from_stored(
            MessageId(self.id.0),
            self.event_type,
            self.module,
            self.payload,
            self.headers,
        )
    }

    /// The stored message with its text kept exactly as stored, for the hash check.
    pub(crate) fn raw(self) -> StoredMessage {
        StoredMessage::from_stored_lossy(
            MessageId(self.id.0),
            self.event_type,
            self.module,
            self.payload,
            self.headers,
        )
    }
}

/// A commit kind from its stored number.
pub(crate) fn kind(v: i16, commit_id: i64) -> Result<CommitKind, Error> {
    u8::try_from(v)
        .ok()
        .and_then(CommitKind::from_u8)
        .ok_or_else(|| Error::Corrupt(format!("commit {commit_id}: unknown kind {v}")))
}

/// A stored id (BIGINT, always positive) as the contract's unsigned id.
pub(crate) fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A contract id or count as a BIGINT, saturating.
pub(crate) fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored INT (index, attempts, count) as the contract's `u32`.
pub(crate) fn small(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// A contract `u32` as an INT, saturating.
pub(crate) fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}
