//! What the store's calls and its background tasks (writer lanes, sealer, listener) share.

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
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
    /// True while this process's sealer holds the sealer lock: appends then wake it directly
    /// and need not announce themselves to the sealers of other processes.
    pub(crate) seal_active: AtomicBool,
    /// What committed transactions have to announce (see [`crate::notify`]).
    pub(crate) announcer: crate::notify::Announcer,
}

impl Shared {
    /// A connection of its own, outside the pool, for a task that keeps it (a writer lane, the
    /// sealer): it never waits for a pool slot, and a session lock on it never goes back to
    /// the pool.
    ///
    /// Its statements are planned once and the plan kept (`force_generic_plan`), which saves
    /// planning each time. That is safe because every statement these tasks run reaches table
    /// rows only through keys (ids, owners, keys given as parameters, or index ranges) and
    /// sequential scans are ruled out for the session: a plan made while a table is empty is
    /// then the same index lookup as one made when it holds millions of rows. Statements whose
    /// best plan does depend on the data (retention, releases, dead-letter actions) ask for a
    /// fresh plan in their own transaction (see [`custom_plans`]).
    pub(crate) async fn dedicated(&self) -> Result<PgConnection, Error> {
        let options = (*self.pool.connect_options()).clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            // A plan that a disabled sequential scan would price high must not be compiled
            // (JIT): that takes longer than the whole statement.
            ("jit", "off"),
        ]);
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

/// Plans the rest of the caller's transaction afresh for each statement, with sequential scans
/// allowed: for the few statements of the writer lanes whose best plan depends on the data.
pub(crate) async fn custom_plans(conn: &mut PgConnection) -> Result<(), Error> {
    // Unprepared (simple protocol), so that one string may hold both settings.
    conn.execute("SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_seqscan = on")
        .await
        .map_err(db("planning maintenance statements afresh"))?;
    Ok(())
}
