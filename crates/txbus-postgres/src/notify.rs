//! LISTEN/NOTIFY: telling the buses of every process about new work, finished operations and
//! changed subscriptions.
//!
//! Writers send `pg_notify` inside their transactions, so a notification goes out exactly when
//! what it announces is committed. One listener task per store receives every channel and fans
//! them out to [`Store::notifications`](txbus_core::store::Store::notifications) streams; it
//! also wakes the sealer on work. Notifications sent while its connection is down are lost, so
//! after each reconnect it reports work anyway; the buses' poll covers the rest.

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

/// Announces work (new commits, deliveries back to pending) in the caller's transaction.
pub(crate) async fn work(conn: &mut PgConnection, schema: &Schema) -> Result<(), Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(&schema.work_channel)
        .execute(&mut *conn)
        .await
        .map_err(db("announcing work"))?;
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
        match n.payload().parse::<OperationId>() {
            Ok(id) => {
                let _ = events.send(Notification::Finished(id));
            }
            Err(e) => {
                tracing::debug!(payload = n.payload(), error = %e, "ignoring a malformed notification");
            }
        }
    }
}
