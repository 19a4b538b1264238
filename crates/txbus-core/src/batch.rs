//! Batches (design note 003): bulk work — importing a million rows, say — split into commits
//! of bounded size, each carrying the batch's checkpoint, so that a run killed at any moment
//! resumes where the last durable chunk ended: no item twice, none skipped.
//!
//! The checkpoint lives in the key–value space under `txbus/batch/<name>` and is written, with
//! a compare-and-set on its version, *in the same commit* as the chunk's events: either both
//! are durable or neither is. A second runner of the same batch loses the compare-and-set and
//! stops with an error instead of committing a chunk twice. Progress is published on a watch
//! channel as chunks commit, and can be read from the store by anyone
//! ([`crate::Bus::batch_progress`]), e.g. by the CLI.
//!
//! ```no_run
//! # async fn example(bus: txbus_core::Bus) -> Result<(), txbus_core::Error> {
//! use serde_json::json;
//! use txbus_core::{batch::Batch, Event};
//!
//! let rows = 1_000_000u64;
//! let done = Batch::new(bus, "import-users")
//!     .chunk_size(1000)
//!     .total(rows)
//!     .run(|from| (from..rows).map(|n| Event::new("user.imported", json!({"row": n}))))
//!     .await?;
//! assert_eq!(done.done, rows);
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bus::Bus;
use crate::commit::Commit;
use crate::error::Error;
use crate::kv::{KvExpect, KvWrite};
use crate::message::Event;
use crate::store::Store;

/// The key prefix of batch checkpoints in the key–value space.
pub const PREFIX: &str = "txbus/batch/";
/// Items per chunk by default.
pub const DEFAULT_CHUNK: usize = 1000;

/// Where a batch stands: what its checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchProgress {
    /// The batch's name.
    pub name: String,
    /// Items committed so far (the offset the next run starts from).
    pub done: u64,
    /// Items in all, when the runner said.
    pub total: Option<u64>,
    /// Chunks committed so far.
    pub chunks: u64,
    /// True once the source ran dry and the last chunk committed.
    pub finished: bool,
    /// When the checkpoint was last written, ms since the epoch.
    pub updated_at_ms: i64,
}

/// A resumable batch. See the module docs.
#[derive(Debug)]
pub struct Batch {
    bus: Bus,
    name: String,
    chunk_size: usize,
    total: Option<u64>,
    progress: watch::Sender<Option<BatchProgress>>,
}

fn key_of(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn decode(name: &str, bytes: &[u8]) -> Result<BatchProgress, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Store(crate::store::Error::Corrupt(format!(
            "batch {name:?}: its checkpoint is unreadable: {e}"
        )))
    })
}

/// Reads a batch's checkpoint.
pub(crate) async fn read(bus: &Bus, name: &str) -> Result<Option<BatchProgress>, Error> {
    progress_in(bus.store().as_ref(), name).await
}

