//! Group commit: writes go through one bounded queue to a few writer lanes; each lane takes
//! every request waiting (up to a batch), commits them all in one transaction on its own
//! connection, and answers each once the transaction is committed.
//!
//! A batch takes as few statements as it can: all its appends in one, all its
//! acknowledgements in one. A batch of a single statement (appends only, acknowledgements
//! only, heartbeats only: what one caller at a time sends) is a transaction of its own, one
//! round trip, without BEGIN and COMMIT.
//!
//! Several lanes keep the database busy while one waits for its commit to be flushed (the
//! server flushes the commits of concurrent lanes together). A write whose condition (a
//! stream's expected version, a key's) does not hold is answered with its conflict and the rest
//! of the batch commits. If a batch fails because of one request, each is run again alone so
//! only that one fails. If the connection was lost before COMMIT was sent, nothing was written
//! and the batch runs again on a new connection; if it was lost during COMMIT (or during a
//! batch's one statement), the result is unknown and the callers are told so, unless the
//! batch certainly wrote nothing (its appends' operations are not in the store).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use txbus_core::chain::Hash;
use txbus_core::kv::KvWrite;
use txbus_core::store::{
    AppendReceipt, Completion, CompletionEffect, Conflict, Error, NewCommit, OwnerId,
};

use crate::append::{self, Write, Written};
use crate::clock::now_ms;
use crate::complete::complete_all;
use crate::context::Shared;
use crate::error::{db, is_conflict, is_connection_lost, is_stream_taken, shared};
use crate::notify::Announcements;
use crate::pg_uuid::PgUuid;
use crate::prune::{self, Bounds, Step};

/// A write to perform.
pub(crate) enum Op {
    /// A commit and its data hash (computed by the caller's task, not the lane's).
    Append(NewCommit, Hash),
    /// Key writes, all or none.
    Kv(Vec<KvWrite>),
    Complete(Vec<Completion>),
    Heartbeat(OwnerId),
    Release(OwnerId),
    Inspect(crate::inspect::Action),
    Prune(Bounds),
}

/// A write's result.
pub(crate) enum Out {
    Append(AppendReceipt),
    /// Each key's new version.
    Kv(Vec<u64>),
    /// The write's condition did not hold; it wrote nothing (the rest of its batch did).
    Conflict(Conflict),
    Complete(Vec<CompletionEffect>),
    Count(u64),
    Prune(Step),
    Acted(crate::inspect::Acted),
    Unit,
}

pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Out, Error>>,
}

impl Op {
    /// Roughly how many rows the request writes.
    fn rows(&self) -> usize {
        match self {
            Op::Append(c, _) => 1 + c.messages.len() + c.deliveries.len(),
            Op::Kv(w) => w.len(),
            Op::Complete(c) => c.len(),
            _ => 1,
        }
    }
}

/// A lane stops adding requests to a batch past this many rows, so that a few huge commits do
/// not make one huge transaction.
const MAX_ROWS: usize = 50_000;

/// Times a batch that met a deadlock runs again before it is split.
const CONFLICT_RETRIES: u32 = 3;
/// Times a batch runs again on a new connection after losing one before COMMIT.
const RECONNECTS: u32 = 1;

/// Starts `lanes` writer lanes on one queue.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    rx: mpsc::Receiver<Request>,
    lanes: usize,
    max_batch: usize,
) -> Vec<JoinHandle<()>> {
    let rx = Arc::new(Mutex::new(rx));
    (0..lanes.max(1))
        .map(|_| tokio::spawn(lane(Arc::clone(shared), Arc::clone(&rx), max_batch.max(1))))
        .collect()
}

