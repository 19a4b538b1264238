//! The promo flow of the example, against the real PostgreSQL and ClickHouse: the redemption
//! row and its event commit in one PostgreSQL transaction, the sink inserts the analytics row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use txbus_clickhouse::{ClickHouseSink, Client};
use txbus_core::{
    Backoff, Bus, Commit, DeadLetterQuery, Event, Handler, HandlerError, Message, MessageId, On,
    OperationId, PolicyOverride,
};
use txbus_postgres::{PostgresOptions, PostgresStore};

const CLICKHOUSE: &str = "http://127.0.0.1:8123";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn pg_url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// One test's world: a shop schema with `promo_redemptions`, a txbus schema, a ClickHouse
/// table. Dropped by [`World::drop_all`].
struct World {
    pool: PgPool,
    store: PostgresStore,
    shop: String,
    txbus: String,
    table: String,
    clickhouse: Client,
}

impl World {
    async fn new() -> Self {
        let id = format!("{:016x}", fastrand::u64(..));
        let shop = format!("promo_shop_{id}");
        let txbus = format!("promo_txbus_{id}");
        let table = format!("promo_events_{id}");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&pg_url())
            .await
            .unwrap();
        sqlx::query(&format!("CREATE SCHEMA {shop}"))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {shop}.promo_redemptions (\
             order_id BIGINT PRIMARY KEY, code TEXT NOT NULL, discount_cents BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        let store = PostgresOptions::new(pg_url())
            .schema(txbus.clone())
            .connect()
            .await
            .unwrap();
        let clickhouse = Client::new(CLICKHOUSE).unwrap();
        clickhouse
            .execute(&txbus_clickhouse::default_table_ddl(&table))
            .await
            .unwrap();
        Self {
            pool,
            store,
            shop,
            txbus,
            table,
            clickhouse,
        }
    }

    async fn bus(&self, policy: PolicyOverride, handler: impl Handler) -> Bus {
        Bus::builder()
            .store(self.store.clone())
            .handler_with(
                "promo-analytics",
                On::event("promo.applied").module("promo"),
                policy,
                handler,
            )
            .build()
            .await
            .unwrap()
    }

