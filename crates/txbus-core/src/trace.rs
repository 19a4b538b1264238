//! Traces: the spans of an operation and the W3C trace context its messages carry.
//!
//! Every `transact`, `publish` or `commit` runs in a `txbus.transact` span, the durable append
//! in a child `txbus.commit` span, and each delivery attempt in a `txbus.attempt` span whose
//! `outcome` field says what came of it. Their fields name the operation (`operation_id`),
//! the event type and the handler. The commit writes the context of its `txbus.commit` span
//! into each message's headers as a W3C `traceparent` entry ([`TRACEPARENT`], in
//! [`Headers::extra`]), so an attempt — in this process, in another one, after a restart —
//! continues the trace as a child of the commit, and so do relays, inboxes and remote
//! handlers on the other side of a broker.
//!
//! Span and trace ids are those of the installed [`Propagator`]: by default txbus makes them
//! itself and records them on its spans as the fields `trace_id`, `span_id` and
//! `parent_span_id`; with OpenTelemetry (the crate `txbus-otel`, or the `otlp` feature of
//! the `txbus` crate as the module `txbus::otel`, whose exporter builder installs its
//! `OtelPropagator`) they are OpenTelemetry's, so exported spans link up across services.
//! A caller that has a trace
//! context of its own (from an incoming HTTP request) continues it by setting the
//! `traceparent` header on an event.
//!
//! No context is written when no subscriber records txbus's spans and no event brought one:
//! tracing then costs nothing.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::message::Headers;

/// The header entry that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context (`traceparent`): the trace, the span that is the parent of what comes
/// next, and whether the trace is sampled.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace id; never zero.
    pub trace_id: u128,
    /// The parent span id; never zero.
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traceparent {value:?} is not a W3C trace context: {reason}")]
#[non_exhaustive]
pub struct ParseError {
    /// The value.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for TraceParent {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseError {
            value: value.chars().take(128).collect(),
            reason,
        };
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected version-traceid-spanid-flags"));
        };
        let hex = |s: &str, len: usize| {
            (s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then_some(())
        };
        hex(version, 2).ok_or_else(|| err("the version is not two lowercase hex digits"))?;
        if version == "ff" {
            return Err(err("version ff is invalid"));
        }
        if version == "00" && parts.next().is_some() {
            return Err(err("version 00 has exactly four fields"));
        }
        hex(trace, 32).ok_or_else(|| err("the trace id is not 32 lowercase hex digits"))?;
        hex(span, 16).ok_or_else(|| err("the span id is not 16 lowercase hex digits"))?;
        hex(flags, 2).ok_or_else(|| err("the flags are not two lowercase hex digits"))?;
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| err("bad trace id"))?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| err("bad span id"))?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| err("bad flags"))?;
        if trace_id == 0 {
            return Err(err("the trace id is all zeros"));
        }
        if span_id == 0 {
            return Err(err("the span id is all zeros"));
        }
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }
}

impl TraceParent {
    /// The sampled flag.
    pub const SAMPLED: u8 = 1;

    /// The start of a new trace (random ids, sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: Self::SAMPLED,
        }
    }

    /// A new span of the same trace, whose parent is this one.
    pub fn new_child(&self) -> Self {
        Self {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }

    /// The context a message carries, if any (a value that does not parse is ignored, with a
    /// debug log: a broken header must not fail the work).
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let value = headers.extra.get(TRACEPARENT)?;
        match value.parse() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a traceparent header that does not parse");
                None
            }
        }
    }

    /// Writes this context into `headers` (replacing any there).
    pub fn write_to(&self, headers: &mut Headers) {
        headers
            .extra
            .insert(TRACEPARENT.to_owned(), self.to_string());
    }

    /// The trace id as 32 hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// Gives txbus's spans their trace context. Install one with [`set_propagator`]; the default,
/// [`NativePropagator`], makes ids itself.
pub trait Propagator: Send + Sync + 'static {
    /// Called once for each new txbus span, before it is entered, with the context of its
    /// parent when there is one (from a message's headers, or the enclosing txbus span).
    /// Returns the span's own context, to carry on to what comes next.
    fn start(&self, span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent>;
}

/// The default [`Propagator`]: random W3C ids, recorded on the span as `trace_id`, `span_id`
/// and `parent_span_id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativePropagator;

impl Propagator for NativePropagator {
    fn start(&self, span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent> {
        let own = match parent {
            Some(p) => p.new_child(),
            None => TraceParent::new_root(),
        };
        span.record(
            "trace_id",
            tracing::field::display(format_args!("{:032x}", own.trace_id)),
        );
        span.record(
            "span_id",
            tracing::field::display(format_args!("{:016x}", own.span_id)),
        );
        if let Some(p) = parent {
            span.record(
                "parent_span_id",
                tracing::field::display(format_args!("{:016x}", p.span_id)),
            );
        }
        Some(own)
    }
}

static PROPAGATOR: OnceLock<Box<dyn Propagator>> = OnceLock::new();

/// Installs the process's propagator (once, before the first bus is built); false when one
/// was installed already.
pub fn set_propagator(propagator: impl Propagator) -> bool {
    PROPAGATOR.set(Box::new(propagator)).is_ok()
}

/// Gives `span` its context: from the installed propagator when the span is recorded; when
/// nobody records it, the parent's context passes through unchanged (so a trace that came in
/// goes on past this invisible hop), and without a parent there is none.
pub fn start(span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent> {
    if span.is_disabled() {
        return parent;
    }
    match PROPAGATOR.get() {
        Some(p) => p.start(span, parent),
        None => NativePropagator.start(span, parent),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_w3c() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t: TraceParent = s.parse().unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), s);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?} parsed");
        }
        let child = t.new_child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        let mut headers = Headers::default();
        child.write_to(&mut headers);
        assert_eq!(TraceParent::from_headers(&headers), Some(child));
    }
}
