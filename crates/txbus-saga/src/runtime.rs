//! The saga registry and runtime: register saga types on a bus, then start sagas, wait for
//! them, list them by status, read their history, and retry what needs attention.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::task::AbortHandle;
use txbus_core::{Bus, BusBuilder, Direction};

use crate::definition::Saga;
use crate::error::Error;
use crate::id::SagaId;
use crate::keys;
use crate::plan::{KvOptions, Plan};
use crate::record::{Envelope, SagaEvent};
use crate::shared::{Driven, Options, Shared};
use crate::state::{SagaState, SagaStatus};
use crate::view::{HistoryEntry, SagaSummary};

/// The longest correlation id, in bytes.
pub const MAX_CORRELATION_ID_BYTES: usize = 256;

/// The saga types of a service, to install on its bus.
///
/// ```no_run
/// # async fn example(store: impl txbus_core::Store) -> Result<(), txbus_saga::Error> {
/// use serde_json::json;
/// use txbus_core::Bus;
/// use txbus_saga::{Saga, Sagas, Step, StepContext};
///
/// let sagas = Sagas::builder()
///     .saga(Saga::builder("greet")
///         .step(Step::action("hello", |_ctx: StepContext| async { Ok(json!("hi")) }))
///         .build()?)
///     .build()?;
/// let bus = sagas.install(Bus::builder().store(store)).build().await?;
/// let runtime = sagas.attach(bus);
/// let id = runtime.start("greet", json!({})).await?;
/// let state = runtime.wait(&id).await?;
/// # let _ = state; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Sagas {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.shared.defs.keys().collect();
        names.sort();
        f.debug_struct("Sagas").field("types", &names).finish()
    }
}

/// Configures [`Sagas`].
#[derive(Debug)]
pub struct SagasBuilder {
    defs: Vec<Saga>,
    options: Options,
}

impl Default for SagasBuilder {
    fn default() -> Self {
        Self {
            defs: Vec::new(),
            options: Options {
                cache_capacity: 10_000,
                timer_poll: Duration::from_secs(1),
                timer_batch: 256,
                commit_grace: Duration::from_secs(10),
                kv: KvOptions {
                    finished_ttl: Some(Duration::from_secs(30 * 24 * 3600)),
                },
            },
        }
    }
}

impl SagasBuilder {
    /// Registers a saga type.
    pub fn saga(mut self, saga: Saga) -> Self {
        self.defs.push(saga);
        self
    }

    /// Saga states kept in memory at most (default 10 000); the rest are read from their
    /// streams when needed.
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.options.cache_capacity = capacity;
        self
    }

    /// How often the timers are checked for ones set by other processes (default 1 s; timers
    /// set by this process wake the loop themselves).
    pub fn timer_poll(mut self, interval: Duration) -> Self {
        self.options.timer_poll = interval;
        self
    }

    /// How long finished (completed or failed) sagas stay in the status index (default 30
    /// days; `None` keeps them). Their streams stay in the log regardless.
    pub fn finished_index_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.options.kv.finished_ttl = ttl;
        self
    }

    /// Time a saga handler has, past its step's timeout, to record the result (default 10 s).
    pub fn commit_grace(mut self, grace: Duration) -> Self {
        self.options.commit_grace = grace;
        self
    }

    /// Checks that saga types are unique and builds the registry.
    pub fn build(self) -> Result<Sagas, Error> {
        if self.options.timer_poll.is_zero() {
            return Err(Error::InvalidDefinition(
                "timer_poll must be above zero".into(),
            ));
        }
        let mut defs = HashMap::new();
        for def in self.defs {
            let name = def.name.clone();
            if defs.insert(name.clone(), Arc::new(def)).is_some() {
                return Err(Error::InvalidDefinition(format!(
                    "saga type {name:?} is registered twice"
                )));
            }
        }
        let mut options = self.options;
        options.timer_batch = options.timer_batch.max(1);
        Ok(Sagas {
            shared: Arc::new(Shared::new(defs, options)),
        })
    }
}

impl Sagas {
    /// Starts configuring the registry.
    pub fn builder() -> SagasBuilder {
        SagasBuilder::default()
    }

    /// Registers the handlers of every saga type on the bus being built: one per action
    /// step (`saga/<type>/<step>/run`), per compensation (`…/compensate`) and per waiting
    /// step (`…/await`), each with its step's timeout, retries and backoff.
    pub fn install(&self, builder: BusBuilder) -> BusBuilder {
        crate::handlers::install(&self.shared, builder)
    }

