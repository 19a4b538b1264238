//! The runner of one projection: a task that reads the log in pages from the checkpoint,
//! projects each page, and moves the checkpoint with a compare-and-set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use txbus_core::{KvWrite, On};

use super::checkpoint::{checkpoint_key, Checkpoint, CHECKPOINT_PREFIX};
use super::handle::ProjectionHandle;
use super::tx::ReadModelTx;
use super::{ExternalProjection, ReadModel};
use crate::error::{BoxError, Error};
use crate::event::LogEvent;
use crate::store::EventStore;

/// Keys deleted per write while a rebuild clears a read model.
const CLEAR_BATCH: usize = 500;
/// The longest projection name, in bytes.
const MAX_NAME_BYTES: usize = 200;

#[derive(Clone)]
pub(crate) enum Kind {
    ReadModel(Arc<dyn ReadModel>),
    External(Arc<dyn ExternalProjection>),
}

/// What a handle asks of its runner.
pub(crate) enum Command {
    /// Reset to zero and clear the read model; reply once the clearing is done.
    Rebuild(oneshot::Sender<Result<(), Error>>),
}

/// What the runner shares with its handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub last_error: Mutex<Option<String>>,
    /// The lag measured after the last page.
    pub lag: AtomicU64,
}

impl Shared {
    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

/// Configures and starts one projection.
///
/// ```no_run
/// # use txbus_es::projection::{Projector, ExternalProjection};
/// # async fn run(store: txbus_es::EventStore, mailer: impl ExternalProjection) -> Result<(), txbus_es::Error> {
/// use std::time::Duration;
///
/// let handle = Projector::external("welcome-mails", mailer)
///     .page_size(100)                          // commits read at once (bounded memory)
///     .poll_interval(Duration::from_millis(500)) // fallback for commits of other processes
///     .start(&store)
///     .await?;
/// # let _ = handle; Ok(()) }
/// ```
pub struct Projector {
    name: String,
    kind: Kind,
    page_size: usize,
    poll_interval: Duration,
    recheck_after: Duration,
    min_error_pause: Duration,
    max_error_pause: Duration,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("name", &self.name)
            .field("page_size", &self.page_size)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl Projector {
    fn new(name: impl Into<String>, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
            page_size: 256,
            poll_interval: Duration::from_secs(1),
            recheck_after: Duration::from_millis(10),
            min_error_pause: Duration::from_millis(50),
            max_error_pause: Duration::from_secs(30),
        }
    }

    /// A projection named `name` (its identity: the checkpoint is stored under it) into a
    /// read model in the same store: effectively once.
    pub fn read_model(name: impl Into<String>, model: impl ReadModel) -> Self {
        Self::new(name, Kind::ReadModel(Arc::new(model)))
    }

    /// A projection named `name` into something outside the store: at least once.
    pub fn external(name: impl Into<String>, projection: impl ExternalProjection) -> Self {
        Self::new(name, Kind::External(Arc::new(projection)))
    }

    /// Commits read from the log at once (default 256): one page is projected and
    /// checkpointed as a unit, and only one page is held in memory.
    pub fn page_size(mut self, commits: usize) -> Self {
        self.page_size = commits.max(1);
        self
    }

    /// How often the log is read when nothing announced a commit (default 1 s): commits by
    /// this bus wake the projection at once, those of other processes may only be seen then.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How soon the log is read again when a commit was announced but the read found
    /// nothing yet (default 10 ms; the delay doubles on each empty read, up to the poll
    /// interval; zero turns re-reads off). On stores that give positions shortly after the commit (PostgreSQL seals
    /// them in the background) this is what keeps a live projection close behind.
    pub fn recheck_after(mut self, delay: Duration) -> Self {
        self.recheck_after = delay;
        self
    }

    /// The longest pause between retries of a failing page (default 30 s; the pause starts
    /// at 50 ms and doubles).
    pub fn max_error_pause(mut self, pause: Duration) -> Self {
        self.max_error_pause = pause;
        self
    }

