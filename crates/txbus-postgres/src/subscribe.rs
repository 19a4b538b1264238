//! Handler subscriptions: which handlers exist in any process sharing the store, so that a
//! commit made anywhere creates deliveries for all of them. Rare writes, so they run on the
//! pool rather than through the writer lanes.

use std::collections::BTreeMap;

use sqlx::PgPool;
use txbus_core::store::{Error, Subscription};

use crate::error::db;
use crate::notify;
use crate::schema::Schema;

/// Records (or updates) `subscriptions`; buses are told only when something changed.
pub(crate) async fn subscribe(
    pool: &PgPool,
    schema: &Schema,
    subscriptions: &[Subscription],
    now: i64,
) -> Result<(), Error> {
    // One row per name (the last one given wins): an upsert may not touch a row twice.
    let mut by_name: BTreeMap<&str, String> = BTreeMap::new();
    for s in subscriptions {
        let filter = serde_json::to_string(&s.filter)
            .map_err(|e| Error::Corrupt(format!("a handler filter does not serialize: {e}")))?;
        by_name.insert(&s.name, filter);
    }
    if by_name.is_empty() {
        return Ok(());
    }
    let (names, filters): (Vec<&str>, Vec<String>) = by_name.into_iter().unzip();
    let mut tx = pool.begin().await.map_err(db("starting a subscription"))?;
    let changed = sqlx::query(&schema.sql(
        "INSERT INTO {s}.subscriptions (name, filter, updated_at)
         SELECT name, filter, $3 FROM UNNEST($1::TEXT[], $2::TEXT[]) AS v(name, filter)
         ON CONFLICT (name) DO UPDATE SET filter = excluded.filter, updated_at = excluded.updated_at
         WHERE {s}.subscriptions.filter IS DISTINCT FROM excluded.filter",
    ))
    .bind(&names)
    .bind(&filters)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db("recording subscriptions"))?
    .rows_affected();
    if changed > 0 {
        notify::subscriptions(&mut tx, schema).await?;
    }
    tx.commit().await.map_err(db("committing subscriptions"))
}

/// Every recorded subscription, by name.
pub(crate) async fn subscriptions(
    pool: &PgPool,
    schema: &Schema,
) -> Result<Vec<Subscription>, Error> {
    let rows: Vec<(String, String)> =
        sqlx::query_as(&schema.sql("SELECT name, filter FROM {s}.subscriptions ORDER BY name"))
            .fetch_all(pool)
            .await
            .map_err(db("reading subscriptions"))?;
    rows.into_iter()
        .map(|(name, filter)| {
            let filter = serde_json::from_str(&filter).map_err(|e| {
                Error::Corrupt(format!("the filter of handler {name:?} is unreadable: {e}"))
            })?;
            Ok(Subscription { name, filter })
        })
        .collect()
}

/// Forgets the subscription `name`; true when it existed.
pub(crate) async fn unsubscribe(pool: &PgPool, schema: &Schema, name: &str) -> Result<bool, Error> {
    let mut tx = pool.begin().await.map_err(db("starting to unsubscribe"))?;
    let n = sqlx::query(&schema.sql("DELETE FROM {s}.subscriptions WHERE name = $1"))
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db("forgetting a subscription"))?
        .rows_affected();
    if n > 0 {
        notify::subscriptions(&mut tx, schema).await?;
    }
    tx.commit()
        .await
        .map_err(db("committing an unsubscription"))?;
    Ok(n > 0)
}
