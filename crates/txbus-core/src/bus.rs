//! The bus: the API a service uses, and its builder.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::BatchProgress;
use crate::chain::{self, VerifyOptions, VerifyReport};
use crate::commit::Commit;
use crate::encryption::FieldEncryption;
use crate::engine::{Engine, HandlerEntry, Settings, ShutdownReport};
use crate::error::Error;
use crate::filter::On;
use crate::handler::{Erased, Handler, HandlerResult, Typed};
use crate::kv::{KvEntry, KvWrite};
use crate::limits::Limits;
use crate::message::{Event, Message, OperationId, StoredMessage, TypedEvent};
use crate::operation::Operation;
use crate::outcome::{OperationState, Outcome};
use crate::policy::{Backoff, Policy, PolicyOverride};
use crate::retention::{PruneReport, Retention};
use crate::schema::SchemaRegistry;
use crate::signing::{CommitSigner, KeyRing};
use crate::store::{CommitKind, CommitRecord, DeadLetter, DeadLetterQuery, Stats, Store};
use crate::stream::{Direction, StreamEvent};
use crate::version::{Version, VersionDiff};

/// A running bus: commit events, run handlers, report outcomes. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    engine: Arc<Engine>,
    keys: Arc<Keys>,
}

/// The bus's signing key id and the public keys its `verify` checks signatures with.
#[derive(Default)]
struct Keys {
    signing: Option<String>,
    ring: KeyRing,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("owner", &self.engine.owner)
            .finish()
    }
}

impl Bus {
    /// Starts configuring a bus.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    /// Commits `events` atomically and durably, and returns once the commit is durable.
    ///
    /// Every event is validated first (limits, schema); one bad event fails the call with an
    /// error naming its index, type and reason, and nothing is written. The returned
    /// [`Operation`] reports the outcome: ok when every subscribed handler of every event
    /// succeeded; failed as soon as one rejects or runs out of retries.
    pub async fn transact<I>(&self, events: I) -> Result<Operation, Error>
    where
        I: IntoIterator<Item = Event>,
    {
        self.commit(Commit::new().events(events)).await
    }

    /// Commits events, stream appends with their expected versions, and key–value writes,
    /// atomically: all or none. A stream or key that is not where the commit expects fails
    /// the call with [`Error::Conflict`] (match on it, reload, retry) and nothing is written.
    /// Stream events are ordinary messages: subscribed handlers run in the same operation.
    pub async fn commit(&self, commit: Commit) -> Result<Operation, Error> {
        let (commit_id, _, guard) = self
            .engine
            .commit(CommitKind::Transact, commit, true)
            .await?;
        let guard =
            guard.ok_or_else(|| Error::Config("internal: missing operation watch".into()))?;
        Ok(self.engine.operation(commit_id, guard))
    }

    /// Like [`commit`](Self::commit), but nobody waits for the outcome (as for `publish`).
    pub async fn commit_unwatched(&self, commit: Commit) -> Result<OperationId, Error> {
        let (_, id, _) = self
            .engine
            .commit(CommitKind::Publish, commit, false)
            .await?;
        Ok(id)
    }

    /// Validates `commit` and routes its events to every subscribed handler, without writing
    /// anything: the result is what a store writes. Stores that can write a commit inside the
    /// caller's own database transaction (the transactional outbox) take it from here; the
    /// deliveries it names are pending, for whichever bus claims them. Nobody waits on the
    /// operation: read its outcome by id.
    pub fn prepare(&self, commit: Commit) -> Result<crate::store::NewCommit, Error> {
        self.engine.prepare(CommitKind::Publish, commit)
    }

    /// Reads up to `limit` events of a stream from version `from` (inclusive), forward or
    /// backward (`u64::MAX` with [`Direction::Backward`] starts at the end).
    pub async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StreamEvent>, Error> {
        Ok(self
            .engine
            .store
            .read_stream(stream, from, direction, limit)
            .await?)
    }