    /// The business write and the event, in one transaction.
    async fn apply_promo(&self, bus: &Bus, code: &str, order_id: i64) -> OperationId {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO {}.promo_redemptions (order_id, code, discount_cents) VALUES ($1, $2, 500)",
            self.shop
        ))
        .bind(order_id)
        .bind(code)
        .execute(&mut *tx)
        .await
        .unwrap();
        let commit = bus
            .prepare(
                Commit::new().event(
                    Event::new(
                        "promo.applied",
                        json!({"code": code, "order_id": order_id, "discount_cents": 500}),
                    )
                    .module("promo"),
                ),
            )
            .unwrap();
        let operation = commit.operation_id;
        self.store.append_in(&mut tx, commit).await.unwrap();
        tx.commit().await.unwrap();
        operation
    }

    async fn count(&self, sql: &str) -> u64 {
        let sql = sql.replace("{table}", &self.table);
        self.clickhouse
            .query(&sql)
            .await
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    async fn redemptions(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}.promo_redemptions",
            self.shop
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn drop_all(self, bus: Bus) {
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        self.clickhouse
            .execute(&format!("DROP TABLE IF EXISTS {}", self.table))
            .await
            .unwrap();
        for schema in [&self.shop, &self.txbus] {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}

async fn wait_ok(bus: &Bus, op: OperationId) {
    let outcome = tokio::time::timeout(HANG_GUARD, bus.wait(op))
        .await
        .expect("outcome within the hang guard")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promo_redemption_appears_in_clickhouse_once() {
    let world = World::new().await;
    let sink = ClickHouseSink::builder(world.clickhouse.clone(), &world.table)
        .build()
        .unwrap();
    let bus = world
        .bus(PolicyOverride::default().concurrency(1024), sink.clone())
        .await;

    let codes = ["SUMMER24", "WELCOME", "SUMMER24", "VIP", "SUMMER24"];
    let mut ops = Vec::new();
    for (order_id, code) in (1_i64..).zip(codes) {
        ops.push(world.apply_promo(&bus, code, order_id).await);
    }
    // A redemption the business logic rolls back: neither its row nor its event exist.
    {
        let mut tx = world.pool.begin().await.unwrap();
        let commit =
            bus.prepare(Commit::new().event(
                Event::new("promo.applied", json!({"code": "ROLLED-BACK"})).module("promo"),
            ))
            .unwrap();
        world.store.append_in(&mut tx, commit).await.unwrap();
        tx.rollback().await.unwrap();
    }
    for op in ops {
        wait_ok(&bus, op).await;
    }

    assert_eq!(world.redemptions().await, 5);
    assert_eq!(world.count("SELECT count() FROM {table} FINAL").await, 5);
    assert_eq!(world.count("SELECT count() FROM {table}").await, 5);
    let by_code = world
        .clickhouse
        .query(&format!(
            "SELECT visitParamExtractString(payload, 'code') AS code, count() \
             FROM {} FINAL GROUP BY code ORDER BY code",
            world.table
        ))
        .await
        .unwrap();
    assert_eq!(by_code, "SUMMER24\t3\nVIP\t1\nWELCOME\t1\n");
    world.drop_all(bus).await;
}

/// Inserts through the sink, then fails the first delivery of each message: with no retries
/// it becomes a dead letter, whose replay inserts the row again.
struct FailFirstDelivery {
    sink: ClickHouseSink,
    seen: Mutex<HashSet<MessageId>>,
}

impl Handler for FailFirstDelivery {
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        let id = message.id();
        self.sink.handle(message).await?;
        if self.seen.lock().unwrap().insert(id) {
            return Err(HandlerError::transient("the acknowledgement was lost"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_promo_event_does_not_double_count() {
    let world = World::new().await;
    let sink = ClickHouseSink::builder(world.clickhouse.clone(), &world.table)
        .build()
        .unwrap();
    let handler = FailFirstDelivery {
        sink: sink.clone(),
        seen: Mutex::new(HashSet::new()),
    };
    let bus = world
        .bus(
            PolicyOverride::default().concurrency(64).max_retries(0),
            handler,
        )
        .await;

    let n = 6_u64;
    let mut ops = Vec::new();
    for order_id in 0..n {
        let code = if order_id % 2 == 0 { "EVEN" } else { "ODD" };
        ops.push(
            world
                .apply_promo(&bus, code, i64::try_from(order_id).unwrap())
                .await,
        );
    }
    for op in ops {
        let outcome = tokio::time::timeout(HANG_GUARD, bus.wait(op))
            .await
            .unwrap()
            .unwrap();
        assert!(!outcome.is_ok(), "the first delivery fails for good");
    }
    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 100,
            ..DeadLetterQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 6);
    for d in &dead {
        bus.replay(d.delivery_id).await.unwrap();
    }
    tokio::time::timeout(HANG_GUARD, async {
        while sink.stats().rows < 2 * n
            || !bus
                .dead_letters(DeadLetterQuery {
                    limit: 100,
                    ..DeadLetterQuery::default()
                })
                .await
                .unwrap()
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("replays handled within the hang guard");

    // Each row went in twice (background merges may already have dropped some copies); the
    // analytics count each redemption once.
    assert_eq!(sink.stats().rows, 2 * n);
    assert_eq!(world.count("SELECT count() FROM {table} FINAL").await, n);
    assert_eq!(
        world
            .count("SELECT count() FROM (SELECT message_id FROM {table} GROUP BY message_id)")
            .await,
        n
    );
    world.drop_all(bus).await;
}

/// Forwards every connection on `listener` to ClickHouse: the server "comes back" at the
/// address the sink was given.
async fn forward_to_clickhouse(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:8123").await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promo_events_wait_while_clickhouse_is_down_and_nothing_is_lost() {
    let world = World::new().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let down = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let sink = ClickHouseSink::builder(down, &world.table).build().unwrap();
    let bus = world
        .bus(
            PolicyOverride::default()
                .concurrency(256)
                .max_retries(10_000)
                .backoff(Backoff::fixed(Duration::from_millis(100))),
            sink.clone(),
        )
        .await;

    let n = 30_u64;
    let mut ops = Vec::new();
    for order_id in 0..n {
        ops.push(
            world
                .apply_promo(&bus, "DOWNTIME", i64::try_from(order_id).unwrap())
                .await,
        );
    }
    tokio::time::timeout(HANG_GUARD, async {
        while sink.stats().failed_inserts < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("failed inserts within the hang guard");
    assert_eq!(world.count("SELECT count() FROM {table}").await, 0);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let proxy = tokio::spawn(forward_to_clickhouse(listener));
    for op in ops {
        wait_ok(&bus, op).await;
    }
    assert_eq!(world.count("SELECT count() FROM {table} FINAL").await, n);
    assert_eq!(world.redemptions().await, i64::try_from(n).unwrap());
    proxy.abort();
    world.drop_all(bus).await;
}
