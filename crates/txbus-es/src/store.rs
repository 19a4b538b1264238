//! The event store: typed appends to streams with an expected version, several streams in one
//! atomic commit, and reads of streams and of the whole log — over a [`Bus`], on any store.

use std::sync::Arc;

use txbus_core::{Bus, Commit, Direction, Event, ExpectedVersion, KvWrite, Operation, StreamEvent};

use crate::error::Error;
use crate::event::{DomainEvent, LogEvent, RecordedEvent, SCHEMA_VERSION_HEADER};
use crate::head;
use crate::upcast::Upcasters;

/// Streams over a bus: append with an expected version, read forward or backward, read the
/// log. Cheap to clone.
///
/// Appended events are ordinary bus messages: the bus's subscribed handlers run for them, in
/// the operation the append returns. Every appended event is stamped with its event type's
/// current schema version (see [`Upcasters`]); every event read is upcast to it.
///
/// ```no_run
/// # async fn example(bus: txbus_core::Bus) -> Result<(), txbus_es::Error> {
/// use serde_json::json;
/// use txbus_core::{Conflict, Event, ExpectedVersion};
/// use txbus_es::{Error, EventStore};
///
/// let store = EventStore::new(bus);
/// let appended = store
///     .append("cart-1", ExpectedVersion::NoStream, [Event::new("cart.opened", json!({}))])
///     .await?;
/// assert_eq!(appended.version, 1);
/// match store
///     .append("cart-1", ExpectedVersion::NoStream, [Event::new("cart.opened", json!({}))])
///     .await
/// {
///     Err(Error::Conflict(Conflict::Stream { actual, .. })) => assert_eq!(actual, 1), // reload, retry
///     other => panic!("{other:?}"),
/// }
/// let events = store.read_forward("cart-1", 1, 100).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EventStore {
    bus: Bus,
    upcasters: Arc<Upcasters>,
}

/// What one append did.
#[derive(Debug)]
pub struct Appended {
    /// The stream.
    pub stream: String,
    /// The stream's version after the append: the version of its last new event.
    pub version: u64,
    /// The commit's operation: wait on it for the bus's handlers, or drop it.
    pub operation: Operation,
}

/// What a [`Transaction`] did.
#[derive(Debug)]
pub struct Committed {
    /// Each stream appended to, with its version after the commit, in the order given.
    pub versions: Vec<(String, u64)>,
    /// The commit's operation: wait on it for the bus's handlers, or drop it.
    pub operation: Operation,
}

impl Committed {
    /// The version of `stream` after the commit, when the commit appended to it.
    pub fn version(&self, stream: &str) -> Option<u64> {
        self.versions
            .iter()
            .find(|(s, _)| s == stream)
            .map(|&(_, v)| v)
    }
}

impl EventStore {
    /// An event store over `bus`, with no upcasters.
    pub fn new(bus: Bus) -> Self {
        Self {
            bus,
            upcasters: Arc::new(Upcasters::new()),
        }
    }

    /// Uses these upcasters for every read, and their current versions for every append.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The upcasters.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Stamps `event` with its type's current schema version (when above 1; absent means 1).
    pub fn stamp(&self, event: Event) -> Event {
        let v = self.upcasters.current_version(event.event_type());
        if v > 1 {
            event.header(SCHEMA_VERSION_HEADER, v.to_string())
        } else {
            event
        }
    }

    /// The bus event of a typed event, stamped.
    pub fn event_of<E: DomainEvent>(&self, event: &E) -> Event {
        self.stamp(event.to_event())
    }