    /// The version of a stream's last event; 0 when it has none.
    pub async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        Ok(self.engine.store.stream_version(stream).await?)
    }

    /// Reads up to `limit` commits of the whole log after `after_position`, in order.
    pub async fn read_log(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<CommitRecord>, Error> {
        Ok(self.engine.store.read_log(after_position, limit).await?)
    }

    /// The commit at `position` of the log as a [`Commit`] value, to append or diff with others
    /// ([`crate::algebra`]), each stream expected at the version it had just before that
    /// commit. `None` when the log has no commit there. See [`CommitRecord::to_commit`].
    pub async fn commit_at(&self, position: u64) -> Result<Option<Commit>, Error> {
        crate::commit::read_at(&self.engine.store, position).await
    }

    /// A receiver that changes whenever the log may have grown (a commit by this bus, or
    /// work announced by a shared store). Readers of the log wait on it, with a poll as a
    /// fallback for commits made elsewhere.
    pub fn log_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.engine.log_tick.subscribe()
    }

    /// Reads one key of the store's key–value space.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, Error> {
        Ok(self.engine.store.kv_get(key).await?)
    }

    /// Applies key–value writes atomically; a condition that fails returns
    /// [`Error::Conflict`] and writes nothing. Returns each key's new version (0 for deletes).
    pub async fn kv_write(&self, writes: Vec<KvWrite>) -> Result<Vec<u64>, Error> {
        self.engine.accepting()?;
        crate::kv::check_writes(&writes).map_err(Error::InvalidCommit)?;
        Ok(self.engine.store.kv_write(writes).await?)
    }

    /// Lists live entries whose key starts with `prefix`, in key order, after `after`.
    pub async fn kv_scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KvEntry>, Error> {
        Ok(self.engine.store.kv_scan(prefix, after, limit).await?)
    }

    /// The store this bus runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.engine.store
    }

    /// Commits one event durably; its handlers run as for `transact`, but nobody waits. The
    /// returned id can still be used with [`outcome`](Self::outcome).
    pub async fn publish(&self, event: Event) -> Result<OperationId, Error> {
        self.commit_unwatched(Commit::new().event(event)).await
    }

    /// Reads where an operation stands, from the store: works after a restart and for
    /// operations committed by other processes. `None` when unknown (or pruned by retention).
    pub async fn outcome(&self, id: OperationId) -> Result<Option<OperationState>, Error> {
        Ok(self.engine.store.operation(id).await?)
    }

    /// Waits for an operation's outcome by id.
    pub async fn wait(&self, id: OperationId) -> Result<Outcome, Error> {
        self.engine.wait(id).await
    }

    /// Lists dead letters: deliveries that failed for good after their retries (or by timeout
    /// or panic on the last attempt).
    pub async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, Error> {
        Ok(self.engine.store.dead_letters(query).await?)
    }

    /// Runs a dead letter again, from attempt 1. The operation's recorded outcome does not
    /// change: an outcome, once reported, is final.
    pub async fn replay(&self, delivery_id: i64) -> Result<(), Error> {
        self.engine.accepting()?;
        if self.engine.store.replay(delivery_id).await? {
            self.engine.wake_claimer();
            Ok(())
        } else {
            Err(Error::UnknownDeadLetter(delivery_id))
        }
    }

    /// Looks inside the store: per-handler counts, throughput, operations, dead letters.
    pub fn inspect(&self) -> crate::Inspector {
        crate::Inspector::new(self.clone())
    }

    /// The names of this bus's handlers.
    pub fn handler_names(&self) -> &[String] {
        self.engine.handler_names()
    }

    pub(crate) fn wake_claimer(&self) {
        self.engine.wake_claimer();
    }

    /// Walks the log and checks every commit's data and chain hash and, when the bus has keys
    /// (its own signing key, [`BusBuilder::verifying_keys`]), every signature; a bus that signs
    /// also requires the end of the log to be signed.
    pub async fn verify(&self) -> Result<VerifyReport, Error> {
        self.verify_with(&self.verify_options()).await
    }

    /// What [`verify`](Self::verify) checks: hashes, and signatures with the bus's key ring
    /// (required at the end of the log when the bus signs).
    pub fn verify_options(&self) -> VerifyOptions {
        if self.keys.ring.is_empty() {
            VerifyOptions::hashes()
        } else {
            VerifyOptions::signatures(self.keys.ring.clone())
                .require_signatures(self.keys.signing.is_some())
        }
    }

    /// Walks the log and checks it as `options` say.
    pub async fn verify_with(&self, options: &VerifyOptions) -> Result<VerifyReport, Error> {
        Ok(chain::verify_with(self.engine.store.as_ref(), options).await?)
    }

    /// The id of the key this bus signs the chain with, if any.
    pub fn signing_key_id(&self) -> Option<&str> {
        self.keys.signing.as_deref()
    }

    /// The position of the last commit in the log (0 when it is empty).
    pub async fn head_position(&self) -> Result<u64, Error> {
        Ok(self.engine.store.head().await?)
    }

    /// The version at `position`: the key–value space and stream heads just after that commit,
    /// and the commits that made it (see [`crate::version`]). Position 0 is the empty state.
    pub async fn state_at(&self, position: u64) -> Result<Version, Error> {
        let head = self.head_position().await?;
        if position > head {
            return Err(Error::InvalidCommit(format!(
                "position {position} is past the end of the log ({head})"
            )));
        }
        Ok(Version {
            store: Arc::clone(&self.engine.store),
            position,
            max_examined: crate::past_page::MAX_EXAMINED,
        })
    }

    /// What changed between positions `from` and `to`: the keys written and the streams
    /// appended to by the commits in between, each with its state in both versions. Reads at
    /// most `max_commits` commits; a longer range comes back `truncated`, to continue from its
    /// `to`.
    pub async fn diff_versions(
        &self,
        from: u64,
        to: u64,
        max_commits: usize,
    ) -> Result<VersionDiff, Error> {
        crate::version::diff(&self.engine.store, from, to, max_commits).await
    }

    /// Opens the session `id`: resumed from the store, or new (see [`crate::session`]).
    pub async fn session(&self, id: &str) -> Result<crate::session::Session, Error> {
        crate::session::Session::open(self.clone(), id).await
    }

    /// Lists up to `limit` stored sessions' ids after `after`.
    pub async fn sessions(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, Error> {
        crate::session::list(self, after, limit).await
    }

    /// Where the batch `name` stands, from its checkpoint in the store (see [`crate::batch`]).
    pub async fn batch_progress(&self, name: &str) -> Result<Option<BatchProgress>, Error> {
        crate::batch::read(self, name).await
    }

    /// Lists up to `limit` batches' progress after the batch `after`, by name.
    pub async fn batches(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<BatchProgress>, Error> {
        crate::batch::list(self, after, limit).await
    }

    /// Commits a chunk of a batch: like [`commit_unwatched`](Self::commit_unwatched), stored as
    /// [`CommitKind::Batch`].
    pub async fn commit_batch(&self, commit: Commit) -> Result<OperationId, Error> {
        let (_, id, _) = self.engine.commit(CommitKind::Batch, commit, false).await?;
        Ok(id)
    }

    /// A message read from the log or a stream with its encrypted fields decrypted (as handlers
    /// get it); returned as it is when it has none.
    pub fn open_message(&self, message: &StoredMessage) -> Result<StoredMessage, Error> {
        match &self.engine.settings.encryption {
            Some(policy) => match policy.open(message) {
                Ok(Some(plain)) => Ok(plain),
                Ok(None) => Ok(message.clone()),
                Err(reason) => Err(Error::Config(reason)),
            },
            None => Ok(message.clone()),
        }
    }

    /// The input limits this bus validates against.
    pub fn limits(&self) -> &Limits {
        &self.engine.settings.limits
    }

    /// Walks the log like [`Bus::verify`], reporting progress after every page of commits.
    pub async fn verify_with_progress<F>(&self, progress: F) -> Result<VerifyReport, Error>
    where
        F: FnMut(chain::VerifyProgress) + Send,
    {
        Ok(
            chain::verify_walk(self.engine.store.as_ref(), &self.verify_options(), progress)
                .await?,
        )
    }

    /// Counts what the store holds.
    pub async fn stats(&self) -> Result<Stats, Error> {
        Ok(self.engine.store.stats().await?)
    }

    /// Applies the retention bounds now (it also runs periodically).
    pub async fn prune(&self) -> Result<PruneReport, Error> {
        Ok(self
            .engine
            .store
            .prune(&self.engine.settings.retention)
            .await?)
    }

    /// Forgets a handler that was retired from every process sharing the store, so that new
    /// commits no longer create deliveries for it. Only meaningful on shared stores; on an
    /// embedded store only the handlers of the running bus are routed to anyway.
    pub async fn unsubscribe(&self, name: &str) -> Result<bool, Error> {
        self.engine.accepting()?;
        let existed = self.engine.store.unsubscribe(name).await?;
        self.engine.refresh_routes().await?;
        Ok(existed)
    }

    /// Stops starting new attempts; commits go on and pile up in the store.
    pub fn pause(&self) {
        self.engine.pause();
    }

    /// Starts attempts again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.engine.resume();
    }

    /// Deliveries held in memory now; never more than the buffer capacity.
    pub fn buffered(&self) -> usize {
        self.engine.in_memory().0
    }

    /// Stops taking work, waits up to `deadline` for running attempts, cancels the rest and
    /// returns every delivery this bus held to pending, so the next start runs them. Then
    /// closes the store.
    pub async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport, Error> {
        self.engine.shutdown(deadline).await
    }
}

