//! The engine: routes committed messages to handlers, runs attempts with timeout, panic
//! containment and retries, records their results, and recovers work from the store.
//!
//! Deliveries live in the store; the engine holds at most `buffer_capacity` of them in memory
//! (one semaphore permit each). A commit made while there is room is leased to this engine at
//! once and handed straight to its handlers, without polling; when memory is full the
//! deliveries stay pending in the store and the claimer leases them as room frees up.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::ack::AckSlot;
use crate::commit::Commit;
use crate::error::Error;
use crate::filter::On;
use crate::handler::ErasedHandler;
use crate::limits::{validate, Limits};
use crate::message::{DeliveryContext, Event, Message, OperationId, StoredMessage};
use crate::metrics::{AttemptOutcome, EngineMetrics};
use crate::operation::{Operation, WatchGuard, Watchers};
use crate::outcome::{Failure, FailureKind, OperationState, Outcome, Progress};
use crate::policy::Policy;
use crate::retention::Retention;
use crate::schema::SchemaRegistry;
use crate::store::{
    ClaimedDelivery, CommitKind, Completion, CompletionEffect, DeliveryResult, NewCommit,
    NewDelivery, OwnerId, Store, Subscription,
};
use crate::stream::{ExpectedVersion, StreamAppend, MAX_STREAM_ID_BYTES};
use crate::trace::{self, TraceParent};

pub(crate) use crate::time::now_ms;

pub(crate) struct HandlerEntry {
    pub(crate) name: Arc<str>,
    pub(crate) filter: On,
    pub(crate) policy: Policy,
    pub(crate) handler: Arc<dyn ErasedHandler>,
}

/// Where matching messages go: a handler of this bus (`local`) or, on a shared store, a
/// handler that another process subscribed.
pub(crate) struct Route {
    name: Arc<str>,
    filter: On,
    local: Option<usize>,
}

/// Engine settings, fixed at build time.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) limits: Limits,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) lease_ttl: Duration,
    pub(crate) buffer_capacity: usize,
    pub(crate) claim_batch: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) retention: Retention,
    pub(crate) max_concurrency: usize,
    pub(crate) start_paused: bool,
    pub(crate) max_interruptions: u32,
    /// Fields encrypted before the write and decrypted for handlers.
    pub(crate) encryption: Option<Arc<crate::encryption::FieldEncryption>>,
    /// Record the start and the shutdown of the bus as system commits.
    pub(crate) system_commits: bool,
}

/// One delivery held in memory, with the slot it occupies.
struct Job {
    id: i64,
    fence: i64,
    attempts: u32,
    interruptions: u32,
    commit_id: u64,
    operation_id: OperationId,
    index: u32,
    message: Arc<StoredMessage>,
    handler: usize,
    _slot: OwnedSemaphorePermit,
}

/// Running attempts, so that shutdown can wait for them and cancel the rest.
#[derive(Default)]
struct Tracker {
    next: AtomicU64,
    tasks: Mutex<HashMap<u64, AbortHandle>>,
    idle: Notify,
}

struct TrackGuard {
    id: u64,
    tracker: Arc<Tracker>,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let mut tasks = self
            .tracker
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tasks.remove(&self.id);
        if tasks.is_empty() {
            self.tracker.idle.notify_waiters();
        }
    }
}

impl Tracker {
    fn spawn<F>(self: &Arc<Self>, make: impl FnOnce(TrackGuard) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let guard = TrackGuard {
            id,
            tracker: Arc::clone(self),
        };
        let fut = make(guard);
        // Insert under the lock the task's guard needs, so it cannot remove itself first.
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let handle = tokio::spawn(fut);
        tasks.insert(id, handle.abort_handle());
    }

    async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                return;
            }
            notified.await;
        }
    }

    fn abort_all(&self) -> usize {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        for handle in tasks.values() {
            handle.abort();
        }
        tasks.len()
    }
}

/// What [`crate::Bus::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True when every running attempt finished within the deadline.
    pub drained: bool,
    /// Attempts cancelled at the deadline (they run again on the next start).
    pub cancelled: usize,
    /// Deliveries returned to pending for the next start.
    pub released: u64,
}

pub(crate) struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) owner: OwnerId,
    pub(crate) settings: Settings,
    pub(crate) handlers: Vec<HandlerEntry>,
    handler_names: Vec<String>,
    by_name: HashMap<Arc<str>, usize>,
    routes: RwLock<Arc<Vec<Route>>>,
    queues: Vec<mpsc::UnboundedSender<Job>>,
    slots: Arc<Semaphore>,
    global: Arc<Semaphore>,
    pub(crate) watchers: Arc<Watchers>,
    claim_wake: Notify,
    claim_dirty: AtomicBool,
    paused: watch::Sender<bool>,
    stopping: watch::Sender<bool>,
    /// Bumped whenever the log may have grown (a commit here, work announced by the store).
    pub(crate) log_tick: watch::Sender<u64>,
    closed: AtomicBool,
    attempts: Arc<Tracker>,
    background: Mutex<Vec<AbortHandle>>,
    metrics: EngineMetrics,
}

