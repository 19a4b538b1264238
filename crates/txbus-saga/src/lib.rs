//! Sagas on txbus: long-running work made of steps that each commit on their own, undone by
//! compensations when a later step fails.
//!
//! - **Orchestrated sagas** ([`Saga`], [`Step`], [`Sagas`], [`SagaRuntime`]): a saga is the
//!   stream `saga-<id>` of its state changes, appended with exact expected versions, so two
//!   drivers cannot advance it twice. Each step runs as a durable bus delivery (with the step's
//!   retries, backoff and timeout); its completion is committed atomically with the request of
//!   the next step. When a step fails for good, the completed steps are compensated in
//!   reverse order; a compensation that keeps failing leaves the saga *needs attention*,
//!   listed with its error, until [`SagaRuntime::retry_compensation`]. Steps may wait for an
//!   event ([`Step::wait_for`]), with a timeout; a saga may have a deadline.
//! - **Choreography** ([`choreography`]): events that react to events, linked by
//!   correlation and causation ids, and the chain read back from the log.
//! - **Compensating transacts** ([`compensating`]): handlers register how to undo what they
//!   did; when the operation fails, the compensations of the handlers that succeeded run.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use serde_json::json;
//! use txbus_core::{Bus, HandlerError};
//! use txbus_saga::{Saga, SagaStatus, Sagas, Step, StepContext};
//!
//! let order = Saga::builder("order")
//!     .step(Step::action("reserve-items", |ctx: StepContext| async move {
//!         Ok(json!({"reservation": format!("r-{}", ctx.saga_id())}))
//!     })
//!     .compensate(|ctx: StepContext| async move {
//!         let reserved: serde_json::Value = ctx.output()?;   // what the action produced
//!         let _ = reserved["reservation"].as_str();            // release it …
//!         Ok(())
//!     }))
//!     .step(Step::action("charge-payment", |_ctx: StepContext| async move {
//!         Err::<serde_json::Value, _>(HandlerError::reject("card declined"))
//!     }).retries(2))
//!     .deadline(Duration::from_secs(60))
//!     .build()?;
//!
//! let sagas = Sagas::builder().saga(order).build()?;
//! let bus = sagas
//!     .install(Bus::builder().store(txbus_sqlite::SqliteStore::open("./data/sagas.db")?))
//!     .build()
//!     .await?;
//! let runtime = sagas.attach(bus);
//!
//! let id = runtime.start("order", json!({"order_id": 7})).await?;   // durable once it returns
//! let state = runtime.wait(&id).await?;
//! assert_eq!(state.status, SagaStatus::Failed);                     // payment failed, items released
//! for change in runtime.history(&id).await? {
//!     println!("{} {:?}", change.version, change.event);
//! }
//! # Ok(()) }
//! ```

pub mod choreography;
pub mod compensating;
mod context;
mod definition;
mod error;
mod handlers;
mod id;
mod keys;
mod plan;
mod record;
mod runtime;
mod shared;
mod state;
mod step;
mod timer;
mod view;

pub use context::StepContext;
pub use definition::{Saga, SagaBuilder, MAX_NAME_BYTES};
pub use error::Error;
pub use id::{SagaId, MAX_SAGA_ID_BYTES};
pub use record::{SagaEvent, MODULE, SAGA_ID_HEADER};
pub use runtime::{
    history, list, SagaRuntime, Sagas, SagasBuilder, StartOptions, MAX_CORRELATION_ID_BYTES,
};
pub use state::{
    AttemptError, CompensationStatus, Pending, SagaState, SagaStatus, StepState, StepStatus,
};
pub use step::{Retry, Step};
pub use view::{HistoryEntry, SagaSummary};
