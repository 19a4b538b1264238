//! Compensating transacts: handlers register how to undo what they did; when the operation
//! fails, the compensations of the handlers that had succeeded run, in reverse order, as a
//! durable delivery, and the outcome lists what was compensated.
//!
//! A handler registered here returns `Ok(Some(data))` to register a compensation with `data`
//! (the reservation id to release, the payment id to refund) or `Ok(None)` when there is
//! nothing to undo. The registration is kept in the key–value space under the operation id.
//! When the operation's outcome is a failure — seen by the caller of
//! [`CompensatingOperation::outcome`], or by a sweeper that checks registrations left behind
//! (the caller crashed) — one commit requests a compensation run and takes the registrations;
//! the run's handler (`txbus/compensations`) calls each compensation, newest success first,
//! marking each done so that a retried run skips it. A handler that succeeds after its
//! operation failed registers too and is compensated by a run of its own; a handler whose
//! operation is already being compensated does nothing.
//!
//! ```no_run
//! # async fn example(store: impl txbus_core::Store) -> Result<(), txbus_saga::Error> {
//! use serde_json::json;
//! use txbus_core::{Bus, Event, HandlerError, Message, On};
//! use txbus_saga::compensating::{Compensation, Compensations};
//!
//! let compensations = Compensations::builder()
//!     .handler("stock", On::event("order.placed"),
//!         |msg: Message| async move {
//!             // reserve the items …
//!             Ok(Some(json!({"reservation": format!("r-{}", msg.id())})))
//!         },
//!         |c: Compensation| async move {
//!             // release c.registered.data["reservation"] …
//!             Ok(())
//!         })
//!     .build()?;
//! let bus = compensations
//!     .install(Bus::builder().store(store)
//!         .handler("payment", On::event("order.placed"), |_msg: Message| async {
//!             Err(HandlerError::reject("card declined"))
//!         }))
//!     .build()
//!     .await?;
//! let cbus = compensations.attach(bus);
//! let op = cbus.transact([Event::new("order.placed", json!({"order": 7}))]).await?;
//! let result = op.outcome().await?;
//! assert!(!result.is_ok());
//! for undone in &result.compensated {
//!     println!("compensated {} on {}", undone.handler, undone.event_type);
//! }
//! # Ok(()) }
//! ```

mod handler;
mod record;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use txbus_core::{
    Bus, BusBuilder, Commit, Conflict, Event, HandlerError, KvExpect, KvWrite, Message, On,
    Operation, OperationId, OperationState, PolicyOverride,
};

pub use record::{CompensatedOutcome, Compensation, CompensationFailure, Registered};

use crate::error::Error;
use crate::step::Retry;
use handler::{ActionFn, CompensationFn};
use record::{RunRequest, RunState};

/// The event type of a compensation run request.
pub const RUN_EVENT: &str = "txbus.compensate";
/// The event type recording a compensation run's result.
pub const RESULT_EVENT: &str = "txbus.compensated";
/// The module of both.
pub const MODULE: &str = "txbus";
/// The name of the handler that runs compensations.
pub const RUNNER: &str = "txbus/compensations";

struct Entry {
    name: String,
    on: On,
    policy: PolicyOverride,
    action: ActionFn,
    compensation: CompensationFn,
}

pub(crate) struct Shared {
    entries: Vec<Entry>,
    bus: watch::Sender<Option<Bus>>,
    retry: Retry,
    keep_for: Duration,
    sweep_interval: Duration,
    sweep_batch: usize,
}

