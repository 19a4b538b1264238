//! What the event sourcing tests share: buses on fresh SQLite files (and fresh PostgreSQL
//! schemas), an order aggregate, and a counting read model.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus_core::{Bus, TypedEvent};
use txbus_es::{Aggregate, BoxError, LogEvent, ReadModel, ReadModelTx};
use txbus_sqlite::SqliteStore;

/// A bus on the SQLite file `db` (default, durable settings).
pub async fn sqlite_bus(db: &Path) -> Bus {
    Bus::builder()
        .store(SqliteStore::open(db).unwrap())
        .build()
        .await
        .unwrap()
}

/// Shuts a bus down so that its file can be opened again.
pub async fn close(bus: Bus) {
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(bus);
}

/// The PostgreSQL test server.
pub fn pg_url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh PostgreSQL schema, dropped when this is dropped.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub fn new() -> Self {
        Self {
            name: format!("es_{:016x}", fastrand::u64(..)),
        }
    }

    /// A bus on this schema.
    pub async fn bus(&self) -> Bus {
        let store = txbus_postgres::PostgresOptions::new(pg_url())
            .schema(&self.name)
            .max_connections(4)
            .connect()
            .await
            .unwrap();
        Bus::builder().store(store).build().await.unwrap()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sqlx::{Connection, Executor};
                let mut conn = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
                conn.execute("SET lock_timeout = '10s'").await.unwrap();
                conn.execute(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE").as_str())
                    .await
                    .unwrap();
            });
        })
        .join();
        if done.is_err() {
            eprintln!("dropping schema {} failed", self.name);
        }
    }
}

/// A unique name for a stream, projection or aggregate id within a test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:x}", fastrand::u64(..))
}

// ---- the order aggregate ----

/// The most items (total quantity) an order may hold.
pub const MAX_ITEMS: u32 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemAdded {
    pub sku: String,
    pub qty: u32,
}
impl TypedEvent for ItemAdded {
    const EVENT_TYPE: &'static str = "order.item-added";
    const MODULE: Option<&'static str> = Some("order");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRemoved {
    pub sku: String,
}
impl TypedEvent for ItemRemoved {
    const EVENT_TYPE: &'static str = "order.item-removed";
    const MODULE: Option<&'static str> = Some("order");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {}
impl TypedEvent for OrderPlaced {
    const EVENT_TYPE: &'static str = "order.placed";
    const MODULE: Option<&'static str> = Some("order");
}

txbus_es::domain_events! {
    /// What happens to an order.
    #[derive(Debug, Clone, PartialEq)]
    pub enum OrderEvent {
        Added(ItemAdded),
        Removed(ItemRemoved),
        Placed(OrderPlaced),
    }
}

/// An order: items by sku, and how many add commands it has seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub items: BTreeMap<String, u32>,
    pub adds: u64,
    pub placed: bool,
}

impl Order {
    pub fn total(&self) -> u32 {
        self.items.values().sum()
    }
}

/// What an order is asked to do. `Add` may carry a hook run on every attempt (to make a
/// concurrent writer appear between load and save).
pub enum OrderCommand {
    Add {
        sku: String,
        qty: u32,
    },
    Remove {
        sku: String,
    },
    Place,
    Noop,
    AddWithHook {
        sku: String,
        hook: Arc<dyn Fn() + Send + Sync>,
    },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum OrderError {
    #[error("the order was placed")]
    AlreadyPlaced,
    #[error("{0} is not in the order")]
    NotInOrder(String),
    #[error("an order holds at most {MAX_ITEMS} items, this would make {0}")]
    TooManyItems(u32),
}

impl Aggregate for Order {
    const KIND: &'static str = "order";
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn create(_id: &str) -> Self {
        Order::default()
    }

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        if self.placed {
            return Err(OrderError::AlreadyPlaced);
        }
        Ok(match command {
            OrderCommand::Add { sku, qty } => vec![ItemAdded {
                sku: sku.clone(),
                qty: *qty,
            }
            .into()],
            OrderCommand::AddWithHook { sku, hook } => {
                hook();
                vec![ItemAdded {
                    sku: sku.clone(),
                    qty: 1,
                }
                .into()]
            }
            OrderCommand::Remove { sku } => {
                if !self.items.contains_key(sku) {
                    return Err(OrderError::NotInOrder(sku.clone()));
                }
                vec![ItemRemoved { sku: sku.clone() }.into()]
            }
            OrderCommand::Place => vec![OrderPlaced {}.into()],
            OrderCommand::Noop => vec![],
        })
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Added(e) => {
                *self.items.entry(e.sku.clone()).or_default() += e.qty;
                self.adds += 1;
            }
            OrderEvent::Removed(e) => {
                self.items.remove(&e.sku);
            }
            OrderEvent::Placed(_) => self.placed = true,
        }
    }

    fn check(&self) -> Result<(), OrderError> {
        let total = self.total();
        if total > MAX_ITEMS {
            Err(OrderError::TooManyItems(total))
        } else {
            Ok(())
        }
    }
}

// ---- a counting read model ----

/// Counts events per type and per stream, and sums quantities: not idempotent, so applying an
/// event twice shows.
pub struct Counts {
    pub prefix: String,
}

impl Counts {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
}

async fn bump(tx: &mut ReadModelTx<'_>, key: String, by: u64) -> Result<(), BoxError> {
    let n: u64 = tx.get_json(&key).await?.unwrap_or(0);
    tx.put_json(key, &(n + by))?;
    Ok(())
}

#[txbus_es::async_trait]
impl ReadModel for Counts {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        let p = &self.prefix;
        bump(tx, format!("{p}type/{}", event.event_type), 1).await?;
        if let Some(stream) = event.stream() {
            bump(tx, format!("{p}stream/{stream}"), 1).await?;
        }
        if let Some(qty) = event.payload.get("qty").and_then(|q| q.as_u64()) {
            bump(tx, format!("{p}qty"), qty).await?;
        }
        bump(tx, format!("{p}events"), 1).await?;
        Ok(())
    }
}

/// Reads a counter of the read model.
pub async fn count(bus: &Bus, key: &str) -> u64 {
    match bus.kv_get(key).await.unwrap() {
        None => 0,
        Some(e) => serde_json::from_slice(&e.value).unwrap(),
    }
}

/// Every entry under `prefix`, with the prefix cut off.
pub async fn dump(bus: &Bus, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = bus.kv_scan(prefix, after.as_deref(), 500).await.unwrap();
        if page.is_empty() {
            return out;
        }
        after = page.last().map(|e| e.key.clone());
        for e in page {
            out.insert(e.key[prefix.len()..].to_owned(), e.value);
        }
    }
}