    /// Appends `events` to `stream`, which must be at `expected`; returns its new version.
    /// A stream elsewhere fails with [`Error::Conflict`] and writes nothing.
    pub async fn append(
        &self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<Appended, Error> {
        let stream = stream.into();
        let mut committed = self
            .transaction()
            .append(stream.clone(), expected, events)
            .commit()
            .await?;
        let version = committed.versions.pop().map_or(0, |(_, v)| v);
        Ok(Appended {
            stream,
            version,
            operation: committed.operation,
        })
    }

    /// Appends typed events (see [`append`](Self::append)).
    pub async fn append_typed<E: DomainEvent>(
        &self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: &[E],
    ) -> Result<Appended, Error> {
        let events: Vec<Event> = events.iter().map(DomainEvent::to_event).collect();
        self.append(stream, expected, events).await
    }

    /// Starts a commit of several streams (and stream-less events and key–value writes):
    /// all or none.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction {
            store: self,
            commit: Commit::new(),
            streams: Vec::new(),
        }
    }

    /// Reads up to `limit` events of `stream` from version `from` (inclusive) upwards.
    pub async fn read_forward(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.read(stream, from, Direction::Forward, limit).await
    }

    /// Reads up to `limit` events of `stream` from version `from` (inclusive) downwards;
    /// `u64::MAX` starts at the last event.
    pub async fn read_backward(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.read(stream, from, Direction::Backward, limit).await
    }

    async fn read(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let raw = self.bus.read_stream(stream, from, direction, limit).await?;
        raw.into_iter().map(|e| self.recorded(e)).collect()
    }

    pub(crate) fn recorded(&self, e: StreamEvent) -> Result<RecordedEvent, Error> {
        Ok(RecordedEvent {
            stream: e.stream,
            version: e.version,
            commit_id: e.commit_id,
            event: self.upcasters.data(e.message)?,
        })
    }

    /// The version of a stream's last event; 0 when it has none.
    pub async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        Ok(self.bus.stream_version(stream).await?)
    }

    /// Reads the events of up to `limit` commits after `after_position`, in log order (on
    /// stores that seal positions later, only sealed commits: a position once read is never
    /// filled in behind). The bus's system commits (start-up and shutdown records) are not
    /// events of the application and are left out, as projections leave them out.
    pub async fn read_log(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<LogEvent>, Error> {
        let commits = self.bus.read_log(after_position, limit).await?;
        let mut out = Vec::with_capacity(commits.iter().map(|c| c.messages.len()).sum());
        for c in commits.into_iter().filter(|c| !c.is_system()) {
            for (i, m) in c.messages.into_iter().enumerate() {
                out.push(LogEvent {
                    position: c.position,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    operation_id: c.operation_id,
                    created_at_ms: c.created_at_ms,
                    event: self.upcasters.data(m)?,
                });
            }
        }
        Ok(out)
    }

    /// The position of the last commit in the log (0 when empty). Found by a few probing
    /// reads, about `2 log2(n)` of them for `n` commits past `at_least`, which must be a
    /// position known to exist (or 0).
    pub async fn head_position(&self, at_least: u64) -> Result<u64, Error> {
        head::head_position(&self.bus, at_least).await
    }

    /// The version `stream` reached in the commit `commit_id` (when the append did not know
    /// it in advance, with [`ExpectedVersion::Any`]): its newest event of that commit.
    async fn version_in_commit(&self, stream: &str, commit_id: u64) -> Result<u64, Error> {
        const PAGE: usize = 64;
        let mut from = u64::MAX;
        loop {
            let page = self
                .bus
                .read_stream(stream, from, Direction::Backward, PAGE)
                .await?;
            if let Some(e) = page.iter().find(|e| e.commit_id == commit_id) {
                return Ok(e.version);
            }
            match page.last() {
                Some(last) if page.len() == PAGE && last.version > 1 => from = last.version - 1,
                _ => {
                    return Err(Error::Corrupt {
                        key: stream.to_owned(),
                        reason: format!(
                            "the events just committed (commit {commit_id}) are not in the stream"
                        ),
                    })
                }
            }
        }
    }
}

/// Several streams, stream-less events and key–value writes, committed together: all or
/// none. A stream that is not at its expected version fails the whole commit with
/// [`Error::Conflict`].
///
/// ```no_run
/// # async fn example(store: txbus_es::EventStore) -> Result<(), txbus_es::Error> {
/// use serde_json::json;
/// use txbus_core::{Event, ExpectedVersion};
///
/// let committed = store
///     .transaction()
///     .append("account-a", ExpectedVersion::Exact(4), [Event::new("account.debited", json!({"cents": 500}))])
///     .append("account-b", ExpectedVersion::Exact(9), [Event::new("account.credited", json!({"cents": 500}))])
///     .commit()
///     .await?;
/// assert_eq!(committed.version("account-a"), Some(5));
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a transaction does nothing until committed"]
pub struct Transaction<'a> {
    store: &'a EventStore,
    commit: Commit,
    /// (stream, expected, number of events).
    streams: Vec<(String, ExpectedVersion, u64)>,
}

impl Transaction<'_> {
    /// Appends `events` to `stream`, which must be at `expected` (once per stream).
    pub fn append(
        mut self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = Event>,
    ) -> Self {
        let stream = stream.into();
        let events: Vec<Event> = events.into_iter().map(|e| self.store.stamp(e)).collect();
        self.streams
            .push((stream.clone(), expected, events.len() as u64));
        self.commit = self.commit.stream(stream, expected, events);
        self
    }

    /// Appends typed events to `stream`, which must be at `expected`.
    pub fn append_typed<E: DomainEvent>(
        self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: &[E],
    ) -> Self {
        let events: Vec<Event> = events.iter().map(DomainEvent::to_event).collect();
        self.append(stream, expected, events)
    }

    /// Adds an event that belongs to no stream.
    pub fn event(mut self, event: Event) -> Self {
        self.commit = self.commit.event(self.store.stamp(event));
        self
    }

    /// Adds a key–value write (its condition is checked with the streams').
    pub fn kv(mut self, write: KvWrite) -> Self {
        self.commit = self.commit.kv(write);
        self
    }

    /// Acknowledges the delivery of `msg` in this commit (see
    /// [`Commit::acknowledging`]): for a handler whose work is this transaction.
    pub fn acknowledging(mut self, msg: &txbus_core::Message) -> Self {
        self.commit = self.commit.acknowledging(msg);
        self
    }

    /// Commits everything; returns each stream's new version and the operation.
    pub async fn commit(self) -> Result<Committed, Error> {
        let operation = self.store.bus.commit(self.commit).await?;
        let mut versions = Vec::with_capacity(self.streams.len());
        for (stream, expected, n) in self.streams {
            let version = match expected {
                ExpectedVersion::Exact(v) => v + n,
                ExpectedVersion::NoStream => n,
                ExpectedVersion::Any => {
                    self.store
                        .version_in_commit(&stream, operation.commit_id())
                        .await?
                }
            };
            versions.push((stream, version));
        }
        Ok(Committed {
            versions,
            operation,
        })
    }
}
