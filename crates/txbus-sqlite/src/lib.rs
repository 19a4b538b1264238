//! The embedded txbus store: one SQLite file in WAL mode, no server.
//!
//! One writer thread commits every waiting append and acknowledgement in a single transaction
//! (group commit), so concurrent callers share each fsync. Reads use a separate connection and
//! never wait for the writer. One process opens a store file at a time (a lock file enforces
//! it), so on open every lease left in the file belongs to a process that is gone and is taken
//! over at once.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use txbus_sqlite::SqliteStore;
//! let store = SqliteStore::open("./data/txbus.db")?;
//! let bus = txbus_core::Bus::builder().store(store).build().await?;
//! # let _ = bus; Ok(()) }
//! ```

mod append;
mod chain_read;
mod checkpoint;
mod claim;
mod commit_meta;
mod complete;
mod error;
mod history;
mod inline;
mod inspect;
mod kv;
mod lock;
mod prune;
mod read;
mod read_only;
mod row;
mod schema;
mod stream;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use txbus_core::signing::CommitSigner;
use txbus_core::store::{
    AppendReceipt, ClaimedDelivery, CommitRecord, Completion, CompletionEffect, DeadLetter,
    DeadLetterQuery, Error, KvVersion, NewCommit, OwnerId, Stats, Store, StoreInfo,
};
use txbus_core::stream::{Direction, StreamEvent};
use txbus_core::{KvEntry, KvWrite, OperationId, OperationState, PastPage, PruneReport, Retention};

use crate::error::sql;
use crate::writer::{Op, Out, Request, Writer};
pub use read_only::ReadOnlySqliteStore;

/// How hard a commit is pushed to disk before `transact` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync on every commit (`synchronous=FULL`): a commit that returned survives power loss.
    /// The default.
    #[default]
    Full,
    /// fsync at checkpoints only (`synchronous=NORMAL`): a commit that returned survives a
    /// process crash, but the last ones may be lost on power loss or an OS crash.
    Relaxed,
}

/// Options for opening a store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    path: PathBuf,
    durability: Durability,
    max_batch: usize,
    queue_capacity: usize,
    cache_mib: u32,
}

impl SqliteOptions {
    /// Options for the store at `path` (a file; its directory is created if missing).
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            durability: Durability::Full,
            max_batch: 1024,
            queue_capacity: 8192,
            cache_mib: 16,
        }
    }
    /// Durability of each commit (default [`Durability::Full`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// Most requests committed in one transaction (default 1024).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
    /// Requests waiting for the writer at most; callers beyond it wait (default 8192).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }
    /// SQLite page cache per connection, in MiB (default 16).
    pub fn cache_mib(mut self, mib: u32) -> Self {
        self.cache_mib = mib.max(1);
        self
    }
    /// Opens the store.
    pub fn open(self) -> Result<SqliteStore, Error> {
        SqliteStore::open_with(self)
    }
}

/// The embedded store. See the crate docs.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Copies committed pages from the log into the file (see `checkpoint`); stops once the
    /// writer has.
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    lock: Mutex<Option<lock::FileLock>>,
    signer: commit_meta::SharedSigner,
}

