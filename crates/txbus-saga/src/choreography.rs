//! Choreography: services that react to each other's events, with no orchestrator. Failure
//! events trigger compensations elsewhere (payment failed → release the items and cancel the
//! order). What keeps such a flow followable is that every reaction carries the same
//! correlation id as its trigger and names the trigger as its cause: [`CausedBy`] sets both,
//! [`Reactor`] publishes a handler's reactions exactly once per trigger, and [`chain`] reads
//! the whole flow back from the log.
//!
//! ```no_run
//! # async fn example(store: impl txbus_core::Store) -> Result<(), txbus_core::Error> {
//! use serde_json::json;
//! use txbus_core::{Bus, Event, Message, On};
//! use txbus_saga::choreography::{chain, ChainQuery, Reactor};
//!
//! let reactor = Reactor::new();
//! let bus = Bus::builder()
//!     .store(store)
//!     .handler("inventory/release", On::event("payment.failed"),
//!         reactor.handler(|msg: Message| async move {
//!             // release what was reserved for msg.payload()["order_id"] …
//!             Ok(vec![Event::new("items.released", json!({"order_id": msg.payload()["order_id"]}))])
//!         }))
//!     .build()
//!     .await?;
//! reactor.bind(bus.clone());
//!
//! bus.publish(Event::new("payment.failed", json!({"order_id": "o-1"})).correlation_id("o-1")).await?;
//! let flow = chain(&bus, "o-1", ChainQuery::default()).await?;
//! for link in &flow.links {
//!     println!("{} caused by {:?}", link.message.event_type, link.message.headers.causation_id);
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use txbus_core::{
    Bus, Commit, CommitRecord, Conflict, Event, Handler, HandlerError, HandlerResult, KvExpect,
    KvWrite, Message, MessageId, StoredMessage,
};

/// Links an event to the message it reacts to.
pub trait CausedBy {
    /// Sets the correlation id to the trigger's (or, when it has none, to the trigger's id:
    /// the trigger starts the flow) and the causation id to the trigger's id.
    fn caused_by(self, trigger: &Message) -> Self;
}

impl CausedBy for Event {
    fn caused_by(self, trigger: &Message) -> Self {
        let correlation = trigger
            .headers()
            .correlation_id
            .clone()
            .unwrap_or_else(|| trigger.id().to_string());
        self.causation_id(trigger.id().to_string())
            .correlation_id(correlation)
    }
}

/// Publishes the events a handler reacts with, linked to their trigger ([`CausedBy`]), in one
/// commit with a mark (`reaction/<handler>/<trigger id>`) that makes a repeated delivery of the
/// same trigger publish nothing more: reactions go out exactly once per trigger and handler,
/// even though the handler itself runs at least once.
#[derive(Clone)]
pub struct Reactor {
    bus: Arc<watch::Sender<Option<Bus>>>,
    mark_ttl: Duration,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("mark_ttl", &self.mark_ttl)
            .finish()
    }
}

impl Default for Reactor {
    fn default() -> Self {
        Self::new()
    }
}

