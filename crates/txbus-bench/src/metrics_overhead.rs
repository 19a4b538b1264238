//! `transact-metrics`: the `transact` scenario with the Prometheus exporter recording (and
//! scraped every second) against the same scenario with no recorder, in the same run,
//! alternating so that a drift of the machine's speed touches both alike.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

use crate::report::{print_check, Line};
use crate::scenarios::{transact_with, BoxError};
use crate::Args;

/// Hands out the exporter's handles while on, no-op handles while off. Buses and stores
/// register their handles when built, so a run built while off records nothing at all: the
/// same as a service without a recorder.
struct Switch {
    on: AtomicBool,
    inner: PrometheusRecorder,
}

impl Recorder for Switch {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

fn merge(name: &str, runs: &[Line]) -> Line {
    let ops = runs.iter().map(|l| l.ops).sum();
    let secs: f64 = runs.iter().map(|l| l.secs).sum();
    let lat = runs.iter().flat_map(|l| l.latencies_ns.clone()).collect();
    Line::new(name, ops, Duration::from_secs_f64(secs), lat)
}

/// Runs `transact` off, on, off, on (each `--secs`), prints both and their ratio.
pub async fn transact_metrics(args: &Args) -> Result<(), BoxError> {
    let (recorder, exporter) = txbus_metrics::Metrics::builder().build()?;
    let switch = Arc::new(Switch {
        on: AtomicBool::new(false),
        inner: recorder,
    });
    metrics::set_global_recorder(SwitchRef(Arc::clone(&switch)))
        .map_err(|_| "a metrics recorder is installed already")?;
    txbus::metrics::describe();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        switch.on.store(false, Ordering::Relaxed);
        off.push(transact_with(args, "transact-metrics-off", |_| None).await?);
        switch.on.store(true, Ordering::Relaxed);
        let exporter = exporter.clone();
        let line = transact_with(args, "transact-metrics-on", move |bus| {
            exporter.watch("bench", bus);
            let exporter = exporter.clone();
            // A scraper, far more eager than Prometheus's usual 15 s.
            let scraper = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    exporter.render().await;
                }
            });
            Some(scraper.abort_handle())
        })
        .await?;
        on.push(line);
    }
    switch.on.store(false, Ordering::Relaxed);
    let body = exporter.render().await;
    let committed: f64 = body
        .lines()
        .filter(|l| l.starts_with("txbus_commits_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    let recorded_ops: u64 = on.iter().map(|l| l.ops).sum();
    if committed < recorded_ops as f64 {
        return Err(format!(
            "the exporter counted {committed} commits, the runs with metrics made {recorded_ops}"
        )
        .into());
    }
    let off = merge("transact-metrics-off", &off);
    let on = merge("transact-metrics-on", &on).with("commits_counted", committed);
    off.print(args.json);
    on.print(args.json);
    let r = on.ops_per_sec() / off.ops_per_sec();
    print_check(
        args.json,
        "transact ops/s metrics on / metrics off",
        r,
        ">= 0.95",
        r >= 0.95,
    );
    Ok(())
}

/// The global recorder: a shared [`Switch`].
struct SwitchRef(Arc<Switch>);

impl Recorder for SwitchRef {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, metadata)
    }
}