    /// Binds the built bus (handlers resumed at build wait for it) and starts the timer
    /// loop. Call it once, on the bus built from [`install`](Self::install), inside a tokio
    /// runtime.
    pub fn attach(&self, bus: Bus) -> SagaRuntime {
        self.shared.bind(bus.clone());
        let timer = tokio::spawn(crate::timer::run(Arc::clone(&self.shared), bus.clone()));
        SagaRuntime {
            shared: Arc::clone(&self.shared),
            bus,
            _timer: Arc::new(TimerTask(timer.abort_handle())),
        }
    }
}

/// Stops the timer loop when the last runtime handle goes.
struct TimerTask(AbortHandle);

impl Drop for TimerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How to start one saga.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Its id (default: a new UUIDv7). A chosen id makes the start idempotent.
    pub id: Option<SagaId>,
    /// Its correlation id (default: its id). Unique among unfinished sagas of one type;
    /// events carrying it reach the saga's waiting steps.
    pub correlation_id: Option<String>,
}

impl StartOptions {
    /// Sets the saga id.
    pub fn id(mut self, id: SagaId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// Starts and inspects sagas. Cheap to clone.
#[derive(Clone)]
pub struct SagaRuntime {
    shared: Arc<Shared>,
    bus: Bus,
    _timer: Arc<TimerTask>,
}

impl std::fmt::Debug for SagaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaRuntime").finish_non_exhaustive()
    }
}

/// Removes a waiter entry when the wait ends.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: SagaId,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.release_waiter(&self.id);
    }
}

impl SagaRuntime {
    /// The bus the sagas run on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Starts a saga of type `saga_type` with `input`: one durable commit of its `started`
    /// change and its first step's request (and its status entry). Returns once durable.
    pub async fn start(&self, saga_type: &str, input: impl Serialize) -> Result<SagaId, Error> {
        self.start_with(saga_type, input, StartOptions::default())
            .await
    }