impl Shared {
    pub(crate) async fn bus(&self) -> Bus {
        let mut rx = self.bus.subscribe();
        loop {
            if let Some(bus) = rx.borrow_and_update().clone() {
                return bus;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn compensation(&self, handler: &str) -> Option<&CompensationFn> {
        self.entries
            .iter()
            .find(|e| e.name == handler)
            .map(|e| &e.compensation)
    }

    /// Takes the registrations of `op` and requests a run for them, in one commit: the main
    /// run when there is none yet, else a late one. `Ok(false)` when there was nothing to take.
    pub(crate) async fn take_and_run(&self, bus: &Bus, op: OperationId) -> Result<bool, Error> {
        for _ in 0..16 {
            let entries = bus.kv_scan(&record::record_prefix(op), None, 1000).await?;
            if entries.is_empty() {
                return Ok(false);
            }
            let mut records = Vec::with_capacity(entries.len());
            for e in &entries {
                match serde_json::from_slice::<Registered>(&e.value) {
                    Ok(r) => records.push(r),
                    Err(err) => {
                        tracing::warn!(key = %e.key, error = %err, "unreadable compensation registration skipped")
                    }
                }
            }
            // Newest success first.
            records.sort_by(|a, b| b.seq.cmp(&a.seq));
            let main = bus.kv_get(&record::run_key(op)).await?.is_none();
            let request = RunRequest {
                operation_id: op,
                records: records.clone(),
                main,
            };
            let payload =
                serde_json::to_value(&request).map_err(|e| Error::Unreadable(e.to_string()))?;
            let mut commit = Commit::new().event(
                Event::new(RUN_EVENT, payload)
                    .module(MODULE)
                    .correlation_id(op.to_string()),
            );
            for e in &entries {
                commit =
                    commit.kv(KvWrite::delete(e.key.clone()).expect(KvExpect::Version(e.version)));
            }
            if main {
                let state = RunState {
                    records,
                    finished: false,
                    compensated: Vec::new(),
                    failed: None,
                };
                let value =
                    serde_json::to_vec(&state).map_err(|e| Error::Unreadable(e.to_string()))?;
                commit = commit.kv(KvWrite::put(record::run_key(op), value)
                    .expect(KvExpect::Absent)
                    .ttl(self.keep_for));
            }
            match bus.commit_unwatched(commit).await {
                Ok(_) => {
                    tracing::info!(operation = %op, count = entries.len(), main, "compensation run requested");
                    return Ok(true);
                }
                // Another caller (or the sweeper) took them first, or a late one came in.
                Err(txbus_core::Error::Conflict(Conflict::Key { .. })) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::OperationContended(op))
    }

    /// Drops the registrations of an operation that succeeded.
    async fn forget(&self, bus: &Bus, op: OperationId) -> Result<(), Error> {
        let entries = bus.kv_scan(&record::record_prefix(op), None, 1000).await?;
        if entries.is_empty() {
            return Ok(());
        }
        let writes = entries
            .into_iter()
            .map(|e| KvWrite::delete(e.key).expect(KvExpect::Version(e.version)))
            .collect();
        match bus.kv_write(writes).await {
            Ok(_) | Err(txbus_core::Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Acts on an operation that has registrations: drop them when it succeeded, compensate
    /// when it failed, wait while it runs.
    async fn settle(&self, bus: &Bus, op: OperationId) -> Result<(), Error> {
        match bus.outcome(op).await? {
            Some(OperationState::Pending { .. }) => Ok(()),
            Some(OperationState::Finished(outcome)) if outcome.is_ok() => {
                self.forget(bus, op).await
            }
            Some(OperationState::Finished(_)) => self.take_and_run(bus, op).await.map(|_| ()),
            None => {
                // Its outcome was pruned: it finished long ago; nothing can tell how.
                tracing::warn!(operation = %op, "compensation registrations of an operation whose outcome is gone; dropped");
                self.forget(bus, op).await
            }
        }
    }
}

/// Handlers with compensations, to install on a bus.
#[derive(Clone)]
pub struct Compensations {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Compensations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .shared
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        f.debug_struct("Compensations")
            .field("handlers", &names)
            .finish()
    }
}

/// Configures [`Compensations`].
pub struct CompensationsBuilder {
    entries: Vec<Entry>,
    retry: Retry,
    keep_for: Duration,
    sweep_interval: Duration,
}

impl std::fmt::Debug for CompensationsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompensationsBuilder")
            .field("handlers", &self.entries.len())
            .field("retry", &self.retry)
            .finish()
    }
}

impl Compensations {
    /// Starts configuring.
    pub fn builder() -> CompensationsBuilder {
        CompensationsBuilder {
            entries: Vec::new(),
            retry: Retry::compensation_default(),
            keep_for: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(1),
        }
    }

    /// Registers the handlers and the compensation runner on the bus being built.
    pub fn install(&self, mut builder: BusBuilder) -> BusBuilder {
        for (index, entry) in self.shared.entries.iter().enumerate() {
            builder = builder.handler_with(
                entry.name.clone(),
                entry.on.clone(),
                entry.policy.clone(),
                handler::Registering {
                    shared: Arc::clone(&self.shared),
                    index,
                },
            );
        }
        let retry = self.shared.retry;
        builder.handler_with(
            RUNNER,
            On::event(RUN_EVENT).module(MODULE),
            PolicyOverride::default()
                .timeout(retry.timeout.saturating_add(Duration::from_secs(10)))
                .max_retries(retry.max_retries)
                .backoff(retry.backoff),
            handler::Runner {
                shared: Arc::clone(&self.shared),
            },
        )
    }

    /// Binds the built bus and starts the sweeper (inside a tokio runtime).
    pub fn attach(&self, bus: Bus) -> CompensatingBus {
        self.shared.bus.send_replace(Some(bus.clone()));
        let sweeper = tokio::spawn(sweep(Arc::clone(&self.shared), bus.clone()));
        CompensatingBus {
            shared: Arc::clone(&self.shared),
            bus,
            _sweeper: Arc::new(Sweeper(sweeper.abort_handle())),
        }
    }
}

impl CompensationsBuilder {
    /// Subscribes a handler that may register a compensation: `action` returns
    /// `Ok(Some(data))` to register one with `data`, `Ok(None)` when there is nothing to undo.
    pub fn handler<F, Fut, C, CFut>(
        self,
        name: impl Into<String>,
        on: On,
        action: F,
        compensation: C,
    ) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Value>, HandlerError>> + Send + 'static,
        C: Fn(Compensation) -> CFut + Send + Sync + 'static,
        CFut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handler_with(name, on, PolicyOverride::default(), action, compensation)
    }

    /// Like [`handler`](Self::handler), with the handler's own timeout, retries or backoff.
    pub fn handler_with<F, Fut, C, CFut>(
        mut self,
        name: impl Into<String>,
        on: On,
        policy: PolicyOverride,
        action: F,
        compensation: C,
    ) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Value>, HandlerError>> + Send + 'static,
        C: Fn(Compensation) -> CFut + Send + Sync + 'static,
        CFut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let action = Arc::new(action);
        let compensation = Arc::new(compensation);
        self.entries.push(Entry {
            name: name.into(),
            on,
            policy,
            action: Arc::new(move |m| {
                let a = Arc::clone(&action);
                Box::pin(async move { a(m).await })
            }),
            compensation: Arc::new(move |c| {
                let f = Arc::clone(&compensation);
                Box::pin(async move { f(c).await })
            }),
        });
        self
    }

    /// Timeout, retries and backoff of a compensation run (default: 30 s, 5 retries,
    /// exponential from 500 ms). The timeout bounds each compensation of the run.
    pub fn compensation_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// How long registrations, done marks and run results are kept (default 7 days).
    pub fn keep_for(mut self, keep: Duration) -> Self {
        self.keep_for = keep;
        self
    }

    /// How often registrations left behind are checked (default 1 s).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Checks the handler names and builds.
    pub fn build(self) -> Result<Compensations, Error> {
        let mut seen = std::collections::HashSet::new();
        for e in &self.entries {
            if e.name == RUNNER || !seen.insert(e.name.as_str()) {
                return Err(Error::InvalidDefinition(format!(
                    "handler name {:?} is used twice (or is the runner's)",
                    e.name
                )));
            }
        }
        if self.sweep_interval.is_zero() || self.retry.timeout.is_zero() {
            return Err(Error::InvalidDefinition(
                "the sweep interval and the compensation timeout must be above zero".into(),
            ));
        }
        Ok(Compensations {
            shared: Arc::new(Shared {
                entries: self.entries,
                bus: watch::Sender::new(None),
                retry: self.retry,
                keep_for: self.keep_for,
                sweep_interval: self.sweep_interval,
                sweep_batch: 256,
            }),
        })
    }
}

/// Stops the sweeper with the last handle.
struct Sweeper(AbortHandle);

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Settles operations whose registrations were left behind (their caller did not wait, or
/// crashed).
async fn sweep(shared: Arc<Shared>, bus: Bus) {
    let mut after: Option<String> = None;
    loop {
        tokio::time::sleep(shared.sweep_interval).await;
        let batch = match bus
            .kv_scan(record::RECORDS, after.as_deref(), shared.sweep_batch)
            .await
        {
            Ok(b) => b,
            Err(txbus_core::Error::ShuttingDown) => return,
            Err(e) => {
                tracing::warn!(error = %e, "compensation sweep: scan failed");
                continue;
            }
        };
        after = if batch.len() < shared.sweep_batch {
            None
        } else {
            batch.last().map(|e| e.key.clone())
        };
        let mut last = None;
        for entry in &batch {
            let Some(op) = record::op_of(&entry.key) else {
                continue;
            };
            if last == Some(op) {
                continue;
            }
            last = Some(op);
            if let Err(e) = shared.settle(&bus, op).await {
                tracing::warn!(operation = %op, error = %e, "compensation sweep: could not settle");
            }
        }
    }
}

/// A bus whose transacts report what was compensated. Cheap to clone.
#[derive(Clone)]
pub struct CompensatingBus {
    shared: Arc<Shared>,
    bus: Bus,
    _sweeper: Arc<Sweeper>,
}

impl std::fmt::Debug for CompensatingBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompensatingBus").finish_non_exhaustive()
    }
}

/// A compensating transact's handle.
pub struct CompensatingOperation {
    operation: Operation,
    bus: CompensatingBus,
}

impl std::fmt::Debug for CompensatingOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompensatingOperation")
            .field("id", &self.operation.id())
            .finish()
    }
}

