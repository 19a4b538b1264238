//! The batcher: rows from concurrent deliveries gathered into one `INSERT` by size and time,
//! each delivery told once the insert holding its row was acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::client::Client;

/// One row waiting for its insert, and the delivery waiting for the answer.
pub(crate) struct Pending {
    /// The row as one `JSONEachRow` line, newline included.
    pub(crate) line: Vec<u8>,
    /// Told `Ok` once the row is in an acknowledged insert, or why not.
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// Limits of one batch and of the inserts in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_rows: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_wait: Duration,
    pub(crate) max_inflight: usize,
}

/// Counters of what the batcher did.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) inserts: AtomicU64,
    pub(crate) rows: AtomicU64,
    pub(crate) failed_inserts: AtomicU64,
}

impl Counters {
    fn acknowledged(&self, rows: usize) {
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.rows
            .fetch_add(u64::try_from(rows).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    fn failed(&self) {
        self.failed_inserts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Gathers rows until the channel closes (every sink handle dropped), then flushes the last
/// batch and waits for the inserts in flight.
pub(crate) async fn run(
    client: Client,
    table: Arc<str>,
    mut rows: mpsc::Receiver<Pending>,
    limits: Limits,
    counters: Arc<Counters>,
) {
    let inflight = Arc::new(Semaphore::new(limits.max_inflight));
    let mut open = true;
    while open {
        let Some(first) = rows.recv().await else {
            break;
        };
        let mut bytes = first.line.len();
        let mut batch = vec![first];
        let deadline = Instant::now() + limits.max_wait;
        while batch.len() < limits.max_rows && bytes < limits.max_bytes {
            // Take what is already queued without waiting; wait only while the batch lingers.
            let next = match rows.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rows.recv()).await {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                }
            };
            match next {
                Some(p) => {
                    bytes += p.line.len();
                    batch.push(p);
                }
                None => {
                    open = false;
                    break;
                }
            }
        }
        let Ok(permit) = Arc::clone(&inflight).acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let table = Arc::clone(&table);
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            insert(&client, &table, batch, &counters).await;
            drop(permit);
        });
    }
    // Wait for the inserts in flight, so that nothing is cut short by our return.
    let _ = inflight
        .acquire_many(u32::try_from(limits.max_inflight).unwrap_or(u32::MAX))
        .await;
}

/// Inserts one batch and answers every delivery in it. When the server refuses a batch of
/// several rows, each row is tried alone, so that one bad row does not hold the others back.
async fn insert(client: &Client, table: &str, batch: Vec<Pending>, counters: &Counters) {
    // A delivery that stopped waiting (its attempt timed out) will be redelivered: inserting
    // its row now would only add a duplicate.
    let batch: Vec<Pending> = batch.into_iter().filter(|p| !p.done.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let rows = batch.len();
    let body: Vec<u8> = batch.iter().flat_map(|p| p.line.iter().copied()).collect();
    match client.insert_rows(table, body).await {
        Ok(()) => {
            counters.acknowledged(rows);
            tracing::debug!(table, rows, "ClickHouse insert acknowledged");
            for p in batch {
                let _ = p.done.send(Ok(()));
            }
        }
        Err(e) if e.is_server_refusal() && rows > 1 => {
            counters.failed();
            tracing::warn!(table, rows, error = %e, "ClickHouse refused a batch; inserting its rows one by one");
            for p in batch {
                let result = match client.insert_rows(table, p.line).await {
                    Ok(()) => {
                        counters.acknowledged(1);
                        Ok(())
                    }
                    Err(e) => {
                        counters.failed();
                        Err(format!("ClickHouse insert into {table} failed: {e}"))
                    }
                };
                let _ = p.done.send(result);
            }
        }
        Err(e) => {
            counters.failed();
            tracing::warn!(table, rows, error = %e, "ClickHouse insert failed; its deliveries will be retried");
            let reason = format!("ClickHouse insert into {table} failed: {e}");
            for p in batch {
                let _ = p.done.send(Err(reason.clone()));
            }
        }
    }
}
