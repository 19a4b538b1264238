//! The idempotent inbox: commits each message received from a broker into the receiving bus,
//! once, under its original message id, and acknowledges the broker only after that commit is
//! durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;
use txbus_core::{Backoff, Bus, Commit, Conflict, KvExpect, KvWrite, MessageId, OperationId};

use crate::error::Error;
use crate::inbound::InboundMessage;
use crate::remote::{NoReplies, RemoteReply, RemoteResult, Replier};
use crate::source::{Acker, Received, Source};

/// The key–value key of the dedupe mark of message `id` in the inbox named `inbox`. It holds
/// the operation id the message was committed as.
pub fn dedupe_key(inbox: &str, id: MessageId) -> String {
    format!("inbox/{inbox}/{id}")
}

/// Entry point: `Inbox::builder(bus, name, source)`.
///
/// For every message its [`Source`] yields, the inbox commits one event into the bus — same
/// message id, type, module, headers and payload — together with a dedupe mark (key
/// `inbox/<name>/<message id>`, written only if absent) in the same atomic commit. A
/// redelivered message hits the mark's conflict and is acknowledged without being committed,
/// so the bus's handlers run for it once. The broker is acknowledged only after the commit is
/// durable: a crash before that leaves the message unacknowledged, and the broker delivers it
/// again. Marks expire after the retention (default seven days), which bounds their number;
/// a repeat arriving later than that would be committed again.
///
/// A message that carries a reply address ([`InboundMessage::reply_to`]) is a `transact`
/// across services: with a [`Replier`] set ([`InboxBuilder::replies`]) the inbox commits it
/// as a `transact`, waits for its outcome and sends a [`RemoteReply`]; a repeat is answered
/// with the stored outcome of the first.
#[derive(Debug, Clone, Copy)]
pub struct Inbox;

