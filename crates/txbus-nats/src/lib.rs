//! NATS JetStream for txbus: the outbox relay, the idempotent inbox, and `transact` across
//! services.
//!
//! * [`JetStreamPublisher`] is the relay's side effect: every message is published with
//!   `Nats-Msg-Id` = its message id (the stream drops repeats within its duplicate window),
//!   and publish acks are awaited pipelined. Run it with [`txbus_relay::Relay`].
//! * [`JetStreamSource`] is a durable pull consumer with explicit acks, for an
//!   [`txbus_relay::Inbox`]: each message is committed once into the receiving bus, and acked
//!   only after that commit is durable.
//! * [`RemoteHandler`] (origin) and an inbox with [`NatsReplier`] (remote) make a `transact`
//!   complete only when the handlers of another service succeeded; a remote rejection fails
//!   the origin's operation with the remote reason.
//!
//! Streams and consumers are created when missing ([`StreamSpec`], [`ConsumerSpec`]).
//!
//! ```no_run
//! # async fn example(origin: txbus_core::Bus, receiver: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! use txbus_nats::{ConsumerSpec, JetStreamPublisher, JetStreamSource, StreamSpec};
//! use txbus_relay::{Inbox, Relay};
//!
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! StreamSpec::new("TXBUS", ["txbus.>"]).ensure(&js).await?;
//!
//! // Origin: relay every committed message to txbus.<module>.<event type>.
//! let relay = Relay::builder(origin, "to-nats", JetStreamPublisher::new(js.clone()))
//!     .start()
//!     .await?;
//!
//! // Receiver: the `billing` module's messages, each committed once.
//! let source = JetStreamSource::new(
//!     js,
//!     ConsumerSpec::new("TXBUS", "billing-inbox").filter_subject("txbus.billing.>"),
//! )
//! .await?;
//! let inbox = Inbox::builder(receiver, "billing-inbox", source).start()?;
//! # let _ = (relay, inbox); Ok(()) }
//! ```

mod error;
mod publisher;
mod remote;
mod replier;
mod setup;
mod source;

pub use error::Error;
pub use publisher::{nats_headers, JetStreamPublisher};
pub use remote::RemoteHandler;
pub use replier::NatsReplier;
pub use setup::{ConsumerSpec, StreamSpec};
pub use source::{decode_message, JetStreamAcker, JetStreamSource};

pub use async_nats;
