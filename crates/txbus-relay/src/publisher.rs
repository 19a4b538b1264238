//! The side effect of a relay: handing messages to a broker and waiting for its confirmation.

use std::future::Future;

use crate::outbound::OutboundMessage;

/// Publishes to one broker. Implemented once per broker (NATS JetStream, RabbitMQ, Redis
/// Streams, …); the [`crate::Relay`] does the rest: reading the log in order, filtering,
/// pipelining, the checkpoint, reconnecting with backoff.
///
/// Publishing has two steps so that many messages can be in flight without one round trip
/// per message: [`send_batch`](Self::send_batch) hands a batch to the broker connection, in
/// order, and returns at once with a *confirmation*, a future that resolves only when the
/// broker has confirmed (persisted) every message of that batch. The relay keeps several
/// batches' confirmations pending and advances its checkpoint over confirmed batches only, in
/// log order.
///
/// Contract:
///
/// * Messages of one batch, and batches sent one after another, reach the broker in the
///   order sent (as far as the broker keeps an order at all).
/// * The confirmation resolves `Ok` only when the broker confirmed every message of the
///   batch; any failure (a rejected message, a timeout, a lost connection) resolves `Err`.
///   The relay then drops every pending confirmation and sends again from its last confirmed
///   position after a backoff: delivery to the broker is at-least-once. Brokers that can, drop
///   repeats by [`OutboundMessage::id`] (NATS `Nats-Msg-Id`); receivers drop the rest (the
///   [`crate::Inbox`]).
/// * A publisher reconnects on its own (or on the next call) after a broker error: the relay
///   calls it again after its backoff.
pub trait Publisher: Send + Sync + 'static {
    /// What a failure looks like.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Resolves once the broker confirmed every message of a batch.
    type Confirm: Future<Output = Result<(), Self::Error>> + Send + 'static;

    /// Hands `batch` to the broker, in order, and returns its confirmation without waiting
    /// for it. May wait for room (back-pressure) but not for the broker's confirmations.
    fn send_batch(
        &self,
        batch: &[OutboundMessage],
    ) -> impl Future<Output = Result<Self::Confirm, Self::Error>> + Send;

    /// Publishes `batch` and returns only when the broker confirmed every message: the
    /// pipelined [`send_batch`](Self::send_batch) followed by its confirmation.
    fn publish_batch(
        &self,
        batch: &[OutboundMessage],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async move { self.send_batch(batch).await?.await }
    }
}
