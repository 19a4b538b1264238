//! How long finished deliveries and outcomes are kept.

use std::time::Duration;

/// A bound by count and by age; whichever removes more wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Keep at most this many (newest first).
    pub max_count: u64,
    /// Keep none older than this.
    pub max_age: Duration,
}

impl Keep {
    /// Keeps at most `max_count`, none older than `max_age`.
    pub fn new(max_count: u64, max_age: Duration) -> Self {
        Self { max_count, max_age }
    }
}

/// Retention of finished work (like Bull's `removeOnComplete` / `removeOnFail`). Every bound is
/// finite: nothing grows without limit. The log of commits itself is not pruned: it is the
/// source of truth and carries the hash chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Succeeded deliveries. Default: 10 000, one day.
    pub succeeded: Keep,
    /// Rejected and dead deliveries (dead letters). Default: 100 000, thirty days.
    pub failed: Keep,
    /// Outcomes of finished operations. Default: 100 000, seven days.
    pub outcomes: Keep,
    /// How often pruning runs. Default: 10 s.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            succeeded: Keep::new(10_000, Duration::from_secs(DAY)),
            failed: Keep::new(100_000, Duration::from_secs(30 * DAY)),
            outcomes: Keep::new(100_000, Duration::from_secs(7 * DAY)),
            interval: Duration::from_secs(10),
        }
    }
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Succeeded deliveries removed.
    pub succeeded: u64,
    /// Rejected or dead deliveries removed.
    pub failed: u64,
    /// Outcomes removed.
    pub outcomes: u64,
    /// Expired key–value entries removed.
    pub expired_keys: u64,
}
