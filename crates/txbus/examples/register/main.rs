//! User registration over HTTP (design note 000): one `transact` commits `user.created` and
//! `audit.user-created`, the handlers write the business rows, and the caller gets the outcome,
//! or an operation id to poll (`GET /operations/{id}`) or to follow (`GET /operations/{id}/events`).
//!
//! ```text
//! cargo run -p txbus --example register
//! ```
//!
//! Environment: `TXBUS_DATA_DIR` (default `./data`), `ADDR` (default `127.0.0.1:3000`),
//! `WAIT_MS` (how long `POST /users` waits for the outcome, default 2000), `RUST_LOG`.

mod app;

use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), app::BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let data_dir =
        PathBuf::from(std::env::var("TXBUS_DATA_DIR").unwrap_or_else(|_| "./data".into()));
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let wait = match std::env::var("WAIT_MS") {
        Ok(ms) => Duration::from_millis(ms.parse().map_err(|e| format!("WAIT_MS={ms:?}: {e}"))?),
        Err(_) => Duration::from_millis(2000),
    };

    let (router, bus) = app::build(&data_dir, wait).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(addr = %listener.local_addr()?, data_dir = %data_dir.display(), ?wait, "listening");

    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            // Stop the bus first: requests and event streams still waiting for an outcome are
            // answered (the operations resume on the next start), then the server drains.
            tracing::info!("Ctrl-C: shutting down");
            match bus.shutdown(Duration::from_secs(10)).await {
                Ok(report) => tracing::info!(?report, "bus stopped"),
                Err(e) => tracing::error!(error = %e, "bus shutdown failed"),
            }
        })
        .await?;
    tracing::info!("server stopped");
    Ok(())
}
