//! Looking inside a store: what each handler has pending, running and finished, throughput
//! and failures per minute, operations searched and shown as a tree, dead letters inspected,
//! replayed and discarded.
//!
//! Stores implement [`Inspect`] and hand it out through [`Store::inspect`](crate::Store::inspect);
//! services and tools use it through [`Bus::inspect`](crate::Bus::inspect). Every query is
//! bounded and uses an index: none walks the whole log or every finished delivery. Counts of
//! finished deliveries come from per-handler counters and per-minute buckets that the store's
//! writer updates in the same transaction as the acknowledgements, once per batch
//! ([`Tally`]), so reading them costs the same with ten or ten million deliveries behind them.
//!
//! ```no_run
//! # async fn show(bus: txbus_core::Bus) -> Result<(), txbus_core::Error> {
//! let overview = bus.inspect().overview(15).await?;
//! for h in &overview.handlers {
//!     println!("{}: {} pending, {} dead, {} succeeded", h.handler, h.pending, h.dead, h.succeeded);
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::chain::Hash;
use crate::message::{OperationId, StoredMessage};
use crate::outcome::Failure;
use crate::store::{
    CommitKind, Completion, CompletionEffect, DeadLetter, DeliveryResult, Error as StoreError,
};

/// Pending and leased deliveries are counted up to this many per handler and state; a count
/// that reaches it means "at least this many" ([`HandlerCounts::open_capped`]).
pub const OPEN_COUNT_CAP: u64 = 100_000;

/// Per-minute buckets are kept for this many minutes; older ones are removed by the writer.
pub const MINUTES_KEPT: i64 = 60;

/// Commits one operation search looks at, at most; a page that did not fill up within them
/// says where to continue ([`OperationPage::next_before`]).
pub const SEARCH_WINDOW: usize = 10_000;

/// Operations one search returns at most.
pub const MAX_PAGE: usize = 500;

/// Deliveries one call replays or discards at most.
pub const MAX_BATCH_ACTION: usize = 1_000;

/// The length of a bucket, in milliseconds.
pub const MINUTE_MS: i64 = 60_000;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryStatus {
    /// Waiting to be leased (new, released, or replayed).
    Pending,
    /// Leased to a running bus (running, or waiting for its next retry).
    Leased,
    /// The handler succeeded.
    Succeeded,
    /// The handler rejected it: the operation failed, no retry.
    Rejected,
    /// Failed for good after its retries (or by timeout, panic, interruptions): a dead letter.
    Dead,
}

impl DeliveryStatus {
    /// From the number every store writes (0 pending … 4 dead).
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Pending,
            1 => Self::Leased,
            2 => Self::Succeeded,
            3 => Self::Rejected,
            4 => Self::Dead,
            _ => return None,
        })
    }

    /// Its name, as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Leased => "leased",
            Self::Succeeded => "succeeded",
            Self::Rejected => "rejected",
            Self::Dead => "dead",
        }
    }
}

/// One handler's deliveries by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HandlerCounts {
    /// The handler's name.
    pub handler: String,
    /// Deliveries waiting to be leased (counted up to [`OPEN_COUNT_CAP`]).
    pub pending: u64,
    /// Deliveries leased to a running bus (counted up to [`OPEN_COUNT_CAP`]).
    pub leased: u64,
    /// True when `pending` or `leased` reached the cap: there are at least that many.
    pub open_capped: bool,
    /// Deliveries that succeeded, since the store was created (a counter: retention does not
    /// lower it).
    pub succeeded: u64,
    /// Failed attempts that were retried, since the store was created.
    pub retried: u64,
    /// Deliveries rejected, since the store was created.
    pub rejected: u64,
    /// Dead letters now: made dead, less those replayed, discarded or pruned since.
    pub dead: u64,
    /// Deliveries that became dead letters, since the store was created.
    pub died: u64,
    /// When the pending delivery that has waited longest became due, ms since the epoch.
    pub oldest_pending_due_ms: Option<i64>,
}

