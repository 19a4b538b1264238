//! The scale-out txbus store: one PostgreSQL database shared by many bus processes.
//!
//! Every process that connects to the same schema sees the same log, deliveries and outcomes:
//! a commit made by one is handled by whichever bus claims it, a lease of a process that
//! stopped is taken over by another, and an outcome recorded anywhere can be read or waited
//! for everywhere.
//!
//! - Writes go through a few writer lanes that commit every waiting request in one
//!   transaction (group commit), with multi-row statements: one for all the commits of a
//!   batch (rows, messages, deliveries), one for all its acknowledgements. A batch that is
//!   one statement is a transaction of its own. The lanes plan each statement once per
//!   connection: every one reaches rows through keys, so its plan cannot go wrong.
//! - A delivery leased to the committing bus that succeeds on its first attempt costs no row
//!   of its own: it is kept on its commit's row, and gets a row only when it needs one (a
//!   retry, a failure, a release, a takeover).
//! - Commits are appended unsealed; one sealer in the database (whichever process holds the
//!   schema's advisory lock) gives them log positions and chain hashes shortly after, in a
//!   table of their own, so that writers never wait for one another on the chain, nor acks
//!   for the sealer. [`AppendReceipt::chain_hash`] is therefore `None`, and
//!   [`Store::read_log`] returns sealed commits only.
//! - Claims lease with `FOR UPDATE SKIP LOCKED`, so buses in many processes claim at once.
//! - `LISTEN/NOTIFY` tells every bus about new work, sealed commits, finished operations and
//!   handlers subscribed in other processes right away ([`Store::notifications`]); the
//!   notifications of the writer lanes are sent once their transactions have committed, so
//!   that they never hold up the others' commits.
//! - Handler subscriptions are kept in the database, so a commit made in one process creates
//!   deliveries for the handlers of every process ([`Store::is_shared`]).
//! - Streams and the key–value space: a commit's stream expectations and key conditions are
//!   checked inside its transaction, under a lock per stream and per key that writers in every
//!   process take, so two appends never take one version; a condition that fails refuses its
//!   own commit only, and the rest of its batch commits. Stream events are read by version as
//!   soon as their commit is, sealed or not.
//! - The transactional outbox: [`PostgresStore::append_in`] writes a commit inside the
//!   caller's own transaction, so that a service's business rows and its events commit or roll
//!   back together.
//!
//! Connections: the pool (see [`PostgresOptions::max_connections`]; the notification listener
//! holds one of its connections), plus one connection of its own per writer lane, one for the
//! sealer and one that sends the notifications of committed writes.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use txbus_postgres::PostgresOptions;
//! let store = PostgresOptions::new("postgres://app@db.internal/app")
//!     .schema("txbus")
//!     .max_connections(16)
//!     .connect()
//!     .await?;
//! let bus = txbus_core::Bus::builder().store(store).build().await?;
//! # let _ = bus; Ok(()) }
//! ```
//!
//! [`AppendReceipt::chain_hash`]: txbus_core::store::AppendReceipt::chain_hash

mod append;
mod claim;
mod clock;
mod commit_meta;
mod complete;
mod condition;
mod context;
mod error;
mod history;
mod inline;
mod inspect;
mod kv;
mod notify;
mod outbox;
mod pg_uuid;
#[cfg(test)]
mod plan_tests;
mod prune;
mod read;
mod row;
mod schema;
mod seal;
mod stream;
mod subscribe;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use txbus_core::signing::CommitSigner;
use txbus_core::store::{
    AppendReceipt, ClaimedDelivery, CommitRecord, Completion, CompletionEffect, DeadLetter,
    DeadLetterQuery, Error, KvVersion, NewCommit, Notification, Notifications, OwnerId, Stats,
    Store, StoreInfo, Subscription,
};
use txbus_core::{
    Direction, KvEntry, KvWrite, OperationId, OperationState, PastPage, PruneReport, Retention,
    StreamEvent,
};

use crate::context::Shared;
use crate::error::db;
use crate::schema::Schema;
use crate::writer::{Op, Out, Request};

/// Notifications buffered per stream before a slow reader is told to just claim.
const NOTIFICATION_BUFFER: usize = 1024;