fn configure(conn: &Connection, options: &SqliteOptions) -> Result<(), Error> {
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql("setting the busy timeout"))?;
    let sync = match options.durability {
        Durability::Full => "FULL",
        Durability::Relaxed => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = {sync};
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -{};",
        u64::from(options.cache_mib) * 1024
    ))
    .map_err(sql("configuring the connection"))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` with default options: full durability.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        SqliteOptions::new(path).open()
    }

    /// Opens the store at `path` read-only, beside the process that may hold it (see
    /// [`ReadOnlySqliteStore`]).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<ReadOnlySqliteStore, Error> {
        ReadOnlySqliteStore::open(path)
    }

    /// Options to open the store at `path` with.
    pub fn options(path: impl AsRef<Path>) -> SqliteOptions {
        SqliteOptions::new(path)
    }

    fn open_with(options: SqliteOptions) -> Result<Self, Error> {
        let path = options.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::backend(format!("creating directory {}", dir.display()), e))?;
        }
        let lock = lock::FileLock::acquire(&path)?;
        let mut conn = Connection::open(&path).map_err(sql("opening the database file"))?;
        configure(&conn, &options)?;
        schema::migrate(&mut conn)?;
        // Every lease in the file belongs to a process that no longer holds the lock: free
        // them all now (one scan at open) rather than look for them on every claim. Those
        // kept on commit rows get their rows first.
        {
            let tx = conn
                .transaction()
                .map_err(sql("starting the recovery of leases"))?;
            let n = inline::materialize_owner(&tx, None, writer::now_ms())?;
            tx.commit()
                .map_err(sql("committing the recovery of leases"))?;
            if n > 0 {
                tracing::info!(
                    count = n,
                    "recovered deliveries leased by a process that stopped"
                );
            }
        }
        conn.execute_batch(
            "UPDATE deliveries SET status = 0, owner = NULL, interruptions = interruptions + 1
             WHERE status = 1;
             DELETE FROM owners;",
        )
        .map_err(sql("freeing the leases of stopped buses"))?;
        let reader = Connection::open(&path).map_err(sql("opening the read connection"))?;
        configure(&reader, &options)?;
        reader
            .execute_batch("PRAGMA query_only = 1")
            .map_err(sql("configuring the read connection"))?;

        let signer = commit_meta::SharedSigner::default();
        let (nudge, checkpointer) = checkpoint::start(&conn, &path, |c| configure(c, &options))?;
        let writer = Writer::new(conn, options.max_batch, Arc::clone(&signer), nudge)?;
        let (tx, rx) = mpsc::channel(options.queue_capacity);
        let handle = std::thread::Builder::new()
            .name("txbus-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::backend("starting the writer thread", e))?;
        tracing::debug!(path = %path.display(), "sqlite store open");
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                sender: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                checkpointer: Mutex::new(Some(checkpointer)),
                reader: Arc::new(Mutex::new(reader)),
                lock: Mutex::new(Some(lock)),
                signer,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn call(&self, op: Op) -> Result<Out, Error> {
        let sender = self
            .inner
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::Closed)?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(Request { op, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    {
        let reader = Arc::clone(&self.inner.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|e| Error::backend("a read task failed", e))?
    }
}

fn unexpected() -> Error {
    Error::Corrupt("the writer answered a different request".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, commit: NewCommit) -> Result<AppendReceipt, Error> {
        // The data hash covers every payload: worked out on the caller's task, so that the
        // writer thread only links it into the chain.
        let data = append::data_hash(&commit);
        match self.call(Op::Append(commit, data)).await? {
            Out::Append(r) => Ok(r),
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
        let op = Op::Claim {
            owner,
            handlers: handlers.to_vec(),
            limit,
            lease_ttl,
        };
        match self.call(op).await? {
            Out::Claim(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<CompletionEffect>, Error> {
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
        self.read(move |c| read::operation(c, id)).await
    }

    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, Error> {
        self.read(move |c| read::dead_letters(c, &query)).await
    }

    async fn replay(&self, delivery_id: i64) -> Result<bool, Error> {
        let action = inspect::Action::Replay(vec![delivery_id]);
        match self.call(Op::Inspect(action)).await? {
            Out::Acted(acted) => Ok(!acted.done.is_empty()),
            _ => Err(unexpected()),
        }
    }

    async fn prune(&self, retention: &Retention) -> Result<PruneReport, Error> {
        let r = *retention;
        let now = writer::now_ms();
        let bounds = self.read(move |c| prune::bounds(c, &r, now)).await?;
        let mut total = PruneReport::default();
        loop {
            let op = Op::Prune {
                bounds,
                failed: r.failed,
            };
            let step = match self.call(op).await? {
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
        self.read(move |c| read::log(c, after_position, limit))
            .await
    }

    async fn stats(&self) -> Result<Stats, Error> {
        self.read(read::stats).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StreamEvent>, Error> {
        let stream = stream.to_owned();
        self.read(move |c| stream::read(c, &stream, from, direction, limit))
            .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        let stream = stream.to_owned();
        self.read(move |c| stream::version(c, &stream)).await
    }

    async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, Error> {
        let key = key.to_owned();
        self.read(move |c| kv::get(c, &key, writer::now_ms())).await
    }

    async fn kv_write(&self, writes: Vec<KvWrite>) -> Result<Vec<u64>, Error> {
        match self.call(Op::Kv(writes)).await? {
            Out::Versions(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    async fn kv_scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KvEntry>, Error> {
        let prefix = prefix.to_owned();
        let after = after.map(str::to_owned);
        self.read(move |c| kv::scan(c, &prefix, after.as_deref(), limit, writer::now_ms()))
            .await
    }

    fn set_signer(&self, signer: Option<Arc<CommitSigner>>) -> Result<(), Error> {
        *self
            .inner
            .signer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = signer;
        Ok(())
    }

    async fn head(&self) -> Result<u64, Error> {
        self.read(history::head).await
    }

    async fn read_chain(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<CommitRecord>, Error> {
        self.read(move |c| chain_read::read(c, after_position, limit))
            .await
    }

    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "sqlite",
            schema_version: schema::VERSION,
        }
    }

    async fn kv_at(&self, key: &str, position: u64) -> Result<Option<KvVersion>, Error> {
        let key = key.to_owned();
        self.read(move |c| history::kv_at(c, &key, position)).await
    }

    async fn kv_scan_at(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<KvVersion>, Error> {
        let prefix = prefix.to_owned();
        let after = after.map(str::to_owned);
        self.read(move |c| {
            history::kv_scan_at(c, &prefix, after.as_deref(), limit, position, max_examined)
        })
        .await
    }

    async fn stream_version_at(&self, stream: &str, position: u64) -> Result<u64, Error> {
        let stream = stream.to_owned();
        self.read(move |c| history::stream_version_at(c, &stream, position))
            .await
    }

    async fn streams_at(
        &self,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<(String, u64)>, Error> {
        let after = after.map(str::to_owned);
        self.read(move |c| history::streams_at(c, after.as_deref(), limit, position, max_examined))
            .await
    }

    fn inspect(&self) -> Option<&dyn txbus_core::Inspect> {
        Some(self)
    }

    async fn close(&self) -> Result<(), Error> {
        let sender = self
            .inner
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(sender);
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| Error::backend("waiting for the writer", e))?
                .map_err(|_| Error::Corrupt("the writer thread panicked".into()))?;
        }
        let checkpointer = self
            .inner
            .checkpointer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = checkpointer {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| Error::backend("waiting for the checkpointer", e))?
                .map_err(|_| Error::Corrupt("the checkpoint thread panicked".into()))?;
        }
        // The file is free for the next process (or the next open in this one).
        self.inner
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the writer finish what it has; it exits when its queue is closed.
        self.sender
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = handle.join();
        }
        if let Some(handle) = self
            .checkpointer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synchronous(durability: Durability) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("d.db")).unwrap();
        configure(
            &conn,
            &SqliteOptions::new(dir.path().join("d.db")).durability(durability),
        )
        .unwrap();
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn durability_sets_how_commits_reach_the_disk() {
        // 2 = FULL: an fsync per commit (the default); 1 = NORMAL: at checkpoints only.
        assert_eq!(synchronous(Durability::default()), 2);
        assert_eq!(synchronous(Durability::Full), 2);
        assert_eq!(synchronous(Durability::Relaxed), 1);
    }
}
