//! Events as event sourcing sees them: the typed events of an aggregate ([`DomainEvent`]), and
//! events read back from a stream ([`RecordedEvent`]) or from the log ([`LogEvent`]), already
//! upcast to their current shape.

use std::ops::Deref;

use serde::de::DeserializeOwned;
use serde_json::Value;
use txbus_core::{Event, Headers, MessageId, OperationId, TypedEvent};

/// The header that carries an event's schema version; absent means version 1.
pub const SCHEMA_VERSION_HEADER: &str = "schema_version";

/// The events of an aggregate: one [`TypedEvent`] type, or an enum of several (build one with
/// [`domain_events!`](crate::domain_events)).
///
/// Every `TypedEvent` is a `DomainEvent` on its own, for aggregates with a single event type.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The event type this value is stored under.
    fn event_type(&self) -> &'static str;
    /// The event to append.
    fn to_event(&self) -> Event;
    /// Decodes a stored event: `None` when `event_type` is not one of these events.
    fn decode(event_type: &str, payload: &Value) -> Option<Result<Self, serde_json::Error>>;
}

impl<T: TypedEvent> DomainEvent for T {
    fn event_type(&self) -> &'static str {
        T::EVENT_TYPE
    }

    fn to_event(&self) -> Event {
        Event::typed(self)
    }

    fn decode(event_type: &str, payload: &Value) -> Option<Result<Self, serde_json::Error>> {
        (event_type == T::EVENT_TYPE).then(|| T::deserialize(payload))
    }
}

/// Declares an enum of [`TypedEvent`]s and makes it a [`DomainEvent`] (plus `From` each
/// variant's type): the events of one aggregate.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use txbus_core::TypedEvent;
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// pub struct Opened { pub owner: String }
/// impl TypedEvent for Opened { const EVENT_TYPE: &'static str = "account.opened"; }
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// pub struct Deposited { pub cents: u64 }
/// impl TypedEvent for Deposited { const EVENT_TYPE: &'static str = "account.deposited"; }
///
/// txbus_es::domain_events! {
///     /// What happens to an account.
///     #[derive(Debug, Clone)]
///     pub enum AccountEvent {
///         Opened(Opened),
///         Deposited(Deposited),
///     }
/// }
///
/// use txbus_es::DomainEvent;
/// let e = AccountEvent::from(Deposited { cents: 5 });
/// assert_eq!(e.event_type(), "account.deposited");
/// let back = AccountEvent::decode("account.deposited", &serde_json::json!({"cents": 5}));
/// assert!(matches!(back, Some(Ok(AccountEvent::Deposited(Deposited { cents: 5 })))));
/// ```
#[macro_export]
macro_rules! domain_events {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident($ty:ty) ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant($ty), )+
        }

        impl $crate::DomainEvent for $name {
            fn event_type(&self) -> &'static str {
                match self {
                    $( Self::$variant(_) => <$ty as $crate::__private::TypedEvent>::EVENT_TYPE, )+
                }
            }

            fn to_event(&self) -> $crate::__private::Event {
                match self {
                    $( Self::$variant(e) => $crate::__private::Event::typed(e), )+
                }
            }

            fn decode(
                event_type: &str,
                payload: &$crate::__private::Value,
            ) -> ::core::option::Option<
                ::core::result::Result<Self, $crate::__private::serde_json::Error>,
            > {
                $(
                    if event_type == <$ty as $crate::__private::TypedEvent>::EVENT_TYPE {
                        return ::core::option::Option::Some(
                            <$ty as $crate::__private::serde::Deserialize>::deserialize(payload)
                                .map(Self::$variant),
                        );
                    }
                )+
                ::core::option::Option::None
            }
        }

        $(
            impl ::core::convert::From<$ty> for $name {
                fn from(e: $ty) -> Self {
                    Self::$variant(e)
                }
            }
        )+
    };
}

/// An event as read back, in its current shape (upcasters applied).
#[derive(Debug, Clone, PartialEq)]
pub struct EventData {
    /// The message id.
    pub id: MessageId,
    /// The event type.
    pub event_type: String,
    /// The module, if any.
    pub module: Option<String>,
    /// The payload, upcast to the current schema version of its event type.
    pub payload: Value,
    /// The headers as stored (the schema version header says the stored version).
    pub headers: Headers,
    /// The schema version the payload has now (after upcasting).
    pub schema_version: u32,
    /// The schema version it was stored with.
    pub stored_schema_version: u32,
}

impl EventData {
    /// Decodes the payload into any type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }

    /// Decodes the payload into `T` when the event is of `T`'s type; `None` otherwise.
    pub fn typed<T: TypedEvent>(&self) -> Option<Result<T, serde_json::Error>> {
        (self.event_type == T::EVENT_TYPE).then(|| self.decode())
    }

    /// True when the event is of `T`'s type.
    pub fn is<T: TypedEvent>(&self) -> bool {
        self.event_type == T::EVENT_TYPE
    }

    /// The stream the event was appended to, if any.
    pub fn stream(&self) -> Option<&str> {
        self.headers.stream.as_deref()
    }
}

/// An event read from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// The stream.
    pub stream: String,
    /// Its version in the stream (from 1).
    pub version: u64,
    /// The commit it belongs to (its operation's key in the store).
    pub commit_id: u64,
    /// The event.
    pub event: EventData,
}

impl Deref for RecordedEvent {
    type Target = EventData;
    fn deref(&self) -> &EventData {
        &self.event
    }
}

/// An event read from the log (all streams and stream-less events, in commit order).
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    /// The position of its commit in the log.
    pub position: u64,
    /// Its index within the commit.
    pub index: u32,
    /// The operation of its commit.
    pub operation_id: OperationId,
    /// When its commit was created, ms since the epoch.
    pub created_at_ms: i64,
    /// The event.
    pub event: EventData,
}

impl Deref for LogEvent {
    type Target = EventData;
    fn deref(&self) -> &EventData {
        &self.event
    }
}

/// The schema version an event's headers carry (absent or unreadable: 1).
pub(crate) fn stored_schema_version(headers: &Headers) -> u32 {
    headers
        .extra
        .get(SCHEMA_VERSION_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}
