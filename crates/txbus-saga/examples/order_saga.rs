//! Order processing — order, payment, inventory, shipment — done twice on the embedded store:
//! once **orchestrated** (a saga drives the steps and compensates) and once **choreographed**
//! (services react to each other's events; failure events trigger compensations elsewhere).
//! Each runs three scenarios: everything works, the payment fails, the items are not
//! available.
//!
//! ```sh
//! cargo run -p txbus-saga --example order_saga
//! ```
//!
//! The services keep their own state in memory here (their "databases"); every operation on
//! it is idempotent, since steps and reactions run at least once.
#![allow(clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use txbus_core::{Bus, Event, HandlerError, Message, On};
use txbus_saga::choreography::{chain, Chain, ChainQuery, Reactor};
use txbus_saga::{
    HistoryEntry, Saga, SagaEvent, SagaId, SagaState, Sagas, StartOptions, Step, StepContext,
};
use txbus_sqlite::SqliteStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which way the order goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Everything works: the order ships.
    Ships,
    /// The card is declined.
    PaymentFails,
    /// The items are out of stock.
    ItemsNotAvailable,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 3] = [Self::Ships, Self::PaymentFails, Self::ItemsNotAvailable];

    fn order(self, order_id: &str) -> Value {
        let (sku, card) = match self {
            Self::Ships => ("book", "4242"),
            Self::PaymentFails => ("book", "declined"),
            Self::ItemsNotAvailable => ("lamp", "4242"),
        };
        json!({"order_id": order_id, "sku": sku, "quantity": 1, "amount": 30, "card": card})
    }
}

/// An order as the services receive it.
#[derive(Debug, Clone, Deserialize)]
pub struct Order {
    /// The order id (also the flow's correlation id).
    pub order_id: String,
    /// What is ordered.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// What it costs.
    pub amount: u32,
    /// The card to charge.
    pub card: String,
}

/// Where an order stands in the order service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Created, not confirmed yet.
    Created,
    /// Paid and reserved.
    Confirmed,
    /// Cancelled.
    Cancelled,
}

/// Where a payment stands in the payment service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Charged.
    Charged,
    /// Refunded.
    Refunded,
}

/// The services' own state.
#[derive(Debug, Clone, Default)]
pub struct ShopState {
    /// Stock by sku.
    pub stock: HashMap<String, u32>,
    /// Orders.
    pub orders: HashMap<String, OrderStatus>,
    /// Reserved quantity by order.
    pub reservations: HashMap<String, (String, u32)>,
    /// Orders whose items were released: a late reservation is refused.
    pub released: HashSet<String>,
    /// Payments by order.
    pub payments: HashMap<String, PaymentStatus>,
    /// Orders whose payment was cancelled before it was charged.
    pub payment_cancelled: HashSet<String>,
    /// Shipments by order.
    pub shipments: HashMap<String, String>,
}

/// The services, sharing one in-memory state for the example.
#[derive(Clone, Default)]
pub struct Shop(Arc<Mutex<ShopState>>);

impl Shop {
    fn new() -> Self {
        let shop = Self::default();
        shop.lock().stock.insert("book".into(), 5);
        shop.lock().stock.insert("lamp".into(), 0);
        shop
    }

    fn lock(&self) -> MutexGuard<'_, ShopState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the state.
    pub fn state(&self) -> ShopState {
        self.lock().clone()
    }

    fn create_order(&self, order: &Order) {
        self.lock()
            .orders
            .entry(order.order_id.clone())
            .or_insert(OrderStatus::Created);
    }

    fn cancel_order(&self, order_id: &str) -> bool {
        let mut s = self.lock();
        let was = s.orders.insert(order_id.to_owned(), OrderStatus::Cancelled);
        was != Some(OrderStatus::Cancelled)
    }

