//! `transact` across services over NATS JetStream, end to end in one process: an "orders"
//! bus whose `billing` events are handled by a separate "billing" bus (its own store), reached
//! through JetStream. The first order succeeds; the second is rejected by billing, and the
//! orders operation fails with billing's reason.
//!
//! ```sh
//! cargo run -p txbus-nats --example transact_across_services     # NATS with JetStream on 127.0.0.1:4222
//! ```
#![allow(clippy::print_stdout)]

use std::time::Duration;

use serde_json::json;
use txbus_core::{Bus, Event, HandlerError, Message, On};
use txbus_nats::{ConsumerSpec, JetStreamSource, NatsReplier, RemoteHandler, StreamSpec};
use txbus_relay::{Inbox, SubjectRoute};
use txbus_sqlite::SqliteStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client.clone());
    // Requests travel on txbus.remote.<module>.<event type>, kept by this stream.
    StreamSpec::new("TXBUS_EXAMPLE_REMOTE", ["txbus.remote.>"])
        .ensure(&js)
        .await?;
    let dir = tempfile::tempdir()?;

    // The billing service: its own store, its own handler, an inbox that answers.
    let billing = Bus::builder()
        .store(SqliteStore::open(dir.path().join("billing.db"))?)
        .handler(
            "charge-card",
            On::in_module("billing"),
            |m: Message| async move {
                let amount = m.payload()["amount"].as_i64().unwrap_or(0);
                if amount > 1000 {
                    return Err(HandlerError::reject(format!(
                        "amount {amount} is over the card limit"
                    )));
                }
                println!("billing: charged {amount} for message {}", m.id());
                Ok(())
            },
        )
        .build()
        .await?;
    let source = JetStreamSource::new(
        js.clone(),
        ConsumerSpec::new("TXBUS_EXAMPLE_REMOTE", "billing-inbox")
            .filter_subject("txbus.remote.billing.>"),
    )
    .await?;
    let inbox = Inbox::builder(billing.clone(), "billing-inbox", source)
        .replies(NatsReplier::new(client.clone()))
        .start()?;

    // The orders service: billing's events are handled remotely.
    let orders = Bus::builder()
        .store(SqliteStore::open(dir.path().join("orders.db"))?)
        .handler(
            "billing",
            On::in_module("billing"),
            RemoteHandler::new(client, "billing").route(SubjectRoute::new("txbus.remote")),
        )
        .build()
        .await?;

    for amount in [250, 5000] {
        let op = orders
            .transact([
                Event::new("invoice.requested", json!({"order": 7, "amount": amount}))
                    .module("billing"),
            ])
            .await?;
        let outcome = op.outcome().await?;
        match outcome.error {
            None => println!("orders: operation {} succeeded", op.id()),
            Some(failure) => println!("orders: operation {} failed: {}", op.id(), failure.reason),
        }
    }

    inbox.shutdown(Duration::from_secs(5)).await?;
    orders.shutdown(Duration::from_secs(5)).await?;
    billing.shutdown(Duration::from_secs(5)).await?;
    js.delete_stream("TXBUS_EXAMPLE_REMOTE").await?;
    Ok(())
}
