//! The relay's side effect on Redis: one `XADD` per message, a batch in one pipeline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::Mutex;
use txbus_relay::{OutboundMessage, Publisher};

use crate::connect;
use crate::entry::entry_fields;
use crate::error::Error;

/// Appends relayed messages to Redis streams: one `XADD` per message to the stream named by
/// the relay's destination (by default `txbus.<module>.<event type>`), with the payload in
/// field `payload` and the [`txbus_relay::wire`] headers as the other fields.
///
/// A batch goes out as one pipeline, queued on the connection in order before `send_batch`
/// returns; its confirmation resolves when Redis has answered every `XADD`, so the relay keeps
/// many batches in flight on one connection, never one round trip per message. Redis
/// persists as its own configuration says (AOF, snapshots): a confirmed `XADD` is as durable
/// as the server makes it. After a failure the connection is made again on the next batch.
/// Cheap to clone.
///
/// ```no_run
/// # async fn run(bus: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_redis::RedisPublisher;
/// use txbus_relay::Relay;
///
/// let publisher = RedisPublisher::new("redis://127.0.0.1:6379")?.max_len(1_000_000);
/// let relay = Relay::builder(bus, "to-redis", publisher).start().await?;
/// # let _ = relay; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    max_len: Option<usize>,
    response_timeout: Duration,
    /// The connection in use, with a generation so that a failed batch drops only the
    /// connection it was sent on.
    conn: Mutex<(u64, Option<MultiplexedConnection>)>,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("max_len", &self.inner.max_len)
            .finish_non_exhaustive()
    }
}

impl RedisPublisher {
    /// Publishes to the server at `url` (`redis://host:port/db`). Connects on the first batch.
    pub fn new(url: &str) -> Result<Self, Error> {
        Ok(Self::with(
            connect::client(url)?,
            None,
            Duration::from_secs(30),
        ))
    }

    fn with(client: redis::Client, max_len: Option<usize>, response_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                max_len,
                response_timeout,
                conn: Mutex::new((0, None)),
            }),
        }
    }

    /// Trims each stream to about `entries` (`XADD … MAXLEN ~ entries`), so that streams do not
    /// grow without bound. Entries trimmed before a consumer group read them are lost to it:
    /// keep this well above what consumers may lag behind. Default: no trimming.
    pub fn max_len(self, entries: usize) -> Self {
        Self::with(
            self.inner.client.clone(),
            Some(entries),
            self.inner.response_timeout,
        )
    }

    /// How long a batch may wait for Redis's answers (default 30 s); past it the batch fails
    /// and is sent again.
    pub fn response_timeout(self, timeout: Duration) -> Self {
        Self::with(self.inner.client.clone(), self.inner.max_len, timeout)
    }

    fn pipeline(&self, batch: &[OutboundMessage]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for message in batch {
            let cmd = pipe.cmd("XADD").arg(&message.destination);
            if let Some(n) = self.inner.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*");
            for (name, value) in entry_fields(message) {
                cmd.arg(name).arg(value);
            }
        }
        pipe
    }
}

/// Resolves once Redis answered every `XADD` of a batch.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl Publisher for RedisPublisher {
    type Error = Error;
    type Confirm = Confirm;

    async fn send_batch(&self, batch: &[OutboundMessage]) -> Result<Confirm, Error> {
        let (generation, conn) = {
            let mut slot = self.inner.conn.lock().await;
            if slot.1.is_none() {
                let conn = connect::open(&self.inner.client, self.inner.response_timeout).await?;
                slot.0 += 1;
                slot.1 = Some(conn);
            }
            match &slot.1 {
                Some(c) => (slot.0, c.clone()),
                None => unreachable_connection()?,
            }
        };
        let pipe = self.pipeline(batch);
        let count = batch.len();
        let inner = Arc::clone(&self.inner);
        let mut reply: Pin<Box<dyn Future<Output = redis::RedisResult<Vec<Value>>> + Send>> =
            Box::pin(async move {
                let mut conn = conn;
                pipe.query_async::<Vec<Value>>(&mut conn).await
            });
        // Poll once now: that queues the pipeline on the connection, so batches go out in the
        // order of these calls even though their answers are awaited later.
        let first = std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await;
        Ok(Box::pin(async move {
            let answered = match first {
                Poll::Ready(r) => r,
                Poll::Pending => reply.await,
            };
            let result = match answered {
                Ok(values) => check_ids(&values, count),
                Err(e) => Err(Error::Redis {
                    action: "appending to streams (XADD)",
                    source: e,
                }),
            };
            if result.is_err() {
                let mut slot = inner.conn.lock().await;
                if slot.0 == generation {
                    slot.1 = None;
                }
            }
            result
        }))
    }
}

fn unreachable_connection<T>() -> Result<T, Error> {
    Err(Error::Reply {
        action: "connecting",
        reply: "no connection after connecting".into(),
    })
}

/// Every answer must be an entry id; a server error names the failing command.
fn check_ids(values: &[Value], expected: usize) -> Result<(), Error> {
    if values.len() != expected {
        return Err(Error::Reply {
            action: "XADD pipeline",
            reply: format!("{} answers for {expected} commands", values.len()),
        });
    }
    for v in values {
        match v {
            Value::BulkString(_) | Value::SimpleString(_) => {}
            other => return Err(Error::reply("XADD", other)),
        }
    }
    Ok(())
}
