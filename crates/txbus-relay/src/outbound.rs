//! A message on its way from the log to a broker.

use bytes::Bytes;
use txbus_core::{Headers, MessageId, OperationId, StoredMessage};

/// One message of the log, ready for a broker: what a [`crate::Publisher`] sends.
///
/// Everything a receiver needs travels with it: the original message id (so that the broker
/// and the receiving [`crate::Inbox`] can drop repeats), the event type and module, the
/// headers (correlation and causation ids, …), the payload exactly as stored, and where it
/// came from in the origin's log. [`crate::wire`] turns it into broker headers.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// The message id, unchanged from the origin's log.
    pub id: MessageId,
    /// The operation (commit) the message belongs to at the origin.
    pub operation_id: OperationId,
    /// The position of its commit in the origin's log.
    pub position: u64,
    /// Its index within that commit.
    pub index: u32,
    /// The event type.
    pub event_type: String,
    /// The module, if any.
    pub module: Option<String>,
    /// The headers.
    pub headers: Headers,
    /// The payload: the JSON text exactly as stored.
    pub payload: Bytes,
    /// Where the broker should put it: a subject, routing key or stream name, as chosen by
    /// the relay's [`crate::Route`].
    pub destination: String,
}

impl OutboundMessage {
    /// Builds the outbound form of a stored message.
    pub fn from_stored(
        message: StoredMessage,
        operation_id: OperationId,
        position: u64,
        index: u32,
        destination: String,
    ) -> Self {
        Self {
            id: message.id,
            operation_id,
            position,
            index,
            event_type: message.event_type,
            module: message.module,
            headers: message.headers,
            payload: Bytes::from(message.payload_json),
            destination,
        }
    }
}
