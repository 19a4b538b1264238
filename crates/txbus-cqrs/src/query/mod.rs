//! The query bus: typed queries routed to their handlers, with a result cache that is
//! invalidated when the projections a query reads from move on.
//!
//! A query type is registered with its dependencies: `watch::Receiver<u64>` checkpoints, as
//! projections expose them (any watch works). A result computed while the dependencies stood
//! at `c` is served from the cache only while they still stand at `c` (and for at most the
//! cache's TTL); the checkpoints are read *before* the handler runs, so a projection that
//! moves during the query makes the stored result stale at once rather than hiding the move.
//! A query type registered with no dependencies is cached by TTL alone; register it with
//! [`Builder::uncached`] to run it every time.
//!
//! ```
//! # async fn run() -> Result<(), txbus_cqrs::query::Error> {
//! use serde::Serialize;
//! use tokio::sync::watch;
//! use txbus_cqrs::query::{Error, Query, QueryBus};
//!
//! #[derive(Serialize)]
//! struct CountOrders;
//!
//! impl Query for CountOrders {
//!     type Output = u64;
//!     const NAME: &'static str = "orders.count";
//! }
//!
//! let (checkpoint, rx) = watch::channel(0u64); // a projection's checkpoint
//! let bus = QueryBus::builder()
//!     .handler(|_: CountOrders| async { Ok::<_, Error>(3) }, [rx])
//!     .build()?;
//! assert_eq!(bus.ask(CountOrders).await?, 3); // runs the handler
//! assert_eq!(bus.ask(CountOrders).await?, 3); // from the cache
//! checkpoint.send_replace(1);                 // the projection moved on
//! assert_eq!(bus.ask(CountOrders).await?, 3); // runs the handler again
//! assert_eq!(bus.cache_stats().hits, 1);
//! # Ok(()) }
//! ```

mod cache;
mod error;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

pub use cache::{CacheOptions, CacheStats};
pub use error::Error;

use crate::command::BoxFuture;
use cache::{Cache, Key};

/// A query: a request to read state, answered by exactly one handler.
pub trait Query: Serialize + Send + Sync + 'static {
    /// What its handler returns; cached results are cloned out, so make large results cheap
    /// to clone (an `Arc`).
    type Output: Clone + Send + Sync + 'static;

    /// Its name, in errors (`orders.list`).
    const NAME: &'static str;
}

/// Answers one query type. Async closures `Fn(Q) -> impl Future<Output = Result<Q::Output,
/// Error>>` are handlers, and so is any type implementing this trait.
pub trait QueryHandler<Q: Query>: Send + Sync + 'static {
    /// Answers the query.
    fn handle(&self, query: Q) -> impl Future<Output = Result<Q::Output, Error>> + Send;
}

impl<Q, F, Fut> QueryHandler<Q> for F
where
    Q: Query,
    F: Fn(Q) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Q::Output, Error>> + Send,
{
    fn handle(&self, query: Q) -> impl Future<Output = Result<Q::Output, Error>> + Send {
        self(query)
    }
}

trait AnyQueryHandler<Q: Query>: Send + Sync {
    fn call(&self, query: Q) -> BoxFuture<'_, Result<Q::Output, Error>>;
}

struct Erased<Q, H> {
    handler: H,
    _query: PhantomData<fn(Q)>,
}

impl<Q: Query, H: QueryHandler<Q>> AnyQueryHandler<Q> for Erased<Q, H> {
    fn call(&self, query: Q) -> BoxFuture<'_, Result<Q::Output, Error>> {
        Box::pin(self.handler.handle(query))
    }
}

struct Route<Q: Query> {
    handler: Box<dyn AnyQueryHandler<Q>>,
    deps: Vec<watch::Receiver<u64>>,
    cached: bool,
}

/// Routes queries to their handlers, through the cache. Cheap to clone.
#[derive(Clone)]
pub struct QueryBus {
    inner: Arc<Inner>,
}

