//! Opening a store file read-only, beside the process that holds it: for tools (the `txbus`
//! CLI, a dashboard of another process) that look inside a running service's store.
//!
//! A read-only store takes no lock, runs no writer and changes nothing in the file: every
//! call that would write fails with [`Error::ReadOnly`], naming the file. It reads what the
//! holder has committed, with the same queries as [`crate::SqliteStore`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use txbus_core::store::{
    AppendReceipt, ClaimedDelivery, CommitRecord, Completion, CompletionEffect, DeadLetter,
    DeadLetterQuery, Error, NewCommit, OwnerId, Stats, Store,
};
use txbus_core::stream::{Direction, StreamEvent};
use txbus_core::{KvEntry, KvWrite, OperationId, OperationState, PruneReport, Retention};

use crate::error::sql;
use crate::{inspect, kv, read, schema, stream, writer};
use txbus_core::inspect::{
    HandlerCounts, HandlerMinute, OperationDetail, OperationPage, OperationQuery,
};

/// A store file opened read-only (see [`crate::SqliteStore::open_read_only`]).
pub struct ReadOnlySqliteStore {
    path: PathBuf,
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for ReadOnlySqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlySqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReadOnlySqliteStore {
    /// Opens the store at `path` read-only. The file must exist and hold a txbus store whose
    /// schema this build knows; it may be held by a running process.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "no store file at {}; check the path (a store is created by the first bus that opens it)",
                path.display()
            )));
        }
        // Read-write at the file level (never created), read-only by `query_only`: a reader
        // beside a writer in WAL mode must be able to take its read mark in the shared
        // memory file, which a connection opened read-only cannot always do.
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening the database file"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("setting the busy timeout"))?;
        conn.execute_batch("PRAGMA query_only = 1")
            .map_err(sql("configuring the read connection"))?;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| {
                Error::Invalid(format!(
                    "{} is not a txbus store (it does not read as SQLite: {e})",
                    path.display()
                ))
            })?;
        if found > schema::VERSION {
            return Err(Error::SchemaTooNew {
                found,
                supported: schema::VERSION,
            });
        }
        if found < schema::VERSION {
            return Err(Error::Invalid(format!(
                "{} holds schema version {found}, not {} (none: not a txbus store); open it once with a bus of this version, which migrates it",
                path.display(),
                schema::VERSION
            )));
        }
        Ok(Self {
            path,
            reader: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refused(&self) -> Error {
        Error::ReadOnly {
            path: self.path.display().to_string(),
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|e| Error::backend("a read task failed", e))?
    }
}

#[async_trait]
impl Store for ReadOnlySqliteStore {
    async fn append(&self, _commit: NewCommit) -> Result<AppendReceipt, Error> {
        Err(self.refused())
    }

    async fn claim(
        &self,
        _owner: OwnerId,
        _handlers: &[String],
        _limit: usize,
        _lease_ttl: Duration,
    ) -> Result<Vec<ClaimedDelivery>, Error> {
        Err(self.refused())
    }

    async fn complete(&self, _c: Vec<Completion>) -> Result<Vec<CompletionEffect>, Error> {
        Err(self.refused())
    }

    async fn heartbeat(&self, _owner: OwnerId) -> Result<(), Error> {
        Err(self.refused())
    }

    async fn release(&self, _owner: OwnerId) -> Result<u64, Error> {
        Err(self.refused())
    }

    async fn operation(&self, id: OperationId) -> Result<Option<OperationState>, Error> {
        self.read(move |c| read::operation(c, id)).await
    }

    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, Error> {
        self.read(move |c| read::dead_letters(c, &query)).await
    }

    async fn replay(&self, _delivery_id: i64) -> Result<bool, Error> {
        Err(self.refused())
    }

    async fn prune(&self, _retention: &Retention) -> Result<PruneReport, Error> {
        Err(self.refused())
    }

    async fn read_log(&self, after: u64, limit: usize) -> Result<Vec<CommitRecord>, Error> {
        self.read(move |c| read::log(c, after, limit)).await
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

    async fn kv_write(&self, _writes: Vec<KvWrite>) -> Result<Vec<u64>, Error> {
        Err(self.refused())
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

    fn inspect(&self) -> Option<&dyn txbus_core::Inspect> {
        Some(self)
    }

    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[async_trait]
impl txbus_core::Inspect for ReadOnlySqliteStore {
    async fn handler_counts(&self) -> Result<Vec<HandlerCounts>, Error> {
        self.read(inspect::handler_counts).await
    }

    async fn minutes(
        &self,
        since_ms: i64,
        handler: Option<&str>,
    ) -> Result<Vec<HandlerMinute>, Error> {
        let handler = handler.map(str::to_owned);
        self.read(move |c| inspect::minutes(c, since_ms, handler.as_deref()))
            .await
    }

    async fn operations(&self, query: &OperationQuery) -> Result<OperationPage, Error> {
        let query = query.clone();
        self.read(move |c| inspect::operations(c, &query)).await
    }

    async fn operation_detail(&self, id: OperationId) -> Result<Option<OperationDetail>, Error> {
        self.read(move |c| inspect::operation_detail(c, id)).await
    }

    async fn dead_letter(&self, delivery_id: i64) -> Result<Option<DeadLetter>, Error> {
        self.read(move |c| inspect::dead_letter(c, delivery_id))
            .await
    }

    async fn replay_dead_letters(&self, _ids: &[i64]) -> Result<Vec<i64>, Error> {
        Err(self.refused())
    }

    async fn discard_dead_letters(&self, _ids: &[i64]) -> Result<Vec<i64>, Error> {
        Err(self.refused())
    }

    async fn head(&self) -> Result<u64, Error> {
        self.read(inspect::head).await
    }
}