/// Serves batches until the queue is closed and empty.
async fn lane(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::Receiver<Request>>>, max_batch: usize) {
    let mut conn: Option<PgConnection> = None;
    let group_commits = txbus_core::metrics::GroupCommitMetrics::new("postgres");
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                break;
            };
            let mut rows = first.op.rows();
            let mut batch = Vec::with_capacity(max_batch.min(64));
            batch.push(first);
            while batch.len() < max_batch && rows < MAX_ROWS {
                match rx.try_recv() {
                    Ok(r) => {
                        rows += r.op.rows();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        group_commits.record(batch.len());
        process(&shared, &mut conn, batch).await;
    }
    if let Some(conn) = conn.take() {
        let _ = conn.close().await;
    }
}

/// Why a transaction did not commit.
struct Failed {
    error: Error,
    /// The connection was lost during COMMIT: the batch may or may not be written.
    unknown: bool,
}

impl Failed {
    fn before_commit(error: Error) -> Self {
        Self {
            error,
            unknown: false,
        }
    }

    /// True when one request's statement failed: running each alone isolates it.
    fn splittable(&self) -> bool {
        !self.unknown && !is_connection_lost(&self.error)
    }
}

async fn process(shared: &Shared, conn: &mut Option<PgConnection>, batch: Vec<Request>) {
    match attempt(shared, conn, &batch).await {
        Ok(outs) => reply(batch, outs),
        Err(failed) if batch.len() > 1 && failed.splittable() => {
            tracing::debug!(error = %failed.error, size = batch.len(),
                "batch failed; retrying its requests one by one");
            for req in batch {
                let one = vec![req];
                match attempt(shared, conn, &one).await {
                    Ok(outs) => reply(one, outs),
                    Err(failed) => fail(one, &failed),
                }
            }
        }
        Err(failed) => fail(batch, &failed),
    }
}

fn reply(batch: Vec<Request>, outs: Vec<Out>) {
    for (req, out) in batch.into_iter().zip(outs) {
        let _ = req.reply.send(Ok(out));
    }
}

fn fail(batch: Vec<Request>, failed: &Failed) {
    if failed.unknown {
        tracing::warn!(error = %failed.error, size = batch.len(),
            "the connection was lost while committing; the batch may or may not be written");
    }
    for req in batch {
        let _ = req.reply.send(Err(shared(&failed.error)));
    }
}

/// Runs the batch in one transaction, again after a deadlock or on a new connection when the
/// old one was lost before anything was committed.
async fn attempt(
    shared: &Shared,
    conn: &mut Option<PgConnection>,
    batch: &[Request],
) -> Result<Vec<Out>, Failed> {
    let mut conflicts = 0;
    let mut reconnects = 0;
    loop {
        let failed = match transaction(shared, conn, batch).await {
            Ok((outs, announce)) => {
                if batch.iter().any(|r| matches!(r.op, Op::Append(..))) {
                    shared.seal_wake.notify_one();
                }
                shared.announcer.post(announce);
                return Ok(outs);
            }
            Err(failed) => failed,
        };
        if is_connection_lost(&failed.error) {
            // A connection that failed once is not trusted again.
            *conn = None;
            let again = !failed.unknown || nothing_written(shared, batch).await;
            if again && reconnects < RECONNECTS {
                reconnects += 1;
                tracing::info!(error = %failed.error, "a writer lane lost its connection; running the batch again on a new one");
                continue;
            }
        } else if (is_conflict(&failed.error) || is_stream_taken(&failed.error))
            && conflicts < CONFLICT_RETRIES
        {
            // A stream version taken behind the locks' back: the next round reads it and
            // answers the conflict with the stream's actual version.
            conflicts += 1;
            tokio::time::sleep(Duration::from_millis(conflict_pause_ms(conflicts))).await;
            continue;
        }
        return Err(failed);
    }
}

/// After a batch of one statement lost its connection (a session that ended while the lane
/// was idle, most often): true when it certainly wrote nothing, or running it again changes
/// nothing more, so that it may run again on a new connection. Appends are looked up by
/// operation id; heartbeats are the same written twice; anything else stays unknown.
async fn nothing_written(shared: &Shared, batch: &[Request]) -> bool {
    if !one_statement(batch) {
        return false;
    }
    if batch.iter().all(|r| matches!(r.op, Op::Heartbeat(_))) {
        return true;
    }
    let mut ops = Vec::with_capacity(batch.len());
    for r in batch {
        match &r.op {
            Op::Append(c, _) => ops.push(PgUuid(c.operation_id.0)),
            _ => return false,
        }
    }
    let found: Result<bool, sqlx::Error> = sqlx::query_scalar(
        &shared
            .schema
            .sql("SELECT EXISTS (SELECT 1 FROM {s}.commits WHERE op_id = ANY ($1::UUID[]))"),
    )
    .bind(&ops)
    .fetch_one(&shared.pool)
    .await;
    match found {
        Ok(found) => !found,
        Err(e) => {
            tracing::debug!(error = %e, "cannot tell whether a cut-off batch was written");
            false
        }
    }
}

/// A short, growing, jittered pause so that transactions that deadlocked do not meet again.
fn conflict_pause_ms(round: u32) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(round) * 5 + u64::from(nanos % 10)
}