impl HandlerCounts {
    /// How long the oldest pending delivery has waited at `now_ms` (0 when none is due).
    pub fn oldest_pending_age_ms(&self, now_ms: i64) -> i64 {
        self.oldest_pending_due_ms
            .map_or(0, |due| now_ms.saturating_sub(due).max(0))
    }
}

/// What finished in one minute (of one handler, or of all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MinuteCounts {
    /// The minute's start, ms since the epoch.
    pub minute_ms: i64,
    /// Deliveries that succeeded.
    pub succeeded: u64,
    /// Failed attempts that were retried.
    pub retried: u64,
    /// Deliveries rejected.
    pub rejected: u64,
    /// Deliveries that became dead letters.
    pub died: u64,
}

impl MinuteCounts {
    /// Deliveries that finished: succeeded, rejected or dead.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.rejected + self.died
    }

    /// Share of the finished deliveries that failed (rejected or dead), 0 when none finished.
    pub fn failure_rate(&self) -> f64 {
        let finished = self.finished();
        if finished == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = (self.rejected + self.died) as f64 / finished as f64;
        rate
    }

    fn add(&mut self, other: &MinuteCounts) {
        self.succeeded += other.succeeded;
        self.retried += other.retried;
        self.rejected += other.rejected;
        self.died += other.died;
    }
}

/// One handler's bucket of one minute, as a store returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerMinute {
    /// The handler.
    pub handler: String,
    /// Its counts in that minute.
    pub counts: MinuteCounts,
}

/// Fills `minutes` minutes ending with the one holding `now_ms`, oldest first, with the
/// buckets found (summed over handlers); minutes without activity count zero.
pub fn minute_series(buckets: &[HandlerMinute], now_ms: i64, minutes: usize) -> Vec<MinuteCounts> {
    let minutes = i64::try_from(minutes.clamp(1, MINUTES_KEPT as usize)).unwrap_or(MINUTES_KEPT);
    let last = now_ms.div_euclid(MINUTE_MS);
    let first = last - minutes + 1;
    let mut series: Vec<MinuteCounts> = (first..=last)
        .map(|m| MinuteCounts {
            minute_ms: m * MINUTE_MS,
            ..MinuteCounts::default()
        })
        .collect();
    for b in buckets {
        let m = b.counts.minute_ms.div_euclid(MINUTE_MS);
        if let Some(slot) = usize::try_from(m - first)
            .ok()
            .and_then(|i| series.get_mut(i))
        {
            slot.add(&b.counts);
        }
    }
    series
}

/// The overview: every handler's counts and the last minutes' throughput.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Overview {
    /// When it was read, ms since the epoch.
    pub at_ms: i64,
    /// Every handler known to the store (or subscribed on this bus), by name.
    pub handlers: Vec<HandlerCounts>,
    /// All handlers together, one entry per minute, oldest first.
    pub minutes: Vec<MinuteCounts>,
    /// The last position of the log (0 when empty).
    pub head: u64,
}

impl Overview {
    /// Sums of every handler's counts (the handler name is empty).
    pub fn totals(&self) -> HandlerCounts {
        let mut t = HandlerCounts::default();
        for h in &self.handlers {
            t.pending += h.pending;
            t.leased += h.leased;
            t.open_capped |= h.open_capped;
            t.succeeded += h.succeeded;
            t.retried += h.retried;
            t.rejected += h.rejected;
            t.dead += h.dead;
            t.died += h.died;
            t.oldest_pending_due_ms = match (t.oldest_pending_due_ms, h.oldest_pending_due_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }
}

/// Where an operation stands, for searching and showing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OperationStatus {
    /// Deliveries remain.
    Pending,
    /// Every delivery succeeded.
    Succeeded,
    /// A delivery failed for good.
    Failed,
    /// Finished; its outcome was removed by retention.
    Pruned,
}

impl OperationStatus {
    /// From the number every store writes (see [`crate::store::op_status`]).
    pub fn from_code(code: i64) -> Option<Self> {
        use crate::store::op_status;
        Some(match code {
            op_status::PENDING => Self::Pending,
            op_status::SUCCEEDED => Self::Succeeded,
            op_status::FAILED => Self::Failed,
            op_status::PRUNED => Self::Pruned,
            _ => return None,
        })
    }

