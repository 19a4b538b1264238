//! The HTTP service: POSTs go to the command bus (idempotent with an `Idempotency-Key`
//! header), GETs to the query bus over the projection's read model.

use std::path::Path;

use axum::extract::{Path as UrlPath, Query as UrlQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use txbus_core::Bus;
use txbus_cqrs::command::{self, CommandBus};
use txbus_cqrs::http::IdempotencyLayer;
use txbus_cqrs::idempotency::{Idempotency, Options};
use txbus_cqrs::query::{self, QueryBus};
use txbus_es::projection::Projector;
use txbus_es::{EventStore, ProjectionHandle, Repository};
use txbus_sqlite::SqliteStore;

use crate::commands::{commands, AddItem, CreateOrder};
use crate::domain::Order;
use crate::read_model::{queries, GetOrder, ListOrders, Orders};

/// Any error, for setup.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The running service's parts.
pub struct App {
    /// The HTTP routes.
    pub router: Router,
    /// The bus (shut it down on exit).
    pub bus: Bus,
    /// The orders projection (stop it on exit).
    pub projection: ProjectionHandle,
    /// The command bus.
    #[allow(dead_code)] // the tests use it
    pub commands: CommandBus,
    /// The query bus.
    #[allow(dead_code)] // the tests use it
    pub queries: QueryBus,
}

#[derive(Clone)]
struct Shared {
    commands: CommandBus,
    queries: QueryBus,
}

/// Opens the store at `db` and builds the service.
pub async fn build(db: &Path) -> Result<App, BoxError> {
    let bus = Bus::builder().store(SqliteStore::open(db)?).build().await?;
    let events = EventStore::new(bus.clone());
    let orders = Repository::<Order>::new(events.clone()).snapshot_every(25);
    let projection = Projector::read_model("orders", Orders)
        .start(&events)
        .await?;
    let commands = commands(orders)?;
    let queries = queries(bus.clone(), projection.checkpoint_watch())?;
    let keys = Idempotency::new(bus.clone(), Options::default());
    let router = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/items", post(add_item))
        .layer(IdempotencyLayer::new(keys))
        .with_state(Shared {
            commands: commands.clone(),
            queries: queries.clone(),
        });
    Ok(App {
        router,
        bus,
        projection,
        commands,
        queries,
    })
}

#[derive(Deserialize)]
struct NewOrder {
    customer: String,
}

async fn create_order(State(s): State<Shared>, Json(body): Json<NewOrder>) -> Response {
    let command = CreateOrder {
        id: uuid::Uuid::now_v7().to_string(),
        customer: body.customer,
    };
    match s.commands.send(command).await {
        Ok(created) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/orders/{}", created.id))],
            Json(created),
        )
            .into_response(),
        Err(e) => command_error(&e),
    }
}

#[derive(Deserialize)]
struct NewItem {
    sku: String,
    quantity: u32,
}

async fn add_item(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<NewItem>,
) -> Response {
    let command = AddItem {
        order_id: id,
        sku: body.sku,
        quantity: body.quantity,
    };
    match s.commands.send(command).await {
        Ok(changed) => (StatusCode::CREATED, Json(changed)).into_response(),
        Err(e) => command_error(&e),
    }
}

async fn get_order(State(s): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    match s.queries.ask(GetOrder { id }).await {
        Ok(Some(order)) => Json(&*order).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "order_not_found", "no such order"),
        Err(e) => query_error(&e),
    }
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_orders(State(s): State<Shared>, UrlQuery(page): UrlQuery<Page>) -> Response {
    let query = ListOrders {
        after: page.after,
        limit: page.limit.unwrap_or(20),
    };
    match s.queries.ask(query).await {
        Ok(orders) => Json(json!({ "orders": &*orders })).into_response(),
        Err(e) => query_error(&e),
    }
}

fn command_error(e: &command::Error) -> Response {
    let (status, code) = match e {
        command::Error::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
        command::Error::Rejected { code, .. } => match code.as_str() {
            "order_not_found" => (StatusCode::NOT_FOUND, "order_not_found"),
            "order_exists" => (StatusCode::CONFLICT, "order_exists"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, code.as_str()),
        },
        command::Error::Idempotency(e) => {
            (txbus_cqrs::http::status_of(e), txbus_cqrs::http::code_of(e))
        }
        _ => {
            tracing::error!(error = %e, "command failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    let message = match e {
        command::Error::Rejected { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    error(status, code, &message)
}

fn query_error(e: &query::Error) -> Response {
    match e {
        query::Error::Invalid { .. } => error(StatusCode::BAD_REQUEST, "invalid", &e.to_string()),
        _ => {
            tracing::error!(error = %e, "query failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}