/// True when the batch is one statement, which is then a transaction of its own (one round
/// trip, instead of two more for BEGIN and COMMIT): appends without conditions or
/// acknowledgements, or completions of distinct deliveries, or heartbeats.
fn one_statement(batch: &[Request]) -> bool {
    let unconditional =
        |c: &NewCommit| c.streams.is_empty() && c.kv.is_empty() && c.acks.is_empty();
    if batch
        .iter()
        .all(|r| matches!(&r.op, Op::Append(c, _) if unconditional(c)))
        || batch.iter().all(|r| matches!(r.op, Op::Heartbeat(_)))
    {
        return true;
    }
    let mut lists = Vec::with_capacity(batch.len());
    for r in batch {
        match &r.op {
            Op::Complete(c) => lists.push(c.as_slice()),
            _ => return false,
        }
    }
    crate::complete::rounds_needed(&lists) <= 1
}

/// Runs the batch in one transaction; returns its results and what it has to announce.
async fn transaction(
    shared: &Shared,
    conn: &mut Option<PgConnection>,
    batch: &[Request],
) -> Result<(Vec<Out>, Announcements), Failed> {
    if conn.is_none() {
        *conn = Some(shared.dedicated().await.map_err(Failed::before_commit)?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(Failed::before_commit(Error::Closed));
    };
    if one_statement(batch) {
        // A transaction of its own: once sent, it may have committed even if the answer is
        // lost, so a lost connection leaves the result unknown.
        return apply(c, shared, batch, now_ms())
            .await
            .map_err(|error| Failed {
                unknown: is_connection_lost(&error),
                error,
            });
    }
    let mut tx = c
        .begin()
        .await
        .map_err(db("starting a write transaction"))
        .map_err(Failed::before_commit)?;
    let outs = match apply(&mut tx, shared, batch, now_ms()).await {
        Ok(outs) => outs,
        Err(e) => {
            if !is_connection_lost(&e) {
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(error = %rollback, "rolling back a failed batch failed");
                }
            }
            return Err(Failed::before_commit(e));
        }
    };
    match tx.commit().await.map_err(db("committing")) {
        Ok(()) => Ok(outs),
        Err(error) => Err(Failed {
            unknown: is_connection_lost(&error),
            error,
        }),
    }
}

