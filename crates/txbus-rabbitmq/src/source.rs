//! The inbox's side of RabbitMQ: a durable queue consumed with manual acks.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Consumer, ExchangeKind};
use txbus_relay::wire::{self, DecodeError};
use txbus_relay::{Acker, InboundMessage, Received, Source};

use crate::error::{short, Error};
use crate::link::Link;

/// Consumes a durable RabbitMQ queue for an [`txbus_relay::Inbox`]: each delivery is
/// acknowledged only after the inbox committed it (manual acks), so a message received before
/// a crash, a lost connection or a broker restart is delivered again, and the inbox drops the
/// repeat by message id.
///
/// The queue is declared durable on connecting (with the arguments given) and bound to each
/// exchange and pattern of [`bind`](Self::bind); at most [`prefetch`](Self::prefetch)
/// deliveries are unacknowledged at once. After a failure the connection and the consumer are
/// made again on the next call.
///
/// ```no_run
/// # async fn run(bus: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_rabbitmq::RabbitSource;
/// use txbus_relay::Inbox;
///
/// let source = RabbitSource::new("amqp://guest:guest@127.0.0.1:5672/%2f", "billing-inbox")
///     .bind("txbus", "txbus.order.#");
/// let inbox = Inbox::builder(bus, "billing", source).start()?;
/// # let _ = inbox; Ok(()) }
/// ```
pub struct RabbitSource {
    uri: String,
    queue: String,
    bindings: Vec<(String, String)>,
    arguments: FieldTable,
    prefetch: u16,
    consumer_tag: String,
    live: Option<(Link, Consumer)>,
}

impl std::fmt::Debug for RabbitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSource")
            .field("queue", &self.queue)
            .field("bindings", &self.bindings)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl RabbitSource {
    /// Consumes `queue` on the broker at `uri`.
    pub fn new(uri: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            queue: queue.into(),
            bindings: Vec::new(),
            arguments: FieldTable::default(),
            prefetch: 256,
            consumer_tag: String::new(),
            live: None,
        }
    }

    /// Binds the queue to the (durable, topic) `exchange` with `pattern` (`txbus.order.#`),
    /// declaring the exchange if needed.
    pub fn bind(mut self, exchange: impl Into<String>, pattern: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), pattern.into()));
        self
    }

    /// A queue argument, such as `x-queue-type` = `quorum` (which makes the broker count
    /// deliveries) or `x-dead-letter-exchange` (where discarded messages go).
    pub fn argument(mut self, name: &str, value: impl Into<String>) -> Self {
        if let Ok(name) = short("queue argument", name) {
            self.arguments.insert(
                name,
                AMQPValue::LongString(lapin::types::LongString::from(value.into())),
            );
        }
        self
    }

    /// Unacknowledged deliveries at most (default 256): the broker sends no more until some
    /// are settled.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn connect(&self) -> Result<(Link, Consumer), Error> {
        let link = Link::open(&self.uri, "txbus-inbox").await?;
        let channel = &link.channel;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(Error::amqp("setting the prefetch"))?;
        let queue = short("queue", &self.queue)?;
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.arguments.clone(),
            )
            .await
            .map_err(Error::amqp("declaring the queue"))?;
        for (exchange, pattern) in &self.bindings {
            let exchange = short("exchange", exchange)?;
            channel
                .exchange_declare(
                    exchange.clone(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(Error::amqp("declaring the exchange"))?;
            channel
                .queue_bind(
                    queue.clone(),
                    exchange,
                    short("binding pattern", pattern)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(Error::amqp("binding the queue"))?;
        }
        let consumer = channel
            .basic_consume(
                queue,
                short("consumer tag", &self.consumer_tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::amqp("starting the consumer"))?;
        Ok((link, consumer))
    }
}

/// A header value as text.
fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Decodes a delivery as the source does: the txbus headers from its AMQP headers (text
/// values; see [`txbus_relay::wire`]), the body as JSON. Anything a publisher may send comes
/// back as a value or a [`DecodeError`], never a panic.
pub fn decode_delivery(
    headers: Option<&FieldTable>,
    body: &[u8],
) -> Result<InboundMessage, DecodeError> {
    wire::decode(|name| header_text(headers, name), body)
}

/// The broker's delivery count, when it keeps one (quorum queues), this delivery included;
/// `redelivered` is the delivery's flag of that name.
pub fn delivery_count(headers: Option<&FieldTable>, redelivered: bool) -> Option<u64> {
    let counted = headers.and_then(|h| match h.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        _ => None,
    });
    match counted {
        Some(n) => Some(n + 1),
        None if !redelivered => Some(1),
        None => None,
    }
}

impl Source for RabbitSource {
    type Acker = RabbitAcker;
    type Error = Error;

    async fn next(&mut self) -> Result<Received<RabbitAcker>, Error> {
        if self.live.as_ref().is_some_and(|(l, _)| !l.is_usable()) {
            if let Some((old, _)) = self.live.take() {
                old.close().await;
            }
        }
        if self.live.is_none() {
            self.live = Some(self.connect().await?);
        }
        let Some((_, consumer)) = self.live.as_mut() else {
            return Err(Error::Cancelled {
                queue: self.queue.clone(),
            });
        };
        match consumer.next().await {
            Some(Ok(delivery)) => {
                let headers = delivery.properties.headers().as_ref();
                let message = decode_delivery(headers, &delivery.data);
                Ok(Received {
                    message,
                    delivery_count: delivery_count(headers, delivery.redelivered),
                    acker: RabbitAcker {
                        acker: delivery.acker,
                    },
                })
            }
            Some(Err(e)) => {
                if let Some((old, _)) = self.live.take() {
                    old.close().await;
                }
                Err(Error::Amqp {
                    action: "consuming",
                    source: e,
                })
            }
            None => {
                if let Some((old, _)) = self.live.take() {
                    old.close().await;
                }
                Err(Error::Cancelled {
                    queue: self.queue.clone(),
                })
            }
        }
    }
}

/// Settles one RabbitMQ delivery.
#[derive(Debug)]
pub struct RabbitAcker {
    acker: lapin::Acker,
}

impl Acker for RabbitAcker {
    type Error = Error;

    async fn ack(self) -> Result<(), Error> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(Error::amqp("acknowledging a delivery"))
    }

    /// Waits `delay`, then returns the message to the queue (a negative acknowledgement with
    /// requeue), which delivers it again.
    async fn retry(self, delay: Duration) -> Result<(), Error> {
        tokio::time::sleep(delay).await;
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .map(drop)
            .map_err(Error::amqp("returning a delivery to the queue"))
    }

    /// Rejects the message without requeueing: it goes to the queue's dead-letter exchange
    /// when one is set (see [`RabbitSource::argument`]), and is dropped otherwise.
    async fn discard(self) -> Result<(), Error> {
        self.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(drop)
            .map_err(Error::amqp("rejecting a delivery"))
    }
}
