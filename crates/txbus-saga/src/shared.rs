//! What the saga handlers, the timer loop and the runtime share: the definitions, the bus
//! (bound once built), a bounded cache of saga states, and the commit of state changes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use txbus_core::{Bus, Commit, Conflict, Direction, ExpectedVersion, MessageId};

use crate::context::StepContext;
use crate::definition::Saga;
use crate::error::Error;
use crate::id::SagaId;
use crate::plan::{KvOptions, Plan};
use crate::record::Envelope;
use crate::state::SagaState;

/// Events read per page of a saga's stream.
const PAGE: usize = 256;
/// The most changes one saga may have; a longer stream is refused as corrupt.
const MAX_CHANGES: u64 = 100_000;
/// Attempts to apply a change when other writers keep moving the saga.
const MAX_CONFLICTS: usize = 32;

/// Settings of a saga runtime.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub(crate) cache_capacity: usize,
    pub(crate) timer_poll: Duration,
    pub(crate) timer_batch: usize,
    pub(crate) commit_grace: Duration,
    pub(crate) kv: KvOptions,
}

/// A bounded map of saga states, oldest entries evicted first.
#[derive(Default)]
struct Cache {
    map: HashMap<SagaId, Arc<SagaState>>,
    order: VecDeque<SagaId>,
}

