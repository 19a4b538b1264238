//! Event sourcing on the txbus log: streams with expected versions, aggregates and their
//! repository (snapshots, optimistic concurrency, retries), checkpointed projections, and
//! upcasters for old event shapes. It works on every txbus store.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use txbus_core::{Bus, TypedEvent};
//! use txbus_es::{Aggregate, CommandError, EventStore, Repository};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct ItemAdded { sku: String }
//! impl TypedEvent for ItemAdded { const EVENT_TYPE: &'static str = "order.item-added"; }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("an order holds at most 100 items")]
//! struct TooManyItems;
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Order { items: Vec<String> }
//!
//! impl Aggregate for Order {
//!     const KIND: &'static str = "order";
//!     type Event = ItemAdded;
//!     type Command = String; // the sku to add
//!     type Error = TooManyItems;
//!     fn create(_id: &str) -> Self { Order::default() }
//!     fn handle(&self, sku: &String) -> Result<Vec<ItemAdded>, TooManyItems> {
//!         Ok(vec![ItemAdded { sku: sku.clone() }])
//!     }
//!     fn apply(&mut self, e: &ItemAdded) { self.items.push(e.sku.clone()) }
//!     fn check(&self) -> Result<(), TooManyItems> {
//!         if self.items.len() > 100 { Err(TooManyItems) } else { Ok(()) }
//!     }
//! }
//!
//! # async fn run(bus: Bus) -> Result<(), Box<dyn std::error::Error>> {
//! let orders = Repository::<Order>::new(EventStore::new(bus)).snapshot_every(50);
//! let saved = orders.execute("7", "A1".to_owned()).await?;    // appended to stream "order-7"
//! assert_eq!(saved.version, saved.state.items.len() as u64);
//! match orders.execute("7", "B2".to_owned()).await {
//!     Ok(_) => {}
//!     Err(CommandError::Domain(TooManyItems)) => { /* nothing was written */ }
//!     Err(other) => return Err(other.into()),
//! }
//! let order = orders.load("7").await?;                        // snapshot + tail of the stream
//! # let _ = order; Ok(()) }
//! ```
//!
//! The parts:
//!
//! - [`EventStore`]: append events to a stream with an [`ExpectedVersion`]
//!   (any / no stream / exact) and get its new version; a stream elsewhere fails with
//!   [`Error::Conflict`]. A [`Transaction`] appends to several streams in one atomic commit.
//!   Read a stream forward or backward, or the whole log from a position.
//! - [`Aggregate`] and [`Repository`]: create / handle / apply / check; the repository loads
//!   (snapshot + tail), runs a command, saves with the exact version it loaded, and retries on
//!   conflict. Saving returns the txbus [`Operation`](txbus_core::Operation).
//! - Snapshots in the store's key–value space (`snapshot/<stream>`), every N events or on
//!   demand, ignored when the aggregate's [`SNAPSHOT_VERSION`](Aggregate::SNAPSHOT_VERSION)
//!   changed.
//! - [`projection`]: named, ordered, checkpointed subscriptions over the log. A [`ReadModel`]
//!   in the same store commits its writes with its checkpoint (effectively once); an
//!   [`ExternalProjection`] does its side effect, then checkpoints (at least once).
//! - [`Upcasters`]: old event shapes are converted on every read; aggregates and projections
//!   only see the current one.
//!
//! [`ExpectedVersion`]: txbus_core::ExpectedVersion

mod aggregate;
mod error;
mod event;
mod head;
pub mod projection;
mod repository;
mod snapshot;
mod store;
mod upcast;

pub use aggregate::{stream_id, Aggregate};
pub use error::{BoxError, CommandError, Error};
pub use event::{DomainEvent, EventData, LogEvent, RecordedEvent, SCHEMA_VERSION_HEADER};
pub use projection::{ExternalProjection, ProjectionHandle, Projector, ReadModel, ReadModelTx};

/// The attribute to implement [`ReadModel`] and [`ExternalProjection`] with.
pub use async_trait::async_trait;
pub use repository::{CommandOptions, Loaded, Repository, Saved};
pub use snapshot::{snapshot_key, Snapshot, SNAPSHOT_PREFIX};
pub use store::{Appended, Committed, EventStore, Transaction};
pub use upcast::Upcasters;

/// What [`domain_events!`] expands to needs; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use serde_json;
    pub use serde_json::Value;
    pub use txbus_core::{Event, TypedEvent};
}
