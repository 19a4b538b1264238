//! The handle of a running projection: its checkpoint (now, or as a watch), its lag, rebuild
//! and stop.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::runner::{Command, Shared};
use crate::error::Error;
use crate::store::EventStore;

/// A running projection. Dropping it stops the projection (after the page in progress).
#[derive(Debug)]
pub struct ProjectionHandle {
    name: String,
    store: EventStore,
    checkpoint: watch::Receiver<u64>,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl ProjectionHandle {
    pub(crate) fn new(
        name: String,
        store: EventStore,
        checkpoint: watch::Receiver<u64>,
        commands: mpsc::Sender<Command>,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            name,
            store,
            checkpoint,
            commands,
            stop,
            task: Some(task),
            shared,
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The position of the last commit projected (0: none yet).
    pub fn checkpoint(&self) -> u64 {
        *self.checkpoint.borrow()
    }

    /// A receiver of the checkpoint: it changes whenever the projection advances (and goes
    /// back to 0 when it is rebuilt). Whoever caches what the read model answers can drop
    /// the cache on each change. Its sender closes when the projection stops.
    pub fn checkpoint_watch(&self) -> watch::Receiver<u64> {
        self.checkpoint.clone()
    }

    /// How many commits the projection is behind: the log's head position minus the
    /// checkpoint, measured now.
    pub async fn lag(&self) -> Result<u64, Error> {
        let checkpoint = self.checkpoint();
        let head = self.store.head_position(checkpoint).await?;
        Ok(head.saturating_sub(checkpoint))
    }

    /// The lag measured by the runner after its last page (0 when that page reached the
    /// head), without reading anything.
    pub fn last_lag(&self) -> u64 {
        self.shared.lag.load(Ordering::Relaxed)
    }

    /// Why the last page failed, while the runner retries it; `None` once a page succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True while the projection's task runs.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until the checkpoint reaches `position`.
    pub async fn wait_for(&self, position: u64) -> Result<(), Error> {
        let mut rx = self.checkpoint.clone();
        loop {
            if *rx.borrow_and_update() >= position {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(Error::Stopped(self.name.clone()));
            }
        }
    }

    /// Waits until the projection has projected the log up to its head as of this call;
    /// returns that position.
    pub async fn catch_up(&self) -> Result<u64, Error> {
        let head = self.store.head_position(self.checkpoint()).await?;
        self.wait_for(head).await?;
        Ok(head)
    }

    /// Rebuilds from zero: resets the checkpoint, clears the read model (a read model's keys
    /// under its prefix; an external projection's `reset` hook), and replays the log from
    /// the start. Returns once the clearing is done; the replay goes on in the background
    /// (wait for it with [`catch_up`](Self::catch_up)).
    pub async fn rebuild(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Rebuild(tx))
            .await
            .map_err(|_| Error::Stopped(self.name.clone()))?;
        rx.await.map_err(|_| Error::Stopped(self.name.clone()))?
    }

    /// Stops the projection after the page in progress, and waits for its task to end.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| Error::Projection {
                name: self.name.clone(),
                reason: format!("its task ended abnormally: {e}"),
            })?;
        }
        Ok(())
    }
}

impl Drop for ProjectionHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
