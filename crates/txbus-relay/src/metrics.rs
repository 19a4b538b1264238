//! What a relay measures (names in [`txbus_core::metrics::names`]): handles registered when it
//! starts, bumped as it goes.

use metrics::{counter, gauge, Counter, Gauge};
use txbus_core::metrics::names;

/// The handles of one relay.
pub(crate) struct RelayMetrics {
    lag: Gauge,
    published: Counter,
    failures: Counter,
}

impl RelayMetrics {
    pub(crate) fn new(relay: &str) -> Self {
        Self {
            lag: gauge!(names::RELAY_LAG, "relay" => relay.to_owned()),
            published: counter!(names::RELAY_PUBLISHED, "relay" => relay.to_owned()),
            failures: counter!(names::RELAY_FAILURES, "relay" => relay.to_owned()),
        }
    }

    pub(crate) fn lag(&self, lag: u64) {
        self.lag.set(lag as f64);
    }

    pub(crate) fn published(&self, count: usize) {
        self.published.increment(count as u64);
    }

    pub(crate) fn failed(&self) {
        self.failures.increment(1);
    }
}
