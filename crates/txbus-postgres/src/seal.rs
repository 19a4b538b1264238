//! The chain sealer: gives committed commits their log positions and chain hashes.
//!
//! Writers insert commits unsealed (no position), so they never wait for one another on the
//! chain. One sealer in the whole database is active at a time: the one whose session holds
//! the schema's advisory lock. Each round it takes the chain head and the unsealed commits
//! that are visible (committed), in id order, and links them after the head. A commit whose
//! transaction is still open is not visible yet and is sealed in a later round, at a later
//! position: readers by position never see a gap fill in behind them, and a rolled-back
//! transaction leaves nothing to wait for. If the active sealer's session ends, the lock goes
//! with it and another process's sealer takes over.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use txbus_core::chain::{self, Hash};
use txbus_core::store::Error;

use crate::context::{stopped, Shared};
use crate::error::{db, is_connection_lost};
use crate::schema::Schema;

/// Most commits sealed in one round.
const ROUND: usize = 1000;
/// How often an idle active sealer looks for work nobody announced.
const POLL: Duration = Duration::from_millis(50);
/// How often a standby sealer tries to take over.
const STANDBY: Duration = Duration::from_millis(500);
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// How a session of the sealer ended.
enum Ended {
    /// The store is closing.
    Stopped,
    /// The connection failed; connect again.
    Lost(Error),
}

/// Runs until `stop`: standby while another session holds the lock, active once it has it,
/// reconnecting by itself whenever its connection is lost.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut delay = FIRST_DELAY;
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = tokio::select! {
            r = shared.dedicated() => r,
            () = stopped(&mut stop) => return,
        };
        let ended = match connected {
            Ok(conn) => {
                delay = FIRST_DELAY;
                session(&shared, conn, &mut stop).await
            }
            Err(e) => Ended::Lost(e),
        };
        match ended {
            Ended::Stopped => return,
            Ended::Lost(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "the chain sealer lost its connection; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return,
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}

/// One connection's life: wait for the lock, then seal until stopped or disconnected.
async fn session(
    shared: &Shared,
    mut conn: PgConnection,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let schema = &shared.schema;
    // A sealer that is frozen rather than dead would keep the lock for ever: the server ends
    // its session once it has been idle this long (an active sealer is never idle for long).
    let idle = format!(
        "SET idle_session_timeout = '{}ms'",
        shared.stall_timeout.as_millis()
    );
    if let Err(e) = sqlx::query(&idle).execute(&mut conn).await {
        return Ended::Lost(db("limiting the sealer's idle time")(e));
    }
    loop {
        let got: Result<bool, Error> = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(schema.seal_key)
            .fetch_one(&mut conn)
            .await
            .map_err(db("taking the sealer lock"));
        match got {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Ended::Lost(e),
        }
        tokio::select! {
            () = tokio::time::sleep(STANDBY) => {}
            () = stopped(stop) => {
                let _ = conn.close().await;
                return Ended::Stopped;
            }
        }
    }
    tracing::info!(schema = schema.name(), "this process seals the chain");
    loop {
        match seal(
            &mut conn,
            schema,
            crate::commit_meta::current(&shared.signer).as_deref(),
        )
        .await
        {
            Ok(n) if n >= ROUND => continue,
            Ok(_) => {}
            Err(e) if is_connection_lost(&e) => return Ended::Lost(e),
            Err(e) => tracing::error!(error = %e, "sealing the chain failed; retrying"),
        }
        tokio::select! {
            () = shared.seal_wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            () = stopped(stop) => {
                // What this process appended before closing is sealed before it lets go.
                loop {
                    match seal(&mut conn, schema, crate::commit_meta::current(&shared.signer).as_deref()).await {
                        Ok(n) if n >= ROUND => continue,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "the last sealing round failed"),
                    }
                    break;
                }
                if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(schema.seal_key)
                    .execute(&mut conn)
                    .await
                {
                    tracing::debug!(error = %e, "releasing the sealer lock failed; closing releases it");
                }
                let _ = conn.close().await;
                return Ended::Stopped;
            }
        }
    }
}

fn hash(bytes: &[u8], what: &str) -> Hash {
    let mut h = [0u8; 32];
    if bytes.len() == h.len() {
        h.copy_from_slice(bytes);
    } else {
        // Linking it anyway keeps the log moving; verification reports this commit.
        tracing::error!(len = bytes.len(), what, "a stored hash is not 32 bytes");
        let n = bytes.len().min(h.len());
        h[..n].copy_from_slice(&bytes[..n]);
    }
    h
}

/// One round: seals up to [`ROUND`] visible unsealed commits; returns how many. A commit whose
/// row a writer holds right now (recording an attempt) is skipped and sealed in a later round:
/// the sealer never waits for the writers, and positions need not follow ids.
pub(crate) async fn seal(
    conn: &mut PgConnection,
    schema: &Schema,
    signer: Option<&txbus_core::signing::CommitSigner>,
) -> Result<usize, Error> {
    let pending: bool = sqlx::query_scalar(
        &schema.sql("SELECT EXISTS (SELECT 1 FROM {s}.commits WHERE position IS NULL)"),
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db("looking for unsealed commits"))?;
    if !pending {
        return Ok(0);
    }
    let mut tx = conn.begin().await.map_err(db("starting a sealing round"))?;
    let (head, parent): (i64, Vec<u8>) =
        sqlx::query_as(&schema.sql("SELECT position, chain_hash FROM {s}.chain_head FOR UPDATE"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db("reading the chain head"))?;
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(&schema.sql(
        "SELECT id, data_hash FROM {s}.commits WHERE position IS NULL
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    ))
    .bind(ROUND as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading unsealed commits"))?;
    if rows.is_empty() {
        tx.rollback().await.map_err(db("ending a sealing round"))?;
        return Ok(0);
    }
    let mut chain = hash(&parent, "chain head");
    let mut ids = Vec::with_capacity(rows.len());
    let mut positions = Vec::with_capacity(rows.len());
    let mut chains = Vec::with_capacity(rows.len());
    let mut position = head;
    for (id, data) in &rows {
        position += 1;
        chain = chain::chain_hash(&hash(data, "data hash"), &chain);
        ids.push(*id);
        positions.push(position);
        chains.push(chain.to_vec());
    }
    sqlx::query(&schema.sql(
        "UPDATE {s}.commits c SET position = v.position, chain_hash = v.chain
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BYTEA[]) AS v(id, position, chain)
         WHERE c.id = v.id",
    ))
    .bind(&ids)
    .bind(&positions)
    .bind(&chains)
    .execute(&mut *tx)
    .await
    .map_err(db("sealing commits"))?;
    sqlx::query(&schema.sql("UPDATE {s}.chain_head SET position = $1, chain_hash = $2"))
        .bind(position)
        .bind(&chain[..])
        .execute(&mut *tx)
        .await
        .map_err(db("moving the chain head"))?;
    crate::commit_meta::sign_round(&mut tx, schema, signer, position, &chain).await?;
    tx.commit()
        .await
        .map_err(db("committing a sealing round"))?;
    tracing::trace!(sealed = rows.len(), head = position, "sealed commits");
    Ok(rows.len())
}
