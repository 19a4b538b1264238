//! Handlers: what runs for each delivered message.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use crate::message::{Message, TypedEvent};

/// How a handler failed.
///
/// `?` on any error type turns it into a *transient* failure, retried with backoff.
/// [`HandlerError::reject`] fails the operation at once, without retry (design note 000's `false`).
pub enum HandlerError {
    /// Definitive: the message is refused, no retry.
    Reject(String),
    /// Temporary: retried until the handler's retries run out.
    Transient(String),
}

impl HandlerError {
    /// A definitive refusal: the operation fails now, no retry.
    pub fn reject(reason: impl fmt::Display) -> Self {
        Self::Reject(reason.to_string())
    }
    /// A temporary failure: retried with backoff.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Self::Transient(reason.to_string())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reject(r) => write!(f, "Reject({r:?})"),
            Self::Transient(r) => write!(f, "Transient({r:?})"),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reject(r) => write!(f, "rejected: {r}"),
            Self::Transient(r) => write!(f, "transient: {r}"),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let mut reason = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        Self::Transient(reason)
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// A boxed handler future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Handles delivered messages. Implemented for async closures `Fn(Message) -> impl Future`.
///
/// Handlers must be idempotent: a message may be delivered more than once (after a crash,
/// a timeout, or a lease taken over). Use [`Message::id`] to recognise a repeat.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery attempt.
    fn handle(&self, message: Message) -> impl Future<Output = HandlerResult> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    fn handle(&self, message: Message) -> impl Future<Output = HandlerResult> + Send {
        self(message)
    }
}

/// A handler behind dynamic dispatch, as the engine stores it.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call(&self, message: Message) -> BoxFuture<HandlerResult>;
}

pub(crate) struct Erased<H>(pub(crate) Arc<H>);

impl<H: Handler> ErasedHandler for Erased<H> {
    fn call(&self, message: Message) -> BoxFuture<HandlerResult> {
        let handler = Arc::clone(&self.0);
        Box::pin(async move { handler.handle(message).await })
    }
}

/// Adapts a function of a typed event into a [`Handler`]: the payload is decoded first, and a
/// payload that does not decode is rejected (retrying would not change it).
pub struct Typed<T, F> {
    f: F,
    _event: PhantomData<fn() -> T>,
}

impl<T, F> Typed<T, F> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _event: PhantomData,
        }
    }
}

impl<T, F, Fut> Handler for Typed<T, F>
where
    T: TypedEvent,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    async fn handle(&self, message: Message) -> HandlerResult {
        let event: T = message.decode().map_err(|e| {
            HandlerError::reject(format!("payload does not decode as {}: {e}", T::EVENT_TYPE))
        })?;
        (self.f)(event, message).await
    }
}
