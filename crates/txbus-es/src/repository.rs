//! The repository: loads an aggregate (snapshot + the tail of its stream), runs a command,
//! saves the new events with optimistic concurrency, and retries on conflict.

use std::marker::PhantomData;
use std::time::Duration;

use txbus_core::{Conflict, Event, ExpectedVersion, KvExpect, KvWrite, Operation};

use crate::aggregate::{stream_id, Aggregate};
use crate::error::{CommandError, Error};
use crate::event::DomainEvent;
use crate::snapshot::{self, Found};
use crate::store::EventStore;

/// An aggregate as loaded: its state after `version` events of its stream.
#[derive(Debug)]
pub struct Loaded<A> {
    /// The aggregate's id.
    pub id: String,
    /// Its stream.
    pub stream: String,
    /// Its state.
    pub state: A,
    /// The version of its stream the state includes (0: no event yet).
    pub version: u64,
    /// The stream version of the snapshot the load started from, if one was used.
    pub snapshot: Option<u64>,
    /// How many events were replayed on top of the snapshot (or from the start).
    pub replayed: u64,
}

/// What a saved command did.
#[derive(Debug)]
pub struct Saved<A: Aggregate> {
    /// The aggregate's id.
    pub id: String,
    /// Its stream.
    pub stream: String,
    /// Its state after the new events.
    pub state: A,
    /// Its stream's version after the new events.
    pub version: u64,
    /// The new events (empty: the command changed nothing, nothing was committed).
    pub events: Vec<A::Event>,
    /// The commit's operation, when something was committed: wait on it for the bus's
    /// handlers of the new events, or drop it.
    pub operation: Option<Operation>,
    /// How many times the command ran (more than 1 after conflicts).
    pub attempts: u32,
    /// True when a snapshot was written with the events.
    pub snapshot_written: bool,
}

/// What to commit with a command's events, besides them.
#[derive(Debug, Clone, Default)]
pub struct CommandOptions {
    correlation_id: Option<String>,
    causation_id: Option<String>,
    headers: Vec<(String, String)>,
    events: Vec<Event>,
    kv: Vec<KvWrite>,
    ack: Option<txbus_core::Message>,
}

impl CommandOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id of every new event.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id of every new event.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Adds a header to every new event.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Commits this stream-less event with the command's events (an integration event, an
    /// audit record).
    pub fn event(mut self, event: Event) -> Self {
        self.events.push(event);
        self
    }

    /// Commits this key–value write with the command's events (an idempotency record, an
    /// index entry). A condition that fails is not retried: the command fails with
    /// [`Error::Conflict`] (a [`Conflict::Key`]) and nothing is written.
    pub fn kv(mut self, write: KvWrite) -> Self {
        self.kv.push(write);
        self
    }

    /// Acknowledges the delivery of `msg` in the command's commit: for a handler that runs
    /// this command as its work (a process manager reacting to an event), so that the save and
    /// the acknowledgement cost one durable write, and a handler whose lease was taken over
    /// cannot save (see [`txbus_core::Commit::acknowledging`]).
    pub fn acknowledging(mut self, msg: &txbus_core::Message) -> Self {
        self.ack = Some(msg.clone());
        self
    }

    fn decorate(&self, mut event: Event) -> Event {
        if let Some(id) = &self.correlation_id {
            event = event.correlation_id(id.clone());
        }
        if let Some(id) = &self.causation_id {
            event = event.causation_id(id.clone());
        }
        for (k, v) in &self.headers {
            event = event.header(k.clone(), v.clone());
        }
        event
    }
}

