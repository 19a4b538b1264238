//! Rows as read back from the database, and their conversion into the core's types.

use rusqlite::types::ValueRef;
use rusqlite::Row;
use txbus_core::store::Error;
use txbus_core::{MessageId, OperationId, StoredMessage};

/// The columns of one `messages` row: id, event_type, module, payload, headers (in that order,
/// starting at the given column). Text columns are read as bytes: a damaged file may hold text
/// that is not UTF-8, and that must fail this one message, not the query that read it.
pub(crate) struct MessageRow {
    pub(crate) id: Vec<u8>,
    pub(crate) event_type: Vec<u8>,
    pub(crate) module: Option<Vec<u8>>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Vec<u8>,
}

/// A text (or blob) column as bytes.
fn bytes(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    match r.get_ref(i)? {
        ValueRef::Text(b) | ValueRef::Blob(b) => Ok(b.to_vec()),
        other => Err(rusqlite::Error::InvalidColumnType(
            i,
            format!("column {i}"),
            other.data_type(),
        )),
    }
}

fn optional_bytes(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Vec<u8>>> {
    match r.get_ref(i)? {
        ValueRef::Null => Ok(None),
        _ => bytes(r, i).map(Some),
    }
}

fn utf8(what: &str, bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| format!("stored {what} is not UTF-8: {e}"))
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl MessageRow {
    pub(crate) fn read(r: &Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(first)?,
            event_type: bytes(r, first + 1)?,
            module: optional_bytes(r, first + 2)?,
            payload: bytes(r, first + 3)?,
            headers: bytes(r, first + 4)?,
        })
    }

    /// The stored message; an error says why the stored text does not parse.
    pub(crate) fn parse(self) -> Result<StoredMessage, String> {
        let id = message_id(&self.id).map_err(|e| e.to_string())?;
        StoredMessage::from_stored(
            id,
            utf8("event type", self.event_type)?,
            self.module.map(|m| utf8("module", m)).transpose()?,
            utf8("payload", self.payload)?,
            utf8("headers", self.headers)?,
        )
    }

    /// The stored message with its text kept as stored, for the hash check (text that is not
    /// UTF-8 is read lossily: it cannot be what was hashed, so the check fails on it).
    pub(crate) fn raw(self) -> Result<StoredMessage, Error> {
        let id = message_id(&self.id)?;
        Ok(StoredMessage::from_stored_lossy(
            id,
            lossy(self.event_type),
            self.module.map(lossy),
            lossy(self.payload),
            lossy(self.headers),
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
