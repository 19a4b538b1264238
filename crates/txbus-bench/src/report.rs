//! Measurements and how they are printed.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

/// The p50 of `raw-sqlite-commit` measured earlier in this run, when the scenario's figures
/// are compared with it: each later line then carries `p50_vs_raw_commit`.
pub static RAW_COMMIT_P50_MS: OnceLock<f64> = OnceLock::new();

fn raw_ratio(line: &Line) -> Option<f64> {
    let raw = *RAW_COMMIT_P50_MS.get()?;
    (!line.scenario.starts_with("raw-") && raw > 0.0 && !line.latencies_ns.is_empty())
        .then(|| line.percentile_ms(0.50) / raw)
}

/// Prints one line of the report; a closed stdout (`| head`) ends the program quietly.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    /// The scenario name (a stable, public name).
    pub scenario: String,
    /// Operations (or rows) done.
    pub ops: u64,
    /// Wall time.
    pub secs: f64,
    /// Latencies of single operations, nanoseconds (sorted by `finish`).
    pub latencies_ns: Vec<u64>,
    /// Extra fields: name and value.
    pub extra: Vec<(&'static str, f64)>,
}

impl Line {
    /// A line from a count, a duration and latencies.
    pub fn new(scenario: &str, ops: u64, elapsed: Duration, mut latencies_ns: Vec<u64>) -> Self {
        latencies_ns.sort_unstable();
        Self {
            scenario: scenario.to_owned(),
            ops,
            secs: elapsed.as_secs_f64(),
            latencies_ns,
            extra: Vec::new(),
        }
    }

    /// Adds an extra field.
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.extra.push((name, value));
        self
    }

    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// The latency at quantile `q` (0–1), in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let rank = ((self.latencies_ns.len() as f64 - 1.0) * q).round() as usize;
        self.latencies_ns[rank.min(self.latencies_ns.len() - 1)] as f64 / 1e6
    }

    /// Prints the line, as text or as one JSON object.
    pub fn print(&self, json: bool) {
        if json {
            let mut obj = serde_json::json!({
                "scenario": self.scenario,
                "ops": self.ops,
                "secs": round(self.secs, 3),
                "ops_per_sec": round(self.ops_per_sec(), 1),
                "p50_ms": round(self.percentile_ms(0.50), 4),
                "p99_ms": round(self.percentile_ms(0.99), 4),
                "p999_ms": round(self.percentile_ms(0.999), 4),
            });
            for (k, v) in &self.extra {
                obj[*k] = serde_json::json!(round(*v, 4));
            }
            if let Some(r) = raw_ratio(self) {
                obj["p50_vs_raw_commit"] = serde_json::json!(round(r, 3));
            }
            emit(&obj.to_string());
        } else {
            let mut s = format!(
                "{:<24} {:>10} ops {:>7.2} s {:>12.1} ops/s   p50 {:>8.3} ms   p99 {:>8.3} ms   p99.9 {:>8.3} ms",
                self.scenario,
                self.ops,
                self.secs,
                self.ops_per_sec(),
                self.percentile_ms(0.50),
                self.percentile_ms(0.99),
                self.percentile_ms(0.999)
            );
            for (k, v) in &self.extra {
                s.push_str(&format!("   {k} {v:.3}"));
            }
            if let Some(r) = raw_ratio(self) {
                s.push_str(&format!("   p50_vs_raw_commit {r:.2}"));
            }
            emit(&s);
        }
    }
}

/// A target checked against figures of the same run.
pub fn print_check(json: bool, name: &str, value: f64, target: &str, met: bool) {
    if json {
        emit(&serde_json::json!({"check": name, "value": round(value, 4), "target": target, "met": met}).to_string());
    } else {
        emit(&format!(
            "check {name:<44} {value:>10.4}   target {target:<10} {}",
            if met { "met" } else { "NOT met" }
        ));
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}
