//! How a message travels on a broker: its payload is the stored JSON, and everything else is
//! carried in headers with the names below. Every broker crate uses this one encoding, so a
//! message relayed through any broker decodes the same way.
//!
//! ```
//! use txbus_relay::wire;
//! # use txbus_relay::OutboundMessage;
//! # fn show(message: &OutboundMessage) -> Result<(), wire::DecodeError> {
//! let headers = wire::headers(message);
//! let lookup = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
//! let back = wire::decode(lookup, &message.payload)?;
//! assert_eq!(back.id, message.id);
//! # Ok(()) }
//! ```

use std::str::FromStr;

use txbus_core::{Headers, MessageId, OperationId};
use uuid::Uuid;

use crate::inbound::InboundMessage;
use crate::outbound::OutboundMessage;

/// The message id (a UUID); also what receivers dedupe on.
pub const MESSAGE_ID: &str = "Txbus-Message-Id";
/// The event type.
pub const EVENT_TYPE: &str = "Txbus-Event-Type";
/// The module (absent when the message has none).
pub const MODULE: &str = "Txbus-Module";
/// The origin's operation id.
pub const OPERATION_ID: &str = "Txbus-Operation-Id";
/// The position of the commit in the origin's log.
pub const POSITION: &str = "Txbus-Position";
/// The correlation id, when set (also inside [`HEADERS`]; here for tools that read headers).
pub const CORRELATION_ID: &str = "Txbus-Correlation-Id";
/// The causation id, when set (also inside [`HEADERS`]).
pub const CAUSATION_ID: &str = "Txbus-Causation-Id";
/// Every header of the message as JSON, when it has any.
pub const HEADERS: &str = "Txbus-Headers";
/// Where the receiver sends the outcome of a `transact` across services.
pub const REPLY_TO: &str = "Txbus-Reply-To";
/// The W3C trace context, when the message carries one (also inside [`HEADERS`]; here under
/// its standard name for tracing tools).
pub const TRACEPARENT: &str = txbus_core::trace::TRACEPARENT;

/// Why a received message could not be decoded. Such a message can never be committed, so
/// the inbox discards it (and answers a waiting origin with the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required header is missing: the message was not sent by a txbus relay.
    #[error("header {0} is missing: the message was not sent by a txbus relay")]
    Missing(&'static str),
    /// A header holds a value that does not parse.
    #[error("header {name} holds {value:?}, which is not valid: {reason}")]
    Invalid {
        /// The header.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is not valid.
        reason: String,
    },
    /// The payload is not JSON.
    #[error("the payload is not JSON: {0}")]
    Payload(String),
}

/// The headers to send with `message`, as (name, value) pairs.
pub fn headers(message: &OutboundMessage) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(8);
    out.push((MESSAGE_ID, message.id.to_string()));
    out.push((EVENT_TYPE, message.event_type.clone()));
    if let Some(m) = &message.module {
        out.push((MODULE, m.clone()));
    }
    out.push((OPERATION_ID, message.operation_id.to_string()));
    out.push((POSITION, message.position.to_string()));
    // Copies for tools that read headers; a value with control characters (a line break
    // would break a NATS header block) travels only inside the JSON header.
    let plain = |v: &String| !v.chars().any(char::is_control);
    if let Some(c) = message.headers.correlation_id.as_ref().filter(|v| plain(v)) {
        out.push((CORRELATION_ID, c.clone()));
    }
    if let Some(c) = message.headers.causation_id.as_ref().filter(|v| plain(v)) {
        out.push((CAUSATION_ID, c.clone()));
    }
    // The plain trace context only when it is one (a W3C `traceparent` has no line break);
    // whatever else a caller put there travels in the JSON header.
    if let Some(t) = message
        .headers
        .extra
        .get(TRACEPARENT)
        .filter(|t| t.parse::<txbus_core::TraceParent>().is_ok())
    {
        out.push((TRACEPARENT, t.clone()));
    }
    if !message.headers.is_empty() {
        if let Ok(json) = serde_json::to_string(&message.headers) {
            out.push((HEADERS, json));
        }
    }
    out
}

