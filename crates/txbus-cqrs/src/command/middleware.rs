//! Middleware: what runs around every command, in the order it was added (the first added is
//! the outermost), like a stack of tower layers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::dispatch::{Dispatch, Reply};
use super::handler::AnyHandler;
use super::Error;

/// A boxed future, as middleware returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Code that runs around every command: it may look at the command, answer it itself, or
/// hand it on with [`Next::run`] and look at the reply.
///
/// ```
/// use txbus_cqrs::command::{BoxFuture, Dispatch, Error, Middleware, Next, Reply};
///
/// /// Refuses every command while the service is read-only.
/// struct ReadOnly;
///
/// impl Middleware for ReadOnly {
///     fn call<'a>(&'a self, command: Dispatch, _next: Next<'a>) -> BoxFuture<'a, Result<Reply, Error>> {
///         Box::pin(async move { Err(Error::rejected(format!("{} refused: read-only", command.name()))) })
///     }
/// }
/// ```
pub trait Middleware: Send + Sync + 'static {
    /// Handles `command`, usually by passing it to `next`.
    fn call<'a>(&'a self, command: Dispatch, next: Next<'a>)
        -> BoxFuture<'a, Result<Reply, Error>>;
}

/// The rest of the chain: the middleware after this one, then the handler.
pub struct Next<'a> {
    pub(crate) chain: &'a [Arc<dyn Middleware>],
    pub(crate) handler: &'a dyn AnyHandler,
}

impl std::fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next")
            .field("middleware_left", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Next<'a> {
    /// Runs the rest of the chain on `command`.
    pub fn run(self, command: Dispatch) -> BoxFuture<'a, Result<Reply, Error>> {
        match self.chain.split_first() {
            Some((first, rest)) => first.call(
                command,
                Next {
                    chain: rest,
                    handler: self.handler,
                },
            ),
            None => self.handler.call(command),
        }
    }
}
