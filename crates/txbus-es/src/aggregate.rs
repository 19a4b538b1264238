//! Aggregates: state rebuilt from a stream of events, changed only by commands that the
//! aggregate turns into new events.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::event::DomainEvent;

/// An event-sourced aggregate: its state is the fold of its events (`create`, then `apply` for
/// each); a command is decided on the current state (`handle`) and yields new events; after
/// applying them the state must hold its invariants (`check`).
///
/// Its stream is `"{KIND}-{id}"`; its snapshots are stored as JSON (hence `Serialize`), tagged
/// with [`SNAPSHOT_VERSION`](Self::SNAPSHOT_VERSION).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use txbus_core::TypedEvent;
/// use txbus_es::Aggregate;
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// pub struct ItemAdded { pub sku: String }
/// impl TypedEvent for ItemAdded { const EVENT_TYPE: &'static str = "order.item-added"; }
///
/// #[derive(Debug, thiserror::Error)]
/// pub enum OrderError {
///     #[error("an order holds at most {0} items")]
///     TooManyItems(usize),
/// }
///
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// pub struct Order { pub items: Vec<String> }
///
/// impl Aggregate for Order {
///     const KIND: &'static str = "order";
///     type Event = ItemAdded;
///     type Command = ItemAdded; // a command can be any type
///     type Error = OrderError;
///
///     fn create(_id: &str) -> Self { Order::default() }
///     fn handle(&self, command: &ItemAdded) -> Result<Vec<ItemAdded>, OrderError> {
///         Ok(vec![command.clone()])
///     }
///     fn apply(&mut self, event: &ItemAdded) { self.items.push(event.sku.clone()) }
///     fn check(&self) -> Result<(), OrderError> {
///         if self.items.len() > 100 { Err(OrderError::TooManyItems(100)) } else { Ok(()) }
///     }
/// }
/// ```
pub trait Aggregate: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind of aggregate: its streams are `"{KIND}-{id}"`.
    const KIND: &'static str;
    /// The shape of its snapshots. Change it whenever the state's serialized form changes:
    /// snapshots of another version are ignored (the aggregate is replayed from its events,
    /// and a new snapshot is written).
    const SNAPSHOT_VERSION: u32 = 1;

    /// Its events.
    type Event: DomainEvent;
    /// What it is asked to do.
    type Command: Send + Sync;
    /// Why it refuses a command, or which invariant the result would break.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The state before any event.
    fn create(id: &str) -> Self;

    /// Decides a command on the current state: the events to append (none: nothing to do),
    /// or why not. Must not change anything else: it may run again after a conflict.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event. Never fails: events are facts.
    fn apply(&mut self, event: &Self::Event);

    /// Checks the invariants after new events were applied; an error refuses the command and
    /// nothing is written. Not checked while loading (stored events are facts).
    fn check(&self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The stream of the aggregate `A` with id `id`.
pub fn stream_id<A: Aggregate>(id: &str) -> String {
    format!("{}-{id}", A::KIND)
}
