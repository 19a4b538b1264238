//! The schema registry: a JSON Schema per event type, checked before anything is written.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// Why a schema could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schema itself is not a valid JSON Schema.
    #[error("the schema for event type {event_type:?} is not a valid JSON Schema: {reason}; fix the schema document")]
    InvalidSchema {
        /// The event type the schema was registered for.
        event_type: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// JSON Schemas by event type.
///
/// By default an event type without a schema is accepted as it is; a [strict](Self::strict)
/// registry rejects it as unknown.
///
/// ```
/// use serde_json::json;
/// let registry = txbus_core::SchemaRegistry::new()
///     .register("user.created", json!({
///         "type": "object",
///         "required": ["user_id", "email"],
///         "properties": { "email": { "type": "string" } }
///     }))
///     .unwrap();
/// assert!(registry.check("user.created", &json!({"user_id": 1, "email": "a@b.c"})).is_ok());
/// assert!(registry.check("user.created", &json!({"user_id": 1})).is_err());
/// ```
#[derive(Clone, Default)]
pub struct SchemaRegistry {
    schemas: HashMap<String, Arc<jsonschema::Validator>>,
    strict: bool,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.schemas.keys().collect();
        types.sort();
        f.debug_struct("SchemaRegistry")
            .field("event_types", &types)
            .field("strict", &self.strict)
            .finish()
    }
}

impl SchemaRegistry {
    /// An empty, permissive registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rejects events whose type has no registered schema.
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Registers (or replaces) the schema of `event_type`.
    pub fn register(mut self, event_type: impl Into<String>, schema: Value) -> Result<Self, Error> {
        let event_type = event_type.into();
        let validator = jsonschema::validator_for(&schema).map_err(|e| Error::InvalidSchema {
            event_type: event_type.clone(),
            reason: e.to_string(),
        })?;
        self.schemas.insert(event_type, Arc::new(validator));
        Ok(self)
    }

    /// The event types with a registered schema, sorted.
    pub fn event_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.schemas.keys().cloned().collect();
        types.sort();
        types
    }

    /// True when a schema is registered for `event_type`.
    pub fn contains(&self, event_type: &str) -> bool {
        self.schemas.contains_key(event_type)
    }

    /// Checks one payload; the error says what is wrong and where in the payload.
    pub fn check(&self, event_type: &str, payload: &Value) -> Result<(), String> {
        match self.schemas.get(event_type) {
            Some(validator) => validator.validate(payload).map_err(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    format!("schema violation: {e}")
                } else {
                    format!("schema violation at {path}: {e}")
                }
            }),
            None if self.strict => Err(format!(
                "unknown event type: no schema is registered for {event_type:?} and the registry is strict"
            )),
            None => Ok(()),
        }
    }
}