struct PendingHandler {
    name: String,
    filter: On,
    policy: PolicyOverride,
    handler: Arc<dyn crate::handler::ErasedHandler>,
}

/// Configures and builds a [`Bus`]. A store is required.
pub struct BusBuilder {
    store: Option<Arc<dyn Store>>,
    schemas: SchemaRegistry,
    limits: Limits,
    policy: Policy,
    handlers: Vec<PendingHandler>,
    retention: Retention,
    lease_ttl: Duration,
    buffer_capacity: usize,
    claim_batch: usize,
    poll_interval: Duration,
    max_concurrency: usize,
    start_paused: bool,
    max_interruptions: u32,
    signer: Option<Arc<CommitSigner>>,
    ring: KeyRing,
    encryption: Option<FieldEncryption>,
    system_commits: bool,
}

impl Default for BusBuilder {
    fn default() -> Self {
        Self {
            store: None,
            schemas: SchemaRegistry::new(),
            limits: Limits::default(),
            policy: Policy::default(),
            handlers: Vec::new(),
            retention: Retention::default(),
            lease_ttl: Duration::from_secs(30),
            buffer_capacity: 10_000,
            claim_batch: 256,
            poll_interval: Duration::from_secs(1),
            max_concurrency: 1024,
            start_paused: false,
            max_interruptions: 10,
            signer: None,
            ring: KeyRing::new(),
            encryption: None,
            system_commits: true,
        }
    }
}

