//! What can go wrong while setting up, flushing or stopping the exporter.

use opentelemetry_otlp::ExporterBuildError;
use opentelemetry_sdk::error::OTelSdkError;

/// Why the OTLP exporter could not be set up, flushed or shut down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting of the [`crate::ExporterBuilder`] is out of range.
    #[error("invalid OTLP exporter setting: {0}")]
    Config(&'static str),
    /// The OTLP exporter refused its configuration (most often the endpoint).
    #[error(
        "the OTLP exporter could not be built: {0}; give an http:// or https:// URL such as \
         http://127.0.0.1:4318/v1/traces to ExporterBuilder::endpoint, or set \
         OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )]
    Build(#[source] ExporterBuildError),
    /// Another propagator was installed in this process before: txbus's spans would not
    /// carry OpenTelemetry's ids.
    #[error(
        "another txbus trace propagator is installed already; install the OTLP exporter once, \
         at start-up, before anything calls txbus_core::trace::set_propagator"
    )]
    OtherPropagator,
    /// The spans waiting in the queue could not all be sent.
    #[error(
        "flushing spans to the OTLP endpoint failed: {0}; check that a collector listens at \
         the endpoint and answers within the export timeout"
    )]
    Flush(#[source] OTelSdkError),
    /// The exporter did not stop cleanly (spans still queued may be lost).
    #[error(
        "shutting down the OTLP exporter failed: {0}; spans still queued may not have been sent"
    )]
    Shutdown(#[source] OTelSdkError),
}
