//! What can go wrong with a command.

use crate::http::BoxError;

/// Why a command did not produce its output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No handler is registered for the command's type.
    #[error(
        "no handler for command {name:?}: register one with CommandBus::builder().handler(..)"
    )]
    NoHandler {
        /// The command's name.
        name: &'static str,
    },
    /// Two handlers were registered for one command type.
    #[error("command {name:?} has two handlers; register exactly one handler per command type")]
    DuplicateHandler {
        /// The command's name.
        name: &'static str,
    },
    /// The command failed validation; it did not run.
    #[error("command {name:?} is invalid, it did not run: {reason}")]
    Invalid {
        /// The command's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The handler refused the command: a business rule does not allow it. Retrying the same
    /// command will not help.
    #[error("command rejected ({code}): {reason}")]
    Rejected {
        /// A short, stable code for callers to match on (`too_many_items`); `rejected` when the
        /// handler gave none.
        code: String,
        /// Why, for people.
        reason: String,
    },
    /// The handler failed for another reason (the store, a conflict that outlived its
    /// retries, …); retrying may help.
    #[error("command failed: {0}")]
    Failed(#[source] BoxError),
    /// The command's idempotency key did not let it run (used for another command, or the
    /// first run is still in progress).
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::Error),
    /// The command or its output could not be serialized, or a stored output read back.
    #[error("command {name:?}: serializing its input or output failed: {source}")]
    Codec {
        /// The command's name.
        name: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A refusal by a business rule, with the reason the caller sees (code `rejected`).
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::rejected_as("rejected", reason)
    }

    /// A refusal by a business rule, with a code for callers to match on (an HTTP layer maps
    /// codes to statuses) and the reason they see.
    pub fn rejected_as(code: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Rejected {
            code: code.into(),
            reason: reason.into(),
        }
    }

    /// Any other failure of the handler.
    pub fn failed(error: impl Into<BoxError>) -> Self {
        Self::Failed(error.into())
    }
}
