//! The sink: a txbus handler that inserts each delivered message as a ClickHouse row.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use txbus_core::{Handler, HandlerError, HandlerResult, Message};

use crate::batch::{self, Counters, Limits, Pending};
use crate::client::Client;
use crate::error::Error;
use crate::row::{default_row, default_table_ddl, RowMapper};

/// A txbus [`Handler`] that inserts every message it is delivered into a ClickHouse table.
///
/// - **Acknowledged batches.** Rows of concurrent deliveries are gathered into one
///   `INSERT … FORMAT JSONEachRow` (up to [`max_rows`](SinkBuilder::max_rows) rows or
///   [`max_bytes`](SinkBuilder::max_bytes), waiting at most
///   [`max_wait`](SinkBuilder::max_wait) for more). A delivery succeeds only once the insert
///   holding its row was acknowledged by ClickHouse, so the bus records it as handled only
///   when the row is in the table. Give the handler a concurrency of the batch size or more
///   ([`txbus_core::PolicyOverride::concurrency`]): a batch holds at most as many rows as
///   deliveries run at once.
/// - **Retries.** An insert that fails fails every delivery in it as a transient error, and
///   the bus retries each with its backoff; a batch the server refuses is retried row by row
///   at once, so that one row that does not parse does not hold the others back.
/// - **Once per message id.** Redeliveries (a crash between the insert and the bus's
///   acknowledgement, a timed-out attempt, a replayed dead letter) insert the same row again.
///   The table decides what counts: the default table ([`default_table_ddl`]) is a
///   `ReplacingMergeTree` ordered by `message_id`, so queries that read it with `FINAL` (or
///   `GROUP BY message_id`) see each message once, and merges drop the copies for good. This
///   holds across any crash, unlike a "done" mark written after the insert, which a crash
///   before the mark loses.
/// - **Bounded.** At most [`buffer`](SinkBuilder::buffer) rows wait for a batch (deliveries
///   beyond it wait for room) and at most
///   [`max_inflight_inserts`](SinkBuilder::max_inflight_inserts) inserts run at once.
///
/// Cheap to clone: clones share one batcher, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct ClickHouseSink {
    rows: mpsc::Sender<Pending>,
    mapper: RowMapper,
    client: Client,
    table: Arc<str>,
    counters: Arc<Counters>,
}

/// What a sink has done since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkStats {
    /// Inserts ClickHouse acknowledged.
    pub inserts: u64,
    /// Rows in those inserts.
    pub rows: u64,
    /// Inserts that failed (their deliveries were failed as transient, and are retried).
    pub failed_inserts: u64,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink")
            .field("client", &self.client)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl ClickHouseSink {
    /// Starts configuring a sink that inserts into `table` (`name` or `database.name`).
    pub fn builder(client: Client, table: impl Into<String>) -> SinkBuilder {
        SinkBuilder {
            client,
            table: table.into(),
            mapper: Arc::new(default_row),
            limits: Limits {
                max_rows: 10_000,
                max_bytes: 8 * 1024 * 1024,
                max_wait: Duration::from_millis(20),
                max_inflight: 2,
            },
            buffer: 10_000,
        }
    }

    /// The client the sink inserts with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table the sink inserts into.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Counts of inserts and rows so far.
    pub fn stats(&self) -> SinkStats {
        SinkStats {
            inserts: self.counters.inserts.load(Ordering::Relaxed),
            rows: self.counters.rows.load(Ordering::Relaxed),
            failed_inserts: self.counters.failed_inserts.load(Ordering::Relaxed),
        }
    }

    /// Creates the table for the default row mapping if it does not exist (see
    /// [`default_table_ddl`]).
    pub async fn create_default_table(&self) -> Result<(), Error> {
        self.client.execute(&default_table_ddl(&self.table)).await
    }

    /// Queues one row and waits for the insert that holds it.
    async fn insert(&self, row: Map<String, Value>) -> HandlerResult {
        let mut line = serde_json::to_vec(&Value::Object(row))
            .map_err(|e| HandlerError::reject(format!("the row does not serialize: {e}")))?;
        line.push(b'\n');
        let (done, answer) = oneshot::channel();
        self.rows
            .send(Pending { line, done })
            .await
            .map_err(|_| HandlerError::transient(Error::Closed))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(HandlerError::transient(reason)),
            Err(_) => Err(HandlerError::transient(Error::Closed)),
        }
    }
}

