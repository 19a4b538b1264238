//! The txbus analytics sink: every event a handler is subscribed to becomes one ClickHouse
//! row, inserted in acknowledged batches, counted once per message id.
//!
//! The business write and the event commit together (in one transaction with the
//! transactional outbox, or one `transact`); the sink's delivery then succeeds only once
//! ClickHouse has acknowledged the insert holding its row, so nothing committed is missing from
//! the analytics, and a redelivery does not count twice (see [`ClickHouseSink`]).
//!
//! ```no_run
//! # async fn run(store: impl txbus_core::Store) -> Result<(), Box<dyn std::error::Error>> {
//! use serde_json::json;
//! use txbus_clickhouse::{ClickHouseSink, Client};
//! use txbus_core::{Bus, Event, On, PolicyOverride};
//!
//! let sink = ClickHouseSink::builder(Client::new("http://127.0.0.1:8123")?, "promo_events").build()?;
//! sink.create_default_table().await?;
//! let bus = Bus::builder()
//!     .store(store)
//!     // As many deliveries at once as rows in a batch.
//!     .handler_with("promo-analytics", On::event("promo.applied"), PolicyOverride::default().concurrency(4096), sink.clone())
//!     .build()
//!     .await?;
//! bus.publish(Event::new("promo.applied", json!({"code": "SUMMER24", "discount": 5}))).await?;
//! let per_type = sink
//!     .client()
//!     .query("SELECT event_type, count() FROM promo_events FINAL GROUP BY event_type")
//!     .await?;
//! # let _ = per_type; Ok(()) }
//! ```

mod batch;
pub mod client;
pub mod error;
pub mod row;
pub mod sink;

pub use client::{Client, ClientOptions};
pub use error::Error;
pub use row::{default_row, default_table_ddl, RowMapper};
pub use sink::{ClickHouseSink, SinkBuilder, SinkStats};
