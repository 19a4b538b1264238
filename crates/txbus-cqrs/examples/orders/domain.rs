//! The order aggregate: created for a customer, then items are added — at most
//! [`MAX_ITEMS`] per order, an invariant the aggregate checks before anything is written.

use serde::{Deserialize, Serialize};
use txbus_core::TypedEvent;
use txbus_es::Aggregate;

/// The most items an order may hold.
pub const MAX_ITEMS: usize = 100;

/// An order was opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Who ordered.
    pub customer: String,
}

impl TypedEvent for OrderCreated {
    const EVENT_TYPE: &'static str = "order.created";
}

/// An item was added to an order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemAdded {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

impl TypedEvent for ItemAdded {
    const EVENT_TYPE: &'static str = "order.item-added";
}

txbus_es::domain_events! {
    /// What happens to an order.
    #[derive(Debug, Clone)]
    pub enum OrderEvent {
        Created(OrderCreated),
        ItemAdded(ItemAdded),
    }
}

/// What an order is asked to do.
#[derive(Debug, Clone)]
pub enum OrderCommand {
    /// Open it.
    Create {
        /// Who orders.
        customer: String,
    },
    /// Add an item.
    AddItem {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
}

/// Why an order refuses a command.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// Created twice.
    #[error("the order already exists")]
    AlreadyExists,
    /// Items added to an order that was never created.
    #[error("no such order")]
    NotFound,
    /// The invariant: at most [`MAX_ITEMS`] items.
    #[error("an order holds at most {MAX_ITEMS} items")]
    TooManyItems,
}

impl OrderError {
    /// A stable code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            Self::AlreadyExists => "order_exists",
            Self::NotFound => "order_not_found",
            Self::TooManyItems => "too_many_items",
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// An order, as its events make it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Order {
    /// Who ordered; `None` until created.
    pub customer: Option<String>,
    /// Its items, in the order they were added.
    pub items: Vec<Line>,
}

impl Aggregate for Order {
    const KIND: &'static str = "order";
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn create(_id: &str) -> Self {
        Self::default()
    }

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Create { .. } if self.customer.is_some() => {
                Err(OrderError::AlreadyExists)
            }
            OrderCommand::Create { customer } => Ok(vec![OrderCreated {
                customer: customer.clone(),
            }
            .into()]),
            OrderCommand::AddItem { .. } if self.customer.is_none() => Err(OrderError::NotFound),
            OrderCommand::AddItem { sku, quantity } => Ok(vec![ItemAdded {
                sku: sku.clone(),
                quantity: *quantity,
            }
            .into()]),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Created(e) => self.customer = Some(e.customer.clone()),
            OrderEvent::ItemAdded(e) => self.items.push(Line {
                sku: e.sku.clone(),
                quantity: e.quantity,
            }),
        }
    }

    fn check(&self) -> Result<(), OrderError> {
        if self.items.len() > MAX_ITEMS {
            return Err(OrderError::TooManyItems);
        }
        Ok(())
    }
}
