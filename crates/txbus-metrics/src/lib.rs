//! Prometheus metrics for txbus: installs the `metrics` recorder that every txbus crate reports
//! to, and serves it as an axum route (`GET /metrics`) a service mounts where it likes.
//!
//! Install the recorder **before** building buses and opening stores (they register their
//! metric handles then), inside a Tokio runtime. The names and labels are listed in
//! [`txbus_core::metrics`]: commits, deliveries by handler and outcome, attempt and commit
//! latency histograms, group-commit sizes, relay and projection lag, and — read from the
//! store of each bus passed to [`Metrics::watch`] at every scrape, from its counters and
//! indexes, without reading the log — deliveries by state (pending, leased, …), dead letters,
//! log size and (counted at most every [`PENDING_OPERATIONS_EVERY`]) pending operations.
//!
//! ```no_run
//! # async fn example(store: impl txbus_core::Store) -> Result<(), Box<dyn std::error::Error>> {
//! use txbus_core::Bus;
//!
//! let metrics = txbus_metrics::Metrics::builder().install()?;   // first: buses register then
//! let bus = Bus::builder().store(store).build().await?;
//! metrics.watch("orders", &bus);                                // store gauges for this bus
//! let app = axum::Router::new().merge(metrics.router());        // GET /metrics
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics::gauge;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use txbus_core::metrics::names;
use txbus_core::Bus;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A recorder is installed already (only one per process): install once, at start-up,
    /// and share the [`Metrics`] (it is cheap to clone).
    #[error("a metrics recorder is installed already; install once per process and clone the Metrics handle")]
    AlreadyInstalled,
    /// Not called inside a Tokio runtime: the exporter runs its upkeep there.
    #[error("Metrics::install must be called inside a Tokio runtime")]
    NoRuntime,
    /// The exporter refused its configuration.
    #[error("the Prometheus exporter refused its configuration: {0}")]
    Config(String),
}

/// Histogram buckets of handler attempts and commits, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Histogram buckets of group-commit sizes, in calls per transaction.
pub const GROUP_COMMIT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How long a scrape waits for one store's counts before it reports the others without them.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a scrape counts a watched store's pending operations: that count reads every
/// commit of the store, so scrapes in between report the last count. Everything else a scrape
/// reports comes from counters and indexes kept up to date as work happens.
pub const PENDING_OPERATIONS_EVERY: Duration = Duration::from_secs(30);

/// How often the exporter drains its histograms, so that they hold bounded memory between
/// scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Configures the exporter; [`install`](Self::install) makes it the process's recorder.
#[derive(Debug, Clone)]
pub struct MetricsBuilder {
    latency_buckets: Vec<f64>,
    group_commit_buckets: Vec<f64>,
}

/// The running exporter: renders the metrics, serves them, reads store gauges at each scrape.
/// Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    watched: Arc<Mutex<Vec<Watched>>>,
}

/// A bus whose store a scrape reports, and its last count of pending operations.
#[derive(Clone)]
struct Watched {
    name: String,
    bus: Bus,
    pending_operations: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Starts configuring the exporter.
    pub fn builder() -> MetricsBuilder {
        MetricsBuilder {
            latency_buckets: LATENCY_BUCKETS.to_vec(),
            group_commit_buckets: GROUP_COMMIT_BUCKETS.to_vec(),
        }
    }

    /// Reports the store of `bus` at every scrape, under the label `bus="<name>"`: deliveries
    /// by state, dead letters, commits in the log, pending operations, and the deliveries the
    /// bus holds in memory. A bus watched twice under one name is reported once.
    pub fn watch(&self, name: impl Into<String>, bus: &Bus) -> &Self {
        let name = name.into();
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched.retain(|w| w.name != name);
        watched.push(Watched {
            name,
            bus: bus.clone(),
            pending_operations: Arc::new(Mutex::new(None)),
        });
        self
    }

    /// Stops reporting the bus watched under `name`.
    pub fn unwatch(&self, name: &str) {
        self.watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|w| w.name != name);
    }

    /// Reads the watched stores and renders every metric in the Prometheus text format.
    pub async fn render(&self) -> String {
        let watched = self
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for w in watched {
            set_store_gauges(&w).await;
        }
        self.handle.render()
    }

    /// A router serving `GET /metrics`; merge or nest it into the service's router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(serve))
            .with_state(self.clone())
    }
}

async fn serve(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics.render().await,
    )
}

