//! The outbox relay and the idempotent inbox of txbus, independent of any broker.
//!
//! * A [`Relay`] is an ordered subscription over a bus's log: it reads commits in order from
//!   its checkpoint, publishes their messages through a [`Publisher`] with many in flight,
//!   and advances its checkpoint (in the store's key–value space, by compare-and-set) only
//!   over what the broker confirmed. After a crash or a broker error it resumes from the
//!   checkpoint: at-least-once to the broker, with the message id for deduplication.
//! * An [`Inbox`] takes messages from a [`Source`] and commits each into the receiving bus
//!   under its original message id, with a dedupe mark in the same commit: a redelivered
//!   message is acknowledged without its handlers running twice. The broker is acknowledged
//!   only once the commit is durable.
//! * A message sent with a reply address is a `transact` across services: the inbox commits
//!   it as a `transact` and answers with a [`RemoteReply`] (the outcome, or the remote
//!   handler's failure), which the origin turns into its own handler's result.
//!
//! Broker crates (`txbus-nats`, …) implement [`Publisher`], [`Source`] with its [`Acker`],
//! and [`Replier`], and encode messages with [`wire`].
//!
//! ```no_run
//! # async fn example<P: txbus_relay::Publisher, S: txbus_relay::Source>(
//! #     bus: txbus_core::Bus, publisher: P, source: S,
//! # ) -> Result<(), txbus_relay::Error> {
//! use std::time::Duration;
//! use txbus_core::On;
//! use txbus_relay::{Inbox, Relay, SubjectRoute};
//!
//! // Origin: every event of the `user` module goes to the broker as txbus.user.<event type>.
//! let relay = Relay::builder(bus.clone(), "users-out", publisher)
//!     .filter(On::in_module("user"))
//!     .route(SubjectRoute::new("txbus"))
//!     .start()
//!     .await?;
//! println!("lag: {}", relay.status().lag());
//!
//! // Receiver: each message is committed once into this bus, whatever the broker repeats.
//! let inbox = Inbox::builder(bus, "users-in", source).start()?;
//!
//! relay.shutdown(Duration::from_secs(5)).await?;
//! inbox.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

mod checkpoint;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod inbound;
mod inbox;
mod metrics;
mod outbound;
mod publisher;
mod relay;
mod remote;
mod route;
mod source;
mod trace;
pub mod wire;

pub use checkpoint::{checkpoint_key, read_checkpoint};
pub use error::Error;
pub use inbound::InboundMessage;
pub use inbox::{dedupe_key, Inbox, InboxBuilder, InboxHandle, InboxStats};
pub use outbound::OutboundMessage;
pub use publisher::Publisher;
pub use relay::{Relay, RelayBuilder, RelayHandle, RelayStatus};
pub use remote::{NoReplies, NoRepliesError, RemoteReply, RemoteResult, Replier};
pub use route::{Route, SubjectRoute};
pub use source::{Acker, Received, Source};