impl Inbox {
    /// Configures an inbox named `name` (the prefix of its dedupe marks) that commits the
    /// messages of `source` into `bus`.
    pub fn builder<S: Source>(
        bus: Bus,
        name: impl Into<String>,
        source: S,
    ) -> InboxBuilder<S, NoReplies> {
        InboxBuilder {
            bus,
            name: name.into(),
            source,
            replier: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            concurrency: 1,
            max_waiting: 1024,
            backoff: Backoff::exponential(Duration::from_millis(100)).max(Duration::from_secs(10)),
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// Configures an [`Inbox`]; [`start`](Self::start) runs it.
pub struct InboxBuilder<S, R> {
    bus: Bus,
    name: String,
    source: S,
    replier: Option<R>,
    retention: Duration,
    concurrency: usize,
    max_waiting: usize,
    backoff: Backoff,
    retry_delay: Duration,
}

impl<S, R> std::fmt::Debug for InboxBuilder<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxBuilder")
            .field("name", &self.name)
            .field("retention", &self.retention)
            .field("concurrency", &self.concurrency)
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

impl<S: Source, R: Replier> InboxBuilder<S, R> {
    /// Answers messages that carry a reply address: they are committed as a `transact`, and
    /// their outcome is sent back through `replier`.
    pub fn replies<R2: Replier>(self, replier: R2) -> InboxBuilder<S, R2> {
        InboxBuilder {
            bus: self.bus,
            name: self.name,
            source: self.source,
            replier: Some(replier),
            retention: self.retention,
            concurrency: self.concurrency,
            max_waiting: self.max_waiting,
            backoff: self.backoff,
            retry_delay: self.retry_delay,
        }
    }

    /// How long dedupe marks are kept (default seven days): a repeat of a message arriving
    /// within it is dropped. Keep it longer than the broker may take to redeliver.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Messages committed at once (default 1, which keeps the broker's order in the log).
    /// More lets the store batch the commits of several messages into one write, at the cost
    /// of that order.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Outcomes of remote `transact`s awaited at once, at most (default 1024); past it the
    /// inbox takes no new message until one finishes.
    pub fn max_waiting(mut self, max: usize) -> Self {
        self.max_waiting = max;
        self
    }

    /// The wait after a broker error, growing with consecutive errors (default exponential
    /// from 100 ms up to 10 s, with jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long the broker waits before delivering again a message that could not be
    /// committed now (the store failed; default 1 s).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Starts taking messages in a background task.
    pub fn start(self) -> Result<InboxHandle, Error> {
        if self.name.is_empty() || self.name.len() > 200 || self.name.contains('/') {
            return Err(Error::Config(format!(
                "inbox name {:?} must be 1 to 200 bytes without '/'",
                self.name
            )));
        }
        if self.concurrency == 0 || self.max_waiting == 0 || self.retention.is_zero() {
            return Err(Error::Config(
                "concurrency, max_waiting and retention must be above zero".into(),
            ));
        }
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            bus: self.bus,
            name: self.name.clone(),
            replier: self.replier,
            retention: self.retention,
            retry_delay: self.retry_delay,
            counters: Arc::clone(&counters),
            waiting: Arc::new(Semaphore::new(self.max_waiting)),
        });
        let task = tokio::spawn(run(
            shared,
            self.source,
            self.concurrency,
            self.backoff,
            stop_rx,
        ));
        Ok(InboxHandle {
            name: self.name,
            counters,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

/// What an inbox has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// Deliveries taken from the broker (repeats included).
    pub received: u64,
    /// Messages committed into the bus (each at most once).
    pub committed: u64,
    /// Repeats of messages already committed: acknowledged, not committed again.
    pub duplicates: u64,
    /// Messages that can never be committed (they do not decode, or the bus refuses them):
    /// discarded at the broker.
    pub discarded: u64,
    /// Messages handed back to the broker for a later delivery because the store failed.
    pub retried: u64,
    /// Replies sent for remote `transact`s.
    pub replies: u64,
    /// Errors of the broker while receiving or acknowledging.
    pub broker_errors: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    committed: AtomicU64,
    duplicates: AtomicU64,
    discarded: AtomicU64,
    retried: AtomicU64,
    replies: AtomicU64,
    broker_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> InboxStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        InboxStats {
            received: get(&self.received),
            committed: get(&self.committed),
            duplicates: get(&self.duplicates),
            discarded: get(&self.discarded),
            retried: get(&self.retried),
            replies: get(&self.replies),
            broker_errors: get(&self.broker_errors),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A running inbox. Dropping it stops the inbox (messages being committed finish first, for
/// up to five seconds); [`shutdown`](Self::shutdown) does the same and waits.
#[derive(Debug)]
pub struct InboxHandle {
    name: String,
    counters: Arc<Counters>,
    stop: watch::Sender<Option<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl InboxHandle {
    /// The inbox's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the inbox has done since it started.
    pub fn stats(&self) -> InboxStats {
        self.counters.snapshot()
    }

    /// Stops taking messages and waits up to `deadline` for the messages being committed and
    /// the replies being awaited; what is left is delivered again by the broker.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<InboxStats, Error> {
        self.stop.send_replace(Some(deadline));
        if let Some(task) = self.task.take() {
            task.await.map_err(|_| Error::TaskFailed("inbox"))?;
        }
        Ok(self.counters.snapshot())
    }
}

impl Drop for InboxHandle {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.send_replace(Some(Duration::from_secs(5)));
        }
    }
}

struct Shared<R> {
    bus: Bus,
    name: String,
    replier: Option<R>,
    retention: Duration,
    retry_delay: Duration,
    counters: Arc<Counters>,
    waiting: Arc<Semaphore>,
}

async fn run<S: Source, R: Replier>(
    shared: Arc<Shared<R>>,
    mut source: S,
    concurrency: usize,
    backoff: Backoff,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut errors_in_row = 0u32;
    let grace = loop {
        while tasks.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break Duration::ZERO,
            },
            changed = stop.changed() => break grace_of(changed, &stop),
        };
        let received = tokio::select! {
            r = source.next() => r,
            changed = stop.changed() => break grace_of(changed, &stop),
        };
        match received {
            Ok(received) => {
                errors_in_row = 0;
                bump(&shared.counters.received);
                tasks.spawn(process(Arc::clone(&shared), received, slot));
            }
            Err(e) => {
                errors_in_row = errors_in_row.saturating_add(1);
                bump(&shared.counters.broker_errors);
                let delay = backoff.delay(errors_in_row);
                tracing::warn!(inbox = %shared.name, error = %e, retry_in = ?delay, "receiving from the broker failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    changed = stop.changed() => break grace_of(changed, &stop),
                }
            }
        }
    };
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(inbox = %shared.name, left = tasks.len(), "inbox stopped with messages in progress; the broker delivers them again");
        tasks.abort_all();
    }
}

fn grace_of(
    changed: Result<(), watch::error::RecvError>,
    stop: &watch::Receiver<Option<Duration>>,
) -> Duration {
    match changed {
        Ok(()) => stop.borrow().unwrap_or(Duration::ZERO),
        Err(_) => Duration::from_secs(5),
    }
}

/// Commits one received message (or recognises a repeat), settles it with the broker, and
/// answers the origin when it asked.
async fn process<A: Acker, R: Replier>(
    shared: Arc<Shared<R>>,
    received: Received<A>,
    slot: OwnedSemaphorePermit,
) {
    let counters = &shared.counters;
    let message = match received.message {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(inbox = %shared.name, error = %e, "discarding a message that does not decode");
            bump(&counters.discarded);
            settle(&shared, received.acker.discard().await);
            return;
        }
    };
    let answer_to = match (&shared.replier, &message.reply_to) {
        (Some(_), Some(to)) => Some(to.clone()),
        _ => None,
    };
    let (span, event) = crate::trace::inbox_span(&shared.name, &message, message.to_event());
    commit_received(
        shared,
        received.acker,
        received.delivery_count,
        slot,
        message,
        answer_to,
        event,
    )
    .instrument(span)
    .await
}

/// The rest of [`process`], in the message's `txbus.inbox` span.
async fn commit_received<A: Acker, R: Replier>(
    shared: Arc<Shared<R>>,
    acker: A,
    delivery_count: Option<u64>,
    slot: OwnedSemaphorePermit,
    message: InboundMessage,
    answer_to: Option<String>,
    event: txbus_core::Event,
) {
    let counters = &shared.counters;
    let key = dedupe_key(&shared.name, message.id);
    let operation_id = OperationId::new();
    let commit = Commit::new()
        .event(event)
        .operation_id(operation_id)
        .kv(
            KvWrite::put(key.clone(), operation_id.to_string().into_bytes())
                .expect(KvExpect::Absent)
                .ttl(shared.retention),
        );
    let committed = if answer_to.is_some() {
        shared.bus.commit(commit).await.map(Some)
    } else {
        shared.bus.commit_unwatched(commit).await.map(|_| None)
    };
    let wait = match committed {
        Ok(operation) => {
            bump(&counters.committed);
            settle(&shared, acker.ack().await);
            Wait::Operation(operation)
        }
        Err(txbus_core::Error::Conflict(Conflict::Key { key: k, .. })) if k == key => {
            bump(&counters.duplicates);
            tracing::debug!(inbox = %shared.name, message = %message.id, deliveries = ?delivery_count, "repeat of a message already committed");
            let first = if answer_to.is_some() {
                first_operation(&shared, &key).await
            } else {
                Ok(None)
            };
            match first {
                Ok(first) => {
                    settle(&shared, acker.ack().await);
                    Wait::Repeat(first)
                }
                Err(e) => {
                    tracing::warn!(inbox = %shared.name, error = %e, "reading a dedupe mark failed; the broker delivers the message again");
                    bump(&counters.retried);
                    settle(&shared, acker.retry(shared.retry_delay).await);
                    return;
                }
            }
        }
        Err(
            e @ (txbus_core::Error::InvalidEvent { .. }
            | txbus_core::Error::InvalidCommit(_)
            | txbus_core::Error::TooManyEvents { .. }),
        ) => {
            tracing::error!(inbox = %shared.name, message = %message.id, error = %e, "the bus refuses the message; discarding it");
            bump(&counters.discarded);
            settle(&shared, acker.discard().await);
            Wait::Refused(e.to_string())
        }
        Err(e) => {
            tracing::warn!(inbox = %shared.name, message = %message.id, error = %e, "committing a received message failed; the broker delivers it again");
            bump(&counters.retried);
            settle(&shared, acker.retry(shared.retry_delay).await);
            return;
        }
    };
    let (Some(to), Some(replier)) = (answer_to, shared.replier.as_ref()) else {
        return;
    };
    // Free the commit slot while waiting for the outcome, but hold a waiting slot.
    let Ok(waiting) = Arc::clone(&shared.waiting).acquire_owned().await else {
        return;
    };
    drop(slot);
    let reply = outcome_reply(&shared, &message, wait).await;
    match replier.reply(&to, &reply).await {
        Ok(()) => bump(&counters.replies),
        Err(e) => {
            tracing::warn!(inbox = %shared.name, message = %message.id, error = %e, "sending a reply failed; the origin asks again")
        }
    }
    drop(waiting);
}

enum Wait {
    Operation(Option<txbus_core::Operation>),
    Repeat(Option<OperationId>),
    Refused(String),
}

/// The operation a message was first committed as, from its dedupe mark.
async fn first_operation<R>(shared: &Shared<R>, key: &str) -> Result<Option<OperationId>, Error> {
    Ok(match shared.bus.kv_get(key).await? {
        None => None,
        Some(entry) => std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|s| s.parse::<OperationId>().ok()),
    })
}

