//! What the store's calls and its background tasks (writer lanes, sealer, listener) share.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;
use txbus_core::store::Error;

use crate::error::db;
use crate::schema::Schema;

pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) schema: Schema,
    /// Wakes the sealer: commits were appended, here or (through the listener) elsewhere.
    pub(crate) seal_wake: Notify,
    /// How long opening a connection may take.
    pub(crate) connect_timeout: Duration,
    /// When this store last looked for leases of stopped buses, ms since the epoch.
    pub(crate) last_abandoned_scan: AtomicI64,
    /// How long a session may stall before the server ends it (see `PostgresOptions`).
    pub(crate) stall_timeout: Duration,
    /// The key the sealer signs the chain with, when the bus set one.
    pub(crate) signer: crate::commit_meta::SharedSigner,
}

impl Shared {
    /// A connection of its own, outside the pool, for a task that keeps it (a writer lane, the
    /// sealer): it never waits for a pool slot, and a session lock on it never goes back to
    /// the pool.
    pub(crate) async fn dedicated(&self) -> Result<PgConnection, Error> {
        let options = self.pool.connect_options();
        match tokio::time::timeout(self.connect_timeout, PgConnection::connect_with(&options)).await
        {
            Ok(conn) => conn.map_err(db("opening a connection")),
            // An I/O error like any other failed connect, so that callers treat it alike.
            Err(_) => Err(db("opening a connection")(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ),
            ))),
        }
    }
}

/// Returns once the store is stopping (or gone). The guard `wait_for` returns is dropped here,
/// so that callers may await in a `select!` branch after it.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