    /// Starts a saga with a chosen id or correlation id.
    pub async fn start_with(
        &self,
        saga_type: &str,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<SagaId, Error> {
        let def = self.shared.def(saga_type)?;
        let input = serde_json::to_value(input).map_err(|e| Error::Input(e.to_string()))?;
        let id = options.id.unwrap_or_else(SagaId::generate);
        let correlation_id = options
            .correlation_id
            .unwrap_or_else(|| id.as_str().to_owned());
        if correlation_id.is_empty() || correlation_id.len() > MAX_CORRELATION_ID_BYTES {
            return Err(Error::Input(format!(
                "the correlation id must be 1 to {MAX_CORRELATION_ID_BYTES} bytes"
            )));
        }
        let plan = Plan::start(def, &id, input, correlation_id, txbus_core::time::now_ms())?;
        match self.shared.commit(&self.bus, plan).await? {
            Some(state) => {
                tracing::debug!(saga = %id, saga_type, "saga started");
                drop(state);
                Ok(id)
            }
            None => Err(Error::AlreadyStarted(id)),
        }
    }

    /// A saga's state, read from its stream; `None` when no such saga exists.
    pub async fn get(&self, id: &SagaId) -> Result<Option<SagaState>, Error> {
        Ok(self.shared.get(&self.bus, id).await?.map(|s| (*s).clone()))
    }

    /// Waits until the saga has settled (completed, failed, or needs attention) and returns
    /// its state. Changes made by this process wake it at once, without a read; on a shared
    /// store, changes made elsewhere are seen when the log moves, and at the latest every
    /// `timer_poll`.
    pub async fn wait(&self, id: &SagaId) -> Result<SagaState, Error> {
        let mut local = self.shared.waiter(id);
        let _guard = WaiterGuard {
            shared: &self.shared,
            id: id.clone(),
        };
        let shared_store = self.bus.store().is_shared();
        let mut log = self.bus.log_changes();
        log.borrow_and_update();
        let mut state = self
            .shared
            .get(&self.bus, id)
            .await?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        loop {
            if state.status.is_settled() {
                return Ok((*state).clone());
            }
            let read = tokio::select! {
                changed = local.changed() => match changed {
                    Ok(()) => {
                        let pushed = local.borrow_and_update().clone();
                        if let Some(s) = pushed.filter(|s| s.version > state.version) {
                            state = s;
                        }
                        false
                    }
                    // Unreachable while this receiver lives; fall back to polling.
                    Err(_) => {
                        tokio::time::sleep(self.shared.options.timer_poll).await;
                        true
                    }
                },
                _ = log.changed(), if shared_store => true,
                () = tokio::time::sleep(self.shared.options.timer_poll) => true,
            };
            if read {
                if let Some(s) = self.shared.get(&self.bus, id).await? {
                    state = s;
                }
            }
        }
    }

    /// Lists sagas in one status from the status index, oldest id first, after the id
    /// `after` (for paging), at most `limit` (capped at 1000).
    pub async fn list(
        &self,
        status: SagaStatus,
        after: Option<&SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, Error> {
        list(&self.bus, status, after, limit).await
    }

    /// A saga's history: every change of its stream, in order — step requests, failed
    /// attempts with their errors, completions with outputs, compensations.
    pub async fn history(&self, id: &SagaId) -> Result<Vec<HistoryEntry>, Error> {
        history(&self.bus, id).await
    }

    /// Runs the failed compensation of a saga that needs attention again (after someone
    /// fixed its cause); the remaining compensations follow. Returns once the request is
    /// durable.
    pub async fn retry_compensation(&self, id: &SagaId) -> Result<(), Error> {
        let mut wrong = None;
        let driven = self
            .shared
            .drive(&self.bus, id, None, None, |plan| {
                let Some(base) = plan.base() else {
                    return Ok(());
                };
                let attention = match (&base.status, &base.attention) {
                    (SagaStatus::NeedsAttention, Some((step, _))) => *step,
                    (status, _) => {
                        wrong = Some(*status);
                        return Ok(());
                    }
                };
                wrong = None;
                let name = base
                    .steps
                    .get(attention)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                plan.push(SagaEvent::CompensationRetried {
                    step: attention,
                    name: name.clone(),
                })?;
                plan.push(SagaEvent::Compensating {
                    step: attention,
                    name,
                })
            })
            .await?;
        match (driven, wrong) {
            (Driven::Committed, _) => Ok(()),
            (Driven::Skipped, Some(status)) => Err(Error::WrongStatus {
                id: id.clone(),
                status,
                what: "only a saga that needs attention can retry its compensation",
            }),
            (Driven::Skipped, None) => Err(Error::NotFound(id.clone())),
        }
    }
}

/// Lists sagas in one status from the status index of `bus`'s store, oldest id first, after
/// the id `after` (for paging), at most `limit` (capped at 1000). Needs no saga definitions:
/// a tool (a dashboard, a CLI) reads sagas of any service sharing the store.
pub async fn list(
    bus: &Bus,
    status: SagaStatus,
    after: Option<&SagaId>,
    limit: usize,
) -> Result<Vec<SagaSummary>, Error> {
    let prefix = keys::status_prefix(status);
    let after = after.map(|id| keys::status_key(status, id));
    let entries = bus
        .kv_scan(&prefix, after.as_deref(), limit.min(1000))
        .await?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        match serde_json::from_slice::<SagaSummary>(&entry.value) {
            Ok(summary) => out.push(summary),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable saga status entry skipped")
            }
        }
    }
    Ok(out)
}

/// A saga's history read from `bus`'s store: every change of its stream, in order. Needs no
/// saga definitions.
pub async fn history(bus: &Bus, id: &SagaId) -> Result<Vec<HistoryEntry>, Error> {
    let stream = id.stream();
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = bus
            .read_stream(&stream, from, Direction::Forward, 256)
            .await?;
        let count = page.len();
        for e in page {
            let envelope: Envelope =
                serde_json::from_value(e.message.payload.clone()).map_err(|err| {
                    Error::Corrupt {
                        id: id.clone(),
                        reason: format!("change {} is unreadable: {err}", e.version),
                    }
                })?;
            from = e.version + 1;
            out.push(HistoryEntry {
                version: e.version,
                at_ms: envelope.at_ms,
                message_id: e.message.id,
                causation_id: e.message.headers.causation_id.clone(),
                event: envelope.event,
            });
        }
        if count < 256 || out.len() >= 100_000 {
            break;
        }
    }
    if out.is_empty() {
        return Err(Error::NotFound(id.clone()));
    }
    Ok(out)
}
