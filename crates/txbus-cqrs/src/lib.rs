//! CQRS on txbus: a command bus and a query bus, and idempotency keys — for commands and, as
//! a tower layer, for HTTP APIs.
//!
//! - [`command`]: typed commands routed to the one handler of their type, through middleware:
//!   [`Validation`](command::Validation), [`Tracing`](command::Tracing) (a span per command)
//!   and [`Idempotent`](command::Idempotent) (a command with an idempotency key runs once).
//! - [`query`]: typed queries routed to their handlers, with a bounded result cache that a
//!   query's dependencies — projection checkpoints as `watch::Receiver<u64>` — invalidate
//!   when they move on.
//! - [`idempotency`]: idempotency keys in the bus's key–value space (claim, replay, mismatch,
//!   in progress, expiry).
//! - [`http`]: the `Idempotency-Key` layer for axum and other tower-based servers.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! use serde::{Deserialize, Serialize};
//! use txbus_cqrs::command::{Command, CommandBus, Envelope, Error, Idempotent, Tracing, Validation};
//! use txbus_cqrs::idempotency::{Idempotency, Options};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Pay { order: u64, cents: u64 }
//!
//! impl Command for Pay {
//!     type Output = String; // the payment id
//!     const NAME: &'static str = "payment.pay";
//! }
//!
//! let store = txbus_sqlite::SqliteStore::open(dir.path().join("bus.db"))?;
//! let bus = txbus_core::Bus::builder().store(store).build().await?;
//! let keys = Idempotency::new(bus.clone(), Options::default());
//! let commands = CommandBus::builder()
//!     .middleware(Tracing)
//!     .middleware(Validation)
//!     .middleware(Idempotent::new(keys.clone()))
//!     .handler(|p: Pay| async move { Ok::<_, Error>(format!("pay-{}", p.order)) })
//!     .build()?;
//! let first = commands.send(Envelope::new(Pay { order: 7, cents: 100 }).idempotency_key("k-1")).await?;
//! let again = commands.send(Envelope::new(Pay { order: 7, cents: 100 }).idempotency_key("k-1")).await?;
//! assert_eq!(first, again); // the handler ran once
//!
//! // And for HTTP: `Router::new().route(..).layer(txbus_cqrs::http::IdempotencyLayer::new(keys))`
//! # bus.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

pub mod command;
pub mod http;
pub mod idempotency;
pub mod query;

pub use command::{Command, CommandBus, Envelope};
pub use idempotency::Idempotency;
pub use query::{Query, QueryBus};