    fn reserve(&self, order: &Order) -> Result<(), String> {
        let mut s = self.lock();
        if s.reservations.contains_key(&order.order_id) {
            return Ok(());
        }
        if s.released.contains(&order.order_id) {
            return Err("the order was cancelled".into());
        }
        let stock = s.stock.entry(order.sku.clone()).or_insert(0);
        if *stock < order.quantity {
            return Err(format!("{} × {} not available", order.quantity, order.sku));
        }
        *stock -= order.quantity;
        s.reservations
            .insert(order.order_id.clone(), (order.sku.clone(), order.quantity));
        Ok(())
    }

    fn release(&self, order_id: &str) -> bool {
        let mut s = self.lock();
        s.released.insert(order_id.to_owned());
        match s.reservations.remove(order_id) {
            Some((sku, quantity)) => {
                *s.stock.entry(sku).or_insert(0) += quantity;
                true
            }
            None => false,
        }
    }

    fn charge(&self, order: &Order) -> Result<String, String> {
        let mut s = self.lock();
        let payment_id = format!("pay-{}", order.order_id);
        if s.payments.contains_key(&order.order_id) {
            return Ok(payment_id);
        }
        if s.payment_cancelled.contains(&order.order_id) {
            return Err("the order was cancelled".into());
        }
        if order.card == "declined" {
            return Err("card declined".into());
        }
        s.payments
            .insert(order.order_id.clone(), PaymentStatus::Charged);
        Ok(payment_id)
    }

    fn refund(&self, order_id: &str) -> bool {
        let mut s = self.lock();
        s.payment_cancelled.insert(order_id.to_owned());
        match s.payments.get_mut(order_id) {
            Some(p @ PaymentStatus::Charged) => {
                *p = PaymentStatus::Refunded;
                true
            }
            _ => false,
        }
    }

    fn confirm(&self, order_id: &str) -> bool {
        let mut s = self.lock();
        let ready = s.payments.get(order_id) == Some(&PaymentStatus::Charged)
            && s.reservations.contains_key(order_id);
        match s.orders.get_mut(order_id) {
            Some(o @ OrderStatus::Created) if ready => {
                *o = OrderStatus::Confirmed;
                true
            }
            _ => false,
        }
    }

    fn ship(&self, order_id: &str) -> String {
        self.lock()
            .shipments
            .entry(order_id.to_owned())
            .or_insert_with(|| format!("ship-{order_id}"))
            .clone()
    }
}

/// What one run came to.
#[derive(Debug)]
pub struct Report {
    /// The services' state at the end.
    pub shop: ShopState,
    /// The saga, for an orchestrated run.
    pub saga: Option<SagaState>,
    /// The saga's history, for an orchestrated run.
    pub history: Vec<HistoryEntry>,
    /// The flow read back from the log by correlation id.
    pub chain: Chain,
}

fn order_of(ctx: &StepContext) -> Result<Order, HandlerError> {
    ctx.input()
}

