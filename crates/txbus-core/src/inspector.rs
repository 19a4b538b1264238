//! The bus side of inspection: [`Bus::inspect`] answers through the store's [`Inspect`]
//! capability and adds what only the bus knows (its own handlers, waking its claimer after a
//! replay).

use std::collections::BTreeMap;

use crate::bus::Bus;
use crate::error::Error;
use crate::inspect::{
    check_action_ids, minute_series, HandlerCounts, Inspect, MinuteCounts, OperationDetail,
    OperationPage, OperationQuery, Overview, MINUTES_KEPT, MINUTE_MS,
};
use crate::message::OperationId;
use crate::store::DeadLetter;
use crate::time::now_ms;

/// Inspects the store of a bus (see [`crate::inspect`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inspector {
    bus: Bus,
}

impl Inspector {
    pub(crate) fn new(bus: Bus) -> Self {
        Self { bus }
    }

    fn store(&self) -> Result<&dyn Inspect, Error> {
        self.bus
            .store()
            .inspect()
            .ok_or(Error::Unsupported("inspection"))
    }

    /// Every handler's counts: those the store knows, and this bus's handlers (and, on a
    /// shared store, every subscribed one) even before they had work, by name.
    pub async fn handler_counts(&self) -> Result<Vec<HandlerCounts>, Error> {
        let mut by_name: BTreeMap<String, HandlerCounts> = self
            .store()?
            .handler_counts()
            .await?
            .into_iter()
            .map(|h| (h.handler.clone(), h))
            .collect();
        let mut known: Vec<String> = self.bus.handler_names().to_vec();
        if self.bus.store().is_shared() {
            known.extend(
                self.bus
                    .store()
                    .subscriptions()
                    .await?
                    .into_iter()
                    .map(|s| s.name),
            );
        }
        for name in known {
            by_name
                .entry(name.clone())
                .or_insert_with(|| HandlerCounts {
                    handler: name,
                    ..HandlerCounts::default()
                });
        }
        Ok(by_name.into_values().collect())
    }

    /// Throughput and failures per minute over the last `minutes` (1 to
    /// [`MINUTES_KEPT`]), oldest first, of one handler or of all.
    pub async fn throughput(
        &self,
        handler: Option<&str>,
        minutes: usize,
    ) -> Result<Vec<MinuteCounts>, Error> {
        let now = now_ms();
        let minutes = minutes.clamp(1, MINUTES_KEPT as usize);
        let since = crate::inspect::minute_of(now) - (minutes as i64 - 1) * MINUTE_MS;
        let buckets = self.store()?.minutes(since, handler).await?;
        Ok(minute_series(&buckets, now, minutes))
    }

    /// The overview: every handler's counts, the last `minutes` of throughput (all handlers
    /// together), and the head of the log.
    pub async fn overview(&self, minutes: usize) -> Result<Overview, Error> {
        let at_ms = now_ms();
        let handlers = self.handler_counts().await?;
        let minutes = self.throughput(None, minutes).await?;
        let head = self.store()?.head().await?;
        Ok(Overview {
            at_ms,
            handlers,
            minutes,
            head,
        })
    }

    /// Lists operations, newest first (see [`OperationQuery`]).
    pub async fn operations(&self, query: &OperationQuery) -> Result<OperationPage, Error> {
        if let (Some(from), Some(to)) = (query.from_ms, query.to_ms) {
            if from > to {
                return Err(Error::Config(format!(
                    "operation search: the time range starts ({from}) after it ends ({to})"
                )));
            }
        }
        Ok(self.store()?.operations(query).await?)
    }

    /// One operation as a tree: its commit, its events, each event's deliveries. `None` when
    /// the store does not know it.
    pub async fn operation(&self, id: OperationId) -> Result<Option<OperationDetail>, Error> {
        Ok(self.store()?.operation_detail(id).await?)
    }

    /// One dead letter with its message and last error.
    pub async fn dead_letter(&self, delivery_id: i64) -> Result<DeadLetter, Error> {
        self.store()?
            .dead_letter(delivery_id)
            .await?
            .ok_or(Error::UnknownDeadLetter(delivery_id))
    }

    /// Replays dead letters (each from attempt 1); returns those that were dead letters. The
    /// recorded outcomes of their operations do not change.
    pub async fn replay(&self, delivery_ids: &[i64]) -> Result<Vec<i64>, Error> {
        check_action_ids(delivery_ids)?;
        let done = self.store()?.replay_dead_letters(delivery_ids).await?;
        if !done.is_empty() {
            self.bus.wake_claimer();
        }
        Ok(done)
    }

    /// Discards dead letters for good; returns those that were dead letters.
    pub async fn discard(&self, delivery_ids: &[i64]) -> Result<Vec<i64>, Error> {
        check_action_ids(delivery_ids)?;
        Ok(self.store()?.discard_dead_letters(delivery_ids).await?)
    }

    /// The last position of the log (0 when empty).
    pub async fn head(&self) -> Result<u64, Error> {
        Ok(self.store()?.head().await?)
    }
}
