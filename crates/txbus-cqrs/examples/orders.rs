//! An order service, CQRS and event-sourced, on the embedded store: create orders and add
//! items over HTTP — at most 100 items per order, an invariant of the order aggregate — with
//! idempotent POSTs (`Idempotency-Key`), and reads from a projection through a cached query
//! bus.
//!
//! ```text
//! cargo run -p txbus-cqrs --example orders
//!
//! curl -s -X POST localhost:3001/orders -H 'content-type: application/json' \
//!      -H 'Idempotency-Key: 7d1c-first-order' -d '{"customer":"ada"}'
//! # 201 {"id":"0199…","item_count":0,"version":1}  (the same again: the same answer, replayed)
//! curl -s -X POST localhost:3001/orders/0199…/items -H 'content-type: application/json' \
//!      -d '{"sku":"A1","quantity":2}'
//! # 201 {"id":"0199…","item_count":1,"version":2}; the 101st item: 422 too_many_items
//! curl -s localhost:3001/orders/0199…      # the read model's view of the order
//! curl -s 'localhost:3001/orders?limit=20' # orders in creation order
//! ```
//!
//! Environment: `ORDERS_DB` (the SQLite file, default `txbus-orders/orders.db` under the OS
//! temporary directory), `ADDR` (default `127.0.0.1:3001`), `RUST_LOG`.

#[path = "orders/app.rs"]
mod app;
#[path = "orders/commands.rs"]
mod commands;
#[path = "orders/domain.rs"]
mod domain;
#[path = "orders/read_model.rs"]
mod read_model;

use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), app::BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let db = match std::env::var_os("ORDERS_DB") {
        Some(path) => PathBuf::from(path),
        None => std::env::temp_dir().join("txbus-orders").join("orders.db"),
    };
    if let Some(dir) = db.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3001".into());

    let app = app::build(&db).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(addr = %listener.local_addr()?, db = %db.display(), "listening");
    let app::App {
        router,
        bus,
        projection,
        ..
    } = app;
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C: shutting down");
        })
        .await?;
    if let Err(e) = projection.stop().await {
        tracing::error!(error = %e, "projection stop failed");
    }
    match bus.shutdown(Duration::from_secs(10)).await {
        Ok(report) => tracing::info!(?report, "bus stopped"),
        Err(e) => tracing::error!(error = %e, "bus shutdown failed"),
    }
    Ok(())
}
