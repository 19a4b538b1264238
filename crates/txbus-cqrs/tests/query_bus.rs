//! The query bus: routing, and the result cache — served while the dependencies stay, missed
//! once one moves (also during the query), expired after its TTL, bounded, keyed by query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use txbus_cqrs::query::{CacheOptions, Error, Query, QueryBus};

#[derive(Debug, Serialize)]
struct Balance {
    account: String,
}

impl Query for Balance {
    type Output = (String, u64);
    const NAME: &'static str = "account.balance";
}

#[derive(Debug, Serialize)]
struct Unrouted;

impl Query for Unrouted {
    type Output = ();
    const NAME: &'static str = "nobody.answers-this";
}

/// Counts handler runs; answers with the account and the run number.
#[derive(Default)]
struct Runs(AtomicU64);

impl Runs {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn balance(account: &str) -> Balance {
    Balance {
        account: account.into(),
    }
}

fn bus(runs: &Arc<Runs>, deps: Vec<watch::Receiver<u64>>, cache: CacheOptions) -> QueryBus {
    let runs = runs.clone();
    QueryBus::builder()
        .cache(cache)
        .handler(
            move |q: Balance| {
                let runs = runs.clone();
                async move { Ok((q.account, runs.next())) }
            },
            deps,
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_cached_result_is_served_until_a_dependency_moves() {
    let runs = Arc::new(Runs::default());
    let (orders, orders_rx) = watch::channel(10u64);
    let (stock, stock_rx) = watch::channel(3u64);
    let bus = bus(&runs, vec![orders_rx, stock_rx], CacheOptions::default());

    assert_eq!(bus.ask(balance("a")).await.unwrap(), ("a".into(), 1));
    assert_eq!(bus.ask(balance("a")).await.unwrap(), ("a".into(), 1));
    assert_eq!(runs.get(), 1);
    orders.send_replace(11);
    assert_eq!(bus.ask(balance("a")).await.unwrap(), ("a".into(), 2));
    assert_eq!(bus.ask(balance("a")).await.unwrap(), ("a".into(), 2));
    stock.send_replace(4);
    assert_eq!(bus.ask(balance("a")).await.unwrap(), ("a".into(), 3));
    let stats = bus.cache_stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (2, 3, 1));
}

#[tokio::test]
async fn a_dependency_that_moves_during_the_query_leaves_its_result_stale() {
    let runs = Arc::new(Runs::default());
    let (checkpoint, rx) = watch::channel(0u64);
    let checkpoint = Arc::new(checkpoint);
    let bus = {
        let runs = runs.clone();
        let checkpoint = checkpoint.clone();
        QueryBus::builder()
            .handler(
                move |q: Balance| {
                    let (runs, checkpoint) = (runs.clone(), checkpoint.clone());
                    async move {
                        let run = runs.next();
                        if run == 1 {
                            // The projection advances while this query reads the old state.
                            checkpoint.send_replace(1);
                        }
                        Ok((q.account, run))
                    }
                },
                [rx],
            )
            .build()
            .unwrap()
    };
    assert_eq!(bus.ask(balance("a")).await.unwrap().1, 1);
    assert_eq!(
        bus.ask(balance("a")).await.unwrap().1,
        2,
        "the first result was not served"
    );
    assert_eq!(bus.ask(balance("a")).await.unwrap().1, 2);
}

#[tokio::test]
async fn results_expire_after_the_ttl() {
    let runs = Arc::new(Runs::default());
    let ttl = Duration::from_millis(100);
    let bus = bus(&runs, Vec::new(), CacheOptions::default().ttl(ttl));
    assert_eq!(bus.ask(balance("a")).await.unwrap().1, 1);
    assert_eq!(bus.ask(balance("a")).await.unwrap().1, 1);
    tokio::time::sleep(ttl + Duration::from_millis(20)).await;
    assert_eq!(bus.ask(balance("a")).await.unwrap().1, 2);
}

#[tokio::test]
async fn distinct_queries_are_cached_apart_and_the_cache_is_bounded() {
    let runs = Arc::new(Runs::default());
    let bus = bus(
        &runs,
        Vec::new(),
        CacheOptions::default().max_entries(8).shards(2),
    );
    for i in 0..50 {
        let (account, _) = bus.ask(balance(&format!("acct-{i}"))).await.unwrap();
        assert_eq!(account, format!("acct-{i}"));
    }
    assert_eq!(runs.get(), 50);
    assert!(bus.cache_stats().entries <= 8, "{:?}", bus.cache_stats());
    // The newest is still there; the oldest was evicted.
    let before = runs.get();
    bus.ask(balance("acct-49")).await.unwrap();
    assert_eq!(runs.get(), before);
    bus.ask(balance("acct-0")).await.unwrap();
    assert_eq!(runs.get(), before + 1);
}

#[tokio::test]
async fn uncached_queries_and_failures_always_run() {
    let runs = Arc::new(Runs::default());
    let bus = {
        let runs = runs.clone();
        QueryBus::builder()
            .uncached(move |q: Balance| {
                let runs = runs.clone();
                async move { Ok((q.account, runs.next())) }
            })
            .build()
            .unwrap()
    };
    bus.ask(balance("a")).await.unwrap();
    bus.ask(balance("a")).await.unwrap();
    assert_eq!(runs.get(), 2);

    let failures = Arc::new(Runs::default());
    let failing = {
        let failures = failures.clone();
        QueryBus::builder()
            .handler(
                move |_: Balance| {
                    let failures = failures.clone();
                    async move {
                        failures.next();
                        Err::<(String, u64), _>(Error::failed("the read model is unreachable"))
                    }
                },
                [],
            )
            .build()
            .unwrap()
    };
    for _ in 0..2 {
        assert!(matches!(
            failing.ask(balance("a")).await,
            Err(Error::Failed(_))
        ));
    }
    assert_eq!(failures.get(), 2, "a failure is not cached");
}

#[tokio::test]
async fn unknown_and_duplicate_queries_are_clear_errors() {
    let bus = bus(&Arc::default(), Vec::new(), CacheOptions::default());
    let err = bus.ask(Unrouted).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoHandler {
                name: "nobody.answers-this"
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no handler for query"), "{err}");
    let err = QueryBus::builder()
        .uncached(|_: Unrouted| async { Ok(()) })
        .handler(|_: Unrouted| async { Ok(()) }, [])
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DuplicateHandler {
                name: "nobody.answers-this"
            }
        ),
        "{err}"
    );
}
