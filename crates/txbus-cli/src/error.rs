//! What can go wrong, said so that the reader knows what to do.

use txbus_core::store;

/// A failure of one command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `--store` argument names no store txbus can open.
    #[error("--store {given:?}: {reason}")]
    BadStore {
        /// What was given.
        given: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The embedded store is held by a running process, and the command writes.
    #[error("the store at {path} is held by a running process (its lock file is taken), and `{command}` changes the store; stop that process and run this again, or do it through that process (bus.replay / its dashboard). Reading commands work while it runs.")]
    Held {
        /// The store file.
        path: String,
        /// The command.
        command: &'static str,
    },
    /// The store failed or refused.
    #[error("{0}")]
    Store(#[from] store::Error),
    /// The bus refused.
    #[error("{0}")]
    Bus(#[from] txbus_core::Error),
    /// What was asked for is not there.
    #[error("{0}")]
    NotFound(String),
    /// An argument does not parse.
    #[error("{0}")]
    Usage(String),
}
