//! The transactional outbox: txbus events written inside the caller's own PostgreSQL
//! transaction, so that a service's business rows and the events about them commit, or roll
//! back, together.
//!
//! The service keeps its data in the same database as the store (any schema), validates and
//! routes a [`Commit`](txbus_core::Commit) with [`Bus::prepare`](txbus_core::Bus::prepare)
//! (nothing is written, nothing is leased), and hands the result to
//! [`PostgresStore::append_in`] with the connection of its open transaction. Nothing of the
//! commit is visible until the service commits; then the handlers of every bus on the store
//! take its deliveries (the work notification is sent by the same transaction, so it goes out
//! exactly when the commit does), the sealer gives it its log position, and its outcome can be
//! read or waited for by operation id. If the service rolls back, nothing of it ever existed.
//!
//! [`PostgresStore::append_in`] shows it in code.

use sqlx::{Connection, PgConnection};
use txbus_core::store::{AppendReceipt, Error, NewCommit};

use crate::append::{self, Write, Written};
use crate::clock::now_ms;
use crate::condition;
use crate::error::{db, is_connection_lost, is_stream_taken};
use crate::schema::Schema;
use crate::PostgresStore;

/// Times the append runs again when a stream version was taken behind the locks' back (see
/// the writer lanes): the next round reads the stream and answers with its conflict.
const STREAM_RETRIES: u32 = 3;

impl PostgresStore {
    /// Writes `commit` inside the caller's open transaction on `conn` (pass `&mut tx` of a
    /// `sqlx::Transaction`), in a savepoint of its own. Take the commit from
    /// [`Bus::prepare`](txbus_core::Bus::prepare) on a bus of this store.
    ///
    /// ```no_run
    /// # async fn run(
    /// #     pool: sqlx::PgPool,
    /// #     store: txbus_postgres::PostgresStore,
    /// #     bus: txbus_core::Bus,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use serde_json::json;
    /// use txbus_core::{Commit, Event, ExpectedVersion};
    ///
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO shop.orders (id, total_cents) VALUES ($1, $2)")
    ///     .bind(42_i64)
    ///     .bind(1999_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// let commit = bus.prepare(Commit::new().stream(
    ///     "order-42",
    ///     ExpectedVersion::NoStream,
    ///     [Event::new("order.placed", json!({"id": 42, "total_cents": 1999}))],
    /// ))?;
    /// let operation = commit.operation_id;
    /// store.append_in(&mut tx, commit).await?;
    /// tx.commit().await?; // the order and its events, together
    ///
    /// let outcome = bus.wait(operation).await?; // every handler has run
    /// # let _ = outcome; Ok(()) }
    /// ```
    ///
    /// Everything the commit holds — its row, messages, deliveries, stream versions and key
    /// writes — becomes visible when the caller commits, and vanishes if it rolls back. Its
    /// deliveries are pending, for whichever bus claims them after the commit (a lease named in
    /// the commit is ignored: no bus holds them in memory). The receipt's ids are valid once
    /// the caller has committed.
    ///
    /// Stream and key conditions are checked here, under locks that the caller's transaction
    /// holds until it ends: keep it short, since other writers of the same streams and keys
    /// wait for it. A condition that does not hold returns [`Error::Conflict`] and writes
    /// nothing; the caller's transaction stays usable (roll it back, or go on without the
    /// events). Any other error leaves the savepoint rolled back as well, when the connection
    /// still works.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when `conn` is not inside a transaction started through sqlx (to
    /// commit on its own, use [`Store::append`](txbus_core::store::Store::append)) or the
    /// commit is unusable (it acknowledges deliveries, say); [`Error::Conflict`] as above; [`Error::Closed`] when the store is
    /// closed; [`Error::Backend`] when the database fails.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        mut commit: NewCommit,
    ) -> Result<AppendReceipt, Error> {
        let shared = self.open()?;
        if !conn.is_in_transaction() {
            return Err(Error::Invalid(
                "append_in writes inside the caller's transaction: pass the connection of an \
                 open sqlx transaction (`&mut tx`); to commit on its own, use Store::append"
                    .into(),
            ));
        }
        condition::check_commit(&commit)?;
        if !commit.acks.is_empty() {
            return Err(Error::Invalid(
                "a commit written in the caller's own transaction cannot acknowledge a delivery: \
                 commit it through the bus (Store::append) instead"
                    .into(),
            ));
        }
        commit.lease_to = None;
        for d in &mut commit.deliveries {
            d.leased = false;
        }
        let hash = append::data_hash(&commit);
        let mut retries = 0;
        loop {
            let mut savepoint = conn
                .begin()
                .await
                .map_err(db("starting the append's savepoint"))?;
            match write_one(&mut savepoint, &shared.schema, &commit, &hash).await {
                Ok(receipt) => {
                    savepoint
                        .commit()
                        .await
                        .map_err(db("releasing the append's savepoint"))?;
                    return Ok(receipt);
                }
                Err(e) => {
                    if !is_connection_lost(&e) {
                        if let Err(rollback) = savepoint.rollback().await {
                            tracing::debug!(error = %rollback, "rolling back the append's savepoint failed");
                            return Err(e);
                        }
                    }
                    if is_stream_taken(&e) && retries < STREAM_RETRIES {
                        retries += 1;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Writes one commit in the caller's (sub)transaction and announces its outcome if it has no
/// deliveries; the announcements go out when the caller commits.
async fn write_one(
    conn: &mut PgConnection,
    schema: &Schema,
    commit: &NewCommit,
    hash: &txbus_core::chain::Hash,
) -> Result<AppendReceipt, Error> {
    // No sealer of this process learns of the commit otherwise: announce it to all of them.
    // In the caller's transaction, so that they go out when it commits.
    let results = append::write(
        conn,
        schema,
        &[Write::Commit(commit, hash)],
        now_ms(),
        true,
        None,
    )
    .await?;
    match results.into_iter().next() {
        Some(Ok(Written::Commit(receipt))) => Ok(receipt),
        Some(Err(conflict)) => Err(Error::Conflict(conflict)),
        _ => Err(Error::Corrupt(
            "the append answered something other than its commit".into(),
        )),
    }
}
