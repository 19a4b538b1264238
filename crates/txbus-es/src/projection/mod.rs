//! Projections: named, ordered, checkpointed subscriptions over the log.
//!
//! A projection reads the log in commit order, in pages, from its checkpoint: first it catches
//! up from wherever it stopped (the start, the first time), then it follows the log live,
//! woken by [`Bus::log_changes`](txbus_core::Bus::log_changes) with a poll as a fallback for
//! commits made by other processes. Its checkpoint (the position of the last commit it
//! finished) is stored in the key–value space, under `projection/<name>/checkpoint`, and
//! written with a compare-and-set on the key's version: two runners of one projection cannot
//! both advance it.
//!
//! Two kinds:
//!
//! - **[`ReadModel`]**, a read model in the same store. For each page of the log the runner
//!   hands the projection the events, the projection stages key–value writes in a
//!   [`ReadModelTx`], and the runner commits them **together with the checkpoint**, in one
//!   atomic write. A crash before that write loses the writes and the checkpoint alike; the
//!   page is projected again on restart. So each event changes the read model **effectively
//!   once**, whatever happens.
//! - **[`ExternalProjection`]**, a read model elsewhere (a search index, another database, an
//!   e-mail). The runner calls it with the page's events, and **then** writes the checkpoint.
//!   A crash between the two makes the page run again: delivery is **at least once**, so the
//!   side effect must be idempotent (each [`LogEvent`] has a stable id and
//!   position to dedupe on).
//!
//! A failing page (an error from the projection, a store error) is retried, with a pause that
//! grows to [`Projector::max_error_pause`]; the checkpoint does not move past it. The error is
//! logged and visible in [`ProjectionHandle::last_error`].
//!
//! Rebuild from zero ([`ProjectionHandle::rebuild`]): the checkpoint is reset to 0 and marked
//! "clearing", the read model is cleared (a read model's keys under its prefix are deleted;
//! an external projection's [`reset`](ExternalProjection::reset) hook runs), then the mark is
//! removed and the projection catches up again. A crash during the clearing resumes it on the
//! next start.
//!
//! Lag ([`ProjectionHandle::lag`]) is the head position minus the checkpoint; the runner logs
//! it as the `lag` field of its `tracing` events.
//!
//! ```no_run
//! use txbus_es::projection::{Projector, ReadModel, ReadModelTx};
//! use txbus_es::{BoxError, EventStore, LogEvent};
//!
//! struct OrderCount;
//!
//! #[async_trait::async_trait]
//! impl ReadModel for OrderCount {
//!     fn prefix(&self) -> &str { "rm/order-count/" }
//!     async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
//!         if event.event_type == "order.placed" {
//!             let n: u64 = tx.get_json("rm/order-count/total").await?.unwrap_or(0);
//!             tx.put_json("rm/order-count/total", &(n + 1))?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(store: EventStore) -> Result<(), txbus_es::Error> {
//! let handle = Projector::read_model("order-count", OrderCount).start(&store).await?;
//! let mut advanced = handle.checkpoint_watch(); // changes whenever the projection advances
//! handle.catch_up().await?;                     // waits until it has seen the log's head
//! println!("lag: {}", handle.lag().await?);
//! # let _ = advanced.changed().await; Ok(()) }
//! ```

mod checkpoint;
mod handle;
mod runner;
mod tx;

use async_trait::async_trait;
use txbus_core::On;

use crate::error::BoxError;
use crate::event::LogEvent;

pub use checkpoint::{checkpoint_key, read_checkpoint, CHECKPOINT_PREFIX};
pub use handle::ProjectionHandle;
pub use runner::Projector;
pub use tx::ReadModelTx;

/// A read model kept in the bus's own store: its writes commit with its checkpoint, so every
/// event changes it effectively once.
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// The prefix of every key it writes (writes elsewhere fail the page): a rebuild deletes
    /// every key under it. Must not be a prefix of the checkpoint keys (`projection/…`).
    fn prefix(&self) -> &str;

    /// Which events it is handed (default: all). Others are skipped, but the checkpoint still
    /// moves past them.
    fn filter(&self) -> On {
        On::all()
    }

    /// Whether it is handed the bus's system commits (start-up and shutdown records, see
    /// `txbus_core::system`) too; by default they are skipped like filtered-out events.
    fn system_commits(&self) -> bool {
        false
    }

    /// Projects one event: read what it needs through `tx` (which sees this page's writes
    /// already staged) and stage writes in it. An error fails the page: nothing of it is
    /// written, and it is retried.
    async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError>;
}

/// A read model outside the store (or any side effect): called with each page's events, then
/// checkpointed. **At least once**: after a crash a page may be handed over again, so
/// `handle` must be idempotent.
#[async_trait]
pub trait ExternalProjection: Send + Sync + 'static {
    /// Which events it is handed (default: all).
    fn filter(&self) -> On {
        On::all()
    }

    /// Whether it is handed the bus's system commits (start-up and shutdown records, see
    /// `txbus_core::system`) too; by default they are skipped like filtered-out events.
    fn system_commits(&self) -> bool {
        false
    }

    /// Handles one page's events, in log order (never called with an empty page). An error
    /// makes the runner retry the page; the checkpoint stays before it.
    async fn handle(&self, events: &[LogEvent]) -> Result<(), BoxError>;

    /// Clears the external read model, before a rebuild replays the log from the start.
    /// It may run again (a crash during a rebuild resumes the clearing on the next start), so
    /// it must be idempotent. The default does nothing (for side effects that need no
    /// clearing).
    async fn reset(&self) -> Result<(), BoxError> {
        Ok(())
    }
}
