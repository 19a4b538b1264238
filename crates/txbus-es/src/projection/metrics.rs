//! What a projection measures (names in [`txbus_core::metrics::names`]): its checkpoint and its
//! lag, set after each page.

use metrics::{gauge, Gauge};
use txbus_core::metrics::names;

/// The handles of one projection, registered when it starts.
pub(crate) struct ProjectionMetrics {
    lag: Gauge,
    position: Gauge,
}

impl ProjectionMetrics {
    pub(crate) fn new(projection: &str) -> Self {
        Self {
            lag: gauge!(names::PROJECTION_LAG, "projection" => projection.to_owned()),
            position: gauge!(names::PROJECTION_POSITION, "projection" => projection.to_owned()),
        }
    }

    pub(crate) fn set(&self, position: u64, lag: u64) {
        self.position.set(position as f64);
        self.lag.set(lag as f64);
    }
}
