//! The relay's side effect on JetStream: publishes with `Nats-Msg-Id`, acks awaited pipelined.

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use async_nats::HeaderMap;
use futures_util::future::BoxFuture;
use txbus_relay::{wire, OutboundMessage, Publisher};

use crate::error::Error;

/// Publishes relayed messages to JetStream. Each message carries the txbus headers
/// ([`txbus_relay::wire`]) and `Nats-Msg-Id` = its message id, so the stream stores a
/// repeat within its duplicate window once. A batch is written to the connection at once and
/// its publish acks are awaited together: many messages in flight, no round trip per
/// message. The client reconnects on its own after the server went away.
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    js: jetstream::Context,
}

impl JetStreamPublisher {
    /// A publisher on `js`. The streams that take the relay's subjects must exist (see
    /// [`crate::StreamSpec::ensure`]); a subject no stream takes fails the publish.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }
}

/// The NATS headers the publisher sends with a message: the txbus headers (see
/// [`txbus_relay::wire`]) and the message id for deduplication. Whatever the message's headers
/// hold, this never panics (header values cannot carry line breaks: such values travel only
/// inside the JSON header).
pub fn nats_headers(message: &OutboundMessage) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in wire::headers(message) {
        headers.insert(name, value);
    }
    headers
}

impl Publisher for JetStreamPublisher {
    type Error = Error;
    type Confirm = BoxFuture<'static, Result<(), Error>>;

    async fn send_batch(&self, batch: &[OutboundMessage]) -> Result<Self::Confirm, Error> {
        let mut acks = Vec::with_capacity(batch.len());
        for message in batch {
            let publish = Publish::build()
                .payload(message.payload.clone())
                .headers(nats_headers(message))
                .message_id(message.id.to_string());
            let ack = self
                .js
                .send_publish(message.destination.clone(), publish)
                .await
                .map_err(|source| Error::Publish {
                    message_id: message.id.to_string(),
                    subject: message.destination.clone(),
                    source,
                })?;
            acks.push((message.id, message.destination.clone(), ack));
        }
        Ok(Box::pin(async move {
            for (id, subject, ack) in acks {
                ack.await.map_err(|source| Error::Publish {
                    message_id: id.to_string(),
                    subject,
                    source,
                })?;
            }
            Ok(())
        }))
    }
}
