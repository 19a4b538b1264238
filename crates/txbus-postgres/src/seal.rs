//! The chain sealer: gives committed commits their log positions and chain hashes.
//!
//! Writers insert commits unsealed, so they never wait for one another on the chain. One sealer
//! in the whole database is active at a time: the one whose session holds the schema's advisory
//! lock. Each round it reads the chain head and the unsealed commits that are visible
//! (committed), in id order, and links them after the head. A commit whose transaction is
//! still open is not visible yet and is sealed in a later round, at a later position: readers
//! by position never see a gap fill in behind them, and a rolled-back transaction leaves
//! nothing to wait for. If the active sealer's session ends, the lock goes with it and another
//! process's sealer takes over.
//!
//! Positions and chain hashes live in `commit_seals`, a table of their own: the sealer only
//! ever inserts there, and never touches the commit rows that acknowledgements update, so
//! neither waits for the other.
//!
//! Finding what is unsealed without a flag on the commit rows: every commit row carries the id
//! of the transaction that wrote it (`xid`), and the chain head keeps the snapshot of the last
//! round that sealed everything it saw (its `xmax` and in-progress ids). A transaction below
//! that `xmax` and not in progress then had finished when that round looked, so its commits
//! were sealed then or were rolled back; only transactions at or above `xmax`, or in progress
//! then, can have left unsealed commits. A round looks at exactly those, through an index.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use txbus_core::chain::{self, Hash};
use txbus_core::signing::CommitSigner;
use txbus_core::store::Error;

use crate::context::{stopped, Shared};
use crate::error::{db, is_connection_lost};
use crate::schema::Schema;

/// The schema the sealer reads and writes (a migration of `schema.rs`): sealed positions move
/// from the commit rows to `commit_seals`; commit rows get the id of the transaction that
/// wrote them, the chain head the snapshot of the last complete round. Commits written before
/// are either sealed (moved) or marked as written by the oldest transaction the first round
/// looks at.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE {s}.commit_seals (
    commit_id  BIGINT PRIMARY KEY,
    position   BIGINT NOT NULL UNIQUE,
    chain_hash BYTEA  NOT NULL
);
INSERT INTO {s}.commit_seals (commit_id, position, chain_hash)
SELECT id, position, chain_hash FROM {s}.commits WHERE position IS NOT NULL;

ALTER TABLE {s}.commits ADD COLUMN xid BIGINT NOT NULL DEFAULT 1;
UPDATE {s}.commits SET xid = 2 WHERE position IS NULL;
ALTER TABLE {s}.commits ALTER COLUMN xid SET DEFAULT pg_current_xact_id()::TEXT::BIGINT;
ALTER TABLE {s}.commits DROP COLUMN position, DROP COLUMN chain_hash;
CREATE INDEX commits_xid ON {s}.commits (xid);

ALTER TABLE {s}.chain_head ADD COLUMN seal_xmax BIGINT   NOT NULL DEFAULT 2,
                           ADD COLUMN seal_xip  BIGINT[] NOT NULL DEFAULT '{}';
"#;

/// Most commits sealed in one round.
const ROUND: usize = 1000;
/// Rounds start at least this far apart, so that commits that keep coming are sealed together
/// (one write, one flush, for many) instead of each in a round of its own.
const GAP: Duration = Duration::from_millis(GAP_MS);
const GAP_MS: u64 = 5;
/// How often an idle active sealer looks for work nobody announced.
const POLL: Duration = Duration::from_millis(50);
/// How often a standby sealer tries to take over.
const STANDBY: Duration = Duration::from_millis(500);
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// The head, the round's snapshot and the unsealed visible commits, in one statement (so one
/// snapshot): commits of transactions that the last complete round could not see finished,
/// without a seal, in id order. The candidates are gathered first, through the index on
/// `xid` (a probe of the seals per candidate, as a subquery, so that it stays an index probe
/// whatever the planner thinks of the tables' sizes), and only then sorted and cut: with the
/// order and the limit on the scan itself, a plan could walk the whole table in id order
/// hoping to meet candidates early.
pub(crate) const READ_ROUND: &str = "
WITH h AS MATERIALIZED (
         SELECT position, chain_hash, seal_xmax, seal_xip FROM {s}.chain_head),
     candidates AS MATERIALIZED (
         SELECT c.id, c.data_hash FROM {s}.commits c, h
         WHERE (c.xid >= h.seal_xmax OR c.xid = ANY (h.seal_xip))
           AND (SELECT true FROM {s}.commit_seals s WHERE s.commit_id = c.id) IS NULL)
SELECT h.position, h.chain_hash,
       pg_snapshot_xmax(pg_current_snapshot())::TEXT::BIGINT,
       ARRAY(SELECT x::TEXT::BIGINT FROM pg_snapshot_xip(pg_current_snapshot()) AS x),
       p.ids, p.hashes
FROM h CROSS JOIN LATERAL (
         SELECT array_agg(u.id ORDER BY u.id) AS ids,
                array_agg(u.data_hash ORDER BY u.id) AS hashes
         FROM (SELECT id, data_hash FROM candidates ORDER BY id LIMIT $1) AS u) AS p";

