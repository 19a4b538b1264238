//! A service with the txbus dashboard mounted at `/admin/queues`, as design note 004 mounts
//! Bull Board: orders flow through a mailer, a billing handler that refuses some cards and a
//! warehouse that is down until it is "healed", so the dashboard has succeeded deliveries,
//! rejections, dead letters and a saga to show.
//!
//! ```sh
//! DASHBOARD_OPERATOR_PASSWORD=… DASHBOARD_VIEWER_PASSWORD=… \
//!   cargo run -p txbus-dashboard --example dashboard
//! # open http://127.0.0.1:3000/admin/queues/ and sign in as `operator` or `viewer`
//! curl -X POST localhost:3000/demo/heal     # the warehouse works again: replay its dead letters
//! ```
//!
//! `TXBUS_DATA_DIR` (default `./data`) holds the store; `ADDR` defaults to `127.0.0.1:3000`.
//! There is no default password: the service refuses to start without both.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use txbus_core::{Backoff, Bus, Event, HandlerError, Message, On};
use txbus_dashboard::{Alerts, AlertsHandle, Dashboard, Role};
use txbus_saga::{Saga, Sagas, Step, StepContext};
use txbus_sqlite::SqliteStore;

/// The running demo: the bus, the app to serve, and the switch that heals the warehouse.
pub struct Demo {
    /// The bus.
    pub bus: Bus,
    /// The service's routes with the dashboard nested under `/admin/queues`.
    pub app: Router,
    /// While false the warehouse fails every attempt.
    pub healed: Arc<AtomicBool>,
    /// Alerts checked in the background.
    pub alerts: AlertsHandle,
}

/// Who may use the dashboard.
pub struct Users {
    /// The operator's password (basic auth user `operator`).
    pub operator: String,
    /// The viewer's password (basic auth user `viewer`).
    pub viewer: String,
}

/// Builds the service on a store in `dir` and commits some orders.
pub async fn demo(dir: &Path, users: Users) -> Result<Demo, Box<dyn std::error::Error>> {
    let healed = Arc::new(AtomicBool::new(false));
    let h = Arc::clone(&healed);
    let sagas = Sagas::builder()
        .saga(
            Saga::builder("order-fulfilment")
                .step(Step::action(
                    "reserve-stock",
                    |ctx: StepContext| async move {
                        Ok(json!({"reservation": format!("r-{}", ctx.saga_id())}))
                    },
                ))
                .step(Step::action("ship", |_ctx: StepContext| async move {
                    Ok(json!({"carrier": "post"}))
                }))
                .build()?,
        )
        .build()?;
    let builder = Bus::builder()
        .store(SqliteStore::open(dir.join("txbus.db"))?)
        .max_retries(2)
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        .handler("mailer", On::event("order.placed"), |_m: Message| async {
            Ok(())
        })
        .handler(
            "billing",
            On::event("order.placed"),
            |m: Message| async move {
                if m.payload()["card"] == "declined" {
                    return Err(HandlerError::reject("card declined by the issuer"));
                }
                Ok(())
            },
        )
        .handler("warehouse", On::event("order.placed"), move |m: Message| {
            let healed = Arc::clone(&h);
            async move {
                if m.payload()["fragile"] == true && !healed.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other(
                        "warehouse API: connection refused (10.0.4.7:8443)",
                    )
                    .into());
                }
                Ok(())
            }
        })
        .handler(
            "alert-log",
            On::event(txbus_dashboard::ALERT_EVENT),
            |m: Message| async move {
                tracing::warn!(alert = %m.payload(), "txbus alert");
                Ok(())
            },
        );
    let bus = sagas.install(builder).build().await?;
    let runtime = sagas.attach(bus.clone());
    for n in 0..24u64 {
        let card = if n % 7 == 3 { "declined" } else { "visa" };
        let op = bus
            .transact([Event::new(
                "order.placed",
                json!({"order": 1000 + n, "card": card, "fragile": n % 8 == 5, "total_cents": 1250 + n * 10}),
            )
            .module("orders")])
            .await?;
        let _ = op.outcome().await;
    }
    for n in 0..3u64 {
        let id = runtime
            .start("order-fulfilment", json!({"order": 2000 + n}))
            .await?;
        runtime.wait(&id).await?;
    }
    let alerts = Alerts::builder(bus.clone())
        .on_dead_letters()
        .on_pending_older_than(Duration::from_secs(60))
        .on_lag_above(1_000)
        .interval(Duration::from_secs(5))
        .start();
    let dashboard = Dashboard::builder(bus.clone())
        .user("operator", &users.operator, Role::Operator)
        .user("viewer", &users.viewer, Role::Viewer)
        .metrics_link("/metrics")
        .title("orders service")
        .build()?;
    let heal = Arc::clone(&healed);
    // The service's own public page, outside the dashboard (which refuses anyone unknown).
    let home = Router::new().route(
        "/",
        get(|| async {
            Html("<!doctype html><title>orders service</title><p>The orders service. Operators: <a href=\"/admin/queues\">dashboard</a>.</p>")
        }),
    );
    let app = dashboard.mount(home, "/admin/queues").route(
        "/demo/heal",
        post(move || {
            heal.store(true, Ordering::SeqCst);
            async { "the warehouse works again\n" }
        }),
    );
    Ok(Demo {
        bus,
        app,
        healed,
        alerts,
    })
}

#[tokio::main]
#[allow(dead_code)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .init();
    let password = |name: &str| {
        std::env::var(name)
            .map_err(|_| format!("set {name}: the dashboard has no default password"))
    };
    let users = Users {
        operator: password("DASHBOARD_OPERATOR_PASSWORD")?,
        viewer: password("DASHBOARD_VIEWER_PASSWORD")?,
    };
    let dir = std::env::var("TXBUS_DATA_DIR").unwrap_or_else(|_| "./data".into());
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    let demo = demo(Path::new(&dir), users).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "dashboard at http://{addr}/admin/queues/");
    axum::serve(listener, demo.app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    demo.bus.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