    /// Reads the checkpoint and starts the projection as a task of the current tokio
    /// runtime. It runs until its handle is stopped or dropped.
    pub async fn start(self, store: &EventStore) -> Result<ProjectionHandle, Error> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(Error::Config(format!(
                "projection name {:?} must be 1 to {MAX_NAME_BYTES} bytes",
                self.name
            )));
        }
        let prefix = match &self.kind {
            Kind::ReadModel(m) => {
                let prefix = m.prefix().to_owned();
                if prefix.is_empty() || checkpoint_key(&self.name).starts_with(&prefix) {
                    return Err(Error::Config(format!(
                        "read model {:?}: its prefix {prefix:?} must be non-empty and must not cover the checkpoint keys ({CHECKPOINT_PREFIX}…)",
                        self.name
                    )));
                }
                prefix
            }
            Kind::External(_) => String::new(),
        };
        let filter = match &self.kind {
            Kind::ReadModel(m) => m.filter(),
            Kind::External(p) => p.filter(),
        };
        let system = match &self.kind {
            Kind::ReadModel(m) => m.system_commits(),
            Kind::External(p) => p.system_commits(),
        };
        let cp = Checkpoint::load(store.bus(), &self.name).await?;
        let (checkpoint_tx, checkpoint_rx) = watch::channel(cp.position);
        let (command_tx, command_rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let runner = Runner {
            name: self.name.clone(),
            kind: self.kind,
            store: store.clone(),
            prefix,
            filter,
            system,
            page_size: self.page_size,
            poll_interval: self.poll_interval,
            recheck_after: self.recheck_after,
            min_error_pause: self.min_error_pause,
            max_error_pause: self.max_error_pause.max(self.min_error_pause),
            cp,
            checkpoint: checkpoint_tx,
            commands: command_rx,
            stop: stop_rx,
            shared: Arc::clone(&shared),
            metrics: super::metrics::ProjectionMetrics::new(&self.name),
            recorded_error: None,
        };
        tracing::info!(projection = %self.name, checkpoint = cp.position, "projection starting");
        let task = tokio::spawn(runner.run());
        Ok(ProjectionHandle::new(
            self.name,
            store.clone(),
            checkpoint_rx,
            command_tx,
            stop_tx,
            task,
            shared,
        ))
    }
}

/// Why a page failed.
enum Failure {
    Store(Error),
    Projection(BoxError),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

impl From<txbus_core::Error> for Failure {
    fn from(e: txbus_core::Error) -> Self {
        Self::Store(e.into())
    }
}

impl Failure {
    fn into_error(self, name: &str) -> Error {
        match self {
            Self::Store(e) => e,
            Self::Projection(e) => Error::Projection {
                name: name.to_owned(),
                reason: e.to_string(),
            },
        }
    }
}

enum Step {
    /// A page was projected; there may be more.
    Advanced,
    /// Nothing new in the log.
    Idle,
}

struct Runner {
    name: String,
    kind: Kind,
    store: EventStore,
    prefix: String,
    filter: On,
    /// Hand system commits over too.
    system: bool,
    page_size: usize,
    poll_interval: Duration,
    recheck_after: Duration,
    min_error_pause: Duration,
    max_error_pause: Duration,
    cp: Checkpoint,
    checkpoint: watch::Sender<u64>,
    commands: mpsc::Receiver<Command>,
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    metrics: super::metrics::ProjectionMetrics,
    /// The error last recorded in the key–value space, for other processes to see.
    recorded_error: Option<String>,
}

impl Runner {
    /// Records the runner's error in the key–value space when it changed.
    async fn record_error(&mut self, error: Option<String>) {
        if self.recorded_error == error {
            return;
        }
        match txbus_core::inspect::record_runner_error(
            self.store.bus(),
            "projection",
            &self.name,
            error.as_deref(),
        )
        .await
        {
            Ok(()) => self.recorded_error = error,
            Err(e) => {
                tracing::debug!(projection = %self.name, error = %e, "recording the last error failed")
            }
        }
    }

    async fn run(mut self) {
        let mut log = self.store.bus().log_changes();
        let mut log_open = true;
        let mut failures: u32 = 0;
        // A commit was announced since the last read.
        let mut announced = false;
        // The delay of the next re-read after an announcement that found nothing yet.
        let mut recheck: Option<Duration> = None;
        loop {
            if *self.stop.borrow() {
                break;
            }
            while let Ok(command) = self.commands.try_recv() {
                self.command(command).await;
            }
            log.borrow_and_update();
            let result = if self.cp.clearing {
                self.clear().await.map(|()| Step::Advanced)
            } else {
                self.step().await
            };
            let pause = match result {
                Ok(Step::Advanced) => {
                    failures = 0;
                    recheck = None;
                    announced = false;
                    self.shared.set_error(None);
                    if self.recorded_error.is_some() {
                        self.record_error(None).await;
                    }
                    continue;
                }
                Ok(Step::Idle) => {
                    failures = 0;
                    recheck = if announced || recheck.is_some() {
                        let next = recheck.map_or(self.recheck_after, |d| d.saturating_mul(2));
                        (!next.is_zero() && next < self.poll_interval).then_some(next)
                    } else {
                        None
                    };
                    None
                }
                Err(failure) => {
                    failures = failures.saturating_add(1);
                    self.failed(failure).await;
                    Some(self.error_pause(failures))
                }
            };
            announced = false;
            let wait_log = pause.is_none() && log_open;
            let sleep = pause.or(recheck).unwrap_or(self.poll_interval);
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        break;
                    }
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => break,
                },
                changed = log.changed(), if wait_log => {
                    if changed.is_err() {
                        log_open = false;
                    } else {
                        announced = true;
                    }
                }
                () = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::info!(projection = %self.name, checkpoint = self.cp.position, "projection stopped");
    }

    fn error_pause(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.min_error_pause
            .saturating_mul(factor)
            .min(self.max_error_pause)
    }