/// Sets the store gauges of one watched bus: deliveries by state and dead letters from the
/// store's inspection counters (succeeded and rejected count every delivery recorded since the
/// store was created; pending, leased and dead are current), the log's head, and the pending
/// operations (counted at most every [`PENDING_OPERATIONS_EVERY`]).
async fn set_store_gauges(w: &Watched) {
    let (name, bus) = (w.name.as_str(), &w.bus);
    let counts = match tokio::time::timeout(STATS_TIMEOUT, bus.inspect().handler_counts()).await {
        Ok(Ok(counts)) => Some(counts),
        Ok(Err(e)) => {
            tracing::warn!(bus = name, error = %e, "reading the store's counts for /metrics failed");
            None
        }
        Err(_) => {
            tracing::warn!(bus = name, timeout = ?STATS_TIMEOUT, "reading the store's counts for /metrics timed out");
            None
        }
    };
    if let Some(counts) = counts {
        let mut t = txbus_core::inspect::HandlerCounts::default();
        for h in &counts {
            t.pending += h.pending;
            t.leased += h.leased;
            t.succeeded += h.succeeded;
            t.rejected += h.rejected;
            t.dead += h.dead;
        }
        for (state, count) in [
            ("pending", t.pending),
            ("leased", t.leased),
            ("succeeded", t.succeeded),
            ("rejected", t.rejected),
            ("dead", t.dead),
        ] {
            gauge!(names::STORE_DELIVERIES, "bus" => name.to_owned(), "state" => state)
                .set(count as f64);
        }
        gauge!(names::DEAD_LETTERS, "bus" => name.to_owned()).set(t.dead as f64);
    }
    match tokio::time::timeout(STATS_TIMEOUT, bus.head_position()).await {
        Ok(Ok(head)) => {
            gauge!(names::LOG_COMMITS, "bus" => name.to_owned()).set(head as f64);
        }
        _ => tracing::warn!(
            bus = name,
            "reading the head of the log for /metrics failed"
        ),
    }
    if let Some(pending) = pending_operations(w).await {
        gauge!(names::PENDING_OPERATIONS, "bus" => name.to_owned()).set(pending as f64);
    }
    gauge!(names::IN_MEMORY, "bus" => name.to_owned()).set(bus.buffered() as f64);
}

/// The watched store's pending operations: counted again when the last count is older than
/// [`PENDING_OPERATIONS_EVERY`], else the last count.
async fn pending_operations(w: &Watched) -> Option<u64> {
    let last = *w
        .pending_operations
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((at, count)) = last {
        if at.elapsed() < PENDING_OPERATIONS_EVERY {
            return Some(count);
        }
    }
    match tokio::time::timeout(STATS_TIMEOUT, w.bus.stats()).await {
        Ok(Ok(stats)) => {
            *w.pending_operations
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some((Instant::now(), stats.pending_operations));
            Some(stats.pending_operations)
        }
        Ok(Err(e)) => {
            tracing::warn!(bus = %w.name, error = %e, "counting pending operations for /metrics failed");
            last.map(|(_, c)| c)
        }
        Err(_) => {
            tracing::warn!(bus = %w.name, timeout = ?STATS_TIMEOUT, "counting pending operations for /metrics timed out");
            last.map(|(_, c)| c)
        }
    }
}

impl MetricsBuilder {
    /// Buckets of the attempt and commit duration histograms, in seconds (default
    /// [`LATENCY_BUCKETS`]).
    pub fn latency_buckets(mut self, buckets: &[f64]) -> Self {
        self.latency_buckets = buckets.to_vec();
        self
    }

    /// Buckets of the group-commit size histogram (default [`GROUP_COMMIT_BUCKETS`]).
    pub fn group_commit_buckets(mut self, buckets: &[f64]) -> Self {
        self.group_commit_buckets = buckets.to_vec();
        self
    }

    /// Builds the recorder without installing it, for a service that composes recorders
    /// (it installs the recorder itself, then calls [`txbus_core::metrics::describe`]). The
    /// returned [`Metrics`] renders what the recorder collected; histograms are drained at
    /// each render and every [`UPKEEP_INTERVAL`] by a task on the current Tokio runtime.
    pub fn build(self) -> Result<(PrometheusRecorder, Metrics), Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let config = |e: metrics_exporter_prometheus::BuildError| Error::Config(e.to_string());
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::ATTEMPT_DURATION.to_owned()),
                &self.latency_buckets,
            )
            .map_err(config)?
            .set_buckets_for_metric(
                Matcher::Full(names::COMMIT_DURATION.to_owned()),
                &self.latency_buckets,
            )
            .map_err(config)?
            .set_buckets_for_metric(
                Matcher::Full(names::GROUP_COMMIT_SIZE.to_owned()),
                &self.group_commit_buckets,
            )
            .map_err(config)?
            .build_recorder();
        let handle = recorder.handle();
        let upkeep = handle.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok((
            recorder,
            Metrics {
                handle,
                watched: Arc::new(Mutex::new(Vec::new())),
            },
        ))
    }

    /// Builds the recorder and installs it as the process's global recorder. Call it once,
    /// inside a Tokio runtime, before building buses and opening stores.
    pub fn install(self) -> Result<Metrics, Error> {
        let (recorder, metrics) = self.build()?;
        metrics::set_global_recorder(recorder).map_err(|_| Error::AlreadyInstalled)?;
        txbus_core::metrics::describe();
        Ok(metrics)
    }
}