/// Loads, changes and saves aggregates of type `A`. Cheap to clone.
///
/// - **Load**: the snapshot (if any, and of the aggregate's current
///   [`SNAPSHOT_VERSION`](Aggregate::SNAPSHOT_VERSION)), then the stream from the snapshot's
///   version + 1, in pages. A snapshot of another version is ignored: the aggregate is
///   replayed from its first event and a new snapshot is written.
/// - **Execute**: load, `handle` the command, `apply` the events, `check` the invariants, then
///   append with the exact version loaded. If another writer got there first, reload and run
///   the command again, up to [`max_attempts`](Self::max_attempts) times (default 3) with a
///   short random pause; then fail with [`CommandError::RetriesExhausted`].
/// - **Snapshots**: with [`snapshot_every`](Self::snapshot_every)`(n)`, a save whose events
///   cross a multiple of `n` writes the new state's snapshot in the same commit; a load that
///   replayed `n` events or more writes one too. [`snapshot`](Self::snapshot) writes one on
///   demand.
///
/// ```no_run
/// # use txbus_es::Aggregate;
/// # async fn example<A: Aggregate>(store: txbus_es::EventStore, command: A::Command) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_es::{CommandError, Repository};
///
/// let orders = Repository::<A>::new(store).snapshot_every(100).max_attempts(5);
/// match orders.execute("42", command).await {
///     Ok(saved) => {
///         // the events are durable; wait for the bus's handlers, or not
///         if let Some(op) = saved.operation {
///             op.outcome().await?;
///         }
///     }
///     Err(CommandError::Domain(refused)) => { /* tell the caller why */ }
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Repository<A> {
    store: EventStore,
    snapshot_every: Option<u64>,
    max_attempts: u32,
    retry_pause: Duration,
    page_size: usize,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            snapshot_every: self.snapshot_every,
            max_attempts: self.max_attempts,
            retry_pause: self.retry_pause,
            page_size: self.page_size,
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `store`: no automatic snapshots, 3 attempts, pages of 1000 events.
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            snapshot_every: None,
            max_attempts: 3,
            retry_pause: Duration::from_millis(2),
            page_size: 1000,
            _aggregate: PhantomData,
        }
    }

    /// Writes a snapshot whenever a save crosses a multiple of `n` events, and when a load
    /// replays `n` events or more (`0` turns automatic snapshots off).
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = (n > 0).then_some(n);
        self
    }

    /// How many times a command runs before a conflict is final (at least 1; default 3).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The longest pause before a retry, times the attempt number; the pause is random below
    /// it, so that writers that met do not meet again (default 2 ms).
    pub fn retry_pause(mut self, pause: Duration) -> Self {
        self.retry_pause = pause;
        self
    }

    /// How many events a load reads at once (default 1000; memory is bounded by it).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// The event store.
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The stream of the aggregate `id`: `"{KIND}-{id}"`.
    pub fn stream_id(&self, id: &str) -> String {
        stream_id::<A>(id)
    }

    /// Loads the aggregate `id`: its snapshot if usable, then the rest of its stream. An
    /// aggregate without events loads as [`Aggregate::create`] at version 0.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Error> {
        let stream = stream_id::<A>(id);
        let key = snapshot::snapshot_key(&stream);
        let entry = self.store.bus().kv_get(&key).await?;
        let (mut state, mut version, used, stale) = match &entry {
            None => (A::create(id), 0, None, false),
            Some(e) => match snapshot::decode::<A>(e) {
                Found::Usable(state, v) => (state, v, Some(v), false),
                Found::Stale(reason) => {
                    tracing::info!(stream = %stream, %reason, "ignoring the snapshot; replaying the stream");
                    (A::create(id), 0, None, true)
                }
            },
        };
        let mut replayed = 0u64;
        loop {
            let page = self
                .store
                .read_forward(&stream, version + 1, self.page_size)
                .await?;
            let n = page.len();
            for recorded in page {
                let event = match A::Event::decode(&recorded.event_type, &recorded.payload) {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        return Err(Error::Decode {
                            event_type: recorded.event.event_type,
                            location: format!("stream {stream:?} version {}", recorded.version),
                            reason: e.to_string(),
                        })
                    }
                    None => {
                        return Err(Error::UnknownEvent {
                            aggregate: A::KIND,
                            stream,
                            version: recorded.version,
                            event_type: recorded.event.event_type,
                        })
                    }
                };
                state.apply(&event);
                version = recorded.version;
                replayed += 1;
            }
            if n < self.page_size {
                break;
            }
        }
        let replay_long = self.snapshot_every.is_some_and(|n| replayed >= n);
        if version > 0 && (stale || replay_long) {
            let expect = entry
                .as_ref()
                .map_or(KvExpect::Absent, |e| KvExpect::Version(e.version));
            self.write_snapshot(&stream, &state, version, expect).await;
        }
        Ok(Loaded {
            id: id.to_owned(),
            stream,
            state,
            version,
            snapshot: used,
            replayed,
        })
    }

    /// Writes a snapshot if the key is still as read; a failure only costs a later replay.
    async fn write_snapshot(
        &self,
        stream: &str,
        state: &A,
        version: u64,
        expect: KvExpect,
    ) -> bool {
        let value = match snapshot::encode(state, version) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "cannot write a snapshot");
                return false;
            }
        };
        let write = KvWrite::put(snapshot::snapshot_key(stream), value).expect(expect);
        match self.store.bus().kv_write(vec![write]).await {
            Ok(_) => true,
            Err(txbus_core::Error::Conflict(_)) => false, // someone wrote a newer one
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "writing a snapshot failed");
                false
            }
        }
    }

    /// Loads the aggregate `id` and writes its snapshot now (unless someone wrote one in the
    /// meantime). Returns the stream version the snapshot includes (0: no events, nothing
    /// written).
    pub async fn snapshot(&self, id: &str) -> Result<u64, Error> {
        let stream = stream_id::<A>(id);
        let key = snapshot::snapshot_key(&stream);
        let entry = self.store.bus().kv_get(&key).await?;
        let loaded = self.load(id).await?;
        if loaded.version == 0 {
            return Ok(0);
        }
        let expect = entry.map_or(KvExpect::Absent, |e| KvExpect::Version(e.version));
        let value = snapshot::encode(&loaded.state, loaded.version)?;
        match self
            .store
            .bus()
            .kv_write(vec![KvWrite::put(key, value).expect(expect)])
            .await
        {
            Ok(_) | Err(txbus_core::Error::Conflict(_)) => Ok(loaded.version),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `command` on the aggregate `id` and saves its events; see the type's docs.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Saved<A>, CommandError<A::Error>> {
        self.execute_with(id, &command, &CommandOptions::default())
            .await
    }

    /// Runs `command` with options: headers for the new events, and more events and
    /// key–value writes committed with them.
    pub async fn execute_with(
        &self,
        id: &str,
        command: &A::Command,
        options: &CommandOptions,
    ) -> Result<Saved<A>, CommandError<A::Error>> {
        let mut last = None;
        for attempt in 1..=self.max_attempts {
            let loaded = self.load(id).await?;
            let events = loaded.state.handle(command).map_err(CommandError::Domain)?;
            match self.save_with(loaded, events, options).await {
                Ok(mut saved) => {
                    saved.attempts = attempt;
                    return Ok(saved);
                }
                Err(CommandError::Store(Error::Conflict(c @ Conflict::Stream { .. }))) => {
                    tracing::debug!(stream = %stream_id::<A>(id), attempt, conflict = %c, "concurrent change; reloading");
                    last = Some(c);
                    if attempt < self.max_attempts {
                        self.pause(attempt).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let stream = stream_id::<A>(id);
        Err(CommandError::RetriesExhausted {
            attempts: self.max_attempts,
            last: last.unwrap_or(Conflict::Stream {
                stream: stream.clone(),
                expected: ExpectedVersion::Any,
                actual: 0,
            }),
            stream,
        })
    }

    async fn pause(&self, attempt: u32) {
        let max = self.retry_pause.saturating_mul(attempt);
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if nanos > 0 {
            tokio::time::sleep(Duration::from_nanos(fastrand::u64(0..=nanos))).await;
        }
    }

    /// Applies `events` to a loaded aggregate, checks its invariants and appends them with
    /// the exact version loaded: no retry, a concurrent change fails with
    /// [`Error::Conflict`]. No events: nothing is committed.
    pub async fn save(
        &self,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Saved<A>, CommandError<A::Error>> {
        self.save_with(loaded, events, &CommandOptions::default())
            .await
    }

    /// [`save`](Self::save) with options.
    pub async fn save_with(
        &self,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
        options: &CommandOptions,
    ) -> Result<Saved<A>, CommandError<A::Error>> {
        let Loaded {
            id,
            stream,
            mut state,
            version,
            ..
        } = loaded;
        for e in &events {
            state.apply(e);
        }
        state.check().map_err(CommandError::Domain)?;
        if events.is_empty() {
            return Ok(Saved {
                id,
                stream,
                state,
                version,
                events,
                operation: None,
                attempts: 1,
                snapshot_written: false,
            });
        }
        let new_version = version + events.len() as u64;
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let bus_events: Vec<Event> = events
            .iter()
            .map(|e| options.decorate(e.to_event()))
            .collect();
        let mut tx = self
            .store
            .transaction()
            .append(stream.clone(), expected, bus_events);
        for e in &options.events {
            tx = tx.event(e.clone());
        }
        for w in &options.kv {
            tx = tx.kv(w.clone());
        }
        if let Some(msg) = &options.ack {
            tx = tx.acknowledging(msg);
        }
        let snapshot_written = self
            .snapshot_every
            .is_some_and(|n| version / n != new_version / n);
        if snapshot_written {
            // The append is exact: at commit time this is the newest state there is.
            let value = snapshot::encode(&state, new_version)?;
            tx = tx.kv(KvWrite::put(snapshot::snapshot_key(&stream), value));
        }
        let committed = tx.commit().await?;
        Ok(Saved {
            id,
            stream,
            state,
            version: new_version,
            events,
            operation: Some(committed.operation),
            attempts: 1,
            snapshot_written,
        })
    }
}