    async fn failed(&mut self, failure: Failure) {
        let conflict = matches!(&failure, Failure::Store(Error::Conflict(_)));
        let error = failure.into_error(&self.name);
        self.shared.set_error(Some(error.to_string()));
        self.record_error(Some(error.to_string())).await;
        if conflict {
            // Someone else moved the checkpoint (another runner of this projection, or a
            // rebuild elsewhere): go on from where it is now.
            tracing::warn!(projection = %self.name, error = %error, "the checkpoint moved under this runner; reloading it");
            match Checkpoint::load(self.store.bus(), &self.name).await {
                Ok(cp) => {
                    self.cp = cp;
                    self.checkpoint.send_replace(cp.position);
                }
                Err(e) => {
                    tracing::warn!(projection = %self.name, error = %e, "reloading the checkpoint failed")
                }
            }
        } else {
            tracing::warn!(projection = %self.name, checkpoint = self.cp.position, error = %error, "projecting a page failed; retrying");
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Rebuild(reply) => {
                let result = self.rebuild().await;
                if let Err(e) = &result {
                    tracing::warn!(projection = %self.name, error = %e, "rebuild failed");
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Resets the checkpoint to zero (marked clearing), then clears.
    async fn rebuild(&mut self) -> Result<(), Error> {
        tracing::info!(projection = %self.name, checkpoint = self.cp.position, "rebuilding from zero");
        let write = self.cp.advance(&self.name, 0, true)?;
        let versions = self.store.bus().kv_write(vec![write]).await?;
        self.cp = Checkpoint {
            position: 0,
            clearing: true,
            kv_version: versions.last().copied(),
        };
        self.checkpoint.send_replace(0);
        self.clear().await.map_err(|f| f.into_error(&self.name))
    }

    /// Clears the read model, then removes the clearing mark. Each batch of deletions moves
    /// the checkpoint too (compare-and-set): a second runner cannot interleave.
    async fn clear(&mut self) -> Result<(), Failure> {
        match &self.kind {
            Kind::ReadModel(_) => loop {
                let keys = self
                    .store
                    .bus()
                    .kv_scan(&self.prefix, None, CLEAR_BATCH)
                    .await?;
                if keys.is_empty() {
                    break;
                }
                let mut writes: Vec<KvWrite> =
                    keys.into_iter().map(|e| KvWrite::delete(e.key)).collect();
                writes.push(self.cp.advance(&self.name, 0, true)?);
                let versions = self.store.bus().kv_write(writes).await?;
                self.cp.kv_version = versions.last().copied();
            },
            Kind::External(p) => p.reset().await.map_err(Failure::Projection)?,
        }
        let write = self.cp.advance(&self.name, 0, false)?;
        let versions = self.store.bus().kv_write(vec![write]).await?;
        self.cp = Checkpoint {
            position: 0,
            clearing: false,
            kv_version: versions.last().copied(),
        };
        self.checkpoint.send_replace(0);
        tracing::info!(projection = %self.name, "read model cleared; replaying the log from the start");
        Ok(())
    }

    /// Projects the next page of the log, if there is one.
    async fn step(&mut self) -> Result<Step, Failure> {
        let bus = self.store.bus();
        let commits = bus.read_log(self.cp.position, self.page_size).await?;
        let Some(last) = commits.last().map(|c| c.position) else {
            return Ok(Step::Idle);
        };
        let full = commits.len() >= self.page_size;
        let mut events = Vec::new();
        for c in commits {
            if c.is_system() && !self.system {
                continue;
            }
            for (i, m) in c.messages.into_iter().enumerate() {
                if !self.filter.matches(&m) {
                    continue;
                }
                events.push(LogEvent {
                    position: c.position,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    operation_id: c.operation_id,
                    created_at_ms: c.created_at_ms,
                    event: self.store.upcasters().data(m)?,
                });
            }
        }
        let versions = match &self.kind {
            Kind::ReadModel(model) => {
                let mut tx = ReadModelTx::new(bus, &self.name, &self.prefix);
                for e in &events {
                    model.apply(e, &mut tx).await.map_err(Failure::Projection)?;
                }
                let mut writes = tx.into_writes();
                writes.push(self.cp.advance(&self.name, last, false)?);
                bus.kv_write(writes).await?
            }
            Kind::External(projection) => {
                if !events.is_empty() {
                    projection
                        .handle(&events)
                        .await
                        .map_err(Failure::Projection)?;
                }
                bus.kv_write(vec![self.cp.advance(&self.name, last, false)?])
                    .await?
            }
        };
        self.cp.position = last;
        self.cp.kv_version = versions.last().copied();
        let lag = if full {
            match self.store.head_position(last).await {
                Ok(head) => head.saturating_sub(last),
                Err(_) => self.shared.lag.load(Ordering::Relaxed),
            }
        } else {
            0
        };
        self.shared.lag.store(lag, Ordering::Relaxed);
        self.metrics.set(last, lag);
        self.checkpoint.send_replace(last);
        tracing::debug!(projection = %self.name, checkpoint = last, lag, events = events.len(), "projected a page");
        Ok(Step::Advanced)
    }
}
