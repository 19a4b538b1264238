//! The receiving side of a broker: where an [`crate::Inbox`] takes its messages from.

use std::future::Future;
use std::time::Duration;

use crate::inbound::InboundMessage;
use crate::wire::DecodeError;

/// A broker subscription that yields messages one at a time, each with its [`Acker`].
/// Implemented once per broker (a JetStream durable pull consumer, a RabbitMQ queue with
/// manual acks, a Redis Streams consumer group).
///
/// Contract: a message that is not acknowledged is delivered again later (after the broker's
/// ack wait, or when [`Acker::retry`] asks for it); a source reconnects on its own after a
/// broker error, and the inbox calls [`next`](Self::next) again after a backoff.
pub trait Source: Send + 'static {
    /// Acknowledges one delivery.
    type Acker: Acker;
    /// What a failure looks like.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Waits for the next message.
    fn next(&mut self) -> impl Future<Output = Result<Received<Self::Acker>, Self::Error>> + Send;
}

/// One delivery from a [`Source`].
#[derive(Debug)]
pub struct Received<A> {
    /// The message, or why it does not decode (see [`crate::wire::decode`]).
    pub message: Result<InboundMessage, DecodeError>,
    /// How many times the broker delivered it, this time included, when it says (1 = first).
    pub delivery_count: Option<u64>,
    /// Settles the delivery with the broker.
    pub acker: A,
}

/// Settles one delivery with the broker.
pub trait Acker: Send + 'static {
    /// What a failure looks like.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The message is handled (durably committed): the broker may forget it.
    fn ack(self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The message could not be handled now: deliver it again after about `delay`.
    fn retry(self, delay: Duration) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The message can never be handled (it does not decode, or the bus refuses it): do not
    /// deliver it again (brokers with a dead-letter facility put it there).
    fn discard(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