/// Options for connecting a store.
#[derive(Clone)]
pub struct PostgresOptions {
    url: String,
    schema: String,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    writer_lanes: usize,
    max_batch: usize,
    queue_capacity: usize,
    stall_timeout: Duration,
}

// By hand, so that the URL (and any password in it) stays out of logs.
impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("writer_lanes", &self.writer_lanes)
            .field("max_batch", &self.max_batch)
            .field("queue_capacity", &self.queue_capacity)
            .field("stall_timeout", &self.stall_timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresOptions {
    /// Options for the database at `url` (`postgres://user:password@host:port/database?…`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "txbus".into(),
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(10),
            writer_lanes: 4,
            max_batch: 1024,
            queue_capacity: 8192,
            stall_timeout: Duration::from_secs(10),
        }
    }

    /// The schema holding the store's tables (default `txbus`); created if missing. ASCII
    /// letters, digits and underscores, at most 63 bytes, not starting with a digit. Stores in
    /// different schemas of one database are independent.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Most connections in the pool used by claims, reads and the notification listener
    /// (default 16; at least 2, since the listener keeps one).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(2);
        self
    }

    /// Connections the pool keeps open even when idle (default 0).
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = n;
        self
    }

    /// Longest wait for a pooled connection, or to open a new one (default 10 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Writer lanes: transactions of batched writes in flight at once, each on a connection
    /// of its own (default 4).
    pub fn writer_lanes(mut self, n: usize) -> Self {
        self.writer_lanes = n.max(1);
        self
    }

    /// Most requests committed in one transaction (default 1024).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Requests waiting for a writer lane at most; callers beyond it wait (default 8192).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// How long a session of this store may stall inside a transaction, or (the sealer's)
    /// idle, before the server ends it (default 10 s). A process that is frozen rather than
    /// dead (stopped, swapped out, stuck) would otherwise keep its row locks and the sealer's
    /// lock for ever, and every other process would wait on them. The store's own
    /// transactions last milliseconds; keep this well above that and below the lease ttl.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Connects, brings the schema up to date, and starts the writer lanes, the sealer and the
    /// notification listener. Must be called within a Tokio runtime.
    pub async fn connect(self) -> Result<PostgresStore, Error> {
        PostgresStore::connect_with(self).await
    }
}

