//! OpenTelemetry for txbus: exports txbus's spans over OTLP/HTTP and gives them — and the
//! `traceparent` headers txbus writes into messages — OpenTelemetry's trace and span ids, so
//! the spans of one operation link up across relays, inboxes and services in any
//! OpenTelemetry backend.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (layer, guard) = txbus_otel::ExporterBuilder::default()
//!     .endpoint("http://127.0.0.1:4318/v1/traces")
//!     .service_name("orders")
//!     .install()?; // before the first bus is built
//! tracing_subscriber::registry().with(layer).init();
//!
//! // ... build buses and run the service: each transact exports `txbus.transact`,
//! // `txbus.commit` and one `txbus.attempt` per delivery attempt, in one trace ...
//!
//! guard.shutdown()?; // sends the spans still queued
//! # Ok(()) }
//! ```
//!
//! [`ExporterBuilder::install`] sets up a batch exporter (a bounded queue sent from its own
//! thread, so the service never waits on the collector) and installs [`OtelPropagator`] as
//! txbus's propagator (see `txbus_core::trace`). To use an OpenTelemetry layer you build
//! yourself, install only the propagator, with `txbus_core::trace::set_propagator`.

mod error;
mod exporter;
mod guard;
mod propagator;

pub use error::Error;
pub use exporter::{ExporterBuilder, Layer, DEFAULT_ENDPOINT, DEFAULT_QUEUE_SIZE};
pub use guard::Guard;
pub use propagator::OtelPropagator;