    /// The number stores write for it.
    pub fn code(self) -> i64 {
        use crate::store::op_status;
        match self {
            Self::Pending => op_status::PENDING,
            Self::Succeeded => op_status::SUCCEEDED,
            Self::Failed => op_status::FAILED,
            Self::Pruned => op_status::PRUNED,
        }
    }

    /// Its name, as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Pruned => "pruned",
        }
    }

    /// Parses a name as [`as_str`](Self::as_str) writes it.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "pending" => Self::Pending,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "pruned" => Self::Pruned,
            _ => return None,
        })
    }
}

/// Which operations to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationQuery {
    /// Only operations in this state.
    pub status: Option<OperationStatus>,
    /// Only those committed at or after this time, ms since the epoch.
    pub from_ms: Option<i64>,
    /// Only those committed before this time, ms since the epoch.
    pub to_ms: Option<i64>,
    /// Only commits with an id below this one (the previous page's
    /// [`OperationPage::next_before`]).
    pub before: Option<u64>,
    /// At most this many (1 to [`MAX_PAGE`]; 0 means 50).
    pub limit: usize,
}

impl OperationQuery {
    /// The page size to use: `limit` within 1 ..= [`MAX_PAGE`], 50 when unset.
    pub fn page_size(&self) -> usize {
        if self.limit == 0 {
            50
        } else {
            self.limit.min(MAX_PAGE)
        }
    }
}

/// One operation in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationSummary {
    /// The operation.
    pub operation_id: OperationId,
    /// Its commit's id in the store (see [`crate::store::AppendReceipt::commit_id`]).
    pub commit_id: u64,
    /// Its log position; `None` until the store has sealed it.
    pub position: Option<u64>,
    /// Transact or publish.
    #[serde(serialize_with = "kind_name")]
    pub kind: CommitKind,
    /// When it was committed, ms since the epoch.
    pub created_at_ms: i64,
    /// Where it stands.
    pub status: OperationStatus,
    /// Deliveries not finished yet.
    pub remaining: u32,
    /// When it finished, ms since the epoch.
    pub finished_at_ms: Option<i64>,
    /// Messages in its commit.
    pub message_count: u32,
    /// The event type of its first message.
    pub first_event_type: Option<String>,
    /// The failure that decided it, when it failed (and retention kept it).
    pub failure: Option<Failure>,
}

fn kind_name<S: Serializer>(kind: &CommitKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match kind {
        CommitKind::Transact => "transact",
        CommitKind::Publish => "publish",
        CommitKind::System => "system",
        CommitKind::Batch => "batch",
    })
}

fn hex<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hash_hex(hash))
}

fn hex_opt<S: Serializer>(hash: &Option<Hash>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(h) => s.serialize_some(&hash_hex(h)),
        None => s.serialize_none(),
    }
}

/// A hash as lowercase hex.
pub fn hash_hex(hash: &Hash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A page of operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OperationPage {
    /// The operations found, newest first.
    pub operations: Vec<OperationSummary>,
    /// When more may lie further back: pass it as [`OperationQuery::before`]. A page can be
    /// short (even empty) and still have a next one, when the search window
    /// ([`SEARCH_WINDOW`] commits) ran out before the page filled.
    pub next_before: Option<u64>,
}

/// One delivery of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryDetail {
    /// The delivery id (replay and discard take it).
    pub delivery_id: i64,
    /// The handler.
    pub handler: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts finished.
    pub attempts: u32,
    /// Times the bus running it stopped while holding it.
    pub interruptions: u32,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// When it is (or was) due, ms since the epoch.
    pub next_at_ms: i64,
    /// When it last changed (for a finished delivery: when it finished), ms since the epoch.
    pub updated_at_ms: i64,
}

/// One event of an operation with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDetail {
    /// Its index in the commit.
    pub index: u32,
    /// The message.
    pub message: StoredMessage,
    /// Its deliveries still in the store, by handler. Succeeded deliveries beyond retention
    /// are gone; the counters still count them.
    pub deliveries: Vec<DeliveryDetail>,
}

