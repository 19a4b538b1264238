//! The dashboard's errors: configuration refused at build time, and what pages answer when a
//! request cannot be served.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A dashboard configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No user and no token: the dashboard would refuse everyone (there is no default).
    #[error(
        "the dashboard needs at least one user or token: call DashboardBuilder::user or ::token"
    )]
    NoCredentials,
    /// A password or token is too short to protect anything.
    #[error("the secret of {user:?} is shorter than {min} bytes; use a longer password or token")]
    WeakSecret {
        /// The user or token name.
        user: String,
        /// The shortest secret accepted.
        min: usize,
    },
    /// A user name that basic auth cannot carry.
    #[error("user name {0:?} must be non-empty and contain no ':'")]
    BadName(String),
    /// Two users with one name.
    #[error("user name {0:?} is configured twice")]
    DuplicateUser(String),
}

/// What a page answers when it cannot be served: a status and a message for the operator.
#[derive(Debug)]
pub(crate) struct PageError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl PageError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }
}

impl From<txbus_core::Error> for PageError {
    fn from(e: txbus_core::Error) -> Self {
        tracing::warn!(error = %e, "a dashboard page failed");
        let status = match e {
            txbus_core::Error::UnknownDeadLetter(_) | txbus_core::Error::UnknownOperation(_) => {
                StatusCode::NOT_FOUND
            }
            txbus_core::Error::InvalidCommit(_) | txbus_core::Error::Config(_) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<txbus_saga::Error> for PageError {
    fn from(e: txbus_saga::Error) -> Self {
        let status = match e {
            txbus_saga::Error::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        (self.status, self.message).into_response()
    }
}

pub(crate) async fn not_found() -> PageError {
    PageError::not_found("no such dashboard page")
}