impl Engine {
    /// Builds the engine and starts its loops. The store must be open.
    pub(crate) async fn start(
        store: Arc<dyn Store>,
        handlers: Vec<HandlerEntry>,
        settings: Settings,
    ) -> Result<Arc<Self>, Error> {
        let owner = uuid::Uuid::now_v7();
        store.heartbeat(owner).await?;
        let handler_names = handlers.iter().map(|h| h.name.to_string()).collect();
        let by_name = handlers
            .iter()
            .enumerate()
            .map(|(i, h)| (Arc::clone(&h.name), i))
            .collect();
        let mut queues = Vec::with_capacity(handlers.len());
        let mut receivers = Vec::with_capacity(handlers.len());
        for _ in &handlers {
            // Unbounded in type only: every queued job holds one of `buffer_capacity` slots.
            let (tx, rx) = mpsc::unbounded_channel();
            queues.push(tx);
            receivers.push(rx);
        }
        let metrics = EngineMetrics::new(handlers.iter().map(|h| &h.name));
        let engine = Arc::new(Self {
            metrics,
            store,
            owner,
            slots: Arc::new(Semaphore::new(settings.buffer_capacity)),
            global: Arc::new(Semaphore::new(settings.max_concurrency)),
            paused: watch::Sender::new(settings.start_paused),
            stopping: watch::Sender::new(false),
            log_tick: watch::Sender::new(0),
            settings,
            handlers,
            handler_names,
            by_name,
            routes: RwLock::new(Arc::new(Vec::new())),
            queues,
            watchers: Arc::new(Watchers::default()),
            claim_wake: Notify::new(),
            claim_dirty: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            attempts: Arc::new(Tracker::default()),
            background: Mutex::new(Vec::new()),
        });
        if engine.store.is_shared() {
            engine.store.subscribe(engine.local_subscriptions()).await?;
        }
        engine.refresh_routes().await?;
        let mut background = Vec::new();
        for (index, rx) in receivers.into_iter().enumerate() {
            background.push(tokio::spawn(Arc::clone(&engine).dispatch(index, rx)).abort_handle());
        }
        if !engine.handlers.is_empty() {
            background.push(tokio::spawn(Arc::clone(&engine).claim_loop()).abort_handle());
        }
        background.push(tokio::spawn(Arc::clone(&engine).heartbeat_loop()).abort_handle());
        if let Some(notifications) = engine.store.notifications() {
            background.push(
                tokio::spawn(Arc::clone(&engine).notification_loop(notifications)).abort_handle(),
            );
        }
        background.push(tokio::spawn(Arc::clone(&engine).prune_loop()).abort_handle());
        *engine
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = background;
        tracing::debug!(owner = %engine.owner, handlers = engine.handlers.len(), "bus started");
        Ok(engine)
    }

    fn local_subscriptions(&self) -> Vec<Subscription> {
        self.handlers
            .iter()
            .map(|h| Subscription {
                name: h.name.to_string(),
                filter: h.filter.clone(),
            })
            .collect()
    }