impl Serialize for EventDetail {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("EventDetail", 7)?;
        st.serialize_field("index", &self.index)?;
        st.serialize_field("message_id", &self.message.id)?;
        st.serialize_field("event_type", &self.message.event_type)?;
        st.serialize_field("module", &self.message.module)?;
        st.serialize_field("payload", &self.message.payload)?;
        st.serialize_field("headers", &self.message.headers)?;
        st.serialize_field("deliveries", &self.deliveries)?;
        st.end()
    }
}

/// One operation as a tree: its commit, its events, each event's deliveries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationDetail {
    /// The operation as listed.
    pub summary: OperationSummary,
    /// Its commit's data hash.
    #[serde(serialize_with = "hex")]
    pub data_hash: Hash,
    /// Its commit's chain hash; `None` until sealed.
    #[serde(serialize_with = "hex_opt")]
    pub chain_hash: Option<Hash>,
    /// Its events, in commit order.
    pub events: Vec<EventDetail>,
}

/// What a store answers about itself: the capability behind [`crate::Bus::inspect`].
///
/// Every method is bounded (pages, caps, windows) and served from indexes and counters;
/// nothing walks the whole log or every finished delivery.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Every handler with counters or open deliveries in the store, by name.
    async fn handler_counts(&self) -> Result<Vec<HandlerCounts>, StoreError>;

    /// Per-handler buckets of the minutes at and after `since_ms` (at most the last
    /// [`MINUTES_KEPT`]); only minutes with activity. `handler` limits them to one handler.
    async fn minutes(
        &self,
        since_ms: i64,
        handler: Option<&str>,
    ) -> Result<Vec<HandlerMinute>, StoreError>;

    /// Lists operations newest first, within a bounded window of commits.
    async fn operations(&self, query: &OperationQuery) -> Result<OperationPage, StoreError>;

    /// One operation as a tree; `None` when the store does not know it.
    async fn operation_detail(
        &self,
        id: OperationId,
    ) -> Result<Option<OperationDetail>, StoreError>;

    /// One dead letter with its message; `None` when `delivery_id` is not a dead letter.
    async fn dead_letter(&self, delivery_id: i64) -> Result<Option<DeadLetter>, StoreError>;

    /// Puts dead letters back to pending with their attempts reset, in one transaction;
    /// returns the ids that were dead letters (the others are left alone). At most
    /// [`MAX_BATCH_ACTION`] ids.
    async fn replay_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError>;

    /// Removes dead letters for good (their operation's outcome stays what it was), in one
    /// transaction; returns the ids that were dead letters. At most [`MAX_BATCH_ACTION`] ids.
    async fn discard_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError>;

    /// The last position of the log; 0 when it is empty.
    async fn head(&self) -> Result<u64, StoreError>;
}

/// Checks the ids of a replay or discard: 1 to [`MAX_BATCH_ACTION`] of them.
pub fn check_action_ids(ids: &[i64]) -> Result<(), StoreError> {
    if ids.len() > MAX_BATCH_ACTION {
        return Err(StoreError::Invalid(format!(
            "{} delivery ids in one call exceed the limit of {MAX_BATCH_ACTION}; split them",
            ids.len()
        )));
    }
    Ok(())
}

/// How one batch of writes changes one handler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    /// Deliveries that succeeded.
    pub succeeded: i64,
    /// Attempts that failed and will be retried.
    pub retried: i64,
    /// Deliveries rejected.
    pub rejected: i64,
    /// Deliveries that became dead letters.
    pub died: i64,
    /// Change of the dead letters held now (made dead, less replayed, discarded, pruned).
    pub dead: i64,
}

impl Delta {
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// True when the batch finished or retried something (the minute bucket changes).
    pub fn touches_minute(&self) -> bool {
        self.succeeded != 0 || self.retried != 0 || self.rejected != 0 || self.died != 0
    }
}

