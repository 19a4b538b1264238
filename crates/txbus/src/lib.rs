//! txbus: transactional events for Rust services.
//!
//! Hand the bus a list of events: it commits them atomically and durably, runs every
//! subscribed handler until each has succeeded — retrying with backoff, enforcing timeouts,
//! containing panics — and reports the outcome as a future, as a stream of progress, or later
//! by operation id, even after a restart.
//!
//! ```no_run
//! use serde_json::json;
//! use txbus::{Bus, Event, HandlerError, Message, On, SqliteStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::builder()
//!     .store(SqliteStore::open("./data/txbus.db")?)
//!     .handler("user-writer", On::event("user.created").module("user"), |msg: Message| async move {
//!         // write the business row here, idempotently (msg.id() is stable across attempts)
//!         Ok::<(), HandlerError>(())
//!     })
//!     .build()
//!     .await?;
//!
//! let op = bus
//!     .transact([
//!         Event::new("user.created", json!({"user_id": 42, "email": "a@b.com"})).module("user"),
//!         Event::new("audit.user-created", json!({"user_id": 42})).module("audit"),
//!     ])
//!     .await?; // durable now
//! let outcome = op.outcome().await?; // every handler of every event succeeded, or why not
//! assert!(outcome.is_ok());
//! # Ok(()) }
//! ```
//!
//! Features: `sqlite` (default) brings the embedded store, [`SqliteStore`]; `postgres` the
//! scale-out store, `PostgresStore` (many bus processes on one database).
//! `es` brings event sourcing as the module `es` (aggregates, repositories, snapshots,
//! projections).
//! `cqrs` brings the module `cqrs` (command and query buses, idempotency keys and their HTTP
//! layer).
//! `saga` brings the module `saga` (orchestrated sagas with compensation, choreography
//! helpers, compensating transacts).
//! `otlp` brings the module `otel`: an OpenTelemetry OTLP/HTTP exporter for txbus's spans and
//! the propagator that gives them, and the `traceparent` headers of messages,
//! OpenTelemetry's ids.

pub use txbus_core::*;

#[cfg(feature = "sqlite")]
pub use txbus_sqlite::{Durability, SqliteOptions, SqliteStore};

#[cfg(feature = "postgres")]
pub use txbus_postgres::{PostgresOptions, PostgresStore};

/// Event sourcing: streams, aggregates and their repository, snapshots, projections,
/// upcasters (feature `es`).
#[cfg(feature = "es")]
pub use txbus_es as es;

/// The outbox relay and the idempotent inbox, independent of any broker (feature `relay`,
/// on with every broker feature).
#[cfg(feature = "relay")]
pub use txbus_relay as relay;

/// NATS JetStream: the relay's publisher, the inbox's pull consumer, and `transact` across
/// services (feature `nats`).
#[cfg(feature = "nats")]
pub use txbus_nats as nats;

/// CQRS: the command bus (validation, tracing, idempotency middleware), the query bus with its
/// checkpoint-invalidated cache, idempotency keys and the `Idempotency-Key` layer for axum
/// (feature `cqrs`).
#[cfg(feature = "cqrs")]
pub use txbus_cqrs as cqrs;

/// Sagas: orchestrated steps with compensation, steps that wait for events, choreography
/// helpers and compensating transacts (feature `saga`).
#[cfg(feature = "saga")]
pub use txbus_saga as saga;

/// OpenTelemetry: the OTLP/HTTP span exporter and the propagator that gives txbus's spans and
/// message headers OpenTelemetry's trace and span ids (feature `otlp`).
#[cfg(feature = "otlp")]
pub use txbus_otel as otel;