/// The order saga: create the order, reserve the items, charge the card, wait for the
/// payment provider to settle it, ship.
fn order_saga(shop: &Shop) -> Result<Saga, txbus_saga::Error> {
    let (s1, s2, s3, s4, s5, s6, s7) = (
        shop.clone(),
        shop.clone(),
        shop.clone(),
        shop.clone(),
        shop.clone(),
        shop.clone(),
        shop.clone(),
    );
    Saga::builder("order")
        .step(
            Step::action("create-order", move |ctx: StepContext| {
                let shop = s1.clone();
                async move {
                    let order = order_of(&ctx)?;
                    shop.create_order(&order);
                    Ok(json!({"order_id": order.order_id}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let shop = s2.clone();
                async move {
                    shop.cancel_order(&order_of(&ctx)?.order_id);
                    Ok(())
                }
            }),
        )
        .step(
            Step::action("reserve-items", move |ctx: StepContext| {
                let shop = s3.clone();
                async move {
                    let order = order_of(&ctx)?;
                    shop.reserve(&order).map_err(HandlerError::reject)?;
                    Ok(json!({"sku": order.sku, "quantity": order.quantity}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let shop = s4.clone();
                async move {
                    shop.release(&order_of(&ctx)?.order_id);
                    Ok(())
                }
            }),
        )
        .step(
            Step::action("charge-payment", move |ctx: StepContext| {
                let shop = s5.clone();
                async move {
                    let order = order_of(&ctx)?;
                    let payment_id = shop.charge(&order).map_err(HandlerError::reject)?;
                    // The provider confirms later, through its webhook: anyone may publish
                    // the event the next step waits for; the correlation id finds the saga.
                    let bus = ctx.bus().clone();
                    let correlation = ctx.correlation_id().to_owned();
                    let settled = json!({"payment_id": payment_id});
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let event =
                            Event::new("payment.settled", settled).correlation_id(correlation);
                        if let Err(e) = bus.publish(event).await {
                            tracing::warn!(error = %e, "webhook could not publish");
                        }
                    });
                    Ok(json!({"payment_id": payment_id}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let shop = s6.clone();
                async move {
                    // The output of the step is what the refund needs.
                    let paid: Value = ctx.output()?;
                    let _payment_id = paid["payment_id"].as_str();
                    shop.refund(&order_of(&ctx)?.order_id);
                    Ok(())
                }
            }),
        )
        .step(Step::wait_for(
            "payment-settled",
            "payment.settled",
            Duration::from_secs(30),
        ))
        .step(Step::action("create-shipment", move |ctx: StepContext| {
            let shop = s7.clone();
            async move {
                let order = order_of(&ctx)?;
                shop.confirm(&order.order_id);
                Ok(json!({"shipment_id": shop.ship(&order.order_id)}))
            }
        }))
        .deadline(Duration::from_secs(120))
        .build()
}

/// Runs one order through the saga on a fresh store in `dir`.
pub async fn orchestrated(scenario: Scenario, dir: &std::path::Path) -> Result<Report, BoxError> {
    let shop = Shop::new();
    let sagas = Sagas::builder().saga(order_saga(&shop)?).build()?;
    let bus = sagas
        .install(Bus::builder().store(SqliteStore::open(dir.join("orchestrated.db"))?))
        .build()
        .await?;
    let runtime = sagas.attach(bus.clone());

    let order_id = "o-1";
    let id = runtime
        .start_with(
            "order",
            scenario.order(order_id),
            StartOptions::default()
                .id(SagaId::new(format!("order-{order_id}"))?)
                .correlation_id(order_id),
        )
        .await?;
    let saga = tokio::time::timeout(Duration::from_secs(60), runtime.wait(&id)).await??;
    let history = runtime.history(&id).await?;
    let chain = chain(&bus, order_id, ChainQuery::default()).await?;
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(Report {
        shop: shop.state(),
        saga: Some(saga),
        history,
        chain,
    })
}

fn order_in(msg: &Message) -> Result<Order, HandlerError> {
    msg.decode()
        .map_err(|e| HandlerError::reject(format!("not an order: {e}")))
}

fn id_in(msg: &Message) -> String {
    msg.payload()["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The services as reactions to each other's events.
fn choreographed_bus(
    shop: &Shop,
    reactor: &Reactor,
    path: &std::path::Path,
) -> Result<txbus_core::BusBuilder, BoxError> {
    let s = shop.clone();
    let payment_charge = reactor.handler(move |msg: Message| {
        let shop = s.clone();
        async move {
            let order = order_in(&msg)?;
            Ok(match shop.charge(&order) {
                Ok(payment_id) => vec![Event::new(
                    "payment.processed",
                    json!({"order_id": order.order_id, "payment_id": payment_id}),
                )
                .module("payment")],
                Err(reason) if reason == "card declined" => vec![Event::new(
                    "payment.failed",
                    json!({"order_id": order.order_id, "reason": reason}),
                )
                .module("payment")],
                // Cancelled before it was charged: nothing to do.
                Err(_) => Vec::new(),
            })
        }
    });
    let s = shop.clone();
    let inventory_reserve = reactor.handler(move |msg: Message| {
        let shop = s.clone();
        async move {
            let order = order_in(&msg)?;
            if shop.state().released.contains(&order.order_id) {
                return Ok(Vec::new());
            }
            Ok(match shop.reserve(&order) {
                Ok(()) => vec![
                    Event::new("items.reserved", json!({"order_id": order.order_id}))
                        .module("inventory"),
                ],
                Err(reason) if reason.contains("not available") => vec![Event::new(
                    "items.not-available",
                    json!({"order_id": order.order_id, "reason": reason}),
                )
                .module("inventory")],
                Err(_) => Vec::new(),
            })
        }
    });
    let s = shop.clone();
    // Payment failed → release the reserved items.
    let inventory_release = reactor.handler(move |msg: Message| {
        let shop = s.clone();
        async move {
            let order_id = id_in(&msg);
            let held = shop.release(&order_id);
            Ok(vec![Event::new(
                "items.released",
                json!({"order_id": order_id, "held": held}),
            )
            .module("inventory")])
        }
    });
    let s = shop.clone();
    // Items not available → refund the payment.
    let payment_refund = reactor.handler(move |msg: Message| {
        let shop = s.clone();
        async move {
            let order_id = id_in(&msg);
            let charged = shop.refund(&order_id);
            Ok(vec![Event::new(
                "payment.refunded",
                json!({"order_id": order_id, "charged": charged}),
            )
            .module("payment")])
        }
    });
    let cancel = |shop: Shop| {
        reactor.handler(move |msg: Message| {
            let shop = shop.clone();
            async move {
                let order_id = id_in(&msg);
                Ok(if shop.cancel_order(&order_id) {
                    vec![Event::new(
                        "order.cancelled",
                        json!({"order_id": order_id, "because": msg.event_type()}),
                    )
                    .module("order")]
                } else {
                    Vec::new()
                })
            }
        })
    };
    let confirm = |shop: Shop| {
        reactor.handler(move |msg: Message| {
            let shop = shop.clone();
            async move {
                let order_id = id_in(&msg);
                Ok(if shop.confirm(&order_id) {
                    vec![Event::new("order.confirmed", json!({"order_id": order_id}))
                        .module("order")]
                } else {
                    Vec::new()
                })
            }
        })
    };
    let s = shop.clone();
    let ship = reactor.handler(move |msg: Message| {
        let shop = s.clone();
        async move {
            let order_id = id_in(&msg);
            let shipment = shop.ship(&order_id);
            Ok(vec![Event::new(
                "shipment.created",
                json!({"order_id": order_id, "shipment_id": shipment}),
            )
            .module("shipment")])
        }
    });
    Ok(Bus::builder()
        .store(SqliteStore::open(path)?)
        .handler("payment/charge", On::event("order.placed"), payment_charge)
        .handler(
            "inventory/reserve",
            On::event("order.placed"),
            inventory_reserve,
        )
        .handler(
            "inventory/release",
            On::event("payment.failed"),
            inventory_release,
        )
        .handler(
            "payment/refund",
            On::event("items.not-available"),
            payment_refund,
        )
        .handler(
            "order/cancel-unpaid",
            On::event("payment.failed"),
            cancel(shop.clone()),
        )
        .handler(
            "order/cancel-unavailable",
            On::event("items.not-available"),
            cancel(shop.clone()),
        )
        .handler(
            "order/confirm-paid",
            On::event("payment.processed"),
            confirm(shop.clone()),
        )
        .handler(
            "order/confirm-reserved",
            On::event("items.reserved"),
            confirm(shop.clone()),
        )
        .handler("shipment/create", On::event("order.confirmed"), ship))
}

/// Runs one order through the choreography on a fresh store in `dir`.
pub async fn choreographed(scenario: Scenario, dir: &std::path::Path) -> Result<Report, BoxError> {
    let shop = Shop::new();
    let reactor = Reactor::new();
    let bus = choreographed_bus(&shop, &reactor, &dir.join("choreographed.db"))?
        .build()
        .await?;
    reactor.bind(bus.clone());

    let order_id = "o-2";
    let order = scenario.order(order_id);
    let order_value = order.clone();
    let order: Order = serde_json::from_value(order)?;
    shop.create_order(&order);
    bus.publish(
        Event::new("order.placed", order_value)
            .module("order")
            .correlation_id(order_id),
    )
    .await?;

    // The flow has ended when its last event is in the log and no delivery is left.
    let last = match scenario {
        Scenario::Ships => vec!["shipment.created"],
        Scenario::PaymentFails => vec!["order.cancelled", "items.released"],
        Scenario::ItemsNotAvailable => vec!["order.cancelled", "payment.refunded"],
    };
    let flow = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let flow = chain(&bus, order_id, ChainQuery::default()).await?;
            let stats = bus.stats().await?;
            let idle = stats.deliveries.pending + stats.deliveries.leased == 0;
            if idle && last.iter().all(|t| flow.find(t).is_some()) {
                return Ok::<_, BoxError>(flow);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await??;
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(Report {
        shop: shop.state(),
        saga: None,
        history: Vec::new(),
        chain: flow,
    })
}

fn describe(event: &SagaEvent) -> String {
    match event {
        SagaEvent::Started { saga_type, .. } => format!("started ({saga_type})"),
        SagaEvent::StepRequested { name, .. } => format!("step requested: {name}"),
        SagaEvent::StepAttemptFailed {
            name,
            attempt,
            error,
            ..
        } => {
            format!("step {name} attempt {attempt} failed: {error}")
        }
        SagaEvent::EventArrived { name, .. } => format!("event for {name} arrived early"),
        SagaEvent::StepCompleted { name, output, .. } => {
            format!("step completed: {name} → {output}")
        }
        SagaEvent::StepFailed { name, error, .. } => format!("step FAILED: {name}: {error}"),
        SagaEvent::DeadlineExceeded { .. } => "deadline exceeded".into(),
        SagaEvent::Compensating { name, .. } => format!("compensating: {name}"),
        SagaEvent::CompensationAttemptFailed { name, error, .. } => {
            format!("compensation of {name} failed an attempt: {error}")
        }
        SagaEvent::Compensated { name, .. } => format!("compensated: {name}"),
        SagaEvent::CompensationFailed { name, error, .. } => {
            format!("compensation FAILED: {name}: {error}")
        }
        SagaEvent::NeedsAttention { name, .. } => format!("needs attention: {name}"),
        SagaEvent::CompensationRetried { name, .. } => format!("compensation retried: {name}"),
        SagaEvent::Completed => "completed".into(),
        SagaEvent::Failed { reason } => format!("failed: {reason}"),
        other => format!("{other:?}"),
    }
}

fn print_report(title: &str, report: &Report) {
    println!("\n=== {title}");
    if let Some(saga) = &report.saga {
        for h in &report.history {
            println!("  {:>2}. {}", h.version, describe(&h.event));
        }
        println!("  saga status: {}", saga.status);
    } else {
        for link in &report.chain.links {
            let cause = report
                .chain
                .cause_of(link)
                .map_or_else(|| "(start)".to_owned(), |c| c.message.event_type.clone());
            println!("  {:<20} ← {}", link.message.event_type, cause);
        }
    }
    let s = &report.shop;
    println!(
        "  order: {:?}; payment: {:?}; reserved: {:?}; shipment: {:?}",
        s.orders.values().next(),
        s.payments.values().next(),
        s.reservations.values().next(),
        s.shipments.values().next()
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    for scenario in Scenario::ALL {
        let dir = tempfile::tempdir()?;
        let report = orchestrated(scenario, dir.path()).await?;
        print_report(&format!("orchestrated saga — {scenario:?}"), &report);
        let report = choreographed(scenario, dir.path()).await?;
        print_report(&format!("choreography — {scenario:?}"), &report);
    }
    Ok(())
}
