//! The write side: commands on the command bus, handled by loading the order aggregate from
//! its stream, deciding, and saving its new events with the version it was loaded at.

use serde::{Deserialize, Serialize};
use txbus_cqrs::command::{self, Command, CommandBus, Tracing, Validation};
use txbus_es::{CommandError, Repository};

use crate::domain::{Order, OrderCommand, OrderError};

/// Opens an order.
#[derive(Debug, Serialize)]
pub struct CreateOrder {
    /// The new order's id.
    pub id: String,
    /// Who orders.
    pub customer: String,
}

/// A command's answer: the order and its stream's version after the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// The order's id.
    pub id: String,
    /// How many items it holds now.
    pub item_count: usize,
    /// Its stream's version now.
    pub version: u64,
}

impl Command for CreateOrder {
    type Output = Changed;
    const NAME: &'static str = "order.create";

    fn validate(&self) -> Result<(), String> {
        match self.customer.trim().len() {
            0 => Err("the customer is empty".into()),
            201.. => Err("the customer is longer than 200 bytes".into()),
            _ => Ok(()),
        }
    }
}

/// Adds an item to an order.
#[derive(Debug, Serialize)]
pub struct AddItem {
    /// The order.
    pub order_id: String,
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

impl Command for AddItem {
    type Output = Changed;
    const NAME: &'static str = "order.add-item";

    fn validate(&self) -> Result<(), String> {
        if self.sku.trim().is_empty() || self.sku.len() > 64 {
            return Err("the sku must be 1 to 64 bytes".into());
        }
        if self.quantity == 0 {
            return Err("the quantity must be at least 1".into());
        }
        Ok(())
    }
}

/// The command bus: tracing and validation around the two handlers.
pub fn commands(orders: Repository<Order>) -> Result<CommandBus, command::Error> {
    let for_add = orders.clone();
    CommandBus::builder()
        .middleware(Tracing)
        .middleware(Validation)
        .handler(move |c: CreateOrder| {
            let orders = orders.clone();
            async move {
                let command = OrderCommand::Create {
                    customer: c.customer,
                };
                let saved = orders.execute(&c.id, command).await.map_err(refusal)?;
                Ok(Changed {
                    id: saved.id,
                    item_count: saved.state.items.len(),
                    version: saved.version,
                })
            }
        })
        .handler(move |c: AddItem| {
            let orders = for_add.clone();
            async move {
                let command = OrderCommand::AddItem {
                    sku: c.sku,
                    quantity: c.quantity,
                };
                let saved = orders
                    .execute(&c.order_id, command)
                    .await
                    .map_err(refusal)?;
                Ok(Changed {
                    id: saved.id,
                    item_count: saved.state.items.len(),
                    version: saved.version,
                })
            }
        })
        .build()
}

/// The aggregate's refusals become rejections with their code; the rest are failures.
fn refusal(e: CommandError<OrderError>) -> command::Error {
    match e {
        CommandError::Domain(e) => command::Error::rejected_as(e.code(), e.to_string()),
        other => command::Error::failed(other),
    }
}
