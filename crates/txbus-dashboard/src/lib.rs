//! An operator dashboard for txbus: an axum [`Router`] that a service mounts anywhere.
//!
//! Pages: the overview (every handler's deliveries by state, throughput and failure rate of
//! the last minutes, the oldest pending delivery), operations (search, one operation as a tree
//! of its events, deliveries, attempts, errors and compensations), dead letters (inspect,
//! replay one or many, discard), sagas (by status, with their history), projections and relays
//! (checkpoint, lag, last error), the log (by position, and `verify`), and the audit trail.
//! Server-rendered HTML with a few lines of JavaScript served by the router itself (it works
//! offline); the overview and an operation update live over server-sent events.
//!
//! Every request needs credentials the service configured — HTTP basic auth or a bearer token;
//! there is no default user. Replaying and discarding need [`Role::Operator`]; each action is
//! written to an audit trail in the store, shown on its own page. Forms carry a CSRF token and
//! are refused when a browser says they come from another site.
//!
//! ```no_run
//! # async fn run(bus: txbus_core::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! use txbus_dashboard::{Dashboard, Role};
//!
//! let dashboard = Dashboard::builder(bus)
//!     .user("ada", std::env::var("DASHBOARD_PASSWORD")?, Role::Operator)
//!     .token("monitoring", std::env::var("DASHBOARD_TOKEN")?, Role::Viewer)
//!     .build()?;
//! let app = dashboard.mount(axum::Router::new(), "/admin/queues");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

mod alerts;
mod audit;
mod auth;
mod error;
mod format;
mod layout;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{Mutex, Semaphore};
use txbus_core::Bus;

pub use alerts::{
    Alert, AlertCondition, Alerts, AlertsBuilder, AlertsHandle, CheckReport, ALERT_EVENT,
};
pub use audit::{recent as recent_audit, AuditRecord};
pub use auth::Role;
pub use error::Error;

/// The smallest secret (password or token) accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 8;

/// Configures a [`Dashboard`]: at least one user or token is required.
pub struct DashboardBuilder {
    bus: Bus,
    users: Vec<auth::User>,
    metrics_link: Option<String>,
    audit_capacity: u64,
    refresh: Duration,
    max_live: usize,
    title: String,
    problem: Option<Error>,
}

impl DashboardBuilder {
    /// A user who signs in with HTTP basic auth.
    pub fn user(mut self, name: impl Into<String>, password: impl AsRef<[u8]>, role: Role) -> Self {
        self.users.push(auth::User {
            name: name.into(),
            role,
            secret: auth::Secret::Password(auth::digest(password.as_ref())),
        });
        self.check_secret(password.as_ref().len())
    }

    /// A client that sends `Authorization: Bearer <token>`; `name` is who the audit trail names.
    pub fn token(mut self, name: impl Into<String>, token: impl AsRef<[u8]>, role: Role) -> Self {
        self.users.push(auth::User {
            name: name.into(),
            role,
            secret: auth::Secret::Token(auth::digest(token.as_ref())),
        });
        self.check_secret(token.as_ref().len())
    }

    fn check_secret(mut self, len: usize) -> Self {
        if len < MIN_SECRET_BYTES && self.problem.is_none() {
            let user = self
                .users
                .last()
                .map(|u| u.name.clone())
                .unwrap_or_default();
            self.problem = Some(Error::WeakSecret {
                user,
                min: MIN_SECRET_BYTES,
            });
        }
        self
    }

    /// A link to the service's metrics endpoint, shown in the navigation (e.g. `/metrics`).
    pub fn metrics_link(mut self, href: impl Into<String>) -> Self {
        self.metrics_link = Some(href.into());
        self
    }

    /// Audit records kept at most (default 10 000); older ones are removed as new ones come.
    pub fn audit_capacity(mut self, records: u64) -> Self {
        self.audit_capacity = records.max(1);
        self
    }

