//! Event versions: upcasters turn a stored event's payload from an old schema version into the
//! current one, so that aggregates and projections only ever see the current shape.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use txbus_core::StoredMessage;

use crate::error::Error;
use crate::event::{stored_schema_version, EventData};

type Transform = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// The upcasters of an [`EventStore`](crate::EventStore): for an event type, a JSON transform
/// from one schema version to the next.
///
/// An event's schema version travels in its headers
/// (`extra["schema_version"]`, [`SCHEMA_VERSION_HEADER`](crate::SCHEMA_VERSION_HEADER);
/// absent = 1). The current version of an event type is the highest version an upcaster leads
/// to (1 when it has none); the event store stamps it on every event it appends, and upcasts
/// every event it reads, step by step, up to it.
///
/// ```
/// use serde_json::json;
/// use txbus_es::Upcasters;
///
/// // v1 had `name`; v2 splits it; v3 adds a default country.
/// let upcasters = Upcasters::new()
///     .register("customer.registered", 1, 2, |mut v| {
///         let name = v["name"].as_str().unwrap_or_default().to_owned();
///         let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
///         v["first"] = json!(first);
///         v["last"] = json!(last);
///         v.as_object_mut().map(|o| o.remove("name"));
///         Ok(v)
///     })
///     .register("customer.registered", 2, 3, |mut v| {
///         v["country"] = json!("FR");
///         Ok(v)
///     });
/// assert_eq!(upcasters.current_version("customer.registered"), 3);
/// let (v, version) = upcasters.upcast("customer.registered", 1, json!({"name": "Ada Lovelace"})).unwrap();
/// assert_eq!(version, 3);
/// assert_eq!(v, json!({"first": "Ada", "last": "Lovelace", "country": "FR"}));
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    /// (event type, from version) → (to version, transform).
    steps: HashMap<(String, u32), (u32, Transform)>,
    /// event type → current version.
    current: HashMap<String, u32>,
    /// event type → why a registration for it was refused; reads of that type then fail.
    refused: HashMap<String, String>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<_> = self
            .steps
            .iter()
            .map(|((t, from), (to, _))| format!("{t} {from}->{to}"))
            .collect();
        steps.sort();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}

impl Upcasters {
    /// No upcasters: every event type is at version 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the transform of `event_type`'s payload from schema version `from` to `to`
    /// (`to > from`; usually `from + 1`). The transform returns the new payload or why the
    /// old one cannot be converted. Registering the same `(event_type, from)` again replaces
    /// the earlier transform.
    ///
    /// A step that does not go up (`to <= from`, or `from == 0`) is refused: it is not
    /// registered, and every later read of `event_type` fails with an error that names it, so
    /// the mistake shows at the first load rather than as silently wrong data.
    pub fn register<F>(mut self, event_type: impl Into<String>, from: u32, to: u32, f: F) -> Self
    where
        F: Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    {
        let event_type = event_type.into();
        if from == 0 || to <= from {
            self.refused.insert(
                event_type,
                format!(
                    "an upcaster was registered from version {from} to {to}; a step goes from a \
                     version >= 1 to a higher one: fix the registration"
                ),
            );
            return self;
        }
        let current = self.current.entry(event_type.clone()).or_insert(1);
        *current = (*current).max(to);
        self.steps.insert((event_type, from), (to, Arc::new(f)));
        self
    }

    /// The current schema version of `event_type`: what appended events are stamped with and
    /// what reads upcast to (1 when no upcaster is registered for it).
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.current.get(event_type).copied().unwrap_or(1)
    }

    /// True when no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.refused.is_empty()
    }

    /// Upcasts a payload of `event_type` at schema version `version` to the current version;
    /// returns the payload and its version. Fails when a step is missing, a transform fails,
    /// or the event is newer than this program knows.
    pub fn upcast(
        &self,
        event_type: &str,
        version: u32,
        mut payload: Value,
    ) -> Result<(Value, u32), Error> {
        let current = self.current_version(event_type);
        let fail = |reason: String| Error::Upcast {
            event_type: event_type.to_owned(),
            from: version,
            reason,
        };
        if let Some(reason) = self.refused.get(event_type) {
            return Err(fail(reason.clone()));
        }
        if version > current {
            return Err(fail(format!(
                "it is newer than the current version {current} known here; upgrade this program"
            )));
        }
        let mut at = version;
        while at < current {
            let Some((to, transform)) = self.steps.get(&(event_type.to_owned(), at)) else {
                return Err(fail(format!(
                    "no upcaster from version {at} (the current version is {current}); register one"
                )));
            };
            payload = transform(payload).map_err(|e| fail(format!("step {at} -> {to}: {e}")))?;
            at = *to;
        }
        Ok((payload, at))
    }

    /// The event in its current shape.
    pub(crate) fn data(&self, message: StoredMessage) -> Result<EventData, Error> {
        let stored = stored_schema_version(&message.headers);
        let refused = self.refused.contains_key(&message.event_type);
        let (payload, schema_version) =
            if stored == self.current_version(&message.event_type) && !refused {
                (message.payload, stored)
            } else {
                self.upcast(&message.event_type, stored, message.payload)?
            };
        Ok(EventData {
            id: message.id,
            event_type: message.event_type,
            module: message.module,
            payload,
            headers: message.headers,
            schema_version,
            stored_schema_version: stored,
        })
    }
}