impl Reactor {
    /// A reactor whose marks are kept for 7 days (a trigger redelivered later than that
    /// would react again).
    pub fn new() -> Self {
        Self {
            bus: Arc::new(watch::Sender::new(None)),
            mark_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// How long a trigger's mark is kept.
    pub fn mark_ttl(mut self, ttl: Duration) -> Self {
        self.mark_ttl = ttl;
        self
    }

    /// Binds the built bus; handlers that run before wait for it.
    pub fn bind(&self, bus: Bus) {
        self.bus.send_replace(Some(bus));
    }

    /// A handler that runs `react` and publishes the events it returns.
    pub fn handler<F, Fut>(&self, react: F) -> impl Handler
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Event>, HandlerError>> + Send + 'static,
    {
        ReactHandler {
            reactor: self.clone(),
            react,
        }
    }

    async fn bus(&self) -> Bus {
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
}

struct ReactHandler<F> {
    reactor: Reactor,
    react: F,
}

impl<F, Fut> Handler for ReactHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Event>, HandlerError>> + Send + 'static,
{
    async fn handle(&self, msg: Message) -> HandlerResult {
        let events = (self.react)(msg.clone()).await?;
        if events.is_empty() {
            return Ok(());
        }
        let bus = self.reactor.bus().await;
        let mark = format!("reaction/{}/{}", msg.handler(), msg.id());
        let commit = Commit::new()
            .events(events.into_iter().map(|e| e.caused_by(&msg)))
            .kv(KvWrite::put(mark, Vec::new())
                .expect(KvExpect::Absent)
                .ttl(self.reactor.mark_ttl));
        match bus.commit_unwatched(commit).await {
            Ok(_) => Ok(()),
            // Published by an earlier delivery of the same trigger.
            Err(txbus_core::Error::Conflict(Conflict::Key { .. })) => {
                tracing::debug!(handler = %msg.handler(), trigger = %msg.id(), "reactions already published");
                Ok(())
            }
            Err(e) => Err(HandlerError::transient(e)),
        }
    }
}

/// Bounds of a [`chain`] scan.
#[derive(Debug, Clone, Copy)]
pub struct ChainQuery {
    /// Scan the log after this position (default 0: from the start).
    pub after_position: u64,
    /// Scan at most this many commits (default 100 000).
    pub max_commits: u64,
    /// Stop after finding this many messages (default 10 000).
    pub max_links: usize,
    /// Commits read per page (default 512).
    pub page: usize,
}

impl Default for ChainQuery {
    fn default() -> Self {
        Self {
            after_position: 0,
            max_commits: 100_000,
            max_links: 10_000,
            page: 512,
        }
    }
}

/// One message of a flow, where it is in the log.
#[derive(Debug, Clone)]
pub struct Link {
    /// The position of its commit.
    pub position: u64,
    /// The message.
    pub message: StoredMessage,
}

/// The messages of one flow, in log order.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// The messages.
    pub links: Vec<Link>,
    /// The last log position scanned: pass it as `after_position` to continue.
    pub scanned_to: u64,
    /// True when a bound stopped the scan before the end of the log.
    pub truncated: bool,
}

impl Chain {
    /// The messages whose cause is `id`.
    pub fn caused_by(&self, id: MessageId) -> Vec<&Link> {
        let id = id.to_string();
        self.links
            .iter()
            .filter(|l| l.message.headers.causation_id.as_deref() == Some(id.as_str()))
            .collect()
    }

    /// The first message of a type, if any.
    pub fn find(&self, event_type: &str) -> Option<&Link> {
        self.links
            .iter()
            .find(|l| l.message.event_type == event_type)
    }

    /// The message that caused `link`, if it is in the chain.
    pub fn cause_of(&self, link: &Link) -> Option<&Link> {
        let cause = link.message.headers.causation_id.as_deref()?;
        self.links
            .iter()
            .find(|l| l.message.id.to_string() == cause)
    }

    /// The event types, in log order.
    pub fn event_types(&self) -> Vec<&str> {
        self.links
            .iter()
            .map(|l| l.message.event_type.as_str())
            .collect()
    }

    /// Messages that name a cause which is not in the chain (a broken link; empty for a
    /// chain scanned whole).
    pub fn dangling(&self) -> Vec<&Link> {
        self.links
            .iter()
            .filter(|l| l.message.headers.causation_id.is_some() && self.cause_of(l).is_none())
            .collect()
    }
}

fn belongs(message: &StoredMessage, correlation_id: &str) -> bool {
    message.headers.correlation_id.as_deref() == Some(correlation_id)
        || message.id.to_string() == correlation_id
}

/// Reads the flow of `correlation_id` back from the log: every message whose correlation id it
/// is (and the message whose id it is, the flow's start), in log order, within the bounds of
/// `query`.
pub async fn chain(
    bus: &Bus,
    correlation_id: &str,
    query: ChainQuery,
) -> Result<Chain, txbus_core::Error> {
    let mut out = Chain {
        scanned_to: query.after_position,
        ..Chain::default()
    };
    let page = query.page.clamp(1, 10_000);
    let mut scanned = 0u64;
    loop {
        let commits: Vec<CommitRecord> = bus.read_log(out.scanned_to, page).await?;
        let count = commits.len();
        for commit in commits {
            if scanned >= query.max_commits || out.links.len() >= query.max_links {
                out.truncated = true;
                return Ok(out);
            }
            scanned += 1;
            out.scanned_to = commit.position;
            for message in commit.messages {
                if belongs(&message, correlation_id) {
                    out.links.push(Link {
                        position: commit.position,
                        message,
                    });
                }
            }
        }
        if count < page {
            return Ok(out);
        }
    }
}