    /// How often live pages refresh (default 2 s).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(200));
        self
    }

    /// Live connections (server-sent events) open at once at most (default 64); more are
    /// answered 503.
    pub fn max_live_connections(mut self, n: usize) -> Self {
        self.max_live = n.max(1);
        self
    }

    /// The title shown in the header (default "txbus").
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Checks the configuration and builds the dashboard.
    pub fn build(self) -> Result<Dashboard, Error> {
        if let Some(problem) = self.problem {
            return Err(problem);
        }
        if self.users.is_empty() {
            return Err(Error::NoCredentials);
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() || u.name.contains(':') {
                return Err(Error::BadName(u.name.clone()));
            }
            if !names.insert(u.name.clone()) {
                return Err(Error::DuplicateUser(u.name.clone()));
            }
        }
        let mut csrf_key = [0u8; 32];
        csrf_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        csrf_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Ok(Dashboard {
            inner: Arc::new(Inner {
                bus: self.bus,
                users: self.users,
                csrf_key,
                metrics_link: self.metrics_link,
                audit_capacity: self.audit_capacity,
                refresh: self.refresh,
                live: Arc::new(Semaphore::new(self.max_live)),
                verifying: Mutex::new(()),
                title: self.title,
            }),
        })
    }
}

pub(crate) struct Inner {
    pub(crate) bus: Bus,
    pub(crate) users: Vec<auth::User>,
    pub(crate) csrf_key: [u8; 32],
    pub(crate) metrics_link: Option<String>,
    pub(crate) audit_capacity: u64,
    pub(crate) refresh: Duration,
    pub(crate) live: Arc<Semaphore>,
    /// One `verify` walk at a time.
    pub(crate) verifying: Mutex<()>,
    pub(crate) title: String,
}

/// The dashboard of one bus. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("users", &self.inner.users.len())
            .finish_non_exhaustive()
    }
}

/// Largest request body accepted (forms of delivery ids).
const MAX_BODY: usize = 64 * 1024;

impl Dashboard {
    /// Configures the dashboard of `bus`.
    pub fn builder(bus: Bus) -> DashboardBuilder {
        DashboardBuilder {
            bus,
            users: Vec::new(),
            metrics_link: None,
            audit_capacity: 10_000,
            refresh: Duration::from_secs(2),
            max_live: 64,
            title: "txbus".into(),
            problem: None,
        }
    }

    /// Mounts the dashboard into `app` at `path` (such as `/admin/queues`): the router nested
    /// there, and `path/` sent on to `path`.
    pub fn mount(&self, app: Router, path: &str) -> Router {
        let path = format!("/{}", path.trim_matches('/'));
        let to = path.clone();
        app.nest(&path, self.router()).route(
            &format!("{path}/"),
            get(move || async move { axum::response::Redirect::permanent(&to) }),
        )
    }

    /// The router, to mount anywhere (`Router::nest("/admin/queues", dashboard.router())`, or
    /// [`mount`](Self::mount)).
    pub fn router(&self) -> Router {
        use pages::{dead_letters, log, operations, overview, runners, sagas, trail};
        let state = Arc::clone(&self.inner);
        Router::new()
            .route("/", get(overview::page))
            .route("/live/overview", get(overview::live))
            .route("/operations", get(operations::search))
            .route("/operations/{id}", get(operations::show))
            .route("/live/operations/{id}", get(operations::live))
            .route("/dead-letters", get(dead_letters::list))
            .route("/dead-letters/{id}", get(dead_letters::show))
            .route("/dead-letters/replay", post(dead_letters::replay))
            .route("/dead-letters/discard", post(dead_letters::discard))
            .route("/sagas", get(sagas::list))
            .route("/sagas/{id}", get(sagas::show))
            .route("/subscriptions", get(runners::page))
            .route("/log", get(log::page))
            .route("/log/verify", get(log::verify))
            .route("/audit", get(trail::page))
            .route("/assets/app.css", get(layout::css))
            .route("/assets/app.js", get(layout::js))
            .fallback(error::not_found)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state),
                auth::require,
            ))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(state)
    }
}