/// What one writer batch did to the counters, by handler (in name order, the order stores
/// lock counter rows in). A store's writer fills it from the batch's applied completions and
/// dead-letter changes, then writes it once, in the batch's transaction: one upsert per
/// touched handler and minute, however many acknowledgements the batch held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    by_handler: BTreeMap<Arc<str>, Delta>,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, handler: &str) -> &mut Delta {
        self.by_handler.entry(Arc::from(handler)).or_default()
    }

    /// Counts a completion, if it was applied (a stale one changed nothing).
    pub fn completion(&mut self, completion: &Completion, effect: &CompletionEffect) {
        if !matches!(effect, CompletionEffect::Applied(_)) {
            return;
        }
        let d = self
            .by_handler
            .entry(Arc::clone(&completion.handler))
            .or_default();
        match &completion.result {
            DeliveryResult::Succeeded => d.succeeded += 1,
            DeliveryResult::Retry { .. } => d.retried += 1,
            DeliveryResult::Failed { dead: true, .. } => {
                d.died += 1;
                d.dead += 1;
            }
            DeliveryResult::Failed { dead: false, .. } => d.rejected += 1,
        }
    }

    /// Counts the completions of one request with the effects the store answered.
    pub fn completions(&mut self, completions: &[Completion], effects: &[CompletionEffect]) {
        for (c, e) in completions.iter().zip(effects) {
            self.completion(c, e);
        }
    }

    /// Counts a delivery that became a dead letter outside of a completion (a message that
    /// cannot be read back is dead-lettered when claimed).
    pub fn died(&mut self, handler: &str) {
        let d = self.entry(handler);
        d.died += 1;
        d.dead += 1;
    }

    /// Counts `n` dead letters of `handler` that left the dead-letter set (replayed,
    /// discarded, pruned).
    pub fn dead_removed(&mut self, handler: &str, n: u64) {
        if n > 0 {
            self.entry(handler).dead -= i64::try_from(n).unwrap_or(i64::MAX);
        }
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        for (h, d) in &other.by_handler {
            let e = self.entry(h);
            e.succeeded += d.succeeded;
            e.retried += d.retried;
            e.rejected += d.rejected;
            e.died += d.died;
            e.dead += d.dead;
        }
    }

    /// True when nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.by_handler.values().all(Delta::is_zero)
    }

    /// The non-zero deltas, by handler name.
    pub fn deltas(&self) -> impl Iterator<Item = (&str, &Delta)> {
        self.by_handler
            .iter()
            .filter(|(_, d)| !d.is_zero())
            .map(|(h, d)| (&**h, d))
    }
}

/// The last error of an ordered subscription (a projection, a relay), as its runner records it
/// in the key–value space under [`runner_error_key`], so that other processes (a dashboard, a
/// CLI) see it. Removed when the runner succeeds again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunnerError {
    /// What failed.
    pub error: String,
    /// When it was recorded, ms since the epoch.
    pub at_ms: i64,
}

/// The key of the last error of the runner `name` of `kind` (`projection`, `relay`):
/// `<kind>/<name>/error`, beside its checkpoint `<kind>/<name>/checkpoint`.
pub fn runner_error_key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}/error")
}

/// Records (`Some`) or removes (`None`) the last error of the runner `name` of `kind` in
/// `bus`'s key–value space (see [`RunnerError`]). Runners call it when their error changes,
/// not on every retry.
pub async fn record_runner_error(
    bus: &crate::Bus,
    kind: &str,
    name: &str,
    error: Option<&str>,
) -> Result<(), crate::Error> {
    let key = runner_error_key(kind, name);
    let write = match error {
        Some(e) => {
            let record = RunnerError {
                error: e.chars().take(4096).collect(),
                at_ms: crate::time::now_ms(),
            };
            let value = serde_json::to_vec(&record).map_err(|e| {
                crate::Error::Config(format!("a runner error does not serialize: {e}"))
            })?;
            crate::KvWrite::put(key, value)
        }
        None => crate::KvWrite::delete(key),
    };
    bus.kv_write(vec![write]).await.map(|_| ())
}

