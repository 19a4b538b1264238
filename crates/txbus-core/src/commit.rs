//! A commit to hand to [`crate::Bus::commit`]: events, some of them appended to streams with
//! an expected version, and key–value writes — all atomic.

use std::sync::Arc;

use crate::ack::AckSlot;
use crate::kv::KvWrite;
use crate::message::{Event, Message, OperationId};
use crate::stream::ExpectedVersion;

/// Events and conditions committed together: all or none.
///
/// ```
/// use serde_json::json;
/// use txbus_core::{Commit, Event, ExpectedVersion, KvWrite};
///
/// let commit = Commit::new()
///     .stream("order-7", ExpectedVersion::Exact(3), [Event::new("order.item-added", json!({"sku": "A1"}))])
///     .stream("stock-A1", ExpectedVersion::Any, [Event::new("stock.reserved", json!({"order": 7}))])
///     .event(Event::new("audit.order-changed", json!({"order": 7})))
///     .kv(KvWrite::put("orders/7/last-change", b"now".to_vec()));
/// assert_eq!(commit.len(), 3);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub(crate) events: Vec<Event>,
    /// (stream, expected version, indexes of its events in `events`).
    pub(crate) streams: Vec<(String, ExpectedVersion, Vec<usize>)>,
    pub(crate) kv: Vec<KvWrite>,
    /// A caller-chosen operation id; a new one is generated when `None`.
    pub(crate) operation_id: Option<OperationId>,
    /// Deliveries whose success this commit records (see [`Commit::acknowledging`]).
    pub(crate) acks: Vec<Arc<AckSlot>>,
    /// Messages handed to [`Commit::acknowledging`] that no bus delivered (built by hand):
    /// there is nothing to acknowledge, and the commit is refused rather than silently
    /// acknowledging nothing.
    pub(crate) unackable: usize,
}

impl Commit {
    /// An empty commit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event that belongs to no stream.
    pub fn event(mut self, event: Event) -> Self {
        self.events.push(event);
        self
    }

    /// Adds events that belong to no stream.
    pub fn events(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        self.events.extend(events);
        self
    }

    /// Appends `events` to `stream`, which must be at `expected` when the commit is written;
    /// otherwise the commit fails with [`crate::Error::Conflict`] and nothing is written. A
    /// stream may appear once per commit.
    pub fn stream(
        mut self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = Event>,
    ) -> Self {
        let start = self.events.len();
        self.events.extend(events);
        let indexes = (start..self.events.len()).collect();
        self.streams.push((stream.into(), expected, indexes));
        self
    }

    /// Adds a key–value write, applied with the commit (its condition is checked too).
    pub fn kv(mut self, write: KvWrite) -> Self {
        self.kv.push(write);
        self
    }

    /// Uses a caller-chosen operation id instead of a generated one, so that the caller can
    /// record it (e.g. in a key–value write of the same commit) before the commit is written.
    /// It must be new: a commit under an id the store already holds fails and writes nothing.
    pub fn operation_id(mut self, id: OperationId) -> Self {
        self.operation_id = Some(id);
        self
    }

    /// Records, in this commit, that the handler handling `msg` succeeded: the store writes
    /// the delivery's acknowledgement in the same transaction as the commit, so a handler whose
    /// work is this commit (a saga step, a command's save, a checkpoint) costs one durable write
    /// instead of two, and the bus does not acknowledge the delivery again when the handler
    /// returns.
    ///
    /// The commit is fenced by the attempt's lease: if another worker took the delivery over
    /// meanwhile (or it was acknowledged already), the commit fails with
    /// [`crate::Conflict::Lease`] and writes nothing. Once the commit is durable the delivery
    /// has succeeded, whatever the handler returns afterwards. Only a commit made through the
    /// bus that delivered `msg` may carry it; one made elsewhere, or with a message built by
    /// hand, fails with [`crate::Error::InvalidCommit`].
    pub fn acknowledging(mut self, msg: &Message) -> Self {
        match msg.ack_slot() {
            Some(slot) => {
                if !self.acks.iter().any(|a| Arc::ptr_eq(a, slot)) {
                    self.acks.push(Arc::clone(slot));
                }
            }
            None => self.unackable += 1,
        }
        self
    }

    /// The number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when the commit holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl<I: IntoIterator<Item = Event>> From<I> for Commit {
    fn from(events: I) -> Self {
        Self::new().events(events)
    }
}
