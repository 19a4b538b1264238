//! The errors of the saga API.

use crate::id::SagaId;
use crate::state::SagaStatus;

/// What went wrong with a saga call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A saga definition (or a name in it) is unusable; nothing was registered.
    #[error("invalid saga definition: {0}")]
    InvalidDefinition(String),
    /// No saga of this type was registered with [`crate::Sagas`].
    #[error(
        "no saga type {0:?} is registered; add it with SagasBuilder::saga before starting one"
    )]
    UnknownSagaType(String),
    /// A saga with this id exists already; nothing was written.
    #[error("saga {0} was started already; read it with SagaRuntime::get")]
    AlreadyStarted(SagaId),
    /// Another unfinished saga of the same type holds this correlation id; nothing was
    /// written.
    #[error("an unfinished saga of type {saga_type:?} already holds correlation id {correlation_id:?}; wait for it to finish or use another correlation id")]
    CorrelationInUse {
        /// The saga type.
        saga_type: String,
        /// The correlation id.
        correlation_id: String,
    },
    /// No saga with this id.
    #[error("no saga {0}: never started here")]
    NotFound(SagaId),
    /// The saga is not in the state the call needs.
    #[error("saga {id} is {status}; {what}")]
    WrongStatus {
        /// The saga.
        id: SagaId,
        /// Where it stands.
        status: SagaStatus,
        /// What the call needed.
        what: &'static str,
    },
    /// The saga's stream holds what this version cannot read, or was started with other steps
    /// than its registered definition has.
    #[error("saga {id} cannot be driven: {reason}")]
    Corrupt {
        /// The saga.
        id: SagaId,
        /// What is wrong.
        reason: String,
    },
    /// The saga's input (or a step's output) is not representable as JSON.
    #[error("saga input is not JSON: {0}")]
    Input(String),
    /// Other writers kept moving the saga while this call tried to; try again.
    #[error("saga {0} kept changing under this call (too many conflicts); try again")]
    Contended(SagaId),
    /// Stored compensation data could not be read back.
    #[error("stored compensation data is unreadable: {0}")]
    Unreadable(String),
    /// The compensation registrations of an operation kept changing under this call.
    #[error("the compensation registrations of operation {0} kept changing; try again")]
    OperationContended(txbus_core::OperationId),
    /// The bus or its store failed.
    #[error(transparent)]
    Bus(#[from] txbus_core::Error),
}
