//! A message received from a broker, on its way into the receiving bus.

use serde_json::Value;
use txbus_core::{Event, Headers, MessageId, OperationId};

/// A message as a broker delivered it, decoded by [`crate::wire::decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    /// The message id given at the origin, kept unchanged in the receiving bus.
    pub id: MessageId,
    /// The event type.
    pub event_type: String,
    /// The module, if any.
    pub module: Option<String>,
    /// The headers (correlation and causation ids, free-form entries).
    pub headers: Headers,
    /// The payload.
    pub payload: Value,
    /// The operation that committed it at the origin, when known.
    pub origin_operation: Option<OperationId>,
    /// The position of its commit in the origin's log, when known.
    pub origin_position: Option<u64>,
    /// Where to send the outcome, for a `transact` across services (see [`crate::RemoteReply`]).
    pub reply_to: Option<String>,
}

impl InboundMessage {
    /// The event to commit in the receiving bus: same id, type, module, payload and headers.
    /// The origin's stream, if any, is kept as the free-form header `origin-stream` (the
    /// message is not appended to a stream here).
    pub fn to_event(&self) -> Event {
        let mut event = Event::new(self.event_type.clone(), self.payload.clone()).with_id(self.id);
        if let Some(m) = &self.module {
            event = event.module(m.clone());
        }
        if let Some(c) = &self.headers.correlation_id {
            event = event.correlation_id(c.clone());
        }
        if let Some(c) = &self.headers.causation_id {
            event = event.causation_id(c.clone());
        }
        if let Some(s) = &self.headers.stream {
            event = event.header("origin-stream", s.clone());
        }
        for (k, v) in &self.headers.extra {
            event = event.header(k.clone(), v.clone());
        }
        event
    }
}
