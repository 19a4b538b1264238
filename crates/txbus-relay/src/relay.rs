//! The outbox relay: an ordered subscription over the log whose side effect is a broker
//! publish, with a checkpoint that advances only over what the broker confirmed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::OptionFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use txbus_core::{Backoff, Bus, On};

use crate::checkpoint::{is_conflict, Checkpoint};
use crate::error::Error;
use crate::metrics::RelayMetrics;
use crate::outbound::OutboundMessage;
use crate::publisher::Publisher;
use crate::route::{Route, SubjectRoute};

/// Entry point: `Relay::builder(bus, name, publisher)`.
///
/// A relay reads the bus's log in commit order from its checkpoint, keeps the messages its
/// filter takes, maps each to a destination with its [`Route`], and publishes them through a
/// [`Publisher`], many batches in flight at once. Its checkpoint (key
/// `relay/<name>/checkpoint` in the store's key–value space) advances, by compare-and-set, only
/// over commits whose messages the broker has confirmed, in log order. After a broker error it
/// backs off and sends again from the checkpoint: delivery to the broker is at-least-once, and
/// the message id lets the broker and the receiving inbox drop the repeats.
///
/// Run one relay per name. A second relay with the same name is safe but wasteful: each
/// checkpoint write expects the version the writer last saw, so when two relays race, the
/// loser reloads the checkpoint, backs off and resumes from there (repeats, never gaps).
#[derive(Debug, Clone, Copy)]
pub struct Relay;

impl Relay {
    /// Configures a relay named `name` (its identity across restarts: the checkpoint's key)
    /// on `bus`, publishing through `publisher`.
    pub fn builder<P: Publisher>(
        bus: Bus,
        name: impl Into<String>,
        publisher: P,
    ) -> RelayBuilder<P> {
        RelayBuilder {
            bus,
            name: name.into(),
            publisher,
            filter: On::all(),
            system: false,
            route: Arc::new(SubjectRoute::default()),
            read_batch: 512,
            max_in_flight: 4096,
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::exponential(Duration::from_millis(100)).max(Duration::from_secs(10)),
        }
    }
}

/// Configures a [`Relay`]; [`start`](Self::start) runs it.
pub struct RelayBuilder<P> {
    bus: Bus,
    name: String,
    publisher: P,
    filter: On,
    system: bool,
    route: Arc<dyn Route>,
    read_batch: usize,
    max_in_flight: usize,
    poll_interval: Duration,
    backoff: Backoff,
}

impl<P> std::fmt::Debug for RelayBuilder<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("read_batch", &self.read_batch)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> RelayBuilder<P> {
    /// Which messages to relay (default: every message). Commits with no matching message
    /// still advance the checkpoint.
    pub fn filter(mut self, on: On) -> Self {
        self.filter = on;
        self
    }

    /// Relays the bus's system commits (start-up and shutdown records) too; by default they
    /// are skipped.
    pub fn system_commits(mut self, relay: bool) -> Self {
        self.system = relay;
        self
    }

    /// Where each message goes on the broker (default [`SubjectRoute`] with prefix `txbus`:
    /// `txbus.<module>.<event type>`).
    pub fn route(mut self, route: impl Route) -> Self {
        self.route = Arc::new(route);
        self
    }

    /// Commits read from the log at a time, sent to the broker as one batch (default 512).
    pub fn read_batch(mut self, commits: usize) -> Self {
        self.read_batch = commits;
        self
    }