struct Inner {
    routes: HashMap<TypeId, (&'static str, Box<dyn Any + Send + Sync>)>,
    cache: Cache,
}

impl std::fmt::Debug for QueryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.inner.routes.values().map(|(n, _)| *n).collect();
        names.sort_unstable();
        f.debug_struct("QueryBus")
            .field("queries", &names)
            .field("cache", &self.inner.cache.stats())
            .finish()
    }
}

impl QueryBus {
    /// Starts configuring a query bus.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Answers a query: from the cache when a result is there and still valid, else by its
    /// handler (whose result is then cached).
    pub async fn ask<Q: Query>(&self, query: Q) -> Result<Q::Output, Error> {
        let route = self
            .inner
            .routes
            .get(&TypeId::of::<Q>())
            .and_then(|(_, route)| route.downcast_ref::<Route<Q>>())
            .ok_or(Error::NoHandler { name: Q::NAME })?;
        let cache = &self.inner.cache;
        if !route.cached || !cache.enabled() {
            return route.handler.call(query).await;
        }
        let bytes = serde_json::to_vec(&query).map_err(|source| Error::Codec {
            name: Q::NAME,
            source,
        })?;
        let key = Key::new(TypeId::of::<Q>(), bytes);
        if let Some(hit) = cache
            .get(&key, &route.deps)
            .and_then(|value| value.downcast_ref::<Q::Output>().cloned())
        {
            return Ok(hit);
        }
        // Read the checkpoints before running: a move during the query leaves the stored
        // result stale rather than labelled with a position it may not reflect.
        let checkpoints = route.deps.iter().map(|rx| *rx.borrow()).collect();
        let output = route.handler.call(query).await?;
        cache.insert(key, Arc::new(output.clone()), checkpoints);
        Ok(output)
    }

    /// Drops every cached result.
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }

    /// The cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }
}

/// Configures a [`QueryBus`]: one handler per query type, each with its dependencies, and the
/// cache's bounds.
#[derive(Default)]
pub struct Builder {
    routes: HashMap<TypeId, (&'static str, Box<dyn Any + Send + Sync>)>,
    duplicate: Option<&'static str>,
    cache: CacheOptions,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("queries", &self.routes.len())
            .field("cache", &self.cache)
            .finish()
    }
}

impl Builder {
    /// The cache's bounds. Default: [`CacheOptions::default`].
    pub fn cache(mut self, options: CacheOptions) -> Self {
        self.cache = options;
        self
    }

    /// Registers the handler of query type `Q`, whose results stay valid while every
    /// checkpoint in `depends_on` stays where it was.
    pub fn handler<Q: Query>(
        self,
        handler: impl QueryHandler<Q>,
        depends_on: impl IntoIterator<Item = watch::Receiver<u64>>,
    ) -> Self {
        self.route(Route::<Q> {
            handler: Box::new(Erased {
                handler,
                _query: PhantomData,
            }),
            deps: depends_on.into_iter().collect(),
            cached: true,
        })
    }

    /// Registers the handler of query type `Q`, whose results are never cached.
    pub fn uncached<Q: Query>(self, handler: impl QueryHandler<Q>) -> Self {
        self.route(Route::<Q> {
            handler: Box::new(Erased {
                handler,
                _query: PhantomData,
            }),
            deps: Vec::new(),
            cached: false,
        })
    }

    fn route<Q: Query>(mut self, route: Route<Q>) -> Self {
        if self
            .routes
            .insert(TypeId::of::<Q>(), (Q::NAME, Box::new(route)))
            .is_some()
        {
            self.duplicate.get_or_insert(Q::NAME);
        }
        self
    }

    /// Builds the bus; fails when a query type got two handlers.
    pub fn build(self) -> Result<QueryBus, Error> {
        if let Some(name) = self.duplicate {
            return Err(Error::DuplicateHandler { name });
        }
        Ok(QueryBus {
            inner: Arc::new(Inner {
                routes: self.routes,
                cache: Cache::new(self.cache),
            }),
        })
    }
}