/// The PostgreSQL store. See the crate docs. Cheap to clone: clones share one store, which
/// stops when [`Store::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.shared.schema.name())
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    lanes: Mutex<Vec<JoinHandle<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    events: Mutex<Option<broadcast::Sender<Notification>>>,
    stop: watch::Sender<bool>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PostgresStore {
    /// Connects to the database at `url` with default options (schema `txbus`).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        PostgresOptions::new(url).connect().await
    }

    /// Options to connect to the database at `url` with.
    pub fn options(url: impl Into<String>) -> PostgresOptions {
        PostgresOptions::new(url)
    }

    // Boxed so that the future is checked `Send` here, where its lifetimes are concrete:
    // callers inside `#[async_trait]` methods or `tokio::spawn` otherwise trip over sqlx's
    // higher-ranked executor bounds.
    fn connect_with(
        options: PostgresOptions,
    ) -> futures_util::future::BoxFuture<'static, Result<Self, Error>> {
        Box::pin(Self::start(options))
    }

    async fn start(options: PostgresOptions) -> Result<Self, Error> {
        let schema = Schema::new(&options.schema)?;
        let connect: PgConnectOptions = options
            .url
            .parse()
            .map_err(|e| Error::backend("postgres: parsing the connection URL", e))?;
        // Statements are prepared once per connection, and a generic plan made while a table is
        // small (a sequential scan) would stay long after it has grown: plan each execution for
        // the table and the batch at hand.
        let stall = format!("{}ms", options.stall_timeout.as_millis());
        let connect = connect.options([
            ("plan_cache_mode", "force_custom_plan"),
            ("idle_in_transaction_session_timeout", stall.as_str()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(options.min_connections.min(options.max_connections))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(db("connecting"))?;
        if let Err(e) = schema::migrate(&pool, &schema).await {
            pool.close().await;
            return Err(e);
        }
        let shared = Arc::new(Shared {
            pool,
            schema,
            seal_wake: Notify::new(),
            connect_timeout: options.acquire_timeout,
            stall_timeout: options.stall_timeout,
            last_abandoned_scan: AtomicI64::new(0),
            signer: commit_meta::SharedSigner::default(),
            seal_active: AtomicBool::new(false),
            announcer: notify::Announcer::default(),
        });
        let (tx, rx) = mpsc::channel(options.queue_capacity);
        let lanes = writer::spawn(&shared, rx, options.writer_lanes, options.max_batch);
        let (stop, stopped) = watch::channel(false);
        let (events, _) = broadcast::channel(NOTIFICATION_BUFFER);
        let tasks = vec![
            tokio::spawn(seal::run(Arc::clone(&shared), stopped.clone())),
            tokio::spawn(notify::listen(
                Arc::clone(&shared),
                events.clone(),
                stopped.clone(),
            )),
            tokio::spawn(notify::announce(Arc::clone(&shared), stopped)),
        ];
        tracing::debug!(schema = shared.schema.name(), "postgres store open");
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                sender: Mutex::new(Some(tx)),
                lanes: Mutex::new(lanes),
                tasks: Mutex::new(tasks),
                events: Mutex::new(Some(events)),
                stop,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The schema the store's tables are in.
    pub fn schema(&self) -> &str {
        self.inner.shared.schema.name()
    }

    fn open(&self) -> Result<&Shared, Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(&self.inner.shared)
    }

    async fn call(&self, op: Op) -> Result<Out, Error> {
        let sender = lock(&self.inner.sender).clone().ok_or(Error::Closed)?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(Request { op, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }
}

fn unexpected() -> Error {
    Error::Corrupt("a writer lane answered a different request".into())
}

#[async_trait]
impl Store for PostgresStore {
    async fn append(&self, commit: NewCommit) -> Result<AppendReceipt, Error> {
        condition::check_commit(&commit)?;
        let hash = append::data_hash(&commit);
        match self.call(Op::Append(commit, hash)).await? {
            Out::Append(r) => Ok(r),
            Out::Conflict(c) => Err(Error::Conflict(c)),
            _ => Err(unexpected()),
        }
    }

    async fn claim(
        &self,
        owner: OwnerId,
        handlers: &[String],
        limit: usize,
        lease_ttl: Duration,
    ) -> Result<Vec<ClaimedDelivery>, Error> {
        let shared = self.open()?;
        let req = claim::Claim {
            owner,
            handlers,
            limit,
            lease_ttl,
        };
        claim::claim(shared, &req, clock::now_ms()).await
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<CompletionEffect>, Error> {
        if completions.is_empty() {
            self.open()?;
            return Ok(Vec::new());
        }
        match self.call(Op::Complete(completions)).await? {
            Out::Complete(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    async fn heartbeat(&self, owner: OwnerId) -> Result<(), Error> {
        self.call(Op::Heartbeat(owner)).await.map(|_| ())
    }

    async fn release(&self, owner: OwnerId) -> Result<u64, Error> {
        match self.call(Op::Release(owner)).await? {
            Out::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn operation(&self, id: OperationId) -> Result<Option<OperationState>, Error> {
        let shared = self.open()?;
        read::operation(&shared.pool, &shared.schema, id).await
    }

    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, Error> {
        let shared = self.open()?;
        read::dead_letters(&shared.pool, &shared.schema, &query).await
    }

    async fn replay(&self, delivery_id: i64) -> Result<bool, Error> {
        let action = inspect::Action::Replay(vec![delivery_id]);
        match self.call(Op::Inspect(action)).await? {
            Out::Acted(acted) => Ok(!acted.done.is_empty()),
            _ => Err(unexpected()),
        }
    }

    async fn prune(&self, retention: &Retention) -> Result<PruneReport, Error> {
        let shared = self.open()?;
        let bounds =
            prune::bounds(&shared.pool, &shared.schema, retention, clock::now_ms()).await?;
        let mut total = PruneReport::default();
        loop {
            let step = match self.call(Op::Prune(bounds)).await? {
                Out::Prune(step) => step,
                _ => return Err(unexpected()),
            };
            total.succeeded += step.report.succeeded;
            total.failed += step.report.failed;
            total.outcomes += step.report.outcomes;
            total.expired_keys += step.report.expired_keys;
            if !step.more {
                return Ok(total);
            }
        }
    }

    async fn read_log(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<CommitRecord>, Error> {
        let shared = self.open()?;
        read::log(&shared.pool, &shared.schema, after_position, limit).await
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let shared = self.open()?;
        read::stats(&shared.pool, &shared.schema).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StreamEvent>, Error> {
        let shared = self.open()?;
        stream::read(&shared.pool, &shared.schema, stream, from, direction, limit).await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        let shared = self.open()?;
        stream::version(&shared.pool, &shared.schema, stream).await
    }

    fn set_signer(&self, signer: Option<Arc<CommitSigner>>) -> Result<(), Error> {
        *self
            .inner
            .shared
            .signer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = signer;
        Ok(())
    }

    async fn head(&self) -> Result<u64, Error> {
        let shared = self.open()?;
        history::head(&shared.pool, &shared.schema).await
    }

    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "postgres",
            schema_version: schema::VERSION,
        }
    }

    async fn kv_at(&self, key: &str, position: u64) -> Result<Option<KvVersion>, Error> {
        let shared = self.open()?;
        history::kv_at(&shared.pool, &shared.schema, key, position).await
    }

    async fn kv_scan_at(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<KvVersion>, Error> {
        let shared = self.open()?;
        let (pool, schema) = (&shared.pool, &shared.schema);
        history::kv_scan_at(pool, schema, prefix, after, limit, position, max_examined).await
    }

    async fn stream_version_at(&self, stream: &str, position: u64) -> Result<u64, Error> {
        let shared = self.open()?;
        history::stream_version_at(&shared.pool, &shared.schema, stream, position).await
    }

    async fn streams_at(
        &self,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<(String, u64)>, Error> {
        let shared = self.open()?;
        let (pool, schema) = (&shared.pool, &shared.schema);
        history::streams_at(pool, schema, after, limit, position, max_examined).await
    }

    async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, Error> {
        let shared = self.open()?;
        kv::get(&shared.pool, &shared.schema, key, clock::now_ms()).await
    }

    async fn kv_write(&self, writes: Vec<KvWrite>) -> Result<Vec<u64>, Error> {
        condition::check_writes(&writes)?;
        if writes.is_empty() {
            self.open()?;
            return Ok(Vec::new());
        }
        match self.call(Op::Kv(writes)).await? {
            Out::Kv(versions) => Ok(versions),
            Out::Conflict(c) => Err(Error::Conflict(c)),
            _ => Err(unexpected()),
        }
    }

    async fn kv_scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KvEntry>, Error> {
        let shared = self.open()?;
        kv::scan(
            &shared.pool,
            &shared.schema,
            prefix,
            after,
            limit,
            clock::now_ms(),
        )
        .await
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn subscribe(&self, subscriptions: Vec<Subscription>) -> Result<(), Error> {
        let shared = self.open()?;
        subscribe::subscribe(
            &shared.pool,
            &shared.schema,
            &subscriptions,
            clock::now_ms(),
        )
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<Subscription>, Error> {
        let shared = self.open()?;
        subscribe::subscriptions(&shared.pool, &shared.schema).await
    }

    async fn unsubscribe(&self, name: &str) -> Result<bool, Error> {
        let shared = self.open()?;
        subscribe::unsubscribe(&shared.pool, &shared.schema, name).await
    }

    fn notifications(&self) -> Option<Notifications> {
        let events = lock(&self.inner.events);
        let rx = match events.as_ref() {
            Some(events) => events.subscribe(),
            // A closed store has nothing more to say: a stream that ends at once.
            None => broadcast::channel(1).1,
        };
        Some(notify::stream(rx))
    }

    fn inspect(&self) -> Option<&dyn txbus_core::Inspect> {
        Some(self)
    }

    async fn close(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // The lanes finish what is queued, then stop; then the sealer seals what they wrote.
        drop(lock(&self.inner.sender).take());
        let lanes = std::mem::take(&mut *lock(&self.inner.lanes));
        for lane in lanes {
            if let Err(e) = lane.await {
                tracing::error!(error = %e, "a writer lane failed");
            }
        }
        self.inner.stop.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a background task failed");
            }
        }
        drop(lock(&self.inner.events).take());
        self.inner.shared.pool.close().await;
        tracing::debug!(
            schema = self.inner.shared.schema.name(),
            "postgres store closed"
        );
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The lanes stop once the queue is closed (the sender goes with `self`); the sealer
        // and the listener stop on this signal and let go of their connections.
        self.stop.send_replace(true);
    }
}
