//! The message model: events a caller hands in, and messages as they are stored and delivered.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The id of one message. A UUIDv7, generated when the [`Event`] is built, before anything is
/// written, so that a caller can use it (in a response, as a business key) right away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of one operation: what one `transact` or `publish` call committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OperationId(pub Uuid);

impl OperationId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for OperationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for OperationId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Headers carried with a message: the ids that link a chain of work, and free-form entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers {
    /// Shared by every message of one logical flow (a request, a saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The stream the message was appended to, if any (set by the bus from the commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Any other entries (trace context, idempotency key, tenant, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl Headers {
    /// True when no header is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.stream.is_none()
            && self.extra.is_empty()
    }
}

/// An event with a type known at compile time.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use txbus_core::TypedEvent;
///
/// #[derive(Serialize, Deserialize)]
/// struct UserCreated { user_id: u64, email: String }
///
/// impl TypedEvent for UserCreated {
///     const EVENT_TYPE: &'static str = "user.created";
///     const MODULE: Option<&'static str> = Some("user");
/// }
/// ```
pub trait TypedEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event type this value is stored and routed under.
    const EVENT_TYPE: &'static str;
    /// The module the event belongs to, if any.
    const MODULE: Option<&'static str> = None;
}

/// An event handed to `transact` or `publish`.
///
/// Its [`MessageId`] is generated here, before anything is written.
#[derive(Clone, Debug)]
pub struct Event {
    pub(crate) id: MessageId,
    pub(crate) event_type: String,
    pub(crate) module: Option<String>,
    /// The payload, or why it could not be turned into JSON (reported by `transact`).
    pub(crate) payload: Result<Value, String>,
    pub(crate) headers: Headers,
}

impl Event {
    /// An event of `event_type` with a JSON payload.
    pub fn new(event_type: impl Into<String>, payload: Value) -> Self {
        Self {
            id: MessageId::new(),
            event_type: event_type.into(),
            module: None,
            payload: Ok(payload),
            headers: Headers::default(),
        }
    }

    /// An event from a typed value. A value that does not serialize makes `transact` fail with
    /// an error naming this event, before anything is written.
    pub fn typed<T: TypedEvent>(value: &T) -> Self {
        let mut event = Self::new(T::EVENT_TYPE, Value::Null);
        event.payload = serde_json::to_value(value).map_err(|e| e.to_string());
        event.module = T::MODULE.map(str::to_owned);
        event
    }

    /// Sets the module the event belongs to (handlers may filter on it).
    pub fn module(mut self, module: impl Into<String>) -> Self {
        self.module = Some(module.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.headers.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.headers.causation_id = Some(id.into());
        self
    }

    /// Adds a free-form header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.extra.insert(key.into(), value.into());
        self
    }

    /// Uses a caller-chosen message id instead of the generated one.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// The message id this event will be stored under.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
}

impl<T: TypedEvent> From<&T> for Event {
    fn from(value: &T) -> Self {
        Event::typed(value)
    }
}

/// A message as stored in the log: what handlers receive.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The message id.
    pub id: MessageId,
    /// The event type.
    pub event_type: String,
    /// The module, if any.
    pub module: Option<String>,
    /// The payload.
    pub payload: Value,
    /// The payload exactly as stored (canonical JSON); the hash chain covers these bytes.
    pub payload_json: String,
    /// The headers.
    pub headers: Headers,
    /// The headers exactly as stored (canonical JSON).
    pub headers_json: String,
}

impl StoredMessage {
    /// Rebuilds a message from its stored columns; the error says which stored text does not
    /// parse (a store dead-letters such a message rather than run it).
    pub fn from_stored(
        id: MessageId,
        event_type: String,
        module: Option<String>,
        payload_json: String,
        headers_json: String,
    ) -> Result<Self, String> {
        let payload = serde_json::from_str(&payload_json)
            .map_err(|e| format!("stored payload is not JSON: {e}"))?;
        let headers: Headers = serde_json::from_str(&headers_json)
            .map_err(|e| format!("stored headers are not valid: {e}"))?;
        Ok(Self {
            id,
            event_type,
            module,
            payload,
            payload_json,
            headers,
            headers_json,
        })
    }

