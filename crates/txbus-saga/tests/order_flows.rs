//! The order flows of the `order_saga` example — orchestrated and choreographed, each with
//! both failure scenarios — checked end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "../examples/order_saga.rs"]
mod order_saga;

use order_saga::{choreographed, orchestrated, OrderStatus, PaymentStatus, Scenario};
use txbus_saga::choreography::Chain;
use txbus_saga::{SagaEvent, SagaStatus};

fn compensated(report: &order_saga::Report) -> Vec<String> {
    report
        .history
        .iter()
        .filter_map(|h| match &h.event {
            SagaEvent::Compensated { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// The cause of the first event of `event_type`, by type.
fn cause(chain: &Chain, event_type: &str) -> String {
    let link = chain
        .find(event_type)
        .unwrap_or_else(|| panic!("{event_type} is in the chain"));
    chain.cause_of(link).unwrap().message.event_type.clone()
}

fn assert_linked(chain: &Chain, correlation: &str) {
    assert!(chain.dangling().is_empty(), "every cause is in the chain");
    assert!(!chain.truncated);
    for link in &chain.links[1..] {
        assert_eq!(
            link.message.headers.correlation_id.as_deref(),
            Some(correlation)
        );
        assert!(
            link.message.headers.causation_id.is_some(),
            "{} has a cause",
            link.message.event_type
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_order_ships_after_the_payment_settles() {
    let dir = tempfile::tempdir().unwrap();
    let report = orchestrated(Scenario::Ships, dir.path()).await.unwrap();
    let saga = report.saga.as_ref().unwrap();
    assert_eq!(saga.status, SagaStatus::Completed);
    assert_eq!(
        saga.outputs()["payment-settled"]["event_type"],
        "payment.settled"
    );
    assert_eq!(report.shop.orders["o-1"], OrderStatus::Confirmed);
    assert_eq!(report.shop.payments["o-1"], PaymentStatus::Charged);
    assert_eq!(report.shop.shipments["o-1"], "ship-o-1");
    // The webhook's event carries the order id as correlation id: it is in the order's chain.
    assert!(report.chain.find("payment.settled").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_payment_failure_releases_the_items_and_cancels_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let report = orchestrated(Scenario::PaymentFails, dir.path())
        .await
        .unwrap();
    let saga = report.saga.as_ref().unwrap();
    assert_eq!(saga.status, SagaStatus::Failed);
    assert!(saga.failure.as_deref().unwrap().contains("card declined"));
    assert_eq!(compensated(&report), vec!["reserve-items", "create-order"]);
    assert_eq!(report.shop.orders["o-1"], OrderStatus::Cancelled);
    assert!(report.shop.reservations.is_empty());
    assert_eq!(
        report.shop.stock["book"], 5,
        "the reserved book is back in stock"
    );
    assert!(report.shop.payments.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_unavailable_items_cancel_the_order_before_any_charge() {
    let dir = tempfile::tempdir().unwrap();
    let report = orchestrated(Scenario::ItemsNotAvailable, dir.path())
        .await
        .unwrap();
    let saga = report.saga.as_ref().unwrap();
    assert_eq!(saga.status, SagaStatus::Failed);
    assert!(saga.failure.as_deref().unwrap().contains("not available"));
    assert_eq!(compensated(&report), vec!["create-order"]);
    assert_eq!(report.shop.orders["o-1"], OrderStatus::Cancelled);
    assert!(
        report.shop.payments.is_empty(),
        "the saga reserves before it charges"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_order_ships_and_the_chain_follows_every_reaction() {
    let dir = tempfile::tempdir().unwrap();
    let report = choreographed(Scenario::Ships, dir.path()).await.unwrap();
    assert_eq!(report.shop.orders["o-2"], OrderStatus::Confirmed);
    assert_eq!(report.shop.shipments["o-2"], "ship-o-2");
    let chain = &report.chain;
    assert_eq!(chain.links[0].message.event_type, "order.placed");
    assert_eq!(cause(chain, "payment.processed"), "order.placed");
    assert_eq!(cause(chain, "items.reserved"), "order.placed");
    assert_eq!(cause(chain, "shipment.created"), "order.confirmed");
    assert_linked(chain, "o-2");
    // Exactly one of each reaction, though handlers run at least once.
    assert_eq!(chain.links.len(), 5, "{:?}", chain.event_types());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_payment_failure_releases_the_items_and_cancels_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let report = choreographed(Scenario::PaymentFails, dir.path())
        .await
        .unwrap();
    assert_eq!(report.shop.orders["o-2"], OrderStatus::Cancelled);
    assert!(report.shop.reservations.is_empty());
    assert_eq!(report.shop.stock["book"], 5);
    assert!(report.shop.payments.is_empty());
    assert!(report.shop.shipments.is_empty());
    let chain = &report.chain;
    assert_eq!(cause(chain, "payment.failed"), "order.placed");
    assert_eq!(cause(chain, "items.released"), "payment.failed");
    assert_eq!(cause(chain, "order.cancelled"), "payment.failed");
    assert!(chain.find("order.confirmed").is_none());
    assert_linked(chain, "o-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_unavailable_items_refund_the_payment_and_cancel_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let report = choreographed(Scenario::ItemsNotAvailable, dir.path())
        .await
        .unwrap();
    assert_eq!(report.shop.orders["o-2"], OrderStatus::Cancelled);
    // Charged in parallel and refunded, or never charged: no money is kept either way.
    assert_ne!(
        report.shop.payments.get("o-2"),
        Some(&PaymentStatus::Charged)
    );
    assert!(report.shop.reservations.is_empty());
    let chain = &report.chain;
    assert_eq!(cause(chain, "items.not-available"), "order.placed");
    assert_eq!(cause(chain, "payment.refunded"), "items.not-available");
    assert_eq!(cause(chain, "order.cancelled"), "items.not-available");
    assert_linked(chain, "o-2");
}