/// Decodes a received message from its headers (looked up by name with `get`) and payload.
pub fn decode(
    get: impl Fn(&str) -> Option<String>,
    payload: &[u8],
) -> Result<InboundMessage, DecodeError> {
    let id = get(MESSAGE_ID).ok_or(DecodeError::Missing(MESSAGE_ID))?;
    let id = Uuid::from_str(&id)
        .map(MessageId)
        .map_err(|e| invalid(MESSAGE_ID, &id, e))?;
    let event_type = get(EVENT_TYPE).ok_or(DecodeError::Missing(EVENT_TYPE))?;
    let module = get(MODULE);
    let origin_operation = match get(OPERATION_ID) {
        Some(v) => Some(OperationId::from_str(&v).map_err(|e| invalid(OPERATION_ID, &v, e))?),
        None => None,
    };
    let origin_position = match get(POSITION) {
        Some(v) => Some(v.parse::<u64>().map_err(|e| invalid(POSITION, &v, e))?),
        None => None,
    };
    let headers = match get(HEADERS) {
        Some(v) => serde_json::from_str::<Headers>(&v).map_err(|e| invalid(HEADERS, &v, e))?,
        None => {
            let mut headers = Headers {
                correlation_id: get(CORRELATION_ID),
                causation_id: get(CAUSATION_ID),
                ..Headers::default()
            };
            if let Some(t) = get(TRACEPARENT) {
                headers.extra.insert(TRACEPARENT.to_owned(), t);
            }
            headers
        }
    };
    let payload =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Payload(e.to_string()))?;
    Ok(InboundMessage {
        id,
        event_type,
        module,
        headers,
        payload,
        origin_operation,
        origin_position,
        reply_to: get(REPLY_TO),
    })
}

fn invalid(name: &'static str, value: &str, reason: impl std::fmt::Display) -> DecodeError {
    DecodeError::Invalid {
        name,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    fn sample() -> OutboundMessage {
        let mut headers = Headers {
            correlation_id: Some("corr-1".into()),
            ..Headers::default()
        };
        headers.extra.insert("tenant".into(), "acme".into());
        OutboundMessage {
            id: MessageId::new(),
            operation_id: OperationId::new(),
            position: 42,
            index: 0,
            event_type: "user.created".into(),
            module: Some("user".into()),
            headers,
            payload: Bytes::from_static(br#"{"a":1}"#),
            destination: "txbus.user.user.created".into(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let h = headers(&m);
        let back = decode(
            |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()),
            &m.payload,
        )
        .unwrap();
        assert_eq!(back.id, m.id);
        assert_eq!(back.event_type, "user.created");
        assert_eq!(back.module.as_deref(), Some("user"));
        assert_eq!(back.headers, m.headers);
        assert_eq!(back.payload, serde_json::json!({"a": 1}));
        assert_eq!(back.origin_position, Some(42));
        assert_eq!(back.origin_operation, Some(m.operation_id));
        assert_eq!(back.reply_to, None);
        let event = back.to_event();
        assert_eq!(event.id(), m.id);
    }

    #[test]
    fn values_with_line_breaks_travel_only_in_the_json_header() {
        let mut m = sample();
        m.headers.correlation_id = Some("a\r\nInjected: yes".into());
        m.headers.causation_id = Some("b\n".into());
        // A caller's own entry under the trace context's name, which is no trace context.
        m.headers
            .extra
            .insert(TRACEPARENT.to_owned(), "00-\n\n[[[ ".into());
        let h = headers(&m);
        // No plain copy that would break a NATS or HTTP-style header block...
        assert!(
            h.iter()
                .all(|(_, v)| !v.contains('\n') && !v.contains('\r')),
            "{h:?}"
        );
        assert!(!h
            .iter()
            .any(|(n, _)| *n == CORRELATION_ID || *n == CAUSATION_ID || *n == TRACEPARENT));
        // ...and the values still arrive whole.
        let back = decode(
            |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()),
            &m.payload,
        )
        .unwrap();
        assert_eq!(back.headers, m.headers);
    }

    #[test]
    fn bad_input_is_named() {
        let e = decode(|_| None, b"{}").unwrap_err();
        assert_eq!(e, DecodeError::Missing(MESSAGE_ID));
        let e = decode(
            |n| match n {
                MESSAGE_ID => Some("nope".into()),
                _ => None,
            },
            b"{}",
        )
        .unwrap_err();
        assert!(matches!(
            e,
            DecodeError::Invalid {
                name: MESSAGE_ID,
                ..
            }
        ));
        let id = MessageId::new().to_string();
        let e = decode(
            |n| match n {
                MESSAGE_ID => Some(id.clone()),
                EVENT_TYPE => Some("x".into()),
                _ => None,
            },
            b"not json",
        )
        .unwrap_err();
        assert!(matches!(e, DecodeError::Payload(_)));
    }
}