    fn route_table(&self) -> Arc<Vec<Route>> {
        Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Rebuilds the route table: this bus's handlers, then (on a shared store) every handler
    /// other processes subscribed.
    pub(crate) async fn refresh_routes(&self) -> Result<(), Error> {
        let mut table: Vec<Route> = self
            .handlers
            .iter()
            .enumerate()
            .map(|(i, h)| Route {
                name: Arc::clone(&h.name),
                filter: h.filter.clone(),
                local: Some(i),
            })
            .collect();
        if self.store.is_shared() {
            for s in self.store.subscriptions().await? {
                if !self.by_name.contains_key(s.name.as_str()) {
                    table.push(Route {
                        name: Arc::from(s.name.as_str()),
                        filter: s.filter,
                        local: None,
                    });
                }
            }
        }
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        Ok(())
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// `Err(ShuttingDown)` once shutdown began: calls that write, or wait, stop here.
    pub(crate) fn accepting(&self) -> Result<(), Error> {
        if self.is_stopping() {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Validates a commit and routes it to every subscribed handler, without writing it: for
    /// stores that write commits inside a caller's own transaction (an outbox). Nothing is
    /// leased: the deliveries are pending for whichever bus claims them.
    pub(crate) fn prepare(&self, kind: CommitKind, commit: Commit) -> Result<NewCommit, Error> {
        let Commit {
            mut events,
            streams,
            kv,
            operation_id,
            acks,
            unackable,
        } = commit;
        if !acks.is_empty() || unackable > 0 {
            return Err(Error::InvalidCommit(
                "a commit written in the caller's own transaction cannot acknowledge a delivery: commit it through the bus instead".into(),
            ));
        }
        let streams = stream_appends(&mut events, streams)?;
        crate::kv::check_writes(&kv).map_err(Error::InvalidCommit)?;
        let messages = self.seal(validate(
            events,
            &self.settings.limits,
            &self.settings.schemas,
        )?)?;
        let table = self.route_table();
        let mut deliveries = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let message_index = u32::try_from(i).unwrap_or(u32::MAX);
            deliveries.extend(
                table
                    .iter()
                    .filter(|r| r.filter.matches(m))
                    .map(|r| NewDelivery {
                        message_index,
                        handler: Arc::clone(&r.name),
                        leased: false,
                    }),
            );
        }
        Ok(NewCommit {
            operation_id: operation_id.unwrap_or_default(),
            kind,
            created_at_ms: now_ms(),
            messages,
            deliveries,
            lease_to: None,
            streams,
            kv,
            acks: Vec::new(),
        })
    }

    /// Validates, commits, and hands the deliveries to the handlers, in a `txbus.transact`
    /// span with the durable append in a child `txbus.commit` span, whose trace context every
    /// message carries (see [`crate::trace`]).
    pub(crate) async fn commit(
        self: &Arc<Self>,
        kind: CommitKind,
        mut commit: Commit,
        watch: bool,
    ) -> Result<(u64, OperationId, Option<WatchGuard>), Error> {
        let started = Instant::now();
        let operation_id = *commit.operation_id.get_or_insert_with(OperationId::new);
        let span = tracing::info_span!(
            "txbus.transact",
            kind = kind.name(),
            %operation_id,
            events = commit.events.len(),
            error = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let incoming = commit
            .events
            .iter()
            .find_map(|e| TraceParent::from_headers(&e.headers));
        let context = trace::start(&span, incoming);
        let commit_span = tracing::info_span!(
            parent: &span,
            "txbus.commit",
            %operation_id,
            commit_id = tracing::field::Empty,
            deliveries = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        if let Some(context) = trace::start(&commit_span, context) {
            let value = context.to_string();
            for event in &mut commit.events {
                event
                    .headers
                    .extra
                    .insert(trace::TRACEPARENT.to_owned(), value.clone());
            }
        }
        let result = self
            .commit_in_span(kind, commit, watch, &commit_span)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(_) => self.metrics.committed(kind, started.elapsed()),
            Err(e) => {
                span.record("error", tracing::field::display(e));
            }
        }
        result
    }

    async fn commit_in_span(
        self: &Arc<Self>,
        kind: CommitKind,
        commit: Commit,
        watch: bool,
        commit_span: &tracing::Span,
    ) -> Result<(u64, OperationId, Option<WatchGuard>), Error> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let Commit {
            mut events,
            streams,
            kv,
            operation_id,
            acks,
            unackable,
        } = commit;
        self.check_acks(&acks, unackable)?;
        let streams = stream_appends(&mut events, streams)?;
        crate::kv::check_writes(&kv).map_err(Error::InvalidCommit)?;
        let messages = self.seal(validate(
            events,
            &self.settings.limits,
            &self.settings.schemas,
        )?)?;
        let operation_id = operation_id.unwrap_or_default();
        // (message index, route) for every subscribed handler, local or in another process.
        let table = self.route_table();
        let mut targets: Vec<(u32, &Route)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            targets.extend(
                table
                    .iter()
                    .filter(|r| r.filter.matches(m))
                    .map(|r| (index, r)),
            );
        }
        let local = targets.iter().filter(|(_, r)| r.local.is_some()).count();
        // Reserve room in memory for this bus's own handlers first: if there is some, their
        // deliveries are leased to us in the same commit and run without being read back.
        let permits = if local == 0 {
            None
        } else {
            u32::try_from(local)
                .ok()
                .and_then(|n| Arc::clone(&self.slots).try_acquire_many_owned(n).ok())
        };
        let guard = watch.then(|| self.watchers.watch(operation_id));
        let leased = permits.is_some();
        let commit = NewCommit {
            operation_id,
            kind,
            created_at_ms: now_ms(),
            messages: messages.clone(),
            deliveries: targets
                .iter()
                .map(|&(message_index, r)| NewDelivery {
                    message_index,
                    handler: Arc::clone(&r.name),
                    leased: leased && r.local.is_some(),
                })
                .collect(),
            lease_to: leased.then_some(self.owner),
            streams,
            kv,
            acks: acks.iter().map(|a| a.completion()).collect(),
        };
        commit_span.record("deliveries", commit.deliveries.len());
        self.acknowledging(&acks);
        let receipt = self
            .store
            .append(commit)
            .instrument(commit_span.clone())
            .await?;
        commit_span.record("commit_id", receipt.commit_id);
        self.log_tick.send_modify(|t| *t = t.wrapping_add(1));
        if let Some(outcome) = receipt.finished {
            self.watchers.finish(outcome);
        }
        self.acknowledged(&acks, receipt.acked);
        match permits {
            Some(permits) => {
                let mut rest = Some(permits);
                let mut left = local;
                for (&(index, r), &id) in targets.iter().zip(&receipt.delivery_ids) {
                    let Some(h) = r.local else { continue };
                    // One slot per delivery: split one off, the last takes what remains.
                    left -= 1;
                    let slot = if left == 0 {
                        rest.take()
                    } else {
                        rest.as_mut().and_then(|p| p.split(1))
                    };
                    let Some(slot) = slot else { break };
                    let job = Job {
                        id,
                        fence: 1,
                        attempts: 0,
                        interruptions: 0,
                        commit_id: receipt.commit_id,
                        operation_id,
                        index,
                        message: Arc::clone(&messages[index as usize]),
                        handler: h,
                        _slot: slot,
                    };
                    self.enqueue(job);
                }
            }
            None if local > 0 => self.wake_claimer(),
            None => {}
        }
        Ok((receipt.commit_id, operation_id, guard))
    }

    /// Refuses acknowledgements this bus cannot carry: of messages it did not deliver, of
    /// another bus's deliveries, or recorded already.
    fn check_acks(&self, acks: &[Arc<AckSlot>], unackable: usize) -> Result<(), Error> {
        if unackable > 0 {
            return Err(Error::InvalidCommit(
                "the commit acknowledges a message that no bus delivered (built by hand): only a message handed to a handler can be acknowledged".into(),
            ));
        }
        for ack in acks {
            if ack.owner != self.owner {
                return Err(Error::InvalidCommit(format!(
                    "the commit acknowledges delivery {} of another bus: commit it through the bus that delivered the message",
                    ack.delivery_id
                )));
            }
            if ack.recorded().is_some() {
                return Err(Error::Conflict(crate::Conflict::Lease {
                    delivery_id: ack.delivery_id,
                }));
            }
        }
        Ok(())
    }

    /// Reports the success of each attempt whose acknowledgement a commit carries. Like an
    /// attempt's own progress it goes out before the acknowledgement is written, so that it
    /// precedes the outcome however that outcome is learnt (another process's notification).
    fn acknowledging(&self, acks: &[Arc<AckSlot>]) {
        for ack in acks {
            self.watchers.progress(
                ack.operation_id,
                Progress::Succeeded {
                    event_index: ack.event_index,
                    handler: ack.handler.to_string(),
                    attempt: ack.attempt,
                },
            );
        }
    }

    /// Reports the outcomes that a durable commit's acknowledgements finished, and marks them
    /// recorded for the attempts that wait on them.
    fn acknowledged(&self, acks: &[Arc<AckSlot>], effects: Vec<CompletionEffect>) {
        for (ack, effect) in acks.iter().zip(effects) {
            if let CompletionEffect::Applied(Some(outcome)) = &effect {
                self.metrics.operation_finished(outcome.is_ok());
                tracing::debug!(operation_id = %outcome.operation_id, ok = outcome.is_ok(), "operation finished");
                self.watchers.finish(outcome.clone());
            }
            ack.record(effect);
        }
    }

    /// Encrypts the fields the policy names; an event it cannot encrypt fails the call,
    /// naming it, before anything is written.
    fn seal(
        &self,
        mut messages: Vec<Arc<StoredMessage>>,
    ) -> Result<Vec<Arc<StoredMessage>>, Error> {
        let Some(policy) = &self.settings.encryption else {
            return Ok(messages);
        };
        for (index, m) in messages.iter_mut().enumerate() {
            if policy.covers(&m.event_type) {
                let m = Arc::make_mut(m);
                policy.seal(m).map_err(|reason| Error::InvalidEvent {
                    index,
                    event_type: m.event_type.clone(),
                    reason,
                })?;
            }
        }
        Ok(messages)
    }

    /// Commits a system commit: no deliveries, nobody waits. Taken even while stopping.
    pub(crate) async fn commit_system(&self, event: Event) -> Result<u64, Error> {
        // The bus's own records: the default limits, not the ones set for callers' events.
        let messages = validate(vec![event], &Limits::default(), &SchemaRegistry::new())?;
        let receipt = self
            .store
            .append(NewCommit {
                operation_id: OperationId::new(),
                kind: CommitKind::System,
                created_at_ms: now_ms(),
                messages,
                deliveries: Vec::new(),
                lease_to: None,
                streams: Vec::new(),
                kv: Vec::new(),
                acks: Vec::new(),
            })
            .await?;
        self.log_tick.send_modify(|t| *t = t.wrapping_add(1));
        Ok(receipt.commit_id)
    }

    pub(crate) fn operation(self: &Arc<Self>, commit_id: u64, guard: WatchGuard) -> Operation {
        Operation {
            commit_id,
            guard,
            engine: Arc::clone(self),
        }
    }

    fn enqueue(&self, job: Job) {
        // A closed queue means shutdown: the job's lease is released with the others.
        let _ = self.queues[job.handler].send(job);
    }

    /// The names of this bus's handlers.
    pub(crate) fn handler_names(&self) -> &[String] {
        &self.handler_names
    }

    pub(crate) fn wake_claimer(&self) {
        self.claim_dirty.store(true, Ordering::Release);
        self.claim_wake.notify_one();
    }

    pub(crate) fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub(crate) fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Waits for an operation watched in this process, checking the store now and then so that
    /// an outcome recorded elsewhere is seen too.
    pub(crate) async fn wait_watched(&self, guard: &WatchGuard) -> Result<Outcome, Error> {
        loop {
            tokio::select! {
                outcome = guard.watch.outcome() => return outcome,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
            match self.store.operation(guard.id).await? {
                Some(OperationState::Finished(outcome)) => return Ok(outcome),
                Some(OperationState::Pending { .. }) => {}
                None => return Err(Error::UnknownOperation(guard.id)),
            }
        }
    }

    /// Waits for any operation by id.
    pub(crate) async fn wait(&self, id: OperationId) -> Result<Outcome, Error> {
        let guard = self.watchers.watch(id);
        match self.store.operation(id).await? {
            None => Err(Error::UnknownOperation(id)),
            Some(OperationState::Finished(outcome)) => Ok(outcome),
            Some(OperationState::Pending { .. }) => self.wait_watched(&guard).await,
        }
    }

    async fn wait_unpaused(&self) -> bool {
        let mut paused = self.paused.subscribe();
        let mut stopping = self.stopping.subscribe();
        loop {
            if *stopping.borrow_and_update() {
                return false;
            }
            if !*paused.borrow_and_update() {
                return true;
            }
            tokio::select! {
                r = paused.changed() => if r.is_err() { return false },
                r = stopping.changed() => if r.is_err() { return false },
            }
        }
    }

    /// Runs the jobs of one handler, within its concurrency limit and the global one.
    async fn dispatch(self: Arc<Self>, index: usize, mut rx: mpsc::UnboundedReceiver<Job>) {
        let local = Arc::new(Semaphore::new(
            self.handlers[index].policy.concurrency.max(1),
        ));
        let mut stopping = self.stopping.subscribe();
        loop {
            let job = tokio::select! {
                job = rx.recv() => match job { Some(job) => job, None => return },
                _ = stopping.wait_for(|s| *s) => return,
            };
            if !self.wait_unpaused().await {
                return;
            }
            let permits = tokio::select! {
                p = async {
                    let l = Arc::clone(&local).acquire_owned().await;
                    let g = Arc::clone(&self.global).acquire_owned().await;
                    (l, g)
                } => p,
                _ = stopping.wait_for(|s| *s) => return,
            };
            let (Ok(l), Ok(g)) = permits else { return };
            let engine = Arc::clone(&self);
            self.attempts.spawn(move |guard| async move {
                engine.run_attempt(job, (l, g)).await;
                drop(guard);
            });
        }
    }

    /// Runs one attempt in a `txbus.attempt` span, a child of the commit's span by the
    /// message's trace context.
    async fn run_attempt(
        self: Arc<Self>,
        job: Job,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let entry = &self.handlers[job.handler];
        let span = tracing::info_span!(
            parent: None,
            "txbus.attempt",
            operation_id = %job.operation_id,
            event_type = %job.message.event_type,
            handler = %entry.name,
            attempt = job.attempts + 1,
            delivery_id = job.id,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let context = trace::start(&span, TraceParent::from_headers(&job.message.headers));
        let engine = Arc::clone(&self);
        engine
            .attempt_in_span(job, permits, context, &span)
            .instrument(span.clone())
            .await;
    }

    async fn attempt_in_span(
        self: Arc<Self>,
        job: Job,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
        context: Option<TraceParent>,
        span: &tracing::Span,
    ) {
        let entry = &self.handlers[job.handler];
        let metrics = self.metrics.handler(job.handler);
        let attempt = job.attempts + 1;
        let opened = match &self.settings.encryption {
            Some(policy) => policy.open(&job.message).map(|m| m.map(Arc::new)),
            None => Ok(None),
        };
        let (data, unreadable) = match opened {
            Ok(Some(plain)) => (plain, None),
            Ok(None) => (Arc::clone(&job.message), None),
            Err(reason) => (Arc::clone(&job.message), Some(reason)),
        };
        let ack = AckSlot::new(
            self.owner,
            job.id,
            job.fence,
            job.commit_id,
            job.operation_id,
            job.index,
            Arc::clone(&entry.name),
            attempt,
        );
        let message = Message::new(
            data,
            DeliveryContext {
                operation_id: job.operation_id,
                commit_id: job.commit_id,
                index: job.index,
                handler: Arc::clone(&entry.name),
                attempt,
                delivery_id: job.id,
            },
        )
        .with_trace(context)
        .with_ack(Arc::clone(&ack));
        let transient = if let Some(reason) = unreadable {
            // A key may be added and the bus restarted: retried, then dead-lettered.
            drop(permits);
            Some((FailureKind::RetriesExhausted, reason))
        } else if job.interruptions > self.settings.max_interruptions {
            // Its process went down while holding it, again and again: do not run it once more.
            drop(permits);
            Some((
                FailureKind::Interrupted,
                format!(
                    "the bus running it stopped {} times while holding it (limit {}); it may bring its process down",
                    job.interruptions, self.settings.max_interruptions
                ),
            ))
        } else {
            let call = AssertUnwindSafe(entry.handler.call(message)).catch_unwind();
            let started = Instant::now();
            let ran = tokio::time::timeout(entry.policy.timeout, call).await;
            if let Some(m) = metrics {
                m.attempt_ran(started.elapsed());
            }
            drop(permits);
            Self::classify(ran, entry.policy.timeout)
        };
        if let Some(effect) = ack.recorded() {
            // The handler's own commit carried the acknowledgement: the delivery succeeded
            // when that commit became durable, and its progress and outcome went out then.
            if let Some((_, reason)) = &transient {
                tracing::warn!(handler = %entry.name, delivery = job.id, %reason,
                    "the handler failed after a commit acknowledged its delivery; the acknowledgement stands");
            }
            let recorded = match effect {
                CompletionEffect::Applied(_) => AttemptOutcome::Succeeded,
                CompletionEffect::Stale => AttemptOutcome::Stale,
            };
            span.record("outcome", recorded.name());
            if let Some(m) = metrics {
                m.record(recorded);
            }
            return;
        }
        let mut retry_in = None;
        let mut outcome = AttemptOutcome::Succeeded;
        let (result, progress) = match transient {
            None => (
                DeliveryResult::Succeeded,
                Progress::Succeeded {
                    event_index: job.index,
                    handler: entry.name.to_string(),
                    attempt,
                },
            ),
            Some((kind, reason))
                if matches!(
                    kind,
                    FailureKind::RetriesExhausted | FailureKind::TimedOut | FailureKind::Panicked
                ) && attempt <= entry.policy.max_retries =>
            {
                let delay = entry.policy.backoff.delay(attempt);
                retry_in = Some(delay);
                outcome = AttemptOutcome::Retried;
                tracing::debug!(handler = %entry.name, delivery = job.id, attempt, %reason, "attempt failed; retrying");
                let next_at_ms =
                    now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                (
                    DeliveryResult::Retry {
                        next_at_ms,
                        error: reason.clone(),
                    },
                    Progress::Retrying {
                        event_index: job.index,
                        handler: entry.name.to_string(),
                        attempt,
                        reason,
                        retry_in: delay,
                    },
                )
            }
            Some((kind, reason)) => {
                let failure = Failure {
                    event_index: job.index,
                    event_type: job.message.event_type.clone(),
                    handler: entry.name.to_string(),
                    kind,
                    reason,
                    attempts: attempt,
                };
                tracing::warn!(handler = %entry.name, delivery = job.id, %failure, "delivery failed");
                outcome = if kind == FailureKind::Rejected {
                    AttemptOutcome::Rejected
                } else {
                    AttemptOutcome::Dead
                };
                (
                    DeliveryResult::Failed {
                        failure: failure.clone(),
                        dead: kind != FailureKind::Rejected,
                    },
                    Progress::Failed(failure),
                )
            }
        };
        let completion = Completion {
            delivery_id: job.id,
            fence: job.fence,
            commit_id: job.commit_id,
            attempts: attempt,
            handler: Arc::clone(&entry.name),
            result,
        };
        // Progress goes out before the ack, so it always precedes the outcome, which needs
        // every ack; the outcome itself is reported only once it is durable.
        self.watchers.progress(job.operation_id, progress);
        let effect = self.complete(completion).await;
        let recorded = match effect {
            Some(CompletionEffect::Applied(_)) => outcome,
            Some(CompletionEffect::Stale) => AttemptOutcome::Stale,
            None => AttemptOutcome::Unrecorded,
        };
        span.record("outcome", recorded.name());
        if let Some(m) = metrics {
            m.record(recorded);
        }
        match effect {
            Some(CompletionEffect::Applied(finished)) => {
                if let Some(outcome) = finished {
                    self.metrics.operation_finished(outcome.is_ok());
                    tracing::debug!(operation_id = %outcome.operation_id, ok = outcome.is_ok(), "operation finished");
                    self.watchers.finish(outcome);
                }
            }
            Some(CompletionEffect::Stale) => {
                tracing::warn!(handler = %entry.name, delivery = job.id, fence = job.fence,
                    "the lease was taken over; this attempt's result was discarded");
                return;
            }
            None => return,
        }
        if let Some(delay) = retry_in {
            let engine = Arc::clone(&self);
            let mut stopping = self.stopping.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {
                        let job = Job { attempts: attempt, ..job };
                        engine.enqueue(job);
                    }
                    _ = stopping.wait_for(|s| *s) => {}
                }
            });
        }
    }

    /// Records one completion, retrying while the store fails. `None` when shutting down.
    async fn complete(&self, completion: Completion) -> Option<CompletionEffect> {
        let mut delay = Duration::from_millis(20);
        loop {
            match self.store.complete(vec![completion.clone()]).await {
                Ok(mut effects) => return effects.pop(),
                Err(e) => {
                    if self.is_stopping() || matches!(e, crate::store::Error::Closed) {
                        tracing::warn!(delivery = completion.delivery_id, error = %e,
                            "could not record an attempt; the delivery runs again after restart");
                        return None;
                    }
                    tracing::error!(delivery = completion.delivery_id, error = %e,
                        "could not record an attempt; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn job_from_claim(&self, d: ClaimedDelivery, slot: OwnedSemaphorePermit) -> Option<Job> {
        let Some(&handler) = self.by_name.get(d.handler.as_str()) else {
            tracing::warn!(handler = %d.handler, "claimed a delivery for a handler this bus does not have");
            return None;
        };
        Some(Job {
            id: d.id,
            fence: d.fence,
            attempts: d.attempts,
            interruptions: d.interruptions,
            commit_id: d.commit_id,
            operation_id: d.operation_id,
            index: d.message_index,
            message: d.message,
            handler,
            _slot: slot,
        })
    }

    /// Leases pending and abandoned deliveries from the store as memory frees up.
    async fn claim_loop(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            if !self.claim_dirty.load(Ordering::Acquire) {
                tokio::select! {
                    () = self.claim_wake.notified() => {}
                    () = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
            let first = tokio::select! {
                p = Arc::clone(&self.slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stopping.wait_for(|s| *s) => return,
            };
            let mut slots = vec![first];
            while slots.len() < self.settings.claim_batch {
                match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let wanted = slots.len();
            self.claim_dirty.store(false, Ordering::Release);
            match self
                .store
                .claim(
                    self.owner,
                    &self.handler_names,
                    wanted,
                    self.settings.lease_ttl,
                )
                .await
            {
                Ok(claimed) => {
                    let got = claimed.len();
                    if got > 0 {
                        tracing::debug!(count = got, "claimed deliveries from the store");
                    }
                    for (d, slot) in claimed.into_iter().zip(slots.drain(..)) {
                        if let Some(job) = self.job_from_claim(d, slot) {
                            self.enqueue(job);
                        }
                    }
                    if got == wanted {
                        self.claim_dirty.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming deliveries failed; retrying");
                    self.claim_dirty.store(true, Ordering::Release);
                    drop(slots);
                    tokio::select! {
                        () = tokio::time::sleep(self.settings.poll_interval) => {}
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    /// Reacts to what the store pushes: work to claim, outcomes recorded by other processes.
    async fn notification_loop(self: Arc<Self>, mut notifications: crate::store::Notifications) {
        use futures_util::StreamExt;
        while let Some(n) = notifications.next().await {
            match n {
                crate::store::Notification::Work => {
                    self.log_tick.send_modify(|t| *t = t.wrapping_add(1));
                    self.wake_claimer()
                }
                crate::store::Notification::Subscriptions => {
                    if let Err(e) = self.refresh_routes().await {
                        tracing::warn!(error = %e, "refreshing subscriptions failed");
                    }
                }
                crate::store::Notification::Finished(id) => {
                    if !self.watchers.is_watched(&id) {
                        continue;
                    }
                    match self.store.operation(id).await {
                        Ok(Some(OperationState::Finished(outcome))) => {
                            self.watchers.finish(outcome)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(operation = %id, error = %e, "reading a finished operation failed")
                        }
                    }
                }
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let period = (self.settings.lease_ttl / 3).max(Duration::from_millis(10));
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.store.heartbeat(self.owner).await {
                tracing::error!(error = %e, "heartbeat failed; leases may be taken over");
            }
            if self.store.is_shared() {
                if let Err(e) = self.refresh_routes().await {
                    tracing::warn!(error = %e, "refreshing subscriptions failed");
                }
            }
        }
    }

    async fn prune_loop(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.retention.interval) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            match self.store.prune(&self.settings.retention).await {
                Ok(report) if report != Default::default() => {
                    tracing::debug!(?report, "pruned finished work");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning failed"),
            }
        }
    }

    /// Deliveries and operations held in memory now (for tests and metrics).
    pub(crate) fn in_memory(&self) -> (usize, usize) {
        (
            self.settings.buffer_capacity - self.slots.available_permits(),
            self.watchers.len(),
        )
    }

    pub(crate) async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport, Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(ShutdownReport {
                drained: true,
                cancelled: 0,
                released: 0,
            });
        }
        self.stopping.send_replace(true);
        let drained = tokio::time::timeout(deadline, self.attempts.drained())
            .await
            .is_ok();
        let cancelled = if drained {
            0
        } else {
            self.attempts.abort_all()
        };
        for handle in self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            handle.abort();
        }
        // Let aborted attempts unwind before their leases are returned.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.attempts.drained()).await;
        if self.settings.system_commits {
            crate::system::record_stop(self, drained, cancelled).await;
        }
        let released = self.store.release(self.owner).await?;
        self.watchers.close_all();
        self.store.close().await?;
        tracing::info!(drained, cancelled, released, "bus shut down");
        Ok(ShutdownReport {
            drained,
            cancelled,
            released,
        })
    }
}

type Ran = Result<
    Result<crate::HandlerResult, Box<dyn std::any::Any + Send>>,
    tokio::time::error::Elapsed,
>;

impl Engine {
    /// What an attempt came to: `None` for success, else the failure kind (as it stands if no
    /// retry is left) and the reason.
    fn classify(ran: Ran, timeout: Duration) -> Option<(FailureKind, String)> {
        match ran {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(crate::HandlerError::Reject(reason)))) => {
                Some((FailureKind::Rejected, reason))
            }
            Ok(Ok(Err(crate::HandlerError::Transient(reason)))) => {
                Some((FailureKind::RetriesExhausted, reason))
            }
            Ok(Err(panic)) => Some((FailureKind::Panicked, panic_message(panic.as_ref()))),
            Err(_) => Some((
                FailureKind::TimedOut,
                format!("timed out after {timeout:?}"),
            )),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    format!("panicked: {text}")
}

/// Checks the commit's streams and marks each stream event with its stream id.
fn stream_appends(
    events: &mut [Event],
    streams: Vec<(String, ExpectedVersion, Vec<usize>)>,
) -> Result<Vec<StreamAppend>, Error> {
    let mut out: Vec<StreamAppend> = Vec::with_capacity(streams.len());
    for (stream, expected, indexes) in streams {
        if stream.is_empty() || stream.len() > MAX_STREAM_ID_BYTES {
            return Err(Error::InvalidCommit(format!(
                "stream id {stream:?} must be 1 to {MAX_STREAM_ID_BYTES} bytes"
            )));
        }
        if out.iter().any(|s| s.stream == stream) {
            return Err(Error::InvalidCommit(format!(
                "stream {stream:?} appears twice in one commit; put its events in one list"
            )));
        }
        if indexes.is_empty() {
            return Err(Error::InvalidCommit(format!(
                "stream {stream:?} is given no events"
            )));
        }
        let mut message_indexes = Vec::with_capacity(indexes.len());
        for i in indexes {
            let event = events.get_mut(i).ok_or_else(|| {
                Error::InvalidCommit(format!("stream {stream:?}: event index {i} out of range"))
            })?;
            event.headers.stream = Some(stream.clone());
            message_indexes.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
        out.push(StreamAppend {
            stream,
            expected,
            message_indexes,
        });
    }
    Ok(out)
}
