//! "Promo code applied": the redemption row and its event commit in one PostgreSQL
//! transaction (the transactional outbox); the analytics sink then inserts the event into
//! ClickHouse, and a query counts redemptions by promo code.
//!
//! ```text
//! cargo run -p txbus-clickhouse --example promo
//! ```
//!
//! Needs PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`) and
//! ClickHouse (`CLICKHOUSE_URL`, default `http://127.0.0.1:8123`).
#![allow(clippy::print_stdout)]

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use txbus_clickhouse::{ClickHouseSink, Client};
use txbus_core::{Bus, Commit, Event, On, OperationId, PolicyOverride};
use txbus_postgres::{PostgresOptions, PostgresStore};

/// Where the example keeps its business table and its txbus store, in PostgreSQL.
const SHOP: &str = "promo_example";
const TXBUS: &str = "promo_example_txbus";
/// The ClickHouse table of the analytics.
const ANALYTICS: &str = "promo_example_events";

/// Applies a promo code to an order: the redemption row and the `promo.applied` event are
/// written in one transaction, so the analytics can never miss a redemption nor count one
/// that was rolled back.
async fn apply_promo(
    pool: &sqlx::PgPool,
    store: &PostgresStore,
    bus: &Bus,
    code: &str,
    order_id: i64,
    discount_cents: i64,
) -> Result<OperationId, Box<dyn std::error::Error>> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {SHOP}.promo_redemptions (order_id, code, discount_cents) VALUES ($1, $2, $3)"
    ))
    .bind(order_id)
    .bind(code)
    .bind(discount_cents)
    .execute(&mut *tx)
    .await?;
    let commit = bus.prepare(
        Commit::new().event(
            Event::new(
                "promo.applied",
                json!({"code": code, "order_id": order_id, "discount_cents": discount_cents}),
            )
            .module("promo"),
        ),
    )?;
    let operation = commit.operation_id;
    store.append_in(&mut tx, commit).await?;
    tx.commit().await?;
    Ok(operation)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pg_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let ch_url = std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());

    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {SHOP}"))
        .execute(&pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {SHOP}.promo_redemptions (\
         order_id BIGINT PRIMARY KEY, code TEXT NOT NULL, discount_cents BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await?;
    sqlx::query(&format!("TRUNCATE {SHOP}.promo_redemptions"))
        .execute(&pool)
        .await?;

    let clickhouse = Client::new(&ch_url)?;
    clickhouse
        .execute(&format!("DROP TABLE IF EXISTS {ANALYTICS}"))
        .await?;
    let sink = ClickHouseSink::builder(clickhouse.clone(), ANALYTICS).build()?;
    sink.create_default_table().await?;

    let store = PostgresOptions::new(pg_url).schema(TXBUS).connect().await?;
    let bus = Bus::builder()
        .store(store.clone())
        .handler_with(
            "promo-analytics",
            On::event("promo.applied").module("promo"),
            PolicyOverride::default().concurrency(1024),
            sink.clone(),
        )
        .build()
        .await?;

    let mut operations = Vec::new();
    for (order_id, code) in (1_i64..).zip(["SUMMER24", "WELCOME", "SUMMER24", "VIP", "SUMMER24"]) {
        operations.push(apply_promo(&pool, &store, &bus, code, order_id, 500).await?);
    }
    // One more that the business logic rolls back: it never reaches the analytics.
    {
        let mut tx = pool.begin().await?;
        let commit = bus
            .prepare(Commit::new().event(
                Event::new("promo.applied", json!({"code": "ROLLED-BACK"})).module("promo"),
            ))?;
        store.append_in(&mut tx, commit).await?;
        tx.rollback().await?;
    }
    for op in operations {
        let outcome = bus.wait(op).await?;
        if !outcome.is_ok() {
            return Err(format!("operation {op} failed: {outcome:?}").into());
        }
    }

    println!("redemptions by promo code (ClickHouse):");
    let by_code = clickhouse
        .query(&format!(
            "SELECT visitParamExtractString(payload, 'code') AS code, count() AS redemptions \
             FROM {ANALYTICS} FINAL GROUP BY code ORDER BY code"
        ))
        .await?;
    for line in by_code.lines() {
        let mut cols = line.split('\t');
        let (code, n) = (cols.next().unwrap_or(""), cols.next().unwrap_or(""));
        println!("  {code:<10} {n}");
    }
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
