//! Rows as read back from the database, and their conversion into the core's types.

use rusqlite::Row;
use txbus_core::store::Error;
use txbus_core::{MessageId, OperationId, StoredMessage};

/// The columns of one `messages` row: id, event_type, module, payload, headers (in that order,
/// starting at the given column).
pub(crate) struct MessageRow {
    pub(crate) id: Vec<u8>,
    pub(crate) event_type: String,
    pub(crate) module: Option<String>,
    pub(crate) payload: String,
    pub(crate) headers: String,
}

impl MessageRow {
    pub(crate) fn read(r: &Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(first)?,
            event_type: r.get(first + 1)?,
            module: r.get(first + 2)?,
            payload: r.get(first + 3)?,
            headers: r.get(first + 4)?,
        })
    }

    /// The stored message; an error says why the stored text does not parse.
    pub(crate) fn parse(self) -> Result<StoredMessage, String> {
        let id = message_id(&self.id).map_err(|e| e.to_string())?;
        StoredMessage::from_stored(id, self.event_type, self.module, self.payload, self.headers)
    }

    /// The stored message with its text kept exactly as stored, for the hash check.
    pub(crate) fn raw(self) -> Result<StoredMessage, Error> {
        let id = message_id(&self.id)?;
        Ok(StoredMessage::from_stored_lossy(
            id,
            self.event_type,
            self.module,
            self.payload,
            self.headers,
        ))
    }
}

/// An operation id from its stored bytes.
pub(crate) fn op_id(bytes: &[u8]) -> Result<OperationId, Error> {
    uuid::Uuid::from_slice(bytes)
        .map(OperationId)
        .map_err(|_| Error::Corrupt("an operation id is not 16 bytes".into()))
}

/// A message id from its stored bytes.
pub(crate) fn message_id(bytes: &[u8]) -> Result<MessageId, Error> {
    uuid::Uuid::from_slice(bytes)
        .map(MessageId)
        .map_err(|_| Error::Corrupt("a message id is not 16 bytes".into()))
}