impl CompensatingOperation {
    /// The operation id.
    pub fn id(&self) -> OperationId {
        self.operation.id()
    }

    /// The underlying operation (progress, the plain outcome).
    pub fn operation(&self) -> &Operation {
        &self.operation
    }

    /// Waits for the outcome; when the operation failed, waits for the compensations of the
    /// handlers that had succeeded, and lists them.
    pub async fn outcome(&self) -> Result<CompensatedOutcome, Error> {
        let outcome = self.operation.outcome().await?;
        self.bus.settled(outcome).await
    }
}

impl CompensatingBus {
    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Commits `events` as [`Bus::transact`] does; the handle's outcome lists compensations.
    pub async fn transact<I>(&self, events: I) -> Result<CompensatingOperation, Error>
    where
        I: IntoIterator<Item = Event>,
    {
        self.commit(Commit::new().events(events)).await
    }

    /// Commits as [`Bus::commit`] does; the handle's outcome lists compensations.
    pub async fn commit(&self, commit: Commit) -> Result<CompensatingOperation, Error> {
        let operation = self.bus.commit(commit).await?;
        Ok(CompensatingOperation {
            operation,
            bus: self.clone(),
        })
    }

    /// The compensated outcome of any operation, by id (waits for it).
    pub async fn outcome(&self, id: OperationId) -> Result<CompensatedOutcome, Error> {
        let outcome = self.bus.wait(id).await?;
        self.settled(outcome).await
    }

