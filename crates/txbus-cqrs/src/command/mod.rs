//! The command bus: typed commands routed to the one handler registered for their type,
//! through middleware (validation, tracing, idempotency, or your own).
//!
//! ```
//! # async fn run() -> Result<(), txbus_cqrs::command::Error> {
//! use serde::{Deserialize, Serialize};
//! use txbus_cqrs::command::{Command, CommandBus, Envelope, Error, Tracing, Validation};
//!
//! #[derive(Serialize)]
//! struct Rename { id: u64, name: String }
//!
//! impl Command for Rename {
//!     type Output = u64;
//!     const NAME: &'static str = "item.rename";
//!     fn validate(&self) -> Result<(), String> {
//!         if self.name.is_empty() { Err("the name is empty".into()) } else { Ok(()) }
//!     }
//! }
//!
//! let bus = CommandBus::builder()
//!     .middleware(Tracing)
//!     .middleware(Validation)
//!     .handler(|c: Rename| async move { Ok::<_, Error>(c.id) })
//!     .build()?;
//! assert_eq!(bus.send(Rename { id: 7, name: "x".into() }).await?, 7);
//! assert!(matches!(
//!     bus.send(Rename { id: 7, name: String::new() }).await,
//!     Err(Error::Invalid { .. })
//! ));
//! // With an idempotency key, under the `Idempotent` middleware, it runs once per key:
//! let _ = Envelope::new(Rename { id: 7, name: "y".into() }).idempotency_key("rename-7-y");
//! # Ok(()) }
//! ```

mod dispatch;
mod error;
mod handler;
mod idempotent;
mod middleware;
mod trace;
mod validation;

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

pub use dispatch::{Dispatch, Reply};
pub use error::Error;
pub use handler::CommandHandler;
pub use idempotent::Idempotent;
pub use middleware::{BoxFuture, Middleware, Next};
pub use trace::Tracing;
pub use validation::Validation;

use dispatch::ReplyInner;
use handler::{AnyHandler, Erased};

/// A command: a request to change state, handled by exactly one handler.
pub trait Command: Serialize + Send + Sync + 'static {
    /// What its handler returns. Serializable, so that an idempotent run can be replayed.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Its name, in logs, spans and errors (`order.add-item`).
    const NAME: &'static str;

    /// Checks the command on its own, before it runs (under the [`Validation`] middleware).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A command with what travels with it: an id (UUIDv7) and an optional idempotency key.
#[derive(Debug, Clone)]
pub struct Envelope<C> {
    id: Uuid,
    key: Option<String>,
    command: C,
}

impl<C: Command> Envelope<C> {
    /// The command with a fresh id and no idempotency key.
    pub fn new(command: C) -> Self {
        Self {
            id: Uuid::now_v7(),
            key: None,
            command,
        }
    }

    /// Sets the idempotency key: under the [`Idempotent`] middleware, a command with a key
    /// runs once per key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The command's id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

impl<C: Command> From<C> for Envelope<C> {
    fn from(command: C) -> Self {
        Self::new(command)
    }
}

struct Route {
    name: &'static str,
    handler: Box<dyn AnyHandler>,
}

struct Inner {
    middleware: Vec<Arc<dyn Middleware>>,
    routes: HashMap<TypeId, Route>,
}

/// Routes commands to their handlers through the middleware. Cheap to clone.
#[derive(Clone)]
pub struct CommandBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CommandBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.inner.routes.values().map(|r| r.name).collect();
        names.sort_unstable();
        f.debug_struct("CommandBus")
            .field("commands", &names)
            .field("middleware", &self.inner.middleware.len())
            .finish()
    }
}

impl CommandBus {
    /// Starts configuring a command bus.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Sends a command (or an [`Envelope`] with an idempotency key) to its handler through the
    /// middleware, and returns the handler's output (or, for a replayed idempotent command,
    /// the first run's output).
    pub async fn send<C: Command>(
        &self,
        command: impl Into<Envelope<C>>,
    ) -> Result<C::Output, Error> {
        let envelope = command.into();
        let route = self
            .inner
            .routes
            .get(&TypeId::of::<C>())
            .ok_or(Error::NoHandler { name: C::NAME })?;
        let dispatch = Dispatch {
            id: envelope.id,
            name: C::NAME,
            key: envelope.key,
            command: Box::new(envelope.command),
        };
        let next = Next {
            chain: &self.inner.middleware,
            handler: route.handler.as_ref(),
        };
        match next.run(dispatch).await?.0 {
            ReplyInner::Output(output) => output
                .into_any()
                .downcast::<C::Output>()
                .map(|output| *output)
                .map_err(|_| {
                    Error::failed(format!(
                        "internal: command {:?} got an output of another type",
                        C::NAME
                    ))
                }),
            ReplyInner::Stored(json) => {
                serde_json::from_slice(&json).map_err(|source| Error::Codec {
                    name: C::NAME,
                    source,
                })
            }
        }
    }

    /// True when a handler for `C` is registered.
    pub fn handles<C: Command>(&self) -> bool {
        self.inner.routes.contains_key(&TypeId::of::<C>())
    }
}

/// Configures a [`CommandBus`]: middleware in order (the first added runs outermost), and one
/// handler per command type.
#[derive(Default)]
pub struct Builder {
    middleware: Vec<Arc<dyn Middleware>>,
    routes: HashMap<TypeId, Route>,
    duplicate: Option<&'static str>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("commands", &self.routes.len())
            .field("middleware", &self.middleware.len())
            .finish()
    }
}

impl Builder {
    /// Adds middleware; it runs inside the middleware added before it.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Registers the handler of command type `C`. Registering a second one for the same type
    /// makes [`build`](Self::build) fail.
    pub fn handler<C: Command>(mut self, handler: impl CommandHandler<C>) -> Self {
        let route = Route {
            name: C::NAME,
            handler: Box::new(Erased::<C, _>::new(handler)),
        };
        if self.routes.insert(TypeId::of::<C>(), route).is_some() {
            self.duplicate.get_or_insert(C::NAME);
        }
        self
    }

    /// Builds the bus; fails when a command type got two handlers.
    pub fn build(self) -> Result<CommandBus, Error> {
        if let Some(name) = self.duplicate {
            return Err(Error::DuplicateHandler { name });
        }
        Ok(CommandBus {
            inner: Arc::new(Inner {
                middleware: self.middleware,
                routes: self.routes,
            }),
        })
    }
}