impl Handler for ClickHouseSink {
    async fn handle(&self, message: Message) -> HandlerResult {
        let row = (self.mapper)(&message)?;
        self.insert(row).await
    }
}

/// Configures a [`ClickHouseSink`].
pub struct SinkBuilder {
    client: Client,
    table: String,
    mapper: RowMapper,
    limits: Limits,
    buffer: usize,
}

impl std::fmt::Debug for SinkBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkBuilder")
            .field("table", &self.table)
            .field("limits", &self.limits)
            .field("buffer", &self.buffer)
            .finish_non_exhaustive()
    }
}

impl SinkBuilder {
    /// How a message becomes a row (default: [`default_row`]). The row must be the same every
    /// time for the same message (no clock reads), so that a redelivered copy replaces the
    /// first one; a mapper error is the delivery's result (return a reject for a message that
    /// can never make a row).
    pub fn row<F>(mut self, mapper: F) -> Self
    where
        F: Fn(&Message) -> Result<Map<String, Value>, HandlerError> + Send + Sync + 'static,
    {
        self.mapper = Arc::new(mapper);
        self
    }

    /// Most rows in one insert (default 10 000).
    pub fn max_rows(mut self, rows: usize) -> Self {
        self.limits.max_rows = rows;
        self
    }

    /// Most bytes of rows in one insert; a batch closes once it reaches this (default 8 MiB).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_bytes = bytes;
        self
    }

    /// Longest a batch waits for more rows after its first (default 20 ms); zero sends what
    /// is queued at once.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.limits.max_wait = wait;
        self
    }

    /// Inserts running at once, at most (default 2).
    pub fn max_inflight_inserts(mut self, n: usize) -> Self {
        self.limits.max_inflight = n;
        self
    }

    /// Rows waiting for a batch, at most (default 10 000); deliveries beyond it wait.
    pub fn buffer(mut self, rows: usize) -> Self {
        self.buffer = rows;
        self
    }

    /// Checks the settings and starts the batcher on the current tokio runtime.
    pub fn build(self) -> Result<ClickHouseSink, Error> {
        check_table_name(&self.table)?;
        if self.limits.max_rows == 0
            || self.limits.max_bytes == 0
            || self.limits.max_inflight == 0
            || self.buffer == 0
        {
            return Err(Error::Config(
                "max_rows, max_bytes, max_inflight_inserts and buffer must be above zero".into(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("build the sink inside a tokio runtime: it starts its batcher".into())
        })?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let table: Arc<str> = Arc::from(self.table.as_str());
        let counters = Arc::new(Counters::default());
        runtime.spawn(batch::run(
            self.client.clone(),
            Arc::clone(&table),
            rx,
            self.limits,
            Arc::clone(&counters),
        ));
        Ok(ClickHouseSink {
            rows: tx,
            mapper: self.mapper,
            client: self.client,
            table,
            counters,
        })
    }
}

/// Table names go into SQL text: allow plain identifiers, optionally database-qualified.
fn check_table_name(table: &str) -> Result<(), Error> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "table name {table:?} must be an identifier (letters, digits, _), optionally database-qualified"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::check_table_name;

    #[test]
    fn table_names() {
        assert!(check_table_name("promo_events").is_ok());
        assert!(check_table_name("analytics.promo_events").is_ok());
        assert!(check_table_name("a.b.c").is_err());
        assert!(check_table_name("x; DROP TABLE y").is_err());
        assert!(check_table_name("").is_err());
        assert!(check_table_name("1abc").is_err());
    }
}
