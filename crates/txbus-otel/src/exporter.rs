//! The builder that sets up the OTLP/HTTP span exporter and the `tracing` layer feeding it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

use crate::{Error, Guard, OtelPropagator};

/// Where spans go when neither [`ExporterBuilder::endpoint`] nor the standard
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` variables say: a
/// collector on this host.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4318/v1/traces";

/// How many finished spans wait for export by default; past that, new spans are dropped
/// (never blocking the service).
pub const DEFAULT_QUEUE_SIZE: usize = 2048;

/// Whether this crate installed txbus's propagator in this process.
static PROPAGATOR_INSTALLED: AtomicBool = AtomicBool::new(false);

/// The `tracing` layer that turns spans into OpenTelemetry spans for the exporter; add it to
/// your subscriber.
pub type Layer<S> = OpenTelemetryLayer<S, SdkTracer>;

/// Sets up the OTLP/HTTP exporter (protobuf bodies): where to send, under which service name,
/// how many spans may wait. [`ExporterBuilder::install`] starts it.
#[derive(Debug, Clone)]
pub struct ExporterBuilder {
    endpoint: Option<String>,
    service_name: String,
    queue_size: usize,
    batch_size: usize,
    timeout: Duration,
}

impl Default for ExporterBuilder {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "txbus".to_owned(),
            queue_size: DEFAULT_QUEUE_SIZE,
            batch_size: 512,
            timeout: Duration::from_secs(10),
        }
    }
}

impl ExporterBuilder {
    /// The full URL spans are POSTed to, path included (an OpenTelemetry collector takes them
    /// at `/v1/traces` on port 4318). Default: the standard environment variables, else
    /// [`DEFAULT_ENDPOINT`].
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// The `service.name` of the exported spans (default `txbus`): name it after your service.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = name.into();
        self
    }

    /// How many finished spans may wait for export (default [`DEFAULT_QUEUE_SIZE`]); when the
    /// collector falls behind, spans past that are dropped rather than held in memory.
    pub fn queue_size(mut self, spans: usize) -> Self {
        self.queue_size = spans;
        self
    }

    /// How many spans one export request carries at most (default 512, capped at the queue
    /// size).
    pub fn batch_size(mut self, spans: usize) -> Self {
        self.batch_size = spans;
        self
    }

    /// How long one export request may take before it is given up (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the exporter and installs [`OtelPropagator`] as txbus's propagator. Returns
    /// the layer to add to your `tracing` subscriber and the [`Guard`] that flushes and stops
    /// the exporter. Call it once per process, before the first bus is built.
    pub fn install<S>(self) -> Result<(Layer<S>, Guard), Error>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        if self.queue_size == 0 {
            return Err(Error::Config("the queue size must be at least 1 span"));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("the batch size must be at least 1 span"));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("the export timeout must be longer than zero"));
        }
        if !txbus_core::trace::set_propagator(OtelPropagator)
            && !PROPAGATOR_INSTALLED.load(Ordering::Acquire)
        {
            return Err(Error::OtherPropagator);
        }
        PROPAGATOR_INSTALLED.store(true, Ordering::Release);

        let endpoint = self.endpoint.or_else(|| {
            let from_env = [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
            (!from_env).then(|| DEFAULT_ENDPOINT.to_owned())
        });
        let mut exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(self.timeout);
        if let Some(endpoint) = endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        let exporter = exporter.build().map_err(Error::Build)?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(self.queue_size)
            .with_max_export_batch_size(self.batch_size.min(self.queue_size))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_resource(
                Resource::builder()
                    .with_service_name(self.service_name)
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("txbus"));
        Ok((layer, Guard::new(provider)))
    }
}
