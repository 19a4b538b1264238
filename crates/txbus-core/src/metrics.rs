//! What the bus measures, through the [`metrics`] facade: names, labels, and the handles the
//! engine and the stores keep.
//!
//! Nothing is recorded unless the service installs a recorder (for example the Prometheus
//! exporter of `txbus-metrics`) **before** it builds its buses and opens its stores: handles are
//! registered once, when a bus is built or a store opened, and kept, so that the hot path only
//! bumps atomics (no label is allocated per call). Without a recorder every handle is a no-op.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `txbus_commits_total` | counter | `kind` (`transact`, `publish`, `system`, `batch`) | commits made durable by this process |
//! | `txbus_commit_duration_seconds` | histogram | `kind` | validation, routing and the durable append of one commit |
//! | `txbus_deliveries_total` | counter | `handler`, `outcome` (`succeeded`, `retried`, `rejected`, `dead`, `stale`) | attempts recorded, by what came of them |
//! | `txbus_attempt_duration_seconds` | histogram | `handler` | how long one handler attempt ran |
//! | `txbus_operations_finished_total` | counter | `result` (`succeeded`, `failed`) | operations whose outcome this process recorded |
//! | `txbus_deliveries_in_memory` | gauge | | deliveries held in memory by the bus (set when scraped) |
//! | `txbus_group_commit_size` | histogram | `store` | calls the store's writer committed in one transaction |
//! | `txbus_deliveries` | gauge | `state` (`pending`, `leased`, `succeeded`, `rejected`, `dead`) | deliveries in the store, by state (set by the exporter when scraped) |
//! | `txbus_dead_letters` | gauge | | deliveries in the dead-letter set (set when scraped) |
//! | `txbus_log_commits` | gauge | | commits in the log (set when scraped) |
//! | `txbus_pending_operations` | gauge | | operations without an outcome yet (set when scraped) |
//! | `txbus_relay_lag` | gauge | `relay` | log positions read or not that the relay's checkpoint does not cover yet |
//! | `txbus_relay_published_total` | counter | `relay` | messages the broker confirmed to the relay |
//! | `txbus_relay_failures_total` | counter | `relay` | broker and store failures of the relay |
//! | `txbus_projection_lag` | gauge | `projection` | commits of the log the projection has not applied yet |
//! | `txbus_projection_position` | gauge | `projection` | the projection's checkpoint |

use std::sync::Arc;
use std::time::Duration;

use ::metrics::{counter, histogram, Counter, Histogram, Unit};

use crate::store::CommitKind;

/// Metric names, for dashboards and alert rules (see the module's table).
pub mod names {
    /// Commits made durable by this process.
    pub const COMMITS: &str = "txbus_commits_total";
    /// Duration of one commit (validation, routing, durable append).
    pub const COMMIT_DURATION: &str = "txbus_commit_duration_seconds";
    /// Attempts recorded, by handler and outcome.
    pub const DELIVERIES: &str = "txbus_deliveries_total";
    /// Duration of one handler attempt.
    pub const ATTEMPT_DURATION: &str = "txbus_attempt_duration_seconds";
    /// Operations whose outcome this process recorded.
    pub const OPERATIONS_FINISHED: &str = "txbus_operations_finished_total";
    /// Deliveries held in memory.
    pub const IN_MEMORY: &str = "txbus_deliveries_in_memory";
    /// Calls committed in one store transaction.
    pub const GROUP_COMMIT_SIZE: &str = "txbus_group_commit_size";
    /// Deliveries in the store, by state.
    pub const STORE_DELIVERIES: &str = "txbus_deliveries";
    /// Deliveries in the dead-letter set.
    pub const DEAD_LETTERS: &str = "txbus_dead_letters";
    /// Commits in the log.
    pub const LOG_COMMITS: &str = "txbus_log_commits";
    /// Operations without an outcome.
    pub const PENDING_OPERATIONS: &str = "txbus_pending_operations";
    /// A relay's lag.
    pub const RELAY_LAG: &str = "txbus_relay_lag";
    /// Messages confirmed to a relay.
    pub const RELAY_PUBLISHED: &str = "txbus_relay_published_total";
    /// Failures of a relay.
    pub const RELAY_FAILURES: &str = "txbus_relay_failures_total";
    /// A projection's lag.
    pub const PROJECTION_LAG: &str = "txbus_projection_lag";
    /// A projection's checkpoint.
    pub const PROJECTION_POSITION: &str = "txbus_projection_position";
}

/// Describes every metric (unit and help text) to the installed recorder. Exporters call it
/// once, after installing their recorder.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::COMMITS, "Commits made durable by this process");
    describe_histogram!(
        names::COMMIT_DURATION,
        Unit::Seconds,
        "Validation, routing and durable append of one commit"
    );
    describe_counter!(
        names::DELIVERIES,
        "Delivery attempts recorded, by handler and outcome"
    );
    describe_histogram!(
        names::ATTEMPT_DURATION,
        Unit::Seconds,
        "How long one handler attempt ran"
    );
    describe_counter!(
        names::OPERATIONS_FINISHED,
        "Operations whose outcome this process recorded"
    );
    describe_gauge!(names::IN_MEMORY, "Deliveries held in memory by the buses");
    describe_histogram!(
        names::GROUP_COMMIT_SIZE,
        Unit::Count,
        "Calls the store's writer committed in one transaction"
    );
    describe_gauge!(names::STORE_DELIVERIES, "Deliveries in the store, by state");
    describe_gauge!(names::DEAD_LETTERS, "Deliveries in the dead-letter set");
    describe_gauge!(names::LOG_COMMITS, "Commits in the log");
    describe_gauge!(
        names::PENDING_OPERATIONS,
        "Operations without an outcome yet"
    );
    describe_gauge!(
        names::RELAY_LAG,
        "Log positions the relay's checkpoint does not cover yet"
    );
    describe_counter!(
        names::RELAY_PUBLISHED,
        "Messages the broker confirmed to the relay"
    );
    describe_counter!(
        names::RELAY_FAILURES,
        "Broker and store failures of the relay"
    );
    describe_gauge!(
        names::PROJECTION_LAG,
        "Commits of the log the projection has not applied yet"
    );
    describe_gauge!(names::PROJECTION_POSITION, "The projection's checkpoint");
}