/// The round's seals, the new head (only if the head is still where the round read it), the
/// snapshot to start from next time (when the round saw everything) and the signature, all or
/// nothing in one statement.
const WRITE_ROUND: &str = "
WITH h AS (
         UPDATE {s}.chain_head
         SET position = $4, chain_hash = $5,
             seal_xmax = COALESCE($6, seal_xmax), seal_xip = COALESCE($7, seal_xip)
         WHERE position = $8
         RETURNING position),
     s AS (
         INSERT INTO {s}.commit_seals (commit_id, position, chain_hash)
         SELECT v.id, v.position, v.chain
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BYTEA[]) AS v(id, position, chain)
         WHERE EXISTS (SELECT 1 FROM h)),
     g AS (
         INSERT INTO {s}.commit_signatures (position, key_id, signature)
         SELECT h.position, $9, $10::BYTEA FROM h WHERE $9::TEXT IS NOT NULL)
SELECT count(*)::BIGINT FROM h";

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
                let ended = session(&shared, conn, &mut stop).await;
                shared.seal_active.store(false, Ordering::Release);
                ended
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
    shared.seal_active.store(true, Ordering::Release);
    tracing::info!(schema = schema.name(), "this process seals the chain");
    loop {
        let started = tokio::time::Instant::now();
        match seal(&mut conn, shared).await {
            Ok(n) if n >= ROUND => continue,
            Ok(_) => {}
            Err(e) if is_connection_lost(&e) => return Ended::Lost(e),
            Err(e) => tracing::error!(error = %e, "sealing the chain failed; retrying"),
        }
        tokio::select! {
            () = async {
                shared.seal_wake.notified().await;
                tokio::time::sleep_until(started + GAP).await;
            } => {}
            () = tokio::time::sleep(POLL) => {}
            () = stopped(stop) => {
                // What this process appended before closing is sealed before it lets go.
                loop {
                    match seal(&mut conn, shared).await {
                        Ok(n) if n >= ROUND => continue,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "the last sealing round failed"),
                    }
                    break;
                }
                shared.seal_active.store(false, Ordering::Release);
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

/// What [`READ_ROUND`] returns: head position and chain hash, the snapshot's xmax and
/// in-progress ids, the candidates' ids and data hashes.
type RoundRow = (
    i64,
    Vec<u8>,
    i64,
    Vec<i64>,
    Option<Vec<i64>>,
    Option<Vec<Vec<u8>>>,
);

/// One round: seals up to [`ROUND`] visible unsealed commits; returns how many. Two statements,
/// each its own transaction: the read, and the write, which applies only if the head is still
/// where the read found it.
pub(crate) async fn seal(conn: &mut PgConnection, shared: &Shared) -> Result<usize, Error> {
    let schema: &Schema = &shared.schema;
    let (head, parent, xmax, xip, ids, hashes): RoundRow = sqlx::query_as(&schema.sql(READ_ROUND))
        .bind(ROUND as i64)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("looking for unsealed commits"))?;
    let ids = ids.unwrap_or_default();
    let hashes = hashes.unwrap_or_default();
    if ids.is_empty() {
        return Ok(0);
    }
    if ids.len() != hashes.len() {
        return Err(Error::Corrupt(
            "the sealer read a different number of commits than hashes".into(),
        ));
    }
    let mut chain = hash(&parent, "chain head");
    let mut positions = Vec::with_capacity(ids.len());
    let mut chains = Vec::with_capacity(ids.len());
    let mut position = head;
    for data in &hashes {
        position += 1;
        chain = chain::chain_hash(&hash(data, "data hash"), &chain);
        positions.push(position);
        chains.push(chain.to_vec());
    }
    // A round that saw fewer than it may take saw every unsealed commit of its snapshot: the
    // next one starts from that snapshot. A full round leaves the start where it was.
    let complete = ids.len() < ROUND;
    let signer = crate::commit_meta::current(&shared.signer);
    let signature = signer
        .as_deref()
        .map(|s: &CommitSigner| s.sign(u64::try_from(position).unwrap_or(0), &chain));
    let written: i64 = sqlx::query_scalar(&schema.sql(WRITE_ROUND))
        .bind(&ids)
        .bind(&positions)
        .bind(&chains)
        .bind(position)
        .bind(&chain[..])
        .bind(complete.then_some(xmax))
        .bind(complete.then_some(&xip))
        .bind(head)
        .bind(signature.as_ref().map(|s| s.key_id.as_str()))
        .bind(signature.as_ref().map(|s| &s.signature[..]))
        .fetch_one(&mut *conn)
        .await
        .map_err(db("sealing commits"))?;
    if written == 0 {
        // Another session moved the head (a sealer that lost its lock without noticing):
        // nothing was written; the next round starts from where the head is now.
        tracing::warn!(
            head,
            "the chain head moved during a sealing round; sealing again"
        );
        return Ok(0);
    }
    // Readers of the log, in every process, may read on.
    shared.announcer.post(crate::notify::Announcements {
        sealed: true,
        ..Default::default()
    });
    tracing::trace!(sealed = ids.len(), head = position, "sealed commits");
    Ok(ids.len())
}
