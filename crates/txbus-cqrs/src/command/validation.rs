//! Validation middleware: a command that fails its own checks does not run.

use super::dispatch::{Dispatch, Reply};
use super::middleware::{BoxFuture, Middleware, Next};
use super::Error;

/// Runs [`super::Command::validate`] before the handler; a command that fails it is answered
/// with [`Error::Invalid`] and never reaches its handler (nor claims its idempotency key, when
/// added before [`super::Idempotent`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Validation;

impl Middleware for Validation {
    fn call<'a>(
        &'a self,
        command: Dispatch,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Reply, Error>> {
        if let Err(reason) = command.validate() {
            let name = command.name();
            return Box::pin(async move { Err(Error::Invalid { name, reason }) });
        }
        next.run(command)
    }
}