/// Applies the batch in the open transaction: appends, then completions, heartbeats,
/// releases, replays and pruning; returns their results and what they have to announce once
/// the transaction commits (see [`crate::notify`]).
async fn apply(
    conn: &mut PgConnection,
    shared: &Shared,
    batch: &[Request],
    now: i64,
) -> Result<(Vec<Out>, Announcements), Error> {
    let schema = &shared.schema;
    let mut outs: Vec<Option<Out>> = batch.iter().map(|_| None).collect();
    let mut announce = Announcements::default();

    // Commits that acknowledge deliveries hold only while those leases are theirs: check
    // (and lock) them first, so that a stale one refuses its commit before anything is written.
    let (at, acks): (Vec<usize>, Vec<&[Completion]>) = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.op {
            Op::Append(c, _) if !c.acks.is_empty() => Some((i, c.acks.as_slice())),
            _ => None,
        })
        .unzip();
    if !acks.is_empty() {
        let verdicts = crate::complete::check_leases(conn, schema, &acks).await?;
        for (i, conflict) in at.into_iter().zip(verdicts) {
            if let Some(conflict) = conflict {
                outs[i] = Some(Out::Conflict(conflict));
            }
        }
    }
    let (at, writes): (Vec<usize>, Vec<Write<'_>>) = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.op {
            Op::Append(..) if outs[i].is_some() => None,
            Op::Append(c, hash) => Some((i, Write::Commit(c, hash))),
            Op::Kv(w) => Some((i, Write::Kv(w))),
            _ => None,
        })
        .unzip();
    if !writes.is_empty() {
        // Without a sealer here, those of other processes are told of the new commits.
        let wake_sealers = !shared.seal_active.load(Ordering::Acquire);
        let results = append::write(
            conn,
            schema,
            &writes,
            now,
            wake_sealers,
            Some(&mut announce),
        )
        .await?;
        for (i, result) in at.into_iter().zip(results) {
            outs[i] = Some(match result {
                Ok(Written::Commit(receipt)) => Out::Append(receipt),
                Ok(Written::Kv(versions)) => Out::Kv(versions),
                Err(conflict) => Out::Conflict(conflict),
            });
        }
    }

    // Completions, and the acknowledgements carried by the commits just written.
    let (at, lists): (Vec<usize>, Vec<&[Completion]>) = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match (&r.op, &outs[i]) {
            (Op::Complete(c), _) => Some((i, c.as_slice())),
            (Op::Append(c, _), Some(Out::Append(_))) if !c.acks.is_empty() => {
                Some((i, c.acks.as_slice()))
            }
            _ => None,
        })
        .unzip();
    if !lists.is_empty() {
        let done = complete_all(conn, schema, &lists, now).await?;
        for effect in done.effects.iter().flatten() {
            if let CompletionEffect::Applied(Some(outcome)) = effect {
                announce.finished.push(outcome.operation_id);
            }
        }
        for (i, effects) in at.into_iter().zip(done.effects) {
            match &mut outs[i] {
                Some(Out::Append(receipt)) => {
                    if effects.contains(&CompletionEffect::Stale) {
                        return Err(Error::Corrupt(
                            "an acknowledgement checked as current did not apply".into(),
                        ));
                    }
                    receipt.acked = effects;
                }
                slot => *slot = Some(Out::Complete(effects)),
            }
        }
    }

    let mut owners: Vec<PgUuid> = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        if let Op::Heartbeat(owner) = &r.op {
            owners.push(PgUuid(*owner));
            outs[i] = Some(Out::Unit);
        }
    }
    if !owners.is_empty() {
        // One row per owner, in key order: an upsert may not touch a row twice, and a fixed
        // order keeps concurrent batches from deadlocking.
        owners.sort_unstable();
        owners.dedup();
        sqlx::query(&schema.sql(
            "INSERT INTO {s}.owners (owner, heartbeat_at)
             SELECT o, $2 FROM UNNEST($1::UUID[]) AS o
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        ))
        .bind(&owners)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db("recording heartbeats"))?;
    }

    if batch
        .iter()
        .any(|r| matches!(r.op, Op::Release(_) | Op::Inspect(_) | Op::Prune(_)))
    {
        crate::context::custom_plans(conn).await?;
    }
    for (i, r) in batch.iter().enumerate() {
        let out = match &r.op {
            Op::Release(owner) => {
                let n = sqlx::query(&schema.sql(
                    "UPDATE {s}.deliveries SET status = 0, owner = NULL, updated_at = $2
                     WHERE status = 1 AND owner = $1",
                ))
                .bind(PgUuid(*owner))
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db("releasing leases"))?
                .rows_affected()
                    + crate::inline::release(conn, schema, *owner, now).await?;
                sqlx::query(&schema.sql("DELETE FROM {s}.owners WHERE owner = $1"))
                    .bind(PgUuid(*owner))
                    .execute(&mut *conn)
                    .await
                    .map_err(db("forgetting an owner"))?;
                announce.work |= n > 0;
                Out::Count(n)
            }
            Op::Inspect(action) => {
                let acted = crate::inspect::act(conn, schema, action, now).await?;
                announce.work |= acted.work;
                Out::Acted(acted)
            }
            Op::Prune(bounds) => Out::Prune(prune::step(conn, schema, bounds).await?),
            Op::Append(..) | Op::Kv(_) | Op::Complete(_) | Op::Heartbeat(_) => continue,
        };
        outs[i] = Some(out);
    }

    crate::inspect::record_batch(conn, schema, batch, &outs, now).await?;
    let outs = outs
        .into_iter()
        .map(|o| o.ok_or_else(|| Error::Corrupt("a write request was not answered".into())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((outs, announce))
}
