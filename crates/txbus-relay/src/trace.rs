//! The spans of relays and inboxes, and the trace context they pass on (see
//! [`txbus_core::trace`]).

use txbus_core::trace::{self, TraceParent, TRACEPARENT};
use txbus_core::Event;

use crate::inbound::InboundMessage;
use crate::outbound::OutboundMessage;

/// A `txbus.relay` span for one message on its way to the broker, a child of the commit that
/// holds it; the message then carries the span's context to the receiver.
pub(crate) fn relay_span(relay: &str, message: &mut OutboundMessage) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "txbus.relay",
        relay,
        message_id = %message.id,
        operation_id = %message.operation_id,
        event_type = %message.event_type,
        destination = %message.destination,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    let parent = TraceParent::from_headers(&message.headers);
    if let Some(own) = trace::start(&span, parent) {
        if Some(own) != parent {
            own.write_to(&mut message.headers);
        }
    }
    span
}

/// A `txbus.inbox` span for one received message, a child of the sender's span; the event
/// committed for it carries this span's context, so the receiving bus's spans are its
/// children.
pub(crate) fn inbox_span(
    inbox: &str,
    message: &InboundMessage,
    event: Event,
) -> (tracing::Span, Event) {
    let span = tracing::info_span!(
        parent: None,
        "txbus.inbox",
        inbox,
        message_id = %message.id,
        event_type = %message.event_type,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    let parent = TraceParent::from_headers(&message.headers);
    let event = match trace::start(&span, parent) {
        Some(own) if Some(own) != parent => event.header(TRACEPARENT, own.to_string()),
        _ => event,
    };
    (span, event)
}
