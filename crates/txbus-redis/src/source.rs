//! The inbox's side of Redis Streams: a consumer group read with `XREADGROUP`, entries
//! acknowledged with `XACK` after the commit, stuck ones reclaimed with `XAUTOCLAIM`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::time::Instant;
use txbus_relay::{Acker, Received, Source};

use crate::connect;
use crate::entry::{parse_entries, text, StreamEntry};
use crate::error::Error;

/// Reads a Redis stream through a consumer group for an [`txbus_relay::Inbox`].
///
/// - The group is created on connecting if missing (from the start of the stream, or from its
///   end with [`start_at_end`](Self::start_at_end)), with the stream if missing.
/// - A restarted consumer first reads its own pending entries (those it received but never
///   acknowledged), then new ones (`XREADGROUP … >`), up to [`count`](Self::count) at a time,
///   waiting up to [`block`](Self::block) for more.
/// - Entries are acknowledged (`XACK`) only after the inbox committed them. Entries left
///   pending longer than [`claim_idle`](Self::claim_idle) — by a consumer that crashed, or
///   whose acknowledgement was lost — are taken over with `XAUTOCLAIM` and delivered again;
///   the inbox drops repeats by message id.
///
/// ```no_run
/// # async fn run(bus: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_redis::RedisSource;
/// use txbus_relay::Inbox;
///
/// let source = RedisSource::new("redis://127.0.0.1:6379", "txbus.order.order.placed", "billing", "billing-1")?;
/// let inbox = Inbox::builder(bus, "billing", source).start()?;
/// # let _ = inbox; Ok(()) }
/// ```
pub struct RedisSource {
    client: redis::Client,
    stream: String,
    group: String,
    consumer: String,
    count: usize,
    block: Duration,
    claim_idle: Duration,
    start_at_end: bool,
    reader: Option<MultiplexedConnection>,
    acks: Option<(MultiplexedConnection, Arc<AtomicBool>)>,
    buffer: VecDeque<(StreamEntry, Option<u64>)>,
    /// While reading this consumer's own pending entries (after connecting), before new ones:
    /// the id to read after.
    history: Option<String>,
    next_claim: Instant,
    claim_cursor: String,
}

impl std::fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSource")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisSource {
    /// Reads `stream` on the server at `url` as `consumer` of `group`. The consumer name
    /// identifies this reader across restarts: give each process its own, and the same one
    /// again after a restart.
    pub fn new(
        url: &str,
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Result<Self, Error> {
        Ok(Self {
            client: connect::client(url)?,
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            count: 256,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            start_at_end: false,
            reader: None,
            acks: None,
            buffer: VecDeque::new(),
            history: Some("0".into()),
            next_claim: Instant::now(),
            claim_cursor: "0-0".into(),
        })
    }

    /// Entries read at a time, at most (default 256).
    pub fn count(mut self, count: usize) -> Self {
        self.count = count.max(1);
        self
    }

    /// How long one read waits for new entries (default 1 s).
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block.max(Duration::from_millis(1));
        self
    }

    /// How long an entry stays pending, unacknowledged, before it is taken over and delivered
    /// again (default 30 s). Keep it above the time the inbox takes to commit a message.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle.max(Duration::from_millis(1));
        self
    }

    /// Creates a missing group at the end of the stream (`$`), so that only entries added
    /// afterwards are read. Default: from the start (`0`).
    pub fn start_at_end(mut self) -> Self {
        self.start_at_end = true;
        self
    }

    /// The stream read.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    async fn connect(&mut self) -> Result<(), Error> {
        let mut reader = connect::open(&self.client, self.block + Duration::from_secs(10)).await?;
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(if self.start_at_end { "$" } else { "0" })
            .arg("MKSTREAM")
            .query_async(&mut reader)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(Error::Redis {
                    action: "creating the consumer group",
                    source: e,
                });
            }
        }
        let acks = connect::open(&self.client, Duration::from_secs(10)).await?;
        self.reader = Some(reader);
        self.acks = Some((acks, Arc::new(AtomicBool::new(false))));
        self.history = Some("0".into());
        Ok(())
    }

    fn disconnect(&mut self) {
        self.reader = None;
        self.acks = None;
    }

    /// Takes over entries pending longer than the claim idle time (any consumer's, this one's
    /// included), walking the group's pending list a page at a time.
    async fn reclaim(&mut self, reader: &mut MultiplexedConnection) -> Result<(), Error> {
        let idle_ms = u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(idle_ms)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.count)
            .query_async(reader)
            .await
            .map_err(Error::redis("reclaiming idle entries (XAUTOCLAIM)"))?;
        let Value::Array(parts) = &reply else {
            return Err(Error::reply("XAUTOCLAIM", &reply));
        };
        let cursor = parts.first().and_then(text);
        let entries = parts.get(1).and_then(parse_entries);
        let (Some(cursor), Some(entries)) = (cursor, entries) else {
            return Err(Error::reply("XAUTOCLAIM", &reply));
        };
        if !entries.is_empty() {
            tracing::debug!(stream = %self.stream, group = %self.group, entries = entries.len(), "reclaimed idle entries");
        }
        // A page that ends the walk waits a while before the next; otherwise go on at once.
        self.next_claim = if cursor == "0-0" {
            Instant::now() + self.claim_idle / 2
        } else {
            Instant::now()
        };
        self.claim_cursor = cursor;
        self.buffer.extend(entries.into_iter().map(|e| (e, None)));
        Ok(())
    }

    async fn read(&mut self, reader: &mut MultiplexedConnection) -> Result<(), Error> {
        let from = self.history.clone().unwrap_or_else(|| ">".into());
        let block_ms = u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.count);
        if self.history.is_none() {
            cmd.arg("BLOCK").arg(block_ms);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(&from);
        let reply: Value = cmd
            .query_async(reader)
            .await
            .map_err(Error::redis("reading the stream (XREADGROUP)"))?;
        let entries = match &reply {
            Value::Nil => Vec::new(),
            Value::Array(streams) => {
                let mut all = Vec::new();
                for s in streams {
                    let Value::Array(pair) = s else {
                        return Err(Error::reply("XREADGROUP", &reply));
                    };
                    let entries = pair
                        .get(1)
                        .and_then(parse_entries)
                        .ok_or_else(|| Error::reply("XREADGROUP", &reply))?;
                    all.extend(entries);
                }
                all
            }
            Value::Map(streams) => {
                let mut all = Vec::new();
                for (_, v) in streams {
                    all.extend(parse_entries(v).ok_or_else(|| Error::reply("XREADGROUP", &reply))?);
                }
                all
            }
            other => return Err(Error::reply("XREADGROUP", other)),
        };
        if self.history.is_some() {
            self.history = match entries.last() {
                Some(last) if entries.len() >= self.count => Some(last.id.clone()),
                _ => None,
            };
        }
        let first_delivery = if from == ">" { Some(1) } else { None };
        self.buffer
            .extend(entries.into_iter().map(|e| (e, first_delivery)));
        Ok(())
    }

    fn acker(&self, id: String) -> Result<RedisAcker, Error> {
        let Some((conn, broken)) = &self.acks else {
            return Err(Error::Reply {
                action: "acknowledging",
                reply: "not connected".into(),
            });
        };
        Ok(RedisAcker {
            conn: conn.clone(),
            broken: Arc::clone(broken),
            stream: self.stream.clone(),
            group: self.group.clone(),
            id,
        })
    }
}