    /// Messages sent and not yet confirmed, at most (default 4096); past it the relay waits
    /// for confirmations before reading on. One batch may overshoot it.
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.max_in_flight = messages;
        self
    }

    /// How often the log is read when nothing announced a commit (default 1 s): commits of
    /// this bus wake the relay at once, commits made by other processes on a shared store are
    /// seen at this interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The wait after a broker or store failure, growing with consecutive failures (default
    /// exponential from 100 ms up to 10 s, with jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Reads the checkpoint and starts relaying in a background task.
    pub async fn start(self) -> Result<RelayHandle, Error> {
        if self.name.is_empty()
            || self.name.len() > 200
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
        {
            return Err(Error::Config(format!(
                "relay name {:?} must be 1 to 200 ASCII letters, digits or . _ - :",
                self.name
            )));
        }
        if self.read_batch == 0 || self.max_in_flight == 0 || self.poll_interval.is_zero() {
            return Err(Error::Config(
                "read_batch, max_in_flight and poll_interval must be above zero".into(),
            ));
        }
        let checkpoint = Checkpoint::load(&self.bus, &self.name).await?;
        let initial = RelayStatus {
            checkpoint: checkpoint.position,
            confirmed: checkpoint.position,
            head: checkpoint.position,
            ..RelayStatus::default()
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let (stop_tx, stop_rx) = watch::channel(None);
        let name = self.name.clone();
        let worker = Worker {
            bus: self.bus,
            name: self.name,
            publisher: self.publisher,
            filter: self.filter,
            system: self.system,
            route: self.route,
            read_batch: self.read_batch,
            max_in_flight: self.max_in_flight,
            poll_interval: self.poll_interval,
            backoff: self.backoff,
            status: status_tx,
            metrics: RelayMetrics::new(&name),
        };
        let task = tokio::spawn(worker.run(checkpoint, stop_rx));
        Ok(RelayHandle {
            name,
            status: status_rx,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

/// Where a relay stands. `head - checkpoint` is its lag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// The stored checkpoint: every message up to this log position is confirmed by the
    /// broker, durably recorded.
    pub checkpoint: u64,
    /// The log position up to which the broker has confirmed (stored shortly after).
    pub confirmed: u64,
    /// The highest log position the relay has read. While the relay is behind it reads ahead
    /// only as far as its in-flight limit, so this is a lower bound of the log's end.
    pub head: u64,
    /// Messages sent and awaiting confirmation.
    pub in_flight: usize,
    /// Messages the broker confirmed since the relay started (repeats after a failure
    /// included).
    pub published: u64,
    /// Broker and store failures since the relay started.
    pub failures: u64,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// True when the relay has read to the end of the log and everything it read is confirmed
    /// and its checkpoint stored.
    pub idle: bool,
    /// True once the relay has stopped.
    pub stopped: bool,
    reads_started: u64,
    idle_read: u64,
}

impl RelayStatus {
    /// Log positions read or not, not yet covered by the stored checkpoint.
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.checkpoint)
    }
}

/// A running relay. Dropping it stops the relay (letting in-flight confirmations and the last
/// checkpoint write finish for up to five seconds); [`shutdown`](Self::shutdown) does the same
/// and waits.
#[derive(Debug)]
pub struct RelayHandle {
    name: String,
    status: watch::Receiver<RelayStatus>,
    stop: watch::Sender<Option<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the relay stands now.
    pub fn status(&self) -> RelayStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every change of [`status`](Self::status).
    pub fn watch(&self) -> watch::Receiver<RelayStatus> {
        self.status.clone()
    }

    /// Waits until the relay has published, had confirmed and checkpointed every message
    /// committed before this call (it has read the end of the log after the call, and nothing
    /// is left in flight).
    pub async fn drained(&self) -> Result<RelayStatus, Error> {
        let mut rx = self.status.clone();
        let start = rx.borrow_and_update().reads_started;
        let status = rx
            .wait_for(|s| (s.idle && s.idle_read > start) || s.stopped)
            .await
            .map_err(|_| Error::TaskFailed("relay"))?
            .clone();
        if status.stopped {
            return Err(Error::Config(format!(
                "relay {:?} stopped before it had relayed the log",
                self.name
            )));
        }
        Ok(status)
    }

    /// Stops reading, waits up to `deadline` for the broker to confirm what is in flight and
    /// for the checkpoint to be stored, then stops. What was not confirmed is sent again by
    /// the next relay of this name.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<RelayStatus, Error> {
        self.stop.send_replace(Some(deadline));
        if let Some(task) = self.task.take() {
            task.await.map_err(|_| Error::TaskFailed("relay"))?;
        }
        Ok(self.status.borrow().clone())
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.send_replace(Some(Duration::from_secs(5)));
        }
    }
}

type Confirmation = Pin<Box<dyn Future<Output = Result<(u64, usize), String>> + Send>>;
type CheckpointWrite = Pin<Box<dyn Future<Output = Result<Vec<u64>, txbus_core::Error>> + Send>>;

struct Worker<P> {
    bus: Bus,
    name: String,
    publisher: P,
    filter: On,
    system: bool,
    route: Arc<dyn Route>,
    read_batch: usize,
    max_in_flight: usize,
    poll_interval: Duration,
    backoff: Backoff,
    status: watch::Sender<RelayStatus>,
    metrics: RelayMetrics,
}

/// The relay's moving parts, kept by its one task.
struct State {
    checkpoint: Checkpoint,
    /// Confirmations in log order, each with the position it covers and its message count.
    pending: FuturesOrdered<Confirmation>,
    /// The checkpoint write in progress, with the position it writes.
    writing: Option<(u64, CheckpointWrite)>,
    read_position: u64,
    confirmed: u64,
    head: u64,
    in_flight: usize,
    caught_up: bool,
    retry_at: Option<Instant>,
    failures_in_row: u32,
    reads: u64,
    idle_read: u64,
    /// The error last recorded in the key–value space, for other processes to see.
    recorded_error: Option<String>,
}