    async fn settled(&self, outcome: txbus_core::Outcome) -> Result<CompensatedOutcome, Error> {
        let op = outcome.operation_id;
        if outcome.is_ok() {
            self.shared.forget(&self.bus, op).await?;
            return Ok(CompensatedOutcome {
                outcome,
                compensated: Vec::new(),
                failed: None,
            });
        }
        let mut log = self.bus.log_changes();
        loop {
            log.borrow_and_update();
            match self.bus.kv_get(&record::run_key(op)).await? {
                None => {
                    if !self.shared.take_and_run(&self.bus, op).await? {
                        // Nothing had registered a compensation.
                        return Ok(CompensatedOutcome {
                            outcome,
                            compensated: Vec::new(),
                            failed: None,
                        });
                    }
                    continue;
                }
                Some(entry) => {
                    let run: RunState = serde_json::from_slice(&entry.value)
                        .map_err(|e| Error::Unreadable(format!("compensation run of {op}: {e}")))?;
                    if run.finished {
                        return Ok(CompensatedOutcome {
                            outcome,
                            compensated: run.compensated,
                            failed: run.failed,
                        });
                    }
                }
            }
            tokio::select! {
                _ = log.changed() => {}
                () = tokio::time::sleep(self.shared.sweep_interval) => {}
            }
        }
    }
}

/// What a store holds about the compensations of one operation, for inspection (a dashboard,
/// a CLI): the successes registered to be undone, and the run that undid them, if any.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CompensationView {
    /// Successes registered and not yet taken by a run.
    pub registered: Vec<Registered>,
    /// The operation's main compensation run, once requested.
    pub run: Option<RunView>,
}

/// The main compensation run of a failed operation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunView {
    /// True once it ended.
    pub finished: bool,
    /// What it compensates, in the order it does.
    pub records: Vec<Registered>,
    /// What it compensated.
    pub compensated: Vec<Registered>,
    /// A compensation that failed for good.
    pub failed: Option<CompensationFailure>,
}

/// Reads the compensation records of operation `op` from `bus`'s store; `None` when the
/// operation registered nothing to undo (or its records expired).
pub async fn compensations_of(
    bus: &Bus,
    op: OperationId,
) -> Result<Option<CompensationView>, Error> {
    let mut registered = Vec::new();
    for entry in bus.kv_scan(&record::record_prefix(op), None, 1000).await? {
        match serde_json::from_slice::<Registered>(&entry.value) {
            Ok(r) => registered.push(r),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable compensation registration skipped")
            }
        }
    }
    let run = match bus.kv_get(&record::run_key(op)).await? {
        Some(entry) => match serde_json::from_slice::<RunState>(&entry.value) {
            Ok(state) => Some(RunView {
                finished: state.finished,
                records: state.records,
                compensated: state.compensated,
                failed: state.failed,
            }),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable compensation run skipped");
                None
            }
        },
        None => None,
    };
    if registered.is_empty() && run.is_none() {
        return Ok(None);
    }
    Ok(Some(CompensationView { registered, run }))
}