impl Source for RedisSource {
    type Acker = RedisAcker;
    type Error = Error;

    async fn next(&mut self) -> Result<Received<RedisAcker>, Error> {
        loop {
            if self
                .acks
                .as_ref()
                .is_some_and(|(_, broken)| broken.load(Ordering::Relaxed))
            {
                self.disconnect();
            }
            if let Some((entry, delivery_count)) = self.buffer.pop_front() {
                let message = entry.decode();
                let id = entry.id;
                return Ok(Received {
                    message,
                    delivery_count,
                    acker: self.acker(id)?,
                });
            }
            if self.reader.is_none() {
                self.connect().await?;
            }
            let Some(mut reader) = self.reader.clone() else {
                continue;
            };
            let step = if Instant::now() >= self.next_claim {
                self.reclaim(&mut reader).await
            } else {
                self.read(&mut reader).await
            };
            if let Err(e) = step {
                self.disconnect();
                self.buffer.clear();
                return Err(e);
            }
        }
    }
}

/// Settles one stream entry.
#[derive(Debug)]
pub struct RedisAcker {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
    stream: String,
    group: String,
    id: String,
}

impl RedisAcker {
    async fn xack(mut self) -> Result<(), Error> {
        let acked: redis::RedisResult<Value> = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.id)
            .query_async(&mut self.conn)
            .await;
        acked.map(drop).map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                self.broken.store(true, Ordering::Relaxed);
            }
            Error::Redis {
                action: "acknowledging an entry (XACK)",
                source: e,
            }
        })
    }
}

impl Acker for RedisAcker {
    type Error = Error;

    async fn ack(self) -> Result<(), Error> {
        self.xack().await
    }

    /// Leaves the entry pending: it is taken over and delivered again once it has been idle
    /// for the source's claim idle time (the delay asked for is not kept more precisely).
    async fn retry(self, _delay: Duration) -> Result<(), Error> {
        Ok(())
    }

    /// Acknowledges the entry without handling it: it is not delivered again, and stays in
    /// the stream for inspection.
    async fn discard(self) -> Result<(), Error> {
        tracing::warn!(stream = %self.stream, group = %self.group, entry = %self.id, "discarding a stream entry that cannot be committed; it stays in the stream");
        self.xack().await
    }
}