impl<P: Publisher> Worker<P> {
    /// Records the relay's error in the key–value space when it changed (in the background:
    /// the relay does not wait for it).
    fn record_error(&self, st: &mut State, error: Option<String>) {
        if st.recorded_error == error {
            return;
        }
        st.recorded_error = error.clone();
        let bus = self.bus.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) =
                txbus_core::inspect::record_runner_error(&bus, "relay", &name, error.as_deref())
                    .await
            {
                tracing::debug!(relay = %name, error = %e, "recording the last error failed");
            }
        });
    }

    async fn run(self, checkpoint: Checkpoint, mut stop: watch::Receiver<Option<Duration>>) {
        let mut changes = self.bus.log_changes();
        let mut changes_open = true;
        let mut st = State {
            read_position: checkpoint.position,
            confirmed: checkpoint.position,
            head: checkpoint.position,
            checkpoint,
            pending: FuturesOrdered::new(),
            writing: None,
            in_flight: 0,
            caught_up: false,
            retry_at: None,
            failures_in_row: 0,
            reads: 0,
            idle_read: 0,
            recorded_error: None,
        };
        let mut stop_at: Option<Instant> = None;
        tracing::debug!(relay = %self.name, from = st.read_position, "relay started");
        loop {
            if st.writing.is_none()
                && st.retry_at.is_none()
                && st.confirmed > st.checkpoint.position
            {
                let write = st.checkpoint.advance(st.confirmed);
                let bus = self.bus.clone();
                st.writing = Some((
                    st.confirmed,
                    Box::pin(async move { bus.kv_write(vec![write]).await }),
                ));
            }
            let idle = st.caught_up
                && st.pending.is_empty()
                && st.writing.is_none()
                && st.retry_at.is_none();
            self.publish_status(&st, idle);
            if stop_at.is_some() && st.pending.is_empty() && st.writing.is_none() {
                break;
            }
            let can_read = stop_at.is_none()
                && st.retry_at.is_none()
                && !st.caught_up
                && st.in_flight < self.max_in_flight;
            let retry_sleep = tokio::time::sleep_until(st.retry_at.unwrap_or_else(Instant::now));
            let stop_sleep = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now));
            let has_write = st.writing.is_some();
            let has_pending = !st.pending.is_empty();
            tokio::select! {
                biased;
                Some(result) = st.pending.next(), if has_pending => match result {
                    Ok((position, count)) => {
                        st.confirmed = position;
                        st.in_flight = st.in_flight.saturating_sub(count);
                        st.failures_in_row = 0;
                        self.metrics.published(count);
                        self.status.send_modify(|s| {
                            s.published += count as u64;
                            s.last_error = None;
                        });
                        if st.recorded_error.is_some() {
                            self.record_error(&mut st, None);
                        }
                    }
                    Err(e) => self.broker_failed(&mut st, e),
                },
                Some(result) = OptionFuture::from(st.writing.as_mut().map(|(_, f)| f)), if has_write => {
                    let written = st.writing.take().map_or(0, |(p, _)| p);
                    match result {
                        Ok(versions) => {
                            st.checkpoint.position = written;
                            st.checkpoint.version = versions.first().copied();
                        }
                        Err(e) if is_conflict(&e, &st.checkpoint.key) => self.checkpoint_taken(&mut st).await,
                        Err(e) => self.store_failed(&mut st, format!("storing the checkpoint failed: {e}")),
                    }
                }
                () = std::future::ready(()), if can_read => self.read_and_send(&mut st, &mut changes).await,
                () = retry_sleep, if st.retry_at.is_some() => st.retry_at = None,
                changed = changes.changed(), if st.caught_up && changes_open && stop_at.is_none() => {
                    if changed.is_err() {
                        changes_open = false;
                    }
                    st.caught_up = false;
                }
                () = tokio::time::sleep(self.poll_interval), if st.caught_up && stop_at.is_none() => st.caught_up = false,
                changed = stop.changed(), if stop_at.is_none() => {
                    let grace = match changed {
                        Ok(()) => stop.borrow().unwrap_or(Duration::ZERO),
                        Err(_) => Duration::from_secs(5),
                    };
                    stop_at = Some(Instant::now() + grace);
                    st.retry_at = None;
                }
                () = stop_sleep, if stop_at.is_some() => break,
            }
        }
        let left = st.in_flight;
        self.status.send_modify(|s| {
            s.stopped = true;
            s.idle = false;
            s.in_flight = left;
        });
        tracing::debug!(relay = %self.name, checkpoint = st.checkpoint.position, unconfirmed = left, "relay stopped");
    }

    fn publish_status(&self, st: &State, idle: bool) {
        self.metrics
            .lag(st.head.saturating_sub(st.checkpoint.position));
        self.status.send_if_modified(|s| {
            let before = (
                s.checkpoint,
                s.confirmed,
                s.head,
                s.in_flight,
                s.idle,
                s.reads_started,
                s.idle_read,
            );
            s.checkpoint = st.checkpoint.position;
            s.confirmed = st.confirmed;
            s.head = st.head;
            s.in_flight = st.in_flight;
            s.idle = idle;
            s.reads_started = st.reads;
            s.idle_read = st.idle_read;
            before
                != (
                    s.checkpoint,
                    s.confirmed,
                    s.head,
                    s.in_flight,
                    s.idle,
                    s.reads_started,
                    s.idle_read,
                )
        });
    }

    /// Reads the next commits after the read position and hands their messages to the broker.
    async fn read_and_send(&self, st: &mut State, changes: &mut watch::Receiver<u64>) {
        // Anything committed from here on changes `changes`, so a later wait cannot miss it.
        changes.borrow_and_update();
        st.reads += 1;
        self.status.send_modify(|s| s.reads_started = st.reads);
        let commits = match self.bus.read_log(st.read_position, self.read_batch).await {
            Ok(c) => c,
            Err(e) => return self.store_failed(st, format!("reading the log failed: {e}")),
        };
        let Some(last) = commits.last().map(|c| c.position) else {
            st.caught_up = true;
            st.idle_read = st.reads;
            return;
        };
        let mut batch = Vec::new();
        // Each message's span lasts until the broker confirms it.
        let mut spans = Vec::new();
        for commit in commits {
            if commit.is_system() && !self.system {
                continue;
            }
            for (index, message) in commit.messages.into_iter().enumerate() {
                if self.filter.matches(&message) {
                    let destination = self.route.destination(&message);
                    let mut outbound = OutboundMessage::from_stored(
                        message,
                        commit.operation_id,
                        commit.position,
                        u32::try_from(index).unwrap_or(u32::MAX),
                        destination,
                    );
                    let span = crate::trace::relay_span(&self.name, &mut outbound);
                    if !span.is_disabled() {
                        spans.push(span);
                    }
                    batch.push(outbound);
                }
            }
        }
        st.head = st.head.max(last);
        if batch.is_empty() {
            st.read_position = last;
            st.pending
                .push_back(Box::pin(std::future::ready(Ok((last, 0)))));
            return;
        }
        match self.publisher.send_batch(&batch).await {
            Ok(confirm) => {
                let count = batch.len();
                st.read_position = last;
                st.in_flight += count;
                st.pending.push_back(Box::pin(async move {
                    let confirmed = confirm.await;
                    drop(spans);
                    confirmed.map(|()| (last, count)).map_err(|e| e.to_string())
                }));
            }
            Err(e) => self.broker_failed(st, e.to_string()),
        }
    }

    /// The broker failed: forget what is in flight, back off, send again from the last
    /// confirmed position.
    fn broker_failed(&self, st: &mut State, error: String) {
        tracing::warn!(relay = %self.name, error = %error, resume_from = st.confirmed, "broker publish failed; sending again after a backoff");
        st.pending = FuturesOrdered::new();
        st.in_flight = 0;
        st.read_position = st.confirmed;
        self.back_off(st, error);
    }

    fn store_failed(&self, st: &mut State, error: String) {
        tracing::warn!(relay = %self.name, error = %error, "store failed; retrying after a backoff");
        self.back_off(st, error);
    }

    fn back_off(&self, st: &mut State, error: String) {
        st.caught_up = false;
        st.failures_in_row = st.failures_in_row.saturating_add(1);
        self.metrics.failed();
        st.retry_at = Some(Instant::now() + self.backoff.delay(st.failures_in_row));
        self.record_error(st, Some(error.clone()));
        self.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(error);
        });
    }

    /// Another relay with the same name moved the checkpoint: resume from where it is.
    async fn checkpoint_taken(&self, st: &mut State) {
        tracing::warn!(relay = %self.name, "the checkpoint was advanced by another relay with the same name; resuming from the stored checkpoint");
        match Checkpoint::load(&self.bus, &self.name).await {
            Ok(c) => {
                st.pending = FuturesOrdered::new();
                st.in_flight = 0;
                st.confirmed = c.position;
                st.read_position = c.position;
                st.head = st.head.max(c.position);
                st.checkpoint = c;
                self.back_off(
                    st,
                    "checkpoint advanced by another relay with the same name".into(),
                );
            }
            Err(e) => self.store_failed(st, format!("reloading the checkpoint failed: {e}")),
        }
    }
}
