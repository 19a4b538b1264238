//! The handle `transact` returns: the operation's id, a future of its outcome, and a stream of
//! its progress.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use futures_util::Stream;
use tokio::sync::Notify;

use crate::engine::Engine;
use crate::error::Error;
use crate::message::OperationId;
use crate::outcome::{Outcome, Progress};

/// Progress items kept per watched operation; older ones are dropped first (the outcome never is).
const MAX_PROGRESS: usize = 1024;

#[derive(Default)]
struct WatchState {
    progress: VecDeque<Progress>,
    /// How many items were dropped from the front.
    dropped: usize,
    outcome: Option<Outcome>,
    closed: bool,
}

/// The in-memory rendezvous between the engine and whoever waits for one operation.
#[derive(Default)]
pub(crate) struct OpWatch {
    state: Mutex<WatchState>,
    notify: Notify,
}

impl OpWatch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, item: Progress) {
        let mut s = self.lock();
        if s.outcome.is_some() {
            return;
        }
        if s.progress.len() >= MAX_PROGRESS {
            s.progress.pop_front();
            s.dropped += 1;
        }
        if let Progress::Finished(outcome) = &item {
            s.outcome = Some(outcome.clone());
        }
        s.progress.push_back(item);
        drop(s);
        self.notify.notify_waiters();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Waits until the outcome is known or the bus shuts down.
    pub(crate) async fn outcome(&self) -> Result<Outcome, Error> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if let Some(o) = &s.outcome {
                    return Ok(o.clone());
                }
                if s.closed {
                    return Err(Error::ShuttingDown);
                }
            }
            notified.await;
        }
    }

    /// The item at absolute index `next`, if there is one yet; `Err(())` when the stream is over.
    async fn next_item(&self, next: &mut usize) -> Option<Progress> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if *next < s.dropped {
                    *next = s.dropped;
                }
                if let Some(item) = s.progress.get(*next - s.dropped) {
                    *next += 1;
                    return Some(item.clone());
                }
                if s.outcome.is_some() || s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// Watches by operation id. Entries live while someone holds a handle.
#[derive(Default)]
pub(crate) struct Watchers {
    map: Mutex<HashMap<OperationId, Weak<OpWatch>>>,
    /// Set by [`close_all`](Self::close_all): the bus is down, and a watch made from now on
    /// is closed at once (nothing would ever finish it, so its waiter would wait for ever).
    closed: std::sync::atomic::AtomicBool,
}

impl Watchers {
    fn lock(&self) -> MutexGuard<'_, HashMap<OperationId, Weak<OpWatch>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The watch of `id`, created if nobody watches it yet.
    pub(crate) fn watch(self: &Arc<Self>, id: OperationId) -> WatchGuard {
        let mut map = self.lock();
        let watch = match map.get(&id).and_then(Weak::upgrade) {
            Some(w) => w,
            None => {
                let w = Arc::new(OpWatch::default());
                if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                    w.close();
                } else {
                    map.insert(id, Arc::downgrade(&w));
                }
                w
            }
        };
        WatchGuard {
            id,
            watch,
            watchers: Arc::clone(self),
        }
    }

    /// Reports progress to whoever watches `id`.
    pub(crate) fn progress(&self, id: OperationId, item: Progress) {
        let watch = self.lock().get(&id).and_then(Weak::upgrade);
        if let Some(w) = watch {
            w.push(item);
        }
    }

    /// Reports the outcome and forgets the operation.
    pub(crate) fn finish(&self, outcome: Outcome) {
        let watch = self
            .lock()
            .remove(&outcome.operation_id)
            .and_then(|w| w.upgrade());
        if let Some(w) = watch {
            w.push(Progress::Finished(outcome));
        }
    }

    /// Wakes every waiter with "shutting down".
    pub(crate) fn close_all(&self) {
        let mut map = self.lock();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let all: Vec<Arc<OpWatch>> = map.drain().filter_map(|(_, w)| w.upgrade()).collect();
        drop(map);
        for w in all {
            w.close();
        }
    }

    /// True when someone in this process waits for `id`.
    pub(crate) fn is_watched(&self, id: &OperationId) -> bool {
        self.lock().get(id).is_some_and(|w| w.strong_count() > 0)
    }

    /// Operations being watched now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Holds a watch; removes the map entry when the last holder goes.
pub(crate) struct WatchGuard {
    pub(crate) id: OperationId,
    pub(crate) watch: Arc<OpWatch>,
    watchers: Arc<Watchers>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut map = self.watchers.lock();
        if Arc::strong_count(&self.watch) == 1 {
            if let Some(existing) = map.get(&self.id) {
                if std::ptr::eq(existing.as_ptr(), Arc::as_ptr(&self.watch)) {
                    map.remove(&self.id);
                }
            }
        }
    }
}

/// A committed operation: durable when you hold this.
///
/// Await [`outcome`](Self::outcome) for the result, or consume [`updates`](Self::updates) for
/// each delivery's progress followed by the outcome. Dropping the handle does not cancel
/// anything: the operation runs to its end, and [`crate::Bus::outcome`] reads it later.
pub struct Operation {
    pub(crate) commit_id: u64,
    pub(crate) guard: WatchGuard,
    pub(crate) engine: Arc<Engine>,
}

impl std::fmt::Debug for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operation")
            .field("id", &self.guard.id)
            .field("commit_id", &self.commit_id)
            .finish()
    }
}

impl Operation {
    /// The operation id: use it to read the outcome later, from anywhere.
    pub fn id(&self) -> OperationId {
        self.guard.id
    }

    /// The commit's id in the store.
    pub fn commit_id(&self) -> u64 {
        self.commit_id
    }

    /// Waits for the outcome. Fails with [`Error::ShuttingDown`] if the bus shuts down first
    /// (the operation resumes on the next start; read it then by id).
    pub async fn outcome(&self) -> Result<Outcome, Error> {
        self.engine.wait_watched(&self.guard).await
    }

    /// The outcome if it is already known.
    pub fn try_outcome(&self) -> Option<Outcome> {
        self.guard.watch.lock().outcome.clone()
    }

    /// A stream of progress: each delivery's success, retry or failure as it happens, then
    /// [`Progress::Finished`] with the outcome, then the end. Each call starts from the first
    /// item still kept.
    pub fn updates(&self) -> impl Stream<Item = Progress> + Send + 'static {
        let watch = Arc::clone(&self.guard.watch);
        futures_util::stream::unfold((watch, 0usize), |(watch, mut next)| async move {
            let item = watch.next_item(&mut next).await?;
            Some((item, (watch, next)))
        })
    }
}
