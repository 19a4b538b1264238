//! RabbitMQ for txbus: the outbox relay's [`RabbitPublisher`] (persistent messages, publisher
//! confirms, many in flight) and the idempotent inbox's [`RabbitSource`] (a durable queue with
//! manual acks after the commit), for the broker-independent [`txbus_relay::Relay`] and
//! [`txbus_relay::Inbox`].
//!
//! Routing keys come from the relay's route: by default `txbus.<module>.<event type>`, so a
//! queue bound with `txbus.order.#` takes every event of the `order` module. RabbitMQ drops
//! (and confirms) a message that no queue is bound for: declare and bind the receiving
//! queues before the relay starts (a [`RabbitSource`] does when it connects), or publish with
//! [`RabbitPublisher::mandatory`] to hold the relay until one is.
//!
//! ```no_run
//! # async fn run(origin: txbus_core::Bus, receiver: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use txbus_core::On;
//! use txbus_rabbitmq::{RabbitPublisher, RabbitSource};
//! use txbus_relay::{Inbox, Relay};
//!
//! const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!
//! // Origin: every committed `order` event goes to the `txbus` exchange, in log order.
//! let relay = Relay::builder(origin, "orders-out", RabbitPublisher::new(AMQP, "txbus"))
//!     .filter(On::in_module("order"))
//!     .start()
//!     .await?;
//!
//! // Receiver: each message is committed once, then acknowledged.
//! let source = RabbitSource::new(AMQP, "billing-orders").bind("txbus", "txbus.order.#");
//! let inbox = Inbox::builder(receiver, "billing-orders", source).start()?;
//!
//! relay.shutdown(Duration::from_secs(5)).await?;
//! inbox.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

pub mod error;
mod link;
pub mod publisher;
pub mod source;

pub use error::Error;
/// The AMQP client this crate speaks through.
pub use lapin;
pub use publisher::{message_properties, RabbitPublisher};
pub use source::{decode_delivery, delivery_count, RabbitAcker, RabbitSource};