async fn outcome_reply<R>(shared: &Shared<R>, message: &InboundMessage, wait: Wait) -> RemoteReply {
    let (operation_id, outcome) = match wait {
        Wait::Refused(reason) => {
            return RemoteReply {
                message_id: message.id,
                operation_id: None,
                result: RemoteResult::Refused { reason },
            }
        }
        Wait::Operation(Some(op)) => (Some(op.id()), op.outcome().await),
        Wait::Operation(None) | Wait::Repeat(None) => {
            return RemoteReply {
                message_id: message.id,
                operation_id: None,
                result: RemoteResult::Unknown {
                    reason: "the message was received before, and its dedupe mark does not name its operation".into(),
                },
            }
        }
        Wait::Repeat(Some(id)) => (Some(id), shared.bus.wait(id).await),
    };
    let result = match outcome {
        Ok(outcome) => match outcome.error {
            None => RemoteResult::Succeeded,
            Some(failure) => RemoteResult::Failed { failure },
        },
        Err(e) => RemoteResult::Unknown {
            reason: e.to_string(),
        },
    };
    RemoteReply {
        message_id: message.id,
        operation_id,
        result,
    }
}

fn settle<E: std::fmt::Display, R>(shared: &Shared<R>, result: Result<(), E>) {
    if let Err(e) = result {
        bump(&shared.counters.broker_errors);
        tracing::warn!(inbox = %shared.name, error = %e, "settling a message with the broker failed; it may be delivered again");
    }
}
