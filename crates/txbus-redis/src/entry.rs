//! How a relayed message is laid out as a stream entry, and read back.

use redis::Value;
use txbus_relay::wire::{self, DecodeError};
use txbus_relay::{InboundMessage, OutboundMessage};

/// The field that holds the payload (the stored JSON); the [`wire`] headers are the other
/// fields.
pub const PAYLOAD_FIELD: &str = "payload";

/// The field–value pairs of a relayed message's stream entry: the payload, then the [`wire`]
/// headers.
pub fn entry_fields(message: &OutboundMessage) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::with_capacity(8);
    out.push((PAYLOAD_FIELD, message.payload.to_vec()));
    for (name, value) in wire::headers(message) {
        out.push((name, value.into_bytes()));
    }
    out
}

/// One entry read from a stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    pub(crate) id: String,
    /// `None` for an entry that was deleted while pending.
    pub(crate) fields: Option<Vec<(String, Vec<u8>)>>,
}

impl StreamEntry {
    /// Decodes the message the entry carries.
    pub(crate) fn decode(&self) -> Result<InboundMessage, DecodeError> {
        let fields = self.fields.as_deref().unwrap_or_default();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let payload = fields
            .iter()
            .find(|(n, _)| n == PAYLOAD_FIELD)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default();
        wire::decode(get, payload)
    }
}

pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        _ => None,
    }
}

/// Parses one entry: `[id, [field, value, …]]` (fields `nil` for a deleted entry).
pub(crate) fn parse_entry(value: &Value) -> Option<StreamEntry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1) {
        None | Some(Value::Nil) => None,
        Some(Value::Array(kv)) => Some(
            kv.chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, bytes(pair.get(1)?)?)))
                .collect(),
        ),
        Some(Value::Map(kv)) => Some(
            kv.iter()
                .filter_map(|(k, v)| Some((text(k)?, bytes(v)?)))
                .collect(),
        ),
        Some(_) => return None,
    };
    Some(StreamEntry { id, fields })
}

/// Reads one stream entry (`[id, [field, value, …]]`, as `XREADGROUP` and `XAUTOCLAIM` return
/// them) and decodes the message it carries, as the source does: `None` when the reply is not
/// an entry at all, an inner `None` for an entry deleted while pending. Anything a producer
/// may `XADD` comes back as a value or a [`DecodeError`], never a panic.
pub fn decode_entry(
    value: &Value,
) -> Option<(String, Option<Result<InboundMessage, DecodeError>>)> {
    let entry = parse_entry(value)?;
    let message = entry.fields.is_some().then(|| entry.decode());
    Some((entry.id, message))
}

/// Parses a list of entries.
pub(crate) fn parse_entries(value: &Value) -> Option<Vec<StreamEntry>> {
    match value {
        Value::Array(items) => items.iter().map(parse_entry).collect(),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}