/// The minute bucket (its start, ms since the epoch) that holds `at_ms`.
pub fn minute_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// Buckets that start before this are past [`MINUTES_KEPT`] at `now_ms`.
pub fn minutes_floor(now_ms: i64) -> i64 {
    minute_of(now_ms) - (MINUTES_KEPT - 1) * MINUTE_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, FailureKind};

    fn completion(handler: &str, result: DeliveryResult) -> Completion {
        Completion {
            delivery_id: 1,
            fence: 1,
            commit_id: 1,
            attempts: 1,
            handler: Arc::from(handler),
            result,
        }
    }

    fn failed(dead: bool) -> DeliveryResult {
        DeliveryResult::Failed {
            failure: Failure {
                event_index: 0,
                event_type: "e".into(),
                handler: "h".into(),
                kind: if dead {
                    FailureKind::RetriesExhausted
                } else {
                    FailureKind::Rejected
                },
                reason: "no".into(),
                attempts: 1,
            },
            dead,
        }
    }

    #[test]
    fn a_tally_counts_applied_completions_once_per_handler() {
        let mut t = Tally::new();
        let applied = CompletionEffect::Applied(None);
        let cs = vec![
            completion("b", DeliveryResult::Succeeded),
            completion("a", DeliveryResult::Succeeded),
            completion("a", DeliveryResult::Succeeded),
            completion(
                "a",
                DeliveryResult::Retry {
                    next_at_ms: 0,
                    error: "x".into(),
                },
            ),
            completion("a", failed(true)),
            completion("b", failed(false)),
            completion("b", DeliveryResult::Succeeded),
        ];
        let mut effects = vec![applied; cs.len()];
        effects[6] = CompletionEffect::Stale;
        t.completions(&cs, &effects);
        t.dead_removed("a", 1);
        let deltas: Vec<_> = t.deltas().map(|(h, d)| (h.to_owned(), *d)).collect();
        assert_eq!(
            deltas,
            vec![
                (
                    "a".to_owned(),
                    Delta {
                        succeeded: 2,
                        retried: 1,
                        rejected: 0,
                        died: 1,
                        dead: 0
                    }
                ),
                (
                    "b".to_owned(),
                    Delta {
                        succeeded: 1,
                        retried: 0,
                        rejected: 1,
                        died: 0,
                        dead: 0
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_minute_series_fills_gaps_and_sums_handlers() {
        let now = 10 * MINUTE_MS + 5_000;
        let bucket = |h: &str, minute: i64, succeeded: u64, died: u64| HandlerMinute {
            handler: h.into(),
            counts: MinuteCounts {
                minute_ms: minute * MINUTE_MS,
                succeeded,
                died,
                ..MinuteCounts::default()
            },
        };
        let series = minute_series(
            &[
                bucket("a", 10, 3, 1),
                bucket("b", 10, 1, 0),
                bucket("a", 8, 2, 0),
                bucket("a", 2, 9, 9),
            ],
            now,
            3,
        );
        let got: Vec<(i64, u64, u64)> = series
            .iter()
            .map(|m| (m.minute_ms / MINUTE_MS, m.succeeded, m.died))
            .collect();
        assert_eq!(got, vec![(8, 2, 0), (9, 0, 0), (10, 4, 1)]);
        assert!((series[2].failure_rate() - 0.2).abs() < 1e-9);
        assert_eq!(series[1].failure_rate(), 0.0);
    }

    #[test]
    fn too_many_ids_in_one_action_are_refused() {
        assert!(check_action_ids(&[1; MAX_BATCH_ACTION]).is_ok());
        let err = check_action_ids(&[1; MAX_BATCH_ACTION + 1]).unwrap_err();
        assert!(err.to_string().contains("exceed the limit"), "{err}");
    }

    #[test]
    fn minute_buckets_are_kept_for_an_hour() {
        let now = 100 * MINUTE_MS + 1;
        assert_eq!(minute_of(now), 100 * MINUTE_MS);
        assert_eq!(minutes_floor(now), (100 - MINUTES_KEPT + 1) * MINUTE_MS);
    }
}
