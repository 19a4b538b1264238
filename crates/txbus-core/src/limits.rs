//! Limits on what one call may hand in, and the validation that enforces them.

use std::sync::Arc;

use crate::error::Error;
use crate::message::{Event, StoredMessage};
use crate::schema::SchemaRegistry;

/// Limits on input, checked before anything is written.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload of one event, as JSON bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Most events in one commit. Default 10 000.
    pub max_events_per_commit: usize,
    /// Longest event type, module or header entry, in bytes. Default 255.
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_events_per_commit: 10_000,
            max_name_bytes: 255,
        }
    }
}

fn check_name(what: &str, value: &str, limit: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > limit {
        return Err(format!(
            "{what} is {} bytes; the limit is {limit}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; use ASCII letters, digits and . _ - : /"
        ));
    }
    Ok(())
}

/// Validates events against the limits and the registry and turns them into stored messages.
/// The first bad event yields an error naming its index, its type and the reason.
pub(crate) fn validate(
    events: Vec<Event>,
    limits: &Limits,
    schemas: &SchemaRegistry,
) -> Result<Vec<Arc<StoredMessage>>, Error> {
    if events.is_empty() {
        return Err(Error::NoEvents);
    }
    if events.len() > limits.max_events_per_commit {
        return Err(Error::TooManyEvents {
            count: events.len(),
            limit: limits.max_events_per_commit,
        });
    }
    let mut out = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        let invalid = |reason: String| Error::InvalidEvent {
            index,
            event_type: event.event_type.clone(),
            reason,
        };
        check_name("the event type", &event.event_type, limits.max_name_bytes).map_err(invalid)?;
        if let Some(module) = &event.module {
            check_name("the module", module, limits.max_name_bytes).map_err(invalid)?;
        }
        let payload = match &event.payload {
            Ok(v) => v,
            Err(e) => {
                return Err(invalid(format!(
                    "the payload does not serialize to JSON: {e}"
                )))
            }
        };
        let payload_json = serde_json::to_string(payload)
            .map_err(|e| invalid(format!("the payload does not serialize to JSON: {e}")))?;
        if payload_json.len() > limits.max_payload_bytes {
            return Err(invalid(format!(
                "the payload is {} bytes of JSON; the limit is {} (BusBuilder::max_payload_bytes)",
                payload_json.len(),
                limits.max_payload_bytes
            )));
        }
        schemas.check(&event.event_type, payload).map_err(invalid)?;
        let headers_json = serde_json::to_string(&event.headers)
            .map_err(|e| invalid(format!("the headers do not serialize: {e}")))?;
        if headers_json.len() > limits.max_payload_bytes {
            return Err(invalid(format!(
                "the headers are {} bytes of JSON; the limit is {}",
                headers_json.len(),
                limits.max_payload_bytes
            )));
        }
        let Event {
            id,
            event_type,
            module,
            payload,
            headers,
        } = event;
        out.push(Arc::new(StoredMessage {
            id,
            event_type,
            module,
            payload: payload.unwrap_or_default(),
            payload_json,
            headers,
            headers_json,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_bad_event() {
        let registry = SchemaRegistry::new()
            .register("a.b", json!({"type": "object", "required": ["x"]}))
            .unwrap();
        let events = vec![
            Event::new("a.b", json!({"x": 1})),
            Event::new("a.b", json!({"y": 1})),
        ];
        let err = validate(events, &Limits::default(), &registry).unwrap_err();
        match err {
            Error::InvalidEvent {
                index,
                event_type,
                reason,
            } => {
                assert_eq!(index, 1);
                assert_eq!(event_type, "a.b");
                assert!(reason.contains("schema violation"), "{reason}");
                assert!(reason.contains("\"x\""), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_oversized_and_bad_names() {
        let limits = Limits {
            max_payload_bytes: 16,
            ..Limits::default()
        };
        let err = validate(
            vec![Event::new("big", json!({"s": "0123456789abcdef"}))],
            &limits,
            &SchemaRegistry::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("limit is 16"), "{err}");
        let err = validate(
            vec![Event::new("bad type", json!(1))],
            &Limits::default(),
            &SchemaRegistry::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("event 0"), "{err}");
        let err = validate(vec![], &Limits::default(), &SchemaRegistry::new()).unwrap_err();
        assert!(matches!(err, Error::NoEvents));
    }

    #[test]
    fn strict_registry_rejects_unknown_types() {
        let registry = SchemaRegistry::new().strict();
        let err = validate(
            vec![Event::new("nobody.knows", json!({}))],
            &Limits::default(),
            &registry,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown event type"), "{err}");
    }
}
