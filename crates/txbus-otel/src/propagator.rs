//! The propagator that hands txbus's spans OpenTelemetry's trace and span ids.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use txbus_core::trace::{NativePropagator, Propagator, TraceParent};

/// A [`Propagator`] for the OpenTelemetry layer of `tracing-opentelemetry`: each txbus span
/// becomes an OpenTelemetry span whose parent is the context txbus hands on (from a message's
/// `traceparent` header, or the enclosing txbus span), and the ids txbus writes into message
/// headers are that span's. Exported spans of one operation thus form one trace, across
/// relays, inboxes and services.
///
/// [`crate::ExporterBuilder::install`] installs it; install it yourself with
/// [`txbus_core::trace::set_propagator`] when you build the OpenTelemetry layer on your own.
/// A span that no OpenTelemetry layer records gets txbus's own ids, as with
/// [`NativePropagator`].
///
/// The ids are also recorded on the span as the fields `trace_id`, `span_id` and
/// `parent_span_id`, so that log lines name the same trace as the exported spans.
#[derive(Debug, Clone, Copy, Default)]
pub struct OtelPropagator;

impl Propagator for OtelPropagator {
    fn start(&self, span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent> {
        if let Some(parent) = parent {
            // The context txbus hands on always travelled as a W3C traceparent, so it is a
            // remote parent to OpenTelemetry. Without an OpenTelemetry layer this fails, and
            // the span's context below is invalid: handled there.
            let _ = span.set_parent(Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(parent.trace_id),
                SpanId::from(parent.span_id),
                TraceFlags::new(parent.flags),
                true,
                TraceState::default(),
            )));
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if !own.is_valid() {
            return NativePropagator.start(span, parent);
        }
        let own = TraceParent {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            flags: own.trace_flags().to_u8(),
        };
        span.record("trace_id", tracing::field::display(own.trace_id_hex()));
        span.record("span_id", tracing::field::display(own.span_id_hex()));
        if let Some(parent) = parent {
            span.record(
                "parent_span_id",
                tracing::field::display(parent.span_id_hex()),
            );
        }
        Some(own)
    }
}
