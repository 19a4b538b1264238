//! The relay's side effect on RabbitMQ: persistent messages on a topic exchange, with
//! publisher confirms, many in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, ExchangeKind, PublisherConfirm};
use tokio::sync::Mutex;
use txbus_relay::{wire, OutboundMessage, Publisher};

use crate::error::{short, Error};
use crate::link::Link;

/// Publishes relayed messages to a RabbitMQ exchange: one message per log message, routing
/// key = the relay's destination (by default `txbus.<module>.<event type>`), persistent
/// (delivery mode 2), with the txbus message id as AMQP `message_id` and the [`wire`]
/// headers.
///
/// A batch is written to the channel in order without waiting, and its confirmation resolves
/// once RabbitMQ confirmed every message (publisher confirms): the relay keeps many batches in
/// flight, never one round trip per message. After any failure the connection is made again
/// on the next batch. Cheap to clone.
///
/// ```no_run
/// # async fn run(bus: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_rabbitmq::RabbitPublisher;
/// use txbus_relay::Relay;
///
/// let publisher = RabbitPublisher::new("amqp://guest:guest@127.0.0.1:5672/%2f", "txbus");
/// let relay = Relay::builder(bus, "to-rabbitmq", publisher).start().await?;
/// # let _ = relay; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    exchange: String,
    declare: bool,
    mandatory: bool,
    link: Mutex<Option<Link>>,
}

impl std::fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPublisher")
            .field("exchange", &self.inner.exchange)
            .field("mandatory", &self.inner.mandatory)
            .finish_non_exhaustive()
    }
}

impl RabbitPublisher {
    /// Publishes to `exchange` on the broker at `uri` (`amqp://user:pass@host:port/vhost`).
    /// The exchange is declared (durable, topic) on connecting; `""` is the default exchange,
    /// where the routing key names a queue.
    pub fn new(uri: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self::with(uri.into(), exchange.into(), true, false)
    }

    /// Does not declare the exchange: it must exist (declared elsewhere, of any kind).
    pub fn without_declaring(self) -> Self {
        Self::with(
            self.inner.uri.clone(),
            self.inner.exchange.clone(),
            false,
            self.inner.mandatory,
        )
    }

    /// Publishes as `mandatory`: a message no queue is bound for fails its batch (it is sent
    /// again after a backoff) instead of being dropped by the broker. Default: off.
    pub fn mandatory(self, mandatory: bool) -> Self {
        Self::with(
            self.inner.uri.clone(),
            self.inner.exchange.clone(),
            self.inner.declare,
            mandatory,
        )
    }

    fn with(uri: String, exchange: String, declare: bool, mandatory: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                uri,
                exchange,
                declare,
                mandatory,
                link: Mutex::new(None),
            }),
        }
    }

    /// The exchange messages go to.
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// A working link: the current one, or a new one with confirms on and the exchange
    /// declared.
    async fn link<'a>(&self, slot: &'a mut Option<Link>) -> Result<&'a Link, Error> {
        if slot.as_ref().is_some_and(|l| !l.is_usable()) {
            if let Some(old) = slot.take() {
                old.close().await;
            }
        }
        if slot.is_none() {
            let link = Link::open(&self.inner.uri, "txbus-relay").await?;
            link.channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(Error::amqp("enabling publisher confirms"))?;
            if self.inner.declare && !self.inner.exchange.is_empty() {
                link.channel
                    .exchange_declare(
                        short("exchange", &self.inner.exchange)?,
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(Error::amqp("declaring the exchange"))?;
            }
            *slot = Some(link);
        }
        slot.as_ref().ok_or(Error::Cancelled {
            queue: String::new(),
        })
    }
}

/// The AMQP properties a relayed message carries: persistent, JSON, its message id, and the
/// [`wire`] headers.
pub fn message_properties(message: &OutboundMessage) -> Result<BasicProperties, Error> {
    let mut headers = FieldTable::default();
    for (name, value) in wire::headers(message) {
        headers.insert(
            short("header name", name)?,
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(short("message id", &message.id.to_string())?)
        .with_app_id("txbus".into())
        .with_headers(headers))
}

/// Resolves once every message of a batch is confirmed.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl Publisher for RabbitPublisher {
    type Error = Error;
    type Confirm = Confirm;

    async fn send_batch(&self, batch: &[OutboundMessage]) -> Result<Confirm, Error> {
        let mut slot = self.inner.link.lock().await;
        let channel = self.link(&mut slot).await?.channel.clone();
        let exchange = short("exchange", &self.inner.exchange)?;
        let options = BasicPublishOptions {
            mandatory: self.inner.mandatory,
            ..BasicPublishOptions::default()
        };
        let mut confirms: Vec<(PublisherConfirm, String, String)> = Vec::with_capacity(batch.len());
        for message in batch {
            let routing_key = short("routing key", &message.destination)?;
            let sent = channel
                .basic_publish(
                    exchange.clone(),
                    routing_key,
                    options,
                    &message.payload,
                    message_properties(message)?,
                )
                .await;
            match sent {
                Ok(confirm) => {
                    confirms.push((confirm, message.id.to_string(), message.destination.clone()))
                }
                Err(e) => {
                    if let Some(old) = slot.take() {
                        old.close().await;
                    }
                    return Err(Error::Amqp {
                        action: "publishing",
                        source: e,
                    });
                }
            }
        }
        drop(slot);
        Ok(Box::pin(async move {
            for (confirm, message_id, routing_key) in confirms {
                match confirm
                    .await
                    .map_err(Error::amqp("waiting for a publisher confirm"))?
                {
                    Confirmation::Ack(None) => {}
                    Confirmation::Ack(Some(_)) => {
                        return Err(Error::Unroutable {
                            message_id,
                            routing_key,
                        })
                    }
                    Confirmation::Nack(_) | Confirmation::NotRequested => {
                        return Err(Error::Nacked { message_id })
                    }
                }
            }
            Ok(())
        }))
    }
}