impl Cache {
    fn put(&mut self, state: Arc<SagaState>, capacity: usize) {
        if capacity == 0 {
            return;
        }
        let id = state.id.clone();
        if let Some(old) = self.map.get(&id) {
            if old.version >= state.version {
                return;
            }
        } else {
            self.order.push_back(id.clone());
        }
        self.map.insert(id, state);
        while self.map.len() > capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
}

/// What the saga machinery shares.
pub(crate) struct Shared {
    pub(crate) defs: HashMap<String, Arc<Saga>>,
    bus: watch::Sender<Option<Bus>>,
    cache: Mutex<Cache>,
    waiters: Mutex<HashMap<SagaId, watch::Sender<Option<Arc<SagaState>>>>>,
    /// Woken when a commit here sets a timer.
    pub(crate) timer_wake: Notify,
    pub(crate) options: Options,
}

/// What a decision about a saga came to.
pub(crate) enum Driven {
    /// Nothing was written (the decision found nothing to do).
    Skipped,
    /// Changes were committed.
    Committed,
}

impl Shared {
    pub(crate) fn new(defs: HashMap<String, Arc<Saga>>, options: Options) -> Self {
        Self {
            defs,
            bus: watch::Sender::new(None),
            cache: Mutex::new(Cache::default()),
            waiters: Mutex::new(HashMap::new()),
            timer_wake: Notify::new(),
            options,
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<SagaId, watch::Sender<Option<Arc<SagaState>>>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Binds the bus (once it is built).
    pub(crate) fn bind(&self, bus: Bus) {
        self.bus.send_replace(Some(bus));
    }

    /// The bus; handlers that run before it is bound (resumed work, at build) wait for it.
    pub(crate) async fn bus(&self) -> Bus {
        let mut rx = self.bus.subscribe();
        loop {
            if let Some(bus) = rx.borrow_and_update().clone() {
                return bus;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`: unreachable, but never panic.
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn def(&self, saga_type: &str) -> Result<&Arc<Saga>, Error> {
        self.defs
            .get(saga_type)
            .ok_or_else(|| Error::UnknownSagaType(saga_type.to_owned()))
    }

    /// Reads a saga: from the cache when it already awaits `want` (the request being
    /// handled: the fast path, no read), else the cached state plus the changes after it.
    /// A stale cache costs nothing worse than a conflict on commit.
    pub(crate) async fn load(
        &self,
        bus: &Bus,
        id: &SagaId,
        want: Option<MessageId>,
    ) -> Result<Option<Arc<SagaState>>, Error> {
        let cached = self.cache().map.get(id).cloned();
        if let (Some(state), Some(want)) = (&cached, want) {
            if state.awaits(want) {
                return Ok(cached);
            }
        }
        let state = self.read_after(bus, id, cached).await?;
        if let Some(state) = &state {
            self.cache()
                .put(Arc::clone(state), self.options.cache_capacity);
        }
        Ok(state)
    }

    /// Folds the changes after `from` (or the whole stream).
    async fn read_after(
        &self,
        bus: &Bus,
        id: &SagaId,
        from: Option<Arc<SagaState>>,
    ) -> Result<Option<Arc<SagaState>>, Error> {
        let stream = id.stream();
        let mut state = from.map(|s| (*s).clone());
        loop {
            let next = state.as_ref().map_or(1, |s| s.version + 1);
            if next > MAX_CHANGES {
                return Err(Error::Corrupt {
                    id: id.clone(),
                    reason: format!("its stream holds more than {MAX_CHANGES} changes"),
                });
            }
            let page = bus
                .read_stream(&stream, next, Direction::Forward, PAGE)
                .await?;
            let count = page.len();
            for e in page {
                let corrupt = |reason: String| Error::Corrupt {
                    id: id.clone(),
                    reason: format!("change {}: {reason}", e.version),
                };
                let envelope: Envelope = serde_json::from_value(e.message.payload.clone())
                    .map_err(|err| corrupt(format!("unreadable: {err}")))?;
                match state.as_mut() {
                    None => {
                        state = Some(
                            SagaState::start(id, envelope.at_ms, &envelope.event)
                                .map_err(corrupt)?,
                        );
                    }
                    Some(s) => {
                        if e.version != s.version + 1 {
                            return Err(corrupt(format!("expected version {}", s.version + 1)));
                        }
                        s.apply(e.message.id, envelope.at_ms, &envelope.event)
                            .map_err(corrupt)?;
                    }
                }
            }
            if count < PAGE {
                break;
            }
        }
        Ok(state.map(Arc::new))
    }

    /// Reads a saga afresh (the cached prefix plus everything after it).
    pub(crate) async fn get(
        &self,
        bus: &Bus,
        id: &SagaId,
    ) -> Result<Option<Arc<SagaState>>, Error> {
        self.load(bus, id, None).await
    }

    /// Commits a plan on top of the version it was made from. `Ok(None)` on a stream
    /// conflict (someone else moved the saga: reload and decide again).
    pub(crate) async fn commit(
        &self,
        bus: &Bus,
        plan: Plan<'_>,
    ) -> Result<Option<Arc<SagaState>>, Error> {
        self.commit_acking(bus, plan, None).await
    }

    /// [`commit`](Self::commit), carrying the acknowledgement of `ack`'s delivery when the
    /// plan is the last thing its handler writes (see [`Commit::acknowledging`]).
    pub(crate) async fn commit_acking(
        &self,
        bus: &Bus,
        plan: Plan<'_>,
        ack: Option<&txbus_core::Message>,
    ) -> Result<Option<Arc<SagaState>>, Error> {
        let expected = match plan.base() {
            Some(base) => ExpectedVersion::Exact(base.version),
            None => ExpectedVersion::NoStream,
        };
        let Some((state, events, kv)) = plan.finish(&self.options.kv) else {
            return Ok(None);
        };
        let sets_timer = kv.iter().any(|w| {
            w.key.starts_with(crate::keys::timer_prefix())
                && matches!(w.op, txbus_core::KvOp::Put { .. })
        });
        let mut commit = Commit::new().stream(state.id.stream(), expected, events);
        for write in kv {
            commit = commit.kv(write);
        }
        if let Some(msg) = ack {
            commit = commit.acknowledging(msg);
        }
        match bus.commit_unwatched(commit).await {
            Ok(_) => {}
            Err(txbus_core::Error::Conflict(Conflict::Stream { .. })) => {
                if expected == ExpectedVersion::NoStream {
                    return Err(Error::AlreadyStarted(state.id.clone()));
                }
                return Ok(None);
            }
            Err(txbus_core::Error::Conflict(Conflict::Key { key, .. }))
                if key.starts_with("saga/correlation/") =>
            {
                return Err(Error::CorrelationInUse {
                    saga_type: state.saga_type.clone(),
                    correlation_id: state.correlation_id.clone(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let state = Arc::new(state);
        tracing::debug!(saga = %state.id, version = state.version, status = %state.status, "saga changed");
        self.cache()
            .put(Arc::clone(&state), self.options.cache_capacity);
        if let Some(tx) = self.waiters().get(&state.id) {
            tx.send_replace(Some(Arc::clone(&state)));
        }
        if sets_timer {
            self.timer_wake.notify_one();
        }
        Ok(Some(state))
    }

    /// Reads the saga, lets `decide` plan changes on it, and commits them; on a conflict it
    /// reads again and decides again. `want` is the request being handled (see
    /// [`load`](Self::load)); `cause` becomes the changes' causation id.
    pub(crate) async fn drive<F>(
        &self,
        bus: &Bus,
        id: &SagaId,
        want: Option<MessageId>,
        cause: Option<MessageId>,
        decide: F,
    ) -> Result<Driven, Error>
    where
        F: FnMut(&mut Plan<'_>) -> Result<(), Error>,
    {
        self.drive_acking(bus, id, want, cause, None, decide).await
    }

    /// [`drive`](Self::drive), whose commit (when it makes one) also acknowledges `ack`'s
    /// delivery: for a handler whose work ends with that commit, so that the step costs one
    /// durable write.
    pub(crate) async fn drive_acking<F>(
        &self,
        bus: &Bus,
        id: &SagaId,
        want: Option<MessageId>,
        cause: Option<MessageId>,
        ack: Option<&txbus_core::Message>,
        mut decide: F,
    ) -> Result<Driven, Error>
    where
        F: FnMut(&mut Plan<'_>) -> Result<(), Error>,
    {
        let mut want = want;
        for _ in 0..MAX_CONFLICTS {
            let Some(state) = self.load(bus, id, want).await? else {
                return Err(Error::NotFound(id.clone()));
            };
            let def = self.def(&state.saga_type)?;
            let mut plan = Plan::new(def, &state, cause, txbus_core::time::now_ms());
            decide(&mut plan)?;
            if plan.is_empty() {
                return Ok(Driven::Skipped);
            }
            plan.follow_on()?;
            if self.commit_acking(bus, plan, ack).await?.is_some() {
                return Ok(Driven::Committed);
            }
            // Someone else moved the saga: read what they wrote, then decide again.
            want = None;
        }
        Err(Error::Contended(id.clone()))
    }

    /// A receiver of the saga as this process commits changes to it. The entry goes when
    /// its last receiver does (see [`release_waiter`](Self::release_waiter)).
    pub(crate) fn waiter(&self, id: &SagaId) -> watch::Receiver<Option<Arc<SagaState>>> {
        self.waiters()
            .entry(id.clone())
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe()
    }

    /// Forgets the waiter entry of `id` when nobody listens any more.
    pub(crate) fn release_waiter(&self, id: &SagaId) {
        let mut waiters = self.waiters();
        if waiters.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            waiters.remove(id);
        }
    }

    /// The context of one attempt of step `index`.
    pub(crate) fn context(
        &self,
        bus: &Bus,
        state: &SagaState,
        index: usize,
        attempt: u32,
        request: MessageId,
        compensating: bool,
    ) -> StepContext {
        let step = state.steps.get(index);
        StepContext {
            saga_id: state.id.clone(),
            saga_type: Arc::from(state.saga_type.as_str()),
            step: Arc::from(step.map_or("", |s| s.name.as_str())),
            index,
            attempt,
            input: Arc::new(state.input.clone()),
            outputs: Arc::new(state.outputs()),
            output: if compensating {
                step.and_then(|s| s.output.clone())
            } else {
                None
            },
            correlation_id: Arc::from(state.correlation_id.as_str()),
            request_id: request,
            bus: bus.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use txbus_core::Bus;

    use crate::record::SagaEvent;
    use crate::state::Pending;
    use crate::{Saga, Sagas, Step, StepContext};

    use super::*;

    /// Two drivers that decided on the same version of a saga: only the first commit lands;
    /// the second is refused by the stream's expected version, reads again, and finds
    /// nothing left to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_driver_at_the_same_version_cannot_advance_the_saga_again() {
        let dir = tempfile::tempdir().unwrap();
        let saga = Saga::builder("dup")
            .step(Step::action("hold", |_ctx: StepContext| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(json!(null))
            }))
            .step(Step::action("next", |_ctx: StepContext| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(json!(null))
            }))
            .build()
            .unwrap();
        let sagas = Sagas::builder().saga(saga).build().unwrap();
        let bus = sagas
            .install(
                Bus::builder()
                    .store(txbus_sqlite::SqliteStore::open(dir.path().join("b.db")).unwrap()),
            )
            .build()
            .await
            .unwrap();
        let runtime = sagas.attach(bus.clone());
        let id = runtime.start("dup", json!({})).await.unwrap();
        let shared = &sagas.shared;
        let base = shared.get(&bus, &id).await.unwrap().unwrap();
        let Some(Pending::Step {
            index: 0, request, ..
        }) = base.pending.clone()
        else {
            panic!("the saga waits for its first step");
        };
        let def = shared.def("dup").unwrap();
        let completion = || SagaEvent::StepCompleted {
            step: 0,
            name: "hold".into(),
            output: json!(1),
            attempts: 1,
        };

        let mut first = Plan::new(def, &base, Some(request), 1);
        first.push(completion()).unwrap();
        first.follow_on().unwrap();
        let mut second = Plan::new(def, &base, Some(request), 2);
        second.push(completion()).unwrap();
        second.follow_on().unwrap();

        assert!(shared.commit(&bus, first).await.unwrap().is_some());
        assert!(
            shared.commit(&bus, second).await.unwrap().is_none(),
            "refused: the saga moved"
        );

        // Through `drive`, the late driver reads again and does nothing.
        let driven = shared
            .drive(&bus, &id, Some(request), Some(request), |plan| {
                if plan.base().is_some_and(|s| s.awaits(request)) {
                    plan.push(completion())?;
                }
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(driven, Driven::Skipped));

        let stream = bus
            .read_stream(&id.stream(), 1, Direction::Forward, 100)
            .await
            .unwrap();
        let completions = stream
            .iter()
            .filter(|e| e.message.event_type == "saga.step-completed")
            .count();
        assert_eq!(completions, 1);
        assert_eq!(
            stream.len(),
            4,
            "started, requested, completed, next requested"
        );
        bus.shutdown(Duration::from_secs(1)).await.unwrap();
    }
}
