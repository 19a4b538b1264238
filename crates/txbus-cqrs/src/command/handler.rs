//! Command handlers: one per command type.

use std::future::Future;
use std::marker::PhantomData;

use super::dispatch::{Dispatch, Reply, ReplyInner};
use super::middleware::BoxFuture;
use super::{Command, Error};

/// Handles one command type. Async closures `Fn(C) -> impl Future<Output = Result<C::Output,
/// Error>>` are handlers, and so is any type implementing this trait.
pub trait CommandHandler<C: Command>: Send + Sync + 'static {
    /// Runs the command.
    fn handle(&self, command: C) -> impl Future<Output = Result<C::Output, Error>> + Send;
}

impl<C, F, Fut> CommandHandler<C> for F
where
    C: Command,
    F: Fn(C) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<C::Output, Error>> + Send,
{
    fn handle(&self, command: C) -> impl Future<Output = Result<C::Output, Error>> + Send {
        self(command)
    }
}

/// A handler with its command type erased.
pub(crate) trait AnyHandler: Send + Sync {
    fn call(&self, command: Dispatch) -> BoxFuture<'_, Result<Reply, Error>>;
}

pub(crate) struct Erased<C, H> {
    handler: H,
    _command: PhantomData<fn(C)>,
}

impl<C, H> Erased<C, H> {
    pub(crate) fn new(handler: H) -> Self {
        Self {
            handler,
            _command: PhantomData,
        }
    }
}

impl<C: Command, H: CommandHandler<C>> AnyHandler for Erased<C, H> {
    fn call(&self, command: Dispatch) -> BoxFuture<'_, Result<Reply, Error>> {
        let name = command.name;
        Box::pin(async move {
            let command = command
                .command
                .into_any()
                .downcast::<C>()
                .map_err(|_| Error::NoHandler { name })?;
            let output = self.handler.handle(*command).await?;
            Ok(Reply(ReplyInner::Output(Box::new(output))))
        })
    }
}
