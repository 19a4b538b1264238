//! The handle that flushes the exporter's queue and stops it.

use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::Error;

/// Keeps the exporter running; flushes the queued spans and stops the exporter when it is
/// shut down or dropped. Keep it alive as long as the service runs (in `main`), and call
/// [`Guard::shutdown`] on the way out to see whether the last spans were sent.
///
/// Flushing and shutting down block the calling thread until the collector answered or the
/// export timeout ran out. The export itself runs on the exporter's own thread, never on the
/// caller's runtime, so calling them from async code delays that task but cannot stall the
/// export.
#[derive(Debug)]
#[must_use = "dropping the guard stops the exporter: keep it alive as long as spans should be exported"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    pub(crate) fn new(provider: SdkTracerProvider) -> Self {
        Self {
            provider: Some(provider),
        }
    }

    /// The OpenTelemetry tracer provider, to hand to other OpenTelemetry instrumentation (or
    /// to `opentelemetry::global::set_tracer_provider`) so their spans go to the same place.
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref()
    }

    /// Sends every span finished so far and waits for the collector's answer.
    pub fn flush(&self) -> Result<(), Error> {
        match &self.provider {
            Some(provider) => provider.force_flush().map_err(Error::Flush),
            None => Ok(()),
        }
    }

    /// Sends the spans still queued and stops the exporter; spans finished afterwards are
    /// dropped.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        match self.provider.take() {
            Some(provider) => provider.shutdown().map_err(Error::Shutdown),
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "the OTLP exporter did not stop cleanly");
        }
    }
}