impl BusBuilder {
    /// The store (required).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The store, already shared.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// JSON Schemas to validate events against.
    pub fn schemas(mut self, registry: SchemaRegistry) -> Self {
        self.schemas = registry;
        self
    }

    /// Longest one attempt may run (default 10 s).
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.policy.timeout = timeout;
        self
    }

    /// Retries after the first attempt (default 3).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.policy.max_retries = retries;
        self
    }

    /// Delay between attempts (default exponential from 1 s, capped at 5 min, 20 % jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.policy.backoff = backoff;
        self
    }

    /// Attempts of one handler running at once (default 64).
    pub fn handler_concurrency(mut self, concurrency: usize) -> Self {
        self.policy.concurrency = concurrency;
        self
    }

    /// Attempts of all handlers running at once (default 1024).
    pub fn max_concurrency(mut self, concurrency: usize) -> Self {
        self.max_concurrency = concurrency;
        self
    }

    /// Largest payload of one event in JSON bytes (default 1 MiB).
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_payload_bytes = bytes;
        self
    }

    /// Most events in one commit (default 10 000).
    pub fn max_events_per_commit(mut self, count: usize) -> Self {
        self.limits.max_events_per_commit = count;
        self
    }

    /// Retention of finished deliveries and outcomes.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// How long a lease outlives its holder's last heartbeat (default 30 s). A crashed
    /// process's deliveries are taken over after this.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Deliveries held in memory at most (default 10 000); beyond it work waits in the store.
    pub fn buffer_capacity(mut self, capacity: usize) -> Self {
        self.buffer_capacity = capacity;
        self
    }

    /// How often the store is checked for work not handed over directly (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How many times a delivery may be interrupted — the bus holding it stopped (crashed,
    /// was killed) and another took its lease over — before it is dead-lettered without being
    /// run again (default 10). An attempt cut short by the death of its process is never
    /// recorded, so without this bound a message that brings its process down would run, and
    /// bring it down, after every restart.
    pub fn max_interruptions(mut self, n: u32) -> Self {
        self.max_interruptions = n;
        self
    }

    /// Signs the chain with `signer`: the store signs the chain hash of the last commit of each
    /// group commit (or sealing round) and keeps the signature and key id with that commit (see
    /// [`crate::signing`]). Its public key joins the ring `verify` checks with.
    pub fn signing_key(mut self, signer: CommitSigner) -> Self {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// Public keys `verify` checks signatures with: keep the keys of every rotation here so that
    /// the commits they signed still verify.
    pub fn verifying_keys(mut self, ring: KeyRing) -> Self {
        self.ring = ring;
        self
    }

    /// Encrypts the fields `policy` names before the write and decrypts them for handlers (see
    /// [`crate::encryption`]).
    pub fn field_encryption(mut self, policy: FieldEncryption) -> Self {
        self.encryption = Some(policy);
        self
    }

    /// Records the bus's start (in `build`) and shutdown as system commits in the log (default
    /// on; see [`crate::system`]). Turn it off only where the log must hold exactly what a
    /// caller committed (a measurement, a test counting commits).
    pub fn system_commits(mut self, on: bool) -> Self {
        self.system_commits = on;
        self
    }

    /// Starts with handlers paused (see [`Bus::pause`]).
    pub fn start_paused(mut self, paused: bool) -> Self {
        self.start_paused = paused;
        self
    }

    /// Subscribes a handler under a stable `name` (its identity across restarts).
    pub fn handler(self, name: impl Into<String>, on: On, handler: impl Handler) -> Self {
        self.handler_with(name, on, PolicyOverride::default(), handler)
    }

    /// Subscribes a handler with its own timeout, retries, backoff or concurrency.
    pub fn handler_with(
        mut self,
        name: impl Into<String>,
        on: On,
        policy: PolicyOverride,
        handler: impl Handler,
    ) -> Self {
        self.handlers.push(PendingHandler {
            name: name.into(),
            filter: on,
            policy,
            handler: Arc::new(Erased(Arc::new(handler))),
        });
        self
    }

    /// Subscribes a handler of a typed event: the payload is decoded into `T` first.
    pub fn on<T, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        T: TypedEvent,
        F: Fn(T, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send,
    {
        let mut on = On::event(T::EVENT_TYPE);
        if let Some(module) = T::MODULE {
            on = on.module(module);
        }
        self.handler(name, on, Typed::<T, F>::new(f))
    }

    /// Checks the configuration, opens the engine, and resumes unfinished deliveries.
    pub async fn build(self) -> Result<Bus, Error> {
        let store = self.store.ok_or(Error::NoStore)?;
        let mut seen = HashSet::new();
        let mut handlers = Vec::with_capacity(self.handlers.len());
        for h in self.handlers {
            if h.name.is_empty() || h.name.len() > 255 {
                return Err(Error::Config(format!(
                    "handler name {:?} must be 1 to 255 bytes",
                    h.name
                )));
            }
            if !seen.insert(h.name.clone()) {
                return Err(Error::Config(format!(
                    "handler name {:?} is registered twice; names identify handlers across restarts and must be unique",
                    h.name
                )));
            }
            let policy = h.policy.apply(&self.policy);
            if policy.timeout.is_zero() || policy.concurrency == 0 {
                return Err(Error::Config(format!(
                    "handler {:?}: timeout and concurrency must be above zero",
                    h.name
                )));
            }
            handlers.push(HandlerEntry {
                name: Arc::from(h.name.as_str()),
                filter: h.filter,
                policy,
                handler: h.handler,
            });
        }
        if self.buffer_capacity == 0 || self.max_concurrency == 0 || self.claim_batch == 0 {
            return Err(Error::Config(
                "buffer_capacity and max_concurrency must be above zero".into(),
            ));
        }
        if self.lease_ttl < Duration::from_millis(30) {
            return Err(Error::Config("lease_ttl must be at least 30 ms".into()));
        }
        // A zero interval would turn the claim or prune loop into a busy loop.
        if self.poll_interval.is_zero() {
            return Err(Error::Config("poll_interval must be above zero".into()));
        }
        if self.retention.interval.is_zero() {
            return Err(Error::Config(
                "the retention interval (Retention::interval) must be above zero".into(),
            ));
        }
        if self.limits.max_payload_bytes == 0 || self.limits.max_events_per_commit == 0 {
            return Err(Error::Config(
                "max_payload_bytes and max_events_per_commit must be above zero".into(),
            ));
        }
        if let Some(problem) = self.encryption.as_ref().and_then(|e| e.problem()) {
            return Err(Error::Config(problem.to_string()));
        }
        let mut ring = self.ring;
        let signing = self.signer.as_ref().map(|s| s.key_id().to_owned());
        if let Some(signer) = &self.signer {
            ring = ring.with(signer.key_id(), signer.verifying_key());
        }
        store
            .set_signer(self.signer.clone())
            .or_else(|e| {
                if self.signer.is_none() {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::Config(format!("signing_key: {e}")))?;
        let system_commits = self.system_commits;
        let settings = Settings {
            limits: self.limits,
            schemas: self.schemas,
            lease_ttl: self.lease_ttl,
            buffer_capacity: self.buffer_capacity,
            claim_batch: self.claim_batch.min(self.buffer_capacity),
            poll_interval: self.poll_interval,
            retention: self.retention,
            max_concurrency: self.max_concurrency,
            start_paused: self.start_paused,
            max_interruptions: self.max_interruptions,
            encryption: self.encryption.map(Arc::new),
            system_commits,
        };
        let engine = Engine::start(store, handlers, settings).await?;
        if system_commits {
            if let Err(e) = crate::system::record_start(&engine, signing.as_deref()).await {
                let _ = engine.shutdown(Duration::from_secs(1)).await;
                return Err(e);
            }
        }
        Ok(Bus {
            engine,
            keys: Arc::new(Keys { signing, ring }),
        })
    }
}
