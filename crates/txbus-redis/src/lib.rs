//! Redis Streams for txbus: the outbox relay's [`RedisPublisher`] (pipelined `XADD`, many
//! batches in flight on one connection) and the idempotent inbox's [`RedisSource`] (a
//! consumer group: `XREADGROUP`, `XACK` after the commit, `XAUTOCLAIM` for entries left
//! pending), for the broker-independent [`txbus_relay::Relay`] and [`txbus_relay::Inbox`].
//!
//! Stream names come from the relay's route: by default `txbus.<module>.<event type>`, one
//! stream per event type; route to one stream per module (or one for all) with a closure.
//!
//! ```no_run
//! # async fn run(origin: txbus_core::Bus, receiver: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use txbus_core::{On, StoredMessage};
//! use txbus_redis::{RedisPublisher, RedisSource};
//! use txbus_relay::{Inbox, Relay};
//!
//! const REDIS: &str = "redis://127.0.0.1:6379";
//!
//! // Origin: every `order` event is appended to the stream `orders`, in log order.
//! let relay = Relay::builder(origin, "orders-out", RedisPublisher::new(REDIS)?)
//!     .filter(On::in_module("order"))
//!     .route(|_: &StoredMessage| "orders".to_owned())
//!     .start()
//!     .await?;
//!
//! // Receiver: each entry is committed once, then acknowledged.
//! let source = RedisSource::new(REDIS, "orders", "billing", "billing-1")?;
//! let inbox = Inbox::builder(receiver, "billing-orders", source).start()?;
//!
//! relay.shutdown(Duration::from_secs(5)).await?;
//! inbox.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

mod connect;
pub mod entry;
pub mod error;
pub mod publisher;
pub mod source;

pub use entry::{decode_entry, entry_fields, PAYLOAD_FIELD};
pub use error::Error;
pub use publisher::RedisPublisher;
/// The Redis client this crate speaks through.
pub use redis;
pub use source::{RedisAcker, RedisSource};
