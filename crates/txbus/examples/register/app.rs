//! The registration flow of design note 000 as an HTTP service: `POST /users` commits
//! `user.created` and `audit.user-created` in one `transact`, and the handlers write the business
//! rows; the caller gets the result within `wait`, or an operation id to follow up on.
//!
//! Routes:
//! - `POST /users` `{"email": "..."}` → 200 `{user_id, operation_id}` when every handler succeeded
//!   within `wait`; 202 `{operation_id, user_id, status_url}` when the outcome is not known yet
//!   (a `wait` of zero always answers 202); 500 `{operation_id, error}` when a handler failed;
//!   400 for a bad body, 415 when it is not sent as `application/json`, 413 above
//!   [`MAX_BODY_BYTES`].
//! - `GET /operations/{id}` → where the operation stands (pending or finished), 404 if unknown.
//! - `GET /operations/{id}/events` → server-sent events: one `outcome` event when it finishes.
//! - `GET /users/{id}` → the user row written by the `user-writer` handler.

use std::error::Error;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::json;
use txbus::{
    Backoff, Bus, Error as BusError, Event, HandlerError, Message, On, OperationId, SqliteStore,
};

/// The largest request body accepted (16 KiB).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The error type of setup.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The business database (`app.db`), shared by the handlers and the read routes.
type Db = Arc<Mutex<Connection>>;

#[derive(Clone)]
struct AppState {
    bus: Bus,
    db: Db,
    wait: Duration,
}

/// Opens `<data_dir>/txbus.db` (the bus) and `<data_dir>/app.db` (the business tables), starts
/// the bus with the two handlers, and returns the router and the bus (to shut it down).
pub async fn build(data_dir: &Path, wait: Duration) -> Result<(Router, Bus), BoxError> {
    std::fs::create_dir_all(data_dir)?;
    let conn = Connection::open(data_dir.join("app.db"))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS users(id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, created_at INTEGER);
         CREATE TABLE IF NOT EXISTS audit(message_id TEXT PRIMARY KEY, user_id TEXT, at INTEGER);",
    )?;
    let db: Db = Arc::new(Mutex::new(conn));

    let (user_db, audit_db) = (db.clone(), db.clone());
    let bus = Bus::builder()
        .store(SqliteStore::open(data_dir.join("txbus.db"))?)
        .handler_timeout(Duration::from_secs(10))
        .max_retries(3)
        .backoff(Backoff::exponential(Duration::from_millis(100)))
        .handler(
            "user-writer",
            On::event("user.created").module("user"),
            move |msg: Message| write_user(user_db.clone(), msg),
        )
        .handler(
            "audit-writer",
            On::in_module("audit"),
            move |msg: Message| write_audit(audit_db.clone(), msg),
        )
        .build()
        .await?;

    let router = Router::new()
        .route("/users", post(register))
        .route("/users/{id}", get(get_user))
        .route("/operations/{id}", get(get_operation))
        .route("/operations/{id}/events", get(operation_events))
        // A registration is a few hundred bytes: anything above this is refused with 413
        // before it is read into memory.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState {
            bus: bus.clone(),
            db,
            wait,
        });
    Ok((router, bus))
}

// ---- handlers: the business writes happen here, idempotently ----

/// `user.created`: inserts the user. A redelivery (same user id) is a success; an e-mail taken
/// by another user is a definitive refusal; any other database error is retried.
async fn write_user(db: Db, msg: Message) -> Result<(), HandlerError> {
    let field = |name: &str| {
        msg.payload()[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HandlerError::reject(format!("user.created without {name}")))
    };
    let (user_id, email) = (field("user_id")?, field("email")?);
    tokio::task::spawn_blocking(move || {
        let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO users(id, email, created_at) VALUES (?1, ?2, ?3)",
            (&user_id, &email, now_ms()),
        )?;
        if inserted == 1 {
            return Ok(());
        }
        let exists = conn
            .query_row("SELECT 1 FROM users WHERE id = ?1", [&user_id], |_| Ok(()))
            .optional()?;
        match exists {
            Some(()) => Ok(()), // written by an earlier attempt of this message
            None => Err(HandlerError::reject(format!(
                "e-mail {email} is already registered"
            ))),
        }
    })
    .await?
}