    /// Like [`from_stored`](Self::from_stored), but keeps text that does not parse as it is
    /// (payload `null`, empty headers): what the hash chain check needs, since it hashes the
    /// stored text.
    pub fn from_stored_lossy(
        id: MessageId,
        event_type: String,
        module: Option<String>,
        payload_json: String,
        headers_json: String,
    ) -> Self {
        let payload = serde_json::from_str(&payload_json).unwrap_or(Value::Null);
        let headers = serde_json::from_str(&headers_json).unwrap_or_default();
        Self {
            id,
            event_type,
            module,
            payload,
            payload_json,
            headers,
            headers_json,
        }
    }
}

/// What a handler receives: the message and the context of this delivery attempt.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) data: Arc<StoredMessage>,
    pub(crate) context: DeliveryContext,
    pub(crate) trace: Option<crate::trace::TraceParent>,
    /// The acknowledgement a commit may carry for this attempt (set by the engine).
    pub(crate) ack: Option<Arc<crate::ack::AckSlot>>,
}

/// Where a delivery attempt stands: which operation, which handler, which attempt.
#[derive(Debug, Clone)]
pub struct DeliveryContext {
    /// The operation whose commit holds the message.
    pub operation_id: OperationId,
    /// The commit's id in the store.
    pub commit_id: u64,
    /// The index of the message within its commit.
    pub index: u32,
    /// The handler this delivery is for.
    pub handler: Arc<str>,
    /// This attempt's number, starting at 1.
    pub attempt: u32,
    /// The delivery's id in the store.
    pub delivery_id: i64,
}

impl Message {
    /// Builds a message for a handler; used by the engine and by handler tests.
    pub fn new(data: Arc<StoredMessage>, context: DeliveryContext) -> Self {
        let trace = crate::trace::TraceParent::from_headers(&data.headers);
        Self {
            data,
            context,
            trace,
            ack: None,
        }
    }

    /// Attaches the acknowledgement a commit may carry for this attempt.
    pub(crate) fn with_ack(mut self, slot: Arc<crate::ack::AckSlot>) -> Self {
        self.ack = Some(slot);
        self
    }

    /// The acknowledgement a commit may carry for this attempt, when a bus delivered it.
    pub(crate) fn ack_slot(&self) -> Option<&Arc<crate::ack::AckSlot>> {
        self.ack.as_ref()
    }

    /// Sets the trace context of this attempt (see [`Message::trace_parent`]).
    pub fn with_trace(mut self, trace: Option<crate::trace::TraceParent>) -> Self {
        self.trace = trace;
        self
    }

    /// The trace context of this attempt: pass it on (as a W3C `traceparent`) to the calls
    /// the handler makes, so that they continue the operation's trace under this attempt's
    /// span. `None` when nobody traces.
    pub fn trace_parent(&self) -> Option<crate::trace::TraceParent> {
        self.trace
    }

    /// The stable message id: the same on every attempt and after a restart.
    pub fn id(&self) -> MessageId {
        self.data.id
    }
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.data.event_type
    }
    /// The module, if any.
    pub fn module(&self) -> Option<&str> {
        self.data.module.as_deref()
    }
    /// The JSON payload.
    pub fn payload(&self) -> &Value {
        &self.data.payload
    }
    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.data.headers
    }
    /// Decodes the payload into a typed value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.data.payload)
    }
    /// This attempt's number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.context.attempt
    }
    /// The operation this message was committed by.
    pub fn operation_id(&self) -> OperationId {
        self.context.operation_id
    }
    /// The handler this delivery is for.
    pub fn handler(&self) -> &str {
        &self.context.handler
    }
    /// The whole delivery context.
    pub fn context(&self) -> &DeliveryContext {
        &self.context
    }
    /// The stored message.
    pub fn stored(&self) -> &StoredMessage {
        &self.data
    }
}
