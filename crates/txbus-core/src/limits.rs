//! Limits on what one call may hand in, and the validation that enforces them.

use std::sync::Arc;

use crate::error::Error;
use crate::message::{Event, StoredMessage};
use crate::schema::SchemaRegistry;
use serde_json::Value;

/// Limits on input, checked before anything is written.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload of one event, as JSON bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Most events in one commit. Default 10 000.
    pub max_events_per_commit: usize,
    /// Longest event type, module or header name, in bytes. Default 255.
    pub max_name_bytes: usize,
    /// Deepest nesting of arrays and objects in a payload. Default 127: the deepest a stored
    /// payload can be and still be read back (serde_json's parser stops at 128 levels).
    pub max_payload_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_events_per_commit: 10_000,
            max_name_bytes: 255,
            max_payload_depth: 127,
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

/// Header names are free-form text, but not empty, not over the name limit, and without
/// control characters (brokers carry them as their own headers).
fn check_header_name(name: &str, limit: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("a header name is empty".to_owned());
    }
    if name.len() > limit {
        return Err(format!(
            "the header name {:?}… is {} bytes; the limit is {limit}",
            name.chars().take(32).collect::<String>(),
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("the header name {name:?} contains {c:?}"));
    }
    Ok(())
}

/// How deeply `value` nests, counted without recursion (a caller's value may be deeper than
/// any stack), stopping as soon as it is past `limit`.
fn depth_exceeds(value: &Value, limit: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        let depth = depth + 1;
        if depth > limit {
            return true;
        }
        stack.extend(children.map(|c| (c, depth)));
    }
    false
}

/// Drops a value without recursion: the default drop of a deeply nested value recurses once
/// per level and can overflow the stack.
fn drop_flat(value: Value) {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// A writer that keeps at most `limit` bytes and fails past them, so that measuring an
/// oversized payload costs no more memory than the limit.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    total: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.total = self.total.saturating_add(bytes.len());
        if self.total > self.limit {
            return Err(std::io::Error::other("over the limit"));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serializes `value` as JSON if it fits in `limit` bytes: `Ok(None)` when it does not.
fn to_json_within<T: serde::Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Option<String>, serde_json::Error> {
    let mut w = Bounded {
        buf: Vec::new(),
        limit,
        total: 0,
    };
    match serde_json::to_writer(&mut w, value) {
        Ok(()) => Ok(String::from_utf8(w.buf).ok()),
        Err(_) if w.total > limit => Ok(None),
        Err(e) => Err(e),
    }
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
        for name in event.headers.extra.keys() {
            check_header_name(name, limits.max_name_bytes).map_err(invalid)?;
        }
        let payload = match &event.payload {
            Ok(v) => v,
            Err(e) => {
                return Err(invalid(format!(
                    "the payload does not serialize to JSON: {e}"
                )))
            }
        };
        if depth_exceeds(payload, limits.max_payload_depth) {
            let e = invalid(format!(
                "the payload is nested more than {} arrays or objects deep (the limit)",
                limits.max_payload_depth
            ));
            if let Ok(payload) = event.payload {
                drop_flat(payload);
            }
            return Err(e);
        }
        let payload_json = to_json_within(payload, limits.max_payload_bytes)
            .map_err(|e| invalid(format!("the payload does not serialize to JSON: {e}")))?
            .ok_or_else(|| {
                invalid(format!(
                    "the payload is over {} bytes of JSON; the limit is {} (BusBuilder::max_payload_bytes)",
                    limits.max_payload_bytes, limits.max_payload_bytes
                ))
            })?;
        schemas.check(&event.event_type, payload).map_err(invalid)?;
        let headers_json = to_json_within(&event.headers, limits.max_payload_bytes)
            .map_err(|e| invalid(format!("the headers do not serialize: {e}")))?
            .ok_or_else(|| {
                invalid(format!(
                    "the headers are over {} bytes of JSON; the limit is {}",
                    limits.max_payload_bytes, limits.max_payload_bytes
                ))
            })?;
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
    fn the_deepest_payload_allowed_reads_back_and_one_level_more_is_refused() {
        let nest = |depth: usize| {
            let mut v = json!(0);
            for _ in 0..depth {
                v = json!({ "a": [v] });
            }
            v
        };
        let limits = Limits::default();
        // Each step nests two levels (an object, then an array).
        let deepest = nest(limits.max_payload_depth / 2);
        let deepest = json!([deepest]);
        let stored = validate(
            vec![Event::new("a", deepest)],
            &limits,
            &SchemaRegistry::new(),
        )
        .unwrap();
        let back: Result<Value, _> = serde_json::from_str(&stored[0].payload_json);
        assert!(back.is_ok(), "{back:?}");
        let err = validate(
            vec![Event::new(
                "a",
                json!([[nest(limits.max_payload_depth / 2)]]),
            )],
            &limits,
            &SchemaRegistry::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nested more than 127"), "{err}");
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