/// `audit.*`: records the message once, keyed by its id.
async fn write_audit(db: Db, msg: Message) -> Result<(), HandlerError> {
    let message_id = msg.id().to_string();
    let user_id = msg.payload()["user_id"].as_str().map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
        conn.execute(
            "INSERT OR IGNORE INTO audit(message_id, user_id, at) VALUES (?1, ?2, ?3)",
            (&message_id, &user_id, now_ms()),
        )?;
        Ok(())
    })
    .await?
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---- routes ----

/// An error response: `{"error": "..."}` with a status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        let status = match e {
            BusError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

#[derive(Deserialize)]
struct RegisterRequest {
    email: String,
}

async fn register(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bad = |reason: String| ApiError(StatusCode::BAD_REQUEST, reason);
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_body {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be sent as content-type: application/json".to_owned(),
        ));
    }
    let request: RegisterRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            r#"the body must be JSON like {{"email": "a@example.com"}}: {e}"#
        ))
    })?;
    let email = request.email.trim();
    match email.split_once('@') {
        Some((user, domain)) if !user.is_empty() && !domain.is_empty() => {}
        _ => return Err(bad(format!("{email:?} is not a valid e-mail address"))),
    }

    // The id exists before anything is written: it goes into the events and the response.
    let user_id = uuid::Uuid::now_v7().to_string();
    let op = app
        .bus
        .transact([
            Event::new(
                "user.created",
                json!({ "user_id": user_id, "email": email }),
            )
            .module("user"),
            Event::new("audit.user-created", json!({ "user_id": user_id })).module("audit"),
        ])
        .await?;
    let operation_id = op.id();

    // Durable now. Wait a little for the handlers; after that, hand out the operation id.
    let outcome = if app.wait.is_zero() {
        None
    } else {
        match tokio::time::timeout(app.wait, op.outcome()).await {
            Ok(Ok(outcome)) => Some(outcome),
            // Shutting down: the operation resumes on the next start.
            Ok(Err(BusError::ShuttingDown)) | Err(_) => None,
            Ok(Err(e)) => return Err(e.into()),
        }
    };
    let response = match outcome {
        Some(outcome) => match outcome.error {
            None => (
                StatusCode::OK,
                Json(json!({ "user_id": user_id, "operation_id": operation_id })),
            ),
            Some(failure) => {
                tracing::warn!(%operation_id, %failure, "registration failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "operation_id": operation_id, "error": failure })),
                )
            }
        },
        None => (
            StatusCode::ACCEPTED,
            Json(json!({
                "operation_id": operation_id,
                "user_id": user_id,
                "status_url": format!("/operations/{operation_id}"),
            })),
        ),
    };
    Ok(response.into_response())
}

fn parse_operation_id(raw: &str) -> Result<OperationId, ApiError> {
    raw.parse().map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{raw:?} is not an operation id: {e}"),
        )
    })
}

fn unknown_operation(id: OperationId) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("unknown operation {id}"))
}

async fn get_operation(
    State(app): State<AppState>,
    UrlPath(raw): UrlPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_operation_id(&raw)?;
    let state = app
        .bus
        .outcome(id)
        .await?
        .ok_or_else(|| unknown_operation(id))?;
    Ok(Json(state).into_response())
}

/// One `outcome` event (the Outcome as JSON) when the operation finishes, then the end.
async fn operation_events(
    State(app): State<AppState>,
    UrlPath(raw): UrlPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_operation_id(&raw)?;
    if app.bus.outcome(id).await?.is_none() {
        return Err(unknown_operation(id));
    }
    let outcome = futures_util::stream::once(async move {
        match app.bus.wait(id).await {
            Ok(outcome) => SseEvent::default().event("outcome").json_data(outcome),
            Err(e) => Ok(SseEvent::default().event("error").data(e.to_string())),
        }
    });
    Ok(Sse::new(outcome)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn get_user(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let db = app.db.clone();
    let lookup = id.clone();
    let email = tokio::task::spawn_blocking(move || {
        let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row("SELECT email FROM users WHERE id = ?1", [&lookup], |row| {
            row.get::<_, String>(0)
        })
        .optional()
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match email {
        Some(email) => Ok(Json(json!({ "id": id, "email": email })).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no user with id {id}"),
        )),
    }
}
