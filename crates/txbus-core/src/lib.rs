//! The core of txbus: the message model, the schema registry, the store contract, the engine
//! and the bus API. It holds no database code: stores live in their own crates
//! (`txbus-sqlite`, …) and the `txbus` crate puts them together.
//!
//! A service hands the bus a list of events; the bus commits them atomically and durably, runs
//! every subscribed handler until each has succeeded (retrying with backoff, enforcing
//! timeouts, containing panics) and reports the outcome as a future, as a stream of progress,
//! or later by operation id.
//!
//! ```no_run
//! # async fn example(store: impl txbus_core::Store) -> Result<(), txbus_core::Error> {
//! use serde_json::json;
//! use txbus_core::{Bus, Event, HandlerError, Message, On};
//!
//! let bus = Bus::builder()
//!     .store(store)
//!     .handler("user-writer", On::event("user.created").module("user"), |msg: Message| async move {
//!         let email = msg.payload()["email"].as_str().unwrap_or_default().to_owned();
//!         if email.is_empty() {
//!             return Err(HandlerError::reject("no e-mail"));
//!         }
//!         Ok(())
//!     })
//!     .build()
//!     .await?;
//!
//! let op = bus
//!     .transact([Event::new("user.created", json!({"user_id": 1, "email": "a@b.c"})).module("user")])
//!     .await?;
//! let outcome = op.outcome().await?;
//! assert!(outcome.is_ok());
//! # Ok(()) }
//! ```

mod ack;
pub mod algebra;
pub mod batch;
pub mod bus;
pub mod chain;
pub mod commit;
pub mod conflict;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod encryption;
mod engine;
pub mod error;
pub mod filter;
pub mod handler;
pub mod inspect;
mod inspector;
pub mod kv;
mod limits;
pub mod message;
pub mod metrics;
pub mod operation;
pub mod outcome;
pub mod past_page;
pub mod policy;
pub mod retention;
pub mod schema;
pub mod session;
pub mod signing;
pub mod store;
pub mod stream;
pub mod system;
pub mod time;
pub mod trace;
pub mod version;

pub use algebra::{Contradiction, Diff};
pub use batch::{Batch, BatchProgress};
pub use bus::{Bus, BusBuilder};
pub use chain::{Broken, VerifyOptions, VerifyProgress, VerifyReport};
pub use commit::Commit;
pub use conflict::Conflict;
pub use encryption::FieldEncryption;
pub use engine::ShutdownReport;
pub use error::Error;
pub use filter::On;
pub use handler::{Handler, HandlerError, HandlerResult, Typed};
pub use inspect::Inspect;
pub use inspector::Inspector;
pub use kv::{KvEntry, KvExpect, KvOp, KvWrite};
pub use limits::Limits;
pub use message::{
    DeliveryContext, Event, Headers, Message, MessageId, OperationId, StoredMessage, TypedEvent,
};
pub use operation::Operation;
pub use outcome::{Failure, FailureKind, OperationState, Outcome, Progress};
pub use past_page::PastPage;
pub use policy::{Backoff, Policy, PolicyOverride};
pub use retention::{Keep, PruneReport, Retention};
pub use schema::SchemaRegistry;
pub use session::{Rebase, Session, SessionConflict};
pub use signing::{CommitSignature, CommitSigner, KeyRing};
pub use store::{CommitKind, CommitRecord, DeadLetter, DeadLetterQuery, KvVersion, Stats, Store};
pub use stream::{Direction, ExpectedVersion, StreamEvent};
pub use trace::TraceParent;
pub use version::{Change, KeyChange, StreamChange, Version, VersionDiff};