/// The handles of one handler, registered when its bus is built.
pub(crate) struct HandlerMetrics {
    succeeded: Counter,
    retried: Counter,
    rejected: Counter,
    dead: Counter,
    stale: Counter,
    attempt_duration: Histogram,
}

/// What became of one attempt, for [`HandlerMetrics::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptOutcome {
    Succeeded,
    Retried,
    Rejected,
    Dead,
    Stale,
    /// Not recorded: the bus was shutting down (the delivery runs again after a restart).
    Unrecorded,
}

impl AttemptOutcome {
    /// The label value (and the attempt span's `outcome` field).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retried => "retried",
            Self::Rejected => "rejected",
            Self::Dead => "dead",
            Self::Stale => "stale",
            Self::Unrecorded => "unrecorded",
        }
    }
}

impl HandlerMetrics {
    fn new(handler: &Arc<str>) -> Self {
        let by = |outcome: &'static str| counter!(names::DELIVERIES, "handler" => handler.to_string(), "outcome" => outcome);
        Self {
            succeeded: by("succeeded"),
            retried: by("retried"),
            rejected: by("rejected"),
            dead: by("dead"),
            stale: by("stale"),
            attempt_duration: histogram!(names::ATTEMPT_DURATION, "handler" => handler.to_string()),
        }
    }

    /// Records how long an attempt ran.
    pub(crate) fn attempt_ran(&self, elapsed: Duration) {
        self.attempt_duration.record(elapsed.as_secs_f64());
    }

    /// Counts a recorded attempt.
    pub(crate) fn record(&self, outcome: AttemptOutcome) {
        match outcome {
            AttemptOutcome::Succeeded => &self.succeeded,
            AttemptOutcome::Retried => &self.retried,
            AttemptOutcome::Rejected => &self.rejected,
            AttemptOutcome::Dead => &self.dead,
            AttemptOutcome::Stale => &self.stale,
            AttemptOutcome::Unrecorded => return,
        }
        .increment(1);
    }
}

/// The handles of one bus's engine, registered when it is built.
pub(crate) struct EngineMetrics {
    commits: [Counter; 4],
    commit_duration: [Histogram; 4],
    operations_succeeded: Counter,
    operations_failed: Counter,
    handlers: Vec<HandlerMetrics>,
}

impl EngineMetrics {
    pub(crate) fn new<'a>(handlers: impl IntoIterator<Item = &'a Arc<str>>) -> Self {
        Self {
            commits: [
                counter!(names::COMMITS, "kind" => "transact"),
                counter!(names::COMMITS, "kind" => "publish"),
                counter!(names::COMMITS, "kind" => "system"),
                counter!(names::COMMITS, "kind" => "batch"),
            ],
            commit_duration: [
                histogram!(names::COMMIT_DURATION, "kind" => "transact"),
                histogram!(names::COMMIT_DURATION, "kind" => "publish"),
                histogram!(names::COMMIT_DURATION, "kind" => "system"),
                histogram!(names::COMMIT_DURATION, "kind" => "batch"),
            ],
            operations_succeeded: counter!(names::OPERATIONS_FINISHED, "result" => "succeeded"),
            operations_failed: counter!(names::OPERATIONS_FINISHED, "result" => "failed"),
            handlers: handlers.into_iter().map(HandlerMetrics::new).collect(),
        }
    }

    fn kind(kind: CommitKind) -> usize {
        match kind {
            CommitKind::Transact => 0,
            CommitKind::Publish => 1,
            CommitKind::System => 2,
            CommitKind::Batch => 3,
        }
    }

    /// Counts a durable commit and how long it took.
    pub(crate) fn committed(&self, kind: CommitKind, elapsed: Duration) {
        let k = Self::kind(kind);
        self.commits[k].increment(1);
        self.commit_duration[k].record(elapsed.as_secs_f64());
    }

    /// Counts an operation this process finished.
    pub(crate) fn operation_finished(&self, ok: bool) {
        if ok {
            self.operations_succeeded.increment(1)
        } else {
            self.operations_failed.increment(1)
        }
    }

    /// The handles of handler number `index` (as registered with the bus).
    pub(crate) fn handler(&self, index: usize) -> Option<&HandlerMetrics> {
        self.handlers.get(index)
    }
}

/// A store's group-commit size histogram: register it when the store opens, record each
/// transaction its writer commits.
#[derive(Clone)]
pub struct GroupCommitMetrics {
    size: Histogram,
}

impl std::fmt::Debug for GroupCommitMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommitMetrics").finish_non_exhaustive()
    }
}

impl GroupCommitMetrics {
    /// Registers the histogram for the store named `store` (`sqlite`, `postgres`, …).
    pub fn new(store: &'static str) -> Self {
        Self {
            size: histogram!(names::GROUP_COMMIT_SIZE, "store" => store),
        }
    }

    /// Records one transaction of `calls` calls.
    pub fn record(&self, calls: usize) {
        self.size.record(calls as f64);
    }
}
