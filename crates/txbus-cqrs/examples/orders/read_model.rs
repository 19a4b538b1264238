//! The read side: a projection keeps one JSON document per order in the store's key–value
//! space (committed with its checkpoint, so each event counts once), and the query bus
//! answers from it, caching results until the projection moves on.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use txbus_core::{Bus, On};
use txbus_cqrs::query::{self, Query, QueryBus};
use txbus_es::projection::{ReadModel, ReadModelTx};
use txbus_es::{BoxError, LogEvent};

use crate::domain::{ItemAdded, Line, OrderCreated};

/// Where the read model keeps its documents.
pub const PREFIX: &str = "rm/orders/";

/// The most orders one list query returns.
pub const MAX_PAGE: usize = 100;

/// An order as the read side shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// Its id.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// Its items.
    pub items: Vec<Line>,
    /// How many events it has seen (its stream's version).
    pub version: u64,
    /// When it was created, ms since the epoch.
    pub created_at_ms: i64,
}

/// An order in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSummary {
    /// Its id.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// How many items it holds.
    pub item_count: usize,
    /// Its stream's version.
    pub version: u64,
}

/// The projection of order events into [`OrderView`]s.
pub struct Orders;

#[txbus_es::async_trait]
impl ReadModel for Orders {
    fn prefix(&self) -> &str {
        PREFIX
    }

    fn filter(&self) -> On {
        On::event("order.*")
    }

    async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        let Some(id) = event.stream().and_then(|s| s.strip_prefix("order-")) else {
            return Ok(());
        };
        let key = format!("{PREFIX}{id}");
        if let Some(created) = event.typed::<OrderCreated>() {
            let view = OrderView {
                id: id.to_owned(),
                customer: created?.customer,
                items: Vec::new(),
                version: 1,
                created_at_ms: event.created_at_ms,
            };
            tx.put_json(key, &view)?;
        } else if let Some(added) = event.typed::<ItemAdded>() {
            let added = added?;
            let mut view: OrderView = tx
                .get_json(&key)
                .await?
                .ok_or_else(|| format!("item added to order {id}, which the read model lacks"))?;
            view.items.push(Line {
                sku: added.sku,
                quantity: added.quantity,
            });
            view.version += 1;
            tx.put_json(key, &view)?;
        }
        Ok(())
    }
}

/// One order.
#[derive(Debug, Serialize)]
pub struct GetOrder {
    /// Its id.
    pub id: String,
}

impl Query for GetOrder {
    type Output = Option<Arc<OrderView>>;
    const NAME: &'static str = "orders.get";
}

/// A page of orders, in id order (ids are UUIDv7: creation order).
#[derive(Debug, Serialize)]
pub struct ListOrders {
    /// Start after this id.
    pub after: Option<String>,
    /// At most this many (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl Query for ListOrders {
    type Output = Arc<Vec<OrderSummary>>;
    const NAME: &'static str = "orders.list";
}

/// The query bus over the read model: both queries depend on the projection's checkpoint.
pub fn queries(bus: Bus, checkpoint: watch::Receiver<u64>) -> Result<QueryBus, query::Error> {
    let for_get = bus.clone();
    QueryBus::builder()
        .handler(
            move |q: GetOrder| {
                let bus = for_get.clone();
                async move {
                    let entry = bus
                        .kv_get(&format!("{PREFIX}{}", q.id))
                        .await
                        .map_err(query::Error::failed)?;
                    entry
                        .map(|e| serde_json::from_slice(&e.value).map(Arc::new))
                        .transpose()
                        .map_err(query::Error::failed)
                }
            },
            [checkpoint.clone()],
        )
        .handler(
            move |q: ListOrders| {
                let bus = bus.clone();
                async move {
                    if q.limit == 0 || q.limit > MAX_PAGE {
                        return Err(query::Error::Invalid {
                            name: ListOrders::NAME,
                            reason: format!("limit must be 1 to {MAX_PAGE}, not {}", q.limit),
                        });
                    }
                    let after = q.after.map(|id| format!("{PREFIX}{id}"));
                    let entries = bus
                        .kv_scan(PREFIX, after.as_deref(), q.limit)
                        .await
                        .map_err(query::Error::failed)?;
                    let mut orders = Vec::with_capacity(entries.len());
                    for entry in entries {
                        let view: OrderView =
                            serde_json::from_slice(&entry.value).map_err(query::Error::failed)?;
                        orders.push(OrderSummary {
                            item_count: view.items.len(),
                            id: view.id,
                            customer: view.customer,
                            version: view.version,
                        });
                    }
                    Ok(Arc::new(orders))
                }
            },
            [checkpoint],
        )
        .build()
}
