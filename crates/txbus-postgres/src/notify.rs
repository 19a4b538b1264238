//! LISTEN/NOTIFY: telling the buses of every process about new work, finished operations and
//! changed subscriptions.
//!
//! The writer lanes and the sealer do not notify inside their transactions: PostgreSQL commits
//! the transactions that notify one at a time, each holding a database-wide lock through its
//! WAL flush, so notifying writers could never share a flush. They hand what they did to the
//! announcer once it is committed, and the announcer sends it from a connection of its own, a
//! few statements that write nothing (so flush nothing), many notifications each: finished
//! operations go several to a payload. A notification therefore never goes out before what it
//! announces is committed; one whose process stops in between is lost, like those sent while a
//! listener is disconnected, and the buses' poll covers it. (A commit written into the
//! caller's own transaction, [`crate::outbox`], still notifies in that transaction.)
//!
//! One listener task per store receives every channel and fans them out to
//! [`Store::notifications`](txbus_core::store::Store::notifications) streams; it also wakes the
//! sealer on work. Notifications sent while its connection is down are lost, so after each
//! reconnect it reports work anyway; the buses' poll covers the rest.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgConnection;
use tokio::sync::{broadcast, watch};
use txbus_core::store::{Error, Notification, Notifications};
use txbus_core::OperationId;

use crate::context::{stopped, Shared};
use crate::error::db;
use crate::schema::Schema;

/// The payload of the work notification a sealing round sends.
pub(crate) const SEALED: &str = "sealed";

/// Announcements go out at most this often, each carrying all that was posted since the last:
/// every notification costs the server and every listening process some work, taken from the
/// writers on a small machine.
const ANNOUNCE_GAP: Duration = Duration::from_millis(5);

/// Finished operations' ids are sent this many bytes to a payload at most (the server takes
/// 8000).
const MAX_PAYLOAD: usize = 7000;

/// What committed transactions have to announce.
#[derive(Debug, Default)]
pub(crate) struct Announcements {
    /// Deliveries wait to be claimed, or commits wait to be sealed.
    pub(crate) work: bool,
    /// A sealing round gave commits their positions.
    pub(crate) sealed: bool,
    /// Operations that finished.
    pub(crate) finished: Vec<OperationId>,
}

impl Announcements {
    fn is_empty(&self) -> bool {
        !self.work && !self.sealed && self.finished.is_empty()
    }

    pub(crate) fn merge(&mut self, other: Announcements) {
        self.work |= other.work;
        self.sealed |= other.sealed;
        self.finished.extend(other.finished);
    }

    /// The notifications: channels and payloads.
    pub(crate) fn notifications(&self, schema: &Schema) -> (Vec<String>, Vec<String>) {
        let mut channels = Vec::new();
        let mut payloads = Vec::new();
        if self.work {
            channels.push(schema.work_channel.clone());
            payloads.push(String::new());
        }
        if self.sealed {
            channels.push(schema.work_channel.clone());
            payloads.push(SEALED.to_owned());
        }
        let mut payload = String::new();
        for op in &self.finished {
            let id = op.to_string();
            if !payload.is_empty() && payload.len() + 1 + id.len() > MAX_PAYLOAD {
                channels.push(schema.finished_channel.clone());
                payloads.push(std::mem::take(&mut payload));
            }
            if !payload.is_empty() {
                payload.push(',');
            }
            payload.push_str(&id);
        }
        if !payload.is_empty() {
            channels.push(schema.finished_channel.clone());
            payloads.push(payload);
        }
        (channels, payloads)
    }
}

/// Announcements waiting for the announcer.
#[derive(Debug, Default)]
pub(crate) struct Announcer {
    pending: std::sync::Mutex<Announcements>,
    wake: tokio::sync::Notify,
}

