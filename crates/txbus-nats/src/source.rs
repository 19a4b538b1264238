//! The inbox's source on JetStream: a durable pull consumer with explicit acknowledgements.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures_util::StreamExt;
use txbus_relay::wire::{self, DecodeError};
use txbus_relay::{Acker, InboundMessage, Received, Source};

use crate::error::Error;
use crate::setup::ConsumerSpec;

/// Messages of a durable JetStream pull consumer, for an [`txbus_relay::Inbox`]. The
/// consumer is created when missing; after an error (the server restarted, the consumer was
/// deleted) it is looked up or created again on the next call.
pub struct JetStreamSource {
    js: jetstream::Context,
    spec: ConsumerSpec,
    consumer: Option<PullConsumer>,
    messages: Option<jetstream::consumer::pull::Stream>,
}

impl std::fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSource")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl JetStreamSource {
    /// A source on the consumer `spec`; the stream must exist (see
    /// [`crate::StreamSpec::ensure`]). Creates the consumer now, so that messages published
    /// from here on are kept for it.
    pub async fn new(js: jetstream::Context, spec: ConsumerSpec) -> Result<Self, Error> {
        let mut source = Self {
            js,
            spec,
            consumer: None,
            messages: None,
        };
        source.consumer().await?;
        Ok(source)
    }

    async fn consumer(&mut self) -> Result<PullConsumer, Error> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let what = || {
            format!(
                "creating consumer {} of stream {}",
                self.spec.durable, self.spec.stream
            )
        };
        let stream = self
            .js
            .get_stream(&self.spec.stream)
            .await
            .map_err(|e| Error::nats(what(), e))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(&self.spec.durable, self.spec.config())
            .await
            .map_err(|e| Error::nats(what(), e))?;
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    fn reset(&mut self) {
        self.messages = None;
        self.consumer = None;
    }
}

impl Source for JetStreamSource {
    type Acker = JetStreamAcker;
    type Error = Error;

    async fn next(&mut self) -> Result<Received<JetStreamAcker>, Error> {
        if self.messages.is_none() {
            let consumer = self.consumer().await?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.spec.batch)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            match messages {
                Ok(m) => self.messages = Some(m),
                Err(e) => {
                    self.reset();
                    return Err(Error::nats(
                        format!("pulling from consumer {}", self.spec.durable),
                        e,
                    ));
                }
            }
        }
        let next = match self.messages.as_mut() {
            Some(m) => m.next().await,
            None => None,
        };
        match next {
            Some(Ok(message)) => {
                let delivery_count = message
                    .info()
                    .ok()
                    .and_then(|i| u64::try_from(i.delivered).ok());
                let (message, acker) = message.split();
                let decoded = decode_message(message.headers.as_ref(), &message.payload);
                Ok(Received {
                    message: decoded,
                    delivery_count,
                    acker: JetStreamAcker(acker),
                })
            }
            Some(Err(e)) => {
                self.reset();
                Err(Error::nats(
                    format!("receiving from consumer {}", self.spec.durable),
                    e,
                ))
            }
            None => {
                self.reset();
                Err(Error::StreamEnded(self.spec.durable.clone()))
            }
        }
    }
}

/// Decodes a message as the source does: the txbus headers from its header map (see
/// [`txbus_relay::wire`]), the payload as JSON. Anything a sender may put on the stream comes
/// back as a value or a [`DecodeError`], never a panic.
pub fn decode_message(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<InboundMessage, DecodeError> {
    wire::decode(
        |name| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        },
        payload,
    )
}

/// Acknowledges one JetStream delivery.
pub struct JetStreamAcker(jetstream::message::Acker);

impl std::fmt::Debug for JetStreamAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JetStreamAcker")
    }
}

impl Acker for JetStreamAcker {
    type Error = Error;

    async fn ack(self) -> Result<(), Error> {
        self.0.ack().await.map_err(|e| Error::Nats {
            what: "acknowledging a message".into(),
            source: e,
        })
    }

    async fn retry(self, delay: Duration) -> Result<(), Error> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| Error::Nats {
                what: "asking for a later delivery".into(),
                source: e,
            })
    }

    async fn discard(self) -> Result<(), Error> {
        self.0
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| Error::Nats {
                what: "discarding a message".into(),
                source: e,
            })
    }
}