/// Lists up to `limit` batches' progress after the batch `after`, by name.
pub(crate) async fn list(
    bus: &Bus,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<BatchProgress>, Error> {
    list_in(bus.store().as_ref(), after, limit).await
}

/// Where the batch `name` stands, read from its checkpoint in `store`: for tools that look at a
/// store without running a bus on it (the CLI). `None` when no run of it committed a chunk.
pub async fn progress_in(store: &dyn Store, name: &str) -> Result<Option<BatchProgress>, Error> {
    match store.kv_get(&key_of(name)).await? {
        Some(entry) => decode(name, &entry.value).map(Some),
        None => Ok(None),
    }
}

/// Up to `limit` batches' progress in `store` after the batch `after`, by name (see
/// [`progress_in`]).
pub async fn list_in(
    store: &dyn Store,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<BatchProgress>, Error> {
    let after = after.map(key_of);
    let mut out = Vec::new();
    for e in store.kv_scan(PREFIX, after.as_deref(), limit).await? {
        let name = e.key.strip_prefix(PREFIX).unwrap_or(&e.key).to_owned();
        out.push(decode(&name, &e.value)?);
    }
    Ok(out)
}

impl Batch {
    /// A batch named `name` (its identity across runs: the same name resumes).
    pub fn new(bus: Bus, name: impl Into<String>) -> Self {
        Self {
            bus,
            name: name.into(),
            chunk_size: DEFAULT_CHUNK,
            total: None,
            progress: watch::Sender::new(None),
        }
    }

    /// Items per chunk (one commit each; default 1000). Bigger chunks commit faster; smaller
    /// ones redo less after a crash. Bounded by the bus's `max_events_per_commit`.
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.chunk_size = n.max(1);
        self
    }

    /// The number of items in all, for progress reports.
    pub fn total(mut self, n: u64) -> Self {
        self.total = Some(n);
        self
    }

    /// Progress as chunks commit: `None` until the checkpoint was read.
    pub fn progress(&self) -> watch::Receiver<Option<BatchProgress>> {
        self.progress.subscribe()
    }

    /// Runs (or resumes) the batch: `source(offset)` yields the items from `offset` on, as
    /// events; they are committed `chunk_size` at a time with the checkpoint. Returns the final
    /// progress. The source must yield the same items for the same offset on every run.
    pub async fn run<S, I>(self, mut source: S) -> Result<BatchProgress, Error>
    where
        S: FnMut(u64) -> I,
        I: IntoIterator<Item = Event>,
    {
        let limit = self.bus.limits().max_events_per_commit;
        if self.chunk_size > limit {
            return Err(Error::Config(format!(
                "batch {:?}: chunk size {} exceeds max_events_per_commit ({limit})",
                self.name, self.chunk_size
            )));
        }
        if self.name.is_empty() || self.name.len() > 200 {
            return Err(Error::Config(format!(
                "batch name {:?} must be 1 to 200 bytes",
                self.name
            )));
        }
        let key = key_of(&self.name);
        let (mut progress, mut version) = match self.bus.kv_get(&key).await? {
            Some(entry) => (decode(&self.name, &entry.value)?, Some(entry.version)),
            None => (
                BatchProgress {
                    name: self.name.clone(),
                    done: 0,
                    total: self.total,
                    chunks: 0,
                    finished: false,
                    updated_at_ms: crate::time::now_ms(),
                },
                None,
            ),
        };
        if self.total.is_some() {
            progress.total = self.total;
        }
        self.progress.send_replace(Some(progress.clone()));
        if progress.finished {
            return Ok(progress);
        }
        let mut items = source(progress.done).into_iter().peekable();
        loop {
            let chunk: Vec<Event> = items.by_ref().take(self.chunk_size).collect();
            let last = items.peek().is_none();
            let mut next = progress.clone();
            next.done += chunk.len() as u64;
            next.chunks += u64::from(!chunk.is_empty());
            next.finished = last;
            next.updated_at_ms = crate::time::now_ms();
            let bytes = serde_json::to_vec(&next)
                .map_err(|e| Error::Config(format!("batch progress does not serialize: {e}")))?;
            let checkpoint = KvWrite::put(key.clone(), bytes).expect(match version {
                Some(v) => KvExpect::Version(v),
                None => KvExpect::Absent,
            });
            if chunk.is_empty() {
                // The source ran dry on a chunk boundary: mark the batch finished.
                let v = self
                    .bus
                    .kv_write(vec![checkpoint])
                    .await
                    .map_err(|e| self.lost(e))?;
                version = v.first().copied();
            } else {
                self.bus
                    .commit_batch(Commit::new().events(chunk).kv(checkpoint))
                    .await
                    .map_err(|e| self.lost(e))?;
                version = Some(version.map_or(1, |v| v + 1));
            }
            progress = next;
            tracing::debug!(batch = %self.name, done = progress.done, "batch chunk committed");
            self.progress.send_replace(Some(progress.clone()));
            if progress.finished {
                return Ok(progress);
            }
        }
    }

    /// A conflict on the checkpoint means another runner of this batch moved it.
    fn lost(&self, e: Error) -> Error {
        match e {
            Error::Conflict(_) => Error::ChangedElsewhere(format!(
                "batch {:?}: its checkpoint moved under this run (another runner of the same batch?)",
                self.name
            )),
            other => other,
        }
    }
}
