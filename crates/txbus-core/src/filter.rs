//! Which messages a handler subscribes to.

use crate::message::StoredMessage;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum TypeMatch {
    Any,
    Exact(String),
    Prefix(String),
}

/// A subscription filter: an event type (exact, or a prefix written `user.*`) and optionally a module.
///
/// ```
/// use txbus_core::On;
/// let exact = On::event("user.created").module("user");
/// let every_user_event = On::event("user.*");
/// let whole_module = On::in_module("audit");
/// # let _ = (exact, every_user_event, whole_module);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct On {
    event: TypeMatch,
    module: Option<String>,
}

impl On {
    /// Events of one type; a trailing `*` matches every type with that prefix.
    pub fn event(pattern: impl Into<String>) -> Self {
        let pattern = pattern.into();
        let event = match pattern.strip_suffix('*') {
            Some(prefix) => TypeMatch::Prefix(prefix.to_owned()),
            None => TypeMatch::Exact(pattern),
        };
        Self {
            event,
            module: None,
        }
    }
    /// Events whose type starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            event: TypeMatch::Prefix(prefix.into()),
            module: None,
        }
    }
    /// Every event of a module.
    pub fn module(self, module: impl Into<String>) -> Self {
        Self {
            module: Some(module.into()),
            ..self
        }
    }
    /// Every event.
    pub fn all() -> Self {
        Self {
            event: TypeMatch::Any,
            module: None,
        }
    }
    /// Every event of `module`, whatever its type.
    pub fn in_module(module: impl Into<String>) -> Self {
        Self::all().module(module)
    }

    /// True when `message` passes this filter.
    pub fn matches(&self, message: &StoredMessage) -> bool {
        self.matches_parts(&message.event_type, message.module.as_deref())
    }

    /// True when a message of this type and module passes this filter.
    pub fn matches_parts(&self, event_type: &str, module: Option<&str>) -> bool {
        let type_ok = match &self.event {
            TypeMatch::Any => true,
            TypeMatch::Exact(t) => t == event_type,
            TypeMatch::Prefix(p) => event_type.starts_with(p.as_str()),
        };
        type_ok
            && match &self.module {
                None => true,
                Some(m) => module == Some(m.as_str()),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::On;

    #[test]
    fn matching() {
        assert!(On::event("user.created").matches_parts("user.created", None));
        assert!(!On::event("user.created").matches_parts("user.created.v2", None));
        assert!(On::event("user.*").matches_parts("user.deleted", Some("x")));
        assert!(!On::event("user.*").matches_parts("audit.user", None));
        let m = On::event("user.created").module("user");
        assert!(m.matches_parts("user.created", Some("user")));
        assert!(!m.matches_parts("user.created", Some("audit")));
        assert!(!m.matches_parts("user.created", None));
        assert!(On::in_module("audit").matches_parts("anything", Some("audit")));
        assert!(On::all().matches_parts("x", None));
    }
}
