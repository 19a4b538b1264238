//! Where each message goes on the broker: a subject, routing key or stream name.

use txbus_core::StoredMessage;

/// Chooses the destination of a message on the broker (a NATS subject, a RabbitMQ routing
/// key, a Redis stream name).
///
/// Any `Fn(&StoredMessage) -> String` is a route; [`SubjectRoute`] is the default.
///
/// ```
/// use txbus_relay::Route;
/// let by_type = |m: &txbus_core::StoredMessage| format!("events.{}", m.event_type);
/// # fn check(_: impl Route) {}
/// # check(by_type);
/// ```
pub trait Route: Send + Sync + 'static {
    /// The destination of `message`.
    fn destination(&self, message: &StoredMessage) -> String;
}

impl<F> Route for F
where
    F: Fn(&StoredMessage) -> String + Send + Sync + 'static,
{
    fn destination(&self, message: &StoredMessage) -> String {
        self(message)
    }
}

/// The default route: `<prefix>.<module>.<event type>`, e.g. `txbus.user.user.created`; a
/// message without a module gets `_` in its place. Dots in the event type become levels of
/// the subject, so `txbus.user.>` (NATS) or `txbus.user.#` (RabbitMQ) take a whole module.
/// An empty level (as in `a..b`) is written `_`, since brokers refuse empty tokens.
///
/// ```
/// use txbus_relay::SubjectRoute;
/// let route = SubjectRoute::new("txbus");
/// assert_eq!(route.subject(Some("user"), "user.created"), "txbus.user.user.created");
/// assert_eq!(route.subject(None, "ping"), "txbus._.ping");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRoute {
    prefix: String,
}

impl SubjectRoute {
    /// A route under `prefix` (itself one or more dot-separated levels).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject of a message of this module and event type.
    pub fn subject(&self, module: Option<&str>, event_type: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + event_type.len() + 16);
        push_levels(&mut out, &self.prefix);
        push_levels(&mut out, module.unwrap_or("_"));
        push_levels(&mut out, event_type);
        out
    }

    /// The wildcard pattern (NATS syntax) that takes every message of `module`, or of every
    /// module with `None`.
    pub fn module_pattern(&self, module: Option<&str>) -> String {
        let mut out = String::new();
        push_levels(&mut out, &self.prefix);
        if let Some(m) = module {
            push_levels(&mut out, m);
        }
        out.push_str(".>");
        out
    }
}

impl Default for SubjectRoute {
    fn default() -> Self {
        Self::new("txbus")
    }
}

impl Route for SubjectRoute {
    fn destination(&self, message: &StoredMessage) -> String {
        self.subject(message.module.as_deref(), &message.event_type)
    }
}

/// Appends `value`'s dot-separated levels to `out`, writing empty levels as `_`.
fn push_levels(out: &mut String, value: &str) {
    for level in value.split('.') {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(if level.is_empty() { "_" } else { level });
    }
}

#[cfg(test)]
mod tests {
    use super::SubjectRoute;

    #[test]
    fn subjects_have_no_empty_levels() {
        let r = SubjectRoute::new("txbus");
        assert_eq!(r.subject(Some("m"), "a..b."), "txbus.m.a._.b._");
        assert_eq!(r.subject(None, ".x"), "txbus._._.x");
        assert_eq!(r.module_pattern(Some("billing")), "txbus.billing.>");
        assert_eq!(r.module_pattern(None), "txbus.>");
    }
}