impl Announcer {
    /// Queues what a committed transaction did, to be announced shortly.
    pub(crate) fn post(&self, what: Announcements) {
        if what.is_empty() {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merge(what);
        self.wake.notify_one();
    }

    fn take(&self) -> Announcements {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Sends what is posted to the [`Announcer`] until `stop` (and what is posted by then), on a
/// connection of its own, reconnecting when it is lost. What cannot be sent is dropped: the
/// buses' poll covers it.
pub(crate) async fn announce(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conn: Option<PgConnection> = None;
    let mut last = tokio::time::Instant::now();
    loop {
        let stopping = tokio::select! {
            () = async {
                shared.announcer.wake.notified().await;
                tokio::time::sleep_until(last + ANNOUNCE_GAP).await;
            } => false,
            () = stopped(&mut stop) => true,
        };
        last = tokio::time::Instant::now();
        let what = shared.announcer.take();
        if !what.is_empty() {
            if let Err(e) = send(&shared, &mut conn, &what).await {
                conn = None;
                tracing::warn!(error = %e, "announcing commits failed; buses will see them at their next poll");
            }
        }
        if stopping {
            if let Some(conn) = conn.take() {
                let _ = sqlx::Connection::close(conn).await;
            }
            return;
        }
    }
}

async fn send(
    shared: &Shared,
    conn: &mut Option<PgConnection>,
    what: &Announcements,
) -> Result<(), Error> {
    if conn.is_none() {
        *conn = Some(shared.dedicated().await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(Error::Closed);
    };
    let (channels, payloads) = what.notifications(&shared.schema);
    sqlx::query("SELECT count(pg_notify(n.c, n.p)) FROM UNNEST($1::TEXT[], $2::TEXT[]) AS n(c, p)")
        .bind(&channels)
        .bind(&payloads)
        .execute(&mut *c)
        .await
        .map_err(db("announcing commits"))?;
    Ok(())
}

/// Announces changed subscriptions in the caller's transaction.
pub(crate) async fn subscriptions(conn: &mut PgConnection, schema: &Schema) -> Result<(), Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(&schema.subscriptions_channel)
        .execute(&mut *conn)
        .await
        .map_err(db("announcing changed subscriptions"))?;
    Ok(())
}

/// Announces finished operations in the caller's transaction.
pub(crate) async fn finished(
    conn: &mut PgConnection,
    schema: &Schema,
    operations: &[String],
) -> Result<(), Error> {
    if operations.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, op) FROM UNNEST($2::TEXT[]) AS op")
        .bind(&schema.finished_channel)
        .bind(operations)
        .execute(&mut *conn)
        .await
        .map_err(db("announcing finished operations"))?;
    Ok(())
}

/// A stream of what `rx` receives; a receiver that fell behind reports work, since what it
/// missed may have been work.
pub(crate) fn stream(rx: broadcast::Receiver<Notification>) -> Notifications {
    futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(n) => Some((n, rx)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "a notification stream fell behind");
                Some((Notification::Work, rx))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    })
    .boxed()
}

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Listens until `stop`, reconnecting by itself whenever the connection is lost.
pub(crate) async fn listen(
    shared: Arc<Shared>,
    events: broadcast::Sender<Notification>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = FIRST_DELAY;
    let mut first = true;
    loop {
        let connected = tokio::select! {
            r = connect(&shared) => r,
            () = stopped(&mut stop) => return,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "the notification listener cannot connect");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return,
                }
                delay = (delay * 2).min(MAX_DELAY);
                continue;
            }
        };
        delay = FIRST_DELAY;
        if !first {
            tracing::info!("the notification listener reconnected");
            reconnected(&shared, &events);
        }
        first = false;
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                () = stopped(&mut stop) => return,
            };
            match received {
                Ok(Some(n)) => dispatch(&shared, &events, &n),
                Ok(None) => {
                    // The listener has already reconnected and listens again.
                    tracing::info!("the notification listener lost its connection and reconnected");
                    reconnected(&shared, &events);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the notification listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn connect(shared: &Shared) -> Result<PgListener, Error> {
    let mut listener = PgListener::connect_with(&shared.pool)
        .await
        .map_err(db("connecting the notification listener"))?;
    listener
        .listen_all([
            shared.schema.work_channel.as_str(),
            shared.schema.finished_channel.as_str(),
            shared.schema.subscriptions_channel.as_str(),
        ])
        .await
        .map_err(db("listening for notifications"))?;
    Ok(listener)
}

/// What was sent during the outage is lost: report work and changed subscriptions, so that
/// buses claim and re-read routes, and the sealer looks, now rather than at their next poll.
fn reconnected(shared: &Shared, events: &broadcast::Sender<Notification>) {
    shared.seal_wake.notify_one();
    let _ = events.send(Notification::Work);
    let _ = events.send(Notification::Subscriptions);
}

fn dispatch(shared: &Shared, events: &broadcast::Sender<Notification>, n: &PgNotification) {
    let channel = n.channel();
    if channel == shared.schema.work_channel {
        // New commits wake the sealer; a round of the sealer ("sealed") wakes the readers of
        // the log, whose next commits have just got their positions.
        if n.payload() != SEALED {
            shared.seal_wake.notify_one();
        }
        let _ = events.send(Notification::Work);
    } else if channel == shared.schema.subscriptions_channel {
        let _ = events.send(Notification::Subscriptions);
    } else if channel == shared.schema.finished_channel {
        // One operation id, or several separated by commas.
        for id in n.payload().split(',') {
            match id.parse::<OperationId>() {
                Ok(id) => {
                    let _ = events.send(Notification::Finished(id));
                }
                Err(e) => {
                    tracing::debug!(payload = id, error = %e, "ignoring a malformed notification");
                }
            }
        }
    }
}
