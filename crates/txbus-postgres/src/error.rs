//! Turning sqlx errors into store errors that say what was being done, and telling apart the
//! errors that mean "the connection is gone" from those of one statement.

use txbus_core::store::Error;

/// Wraps a sqlx error with what was being done. A closed pool means a closed store.
pub(crate) fn db(doing: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| match e {
        sqlx::Error::PoolClosed => Error::Closed,
        e => Error::backend(format!("postgres: {doing}"), e),
    }
}

/// The sqlx error inside a store error, if there is one.
fn sqlx_error(e: &Error) -> Option<&sqlx::Error> {
    match e {
        Error::Backend {
            source: Some(source),
            ..
        } => source.downcast_ref::<sqlx::Error>(),
        _ => None,
    }
}

/// The SQLSTATE of a database error, if the error is one.
fn code(e: &Error) -> Option<String> {
    match sqlx_error(e)? {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// True when the connection the error came from cannot be used again: I/O, protocol, or the
/// server ending the session (shutdown, `pg_terminate_backend`, any FATAL error).
pub(crate) fn is_connection_lost(e: &Error) -> bool {
    let Some(e) = sqlx_error(e) else {
        return false;
    };
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().unwrap_or_default();
            let fatal = d
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                });
            fatal || code.starts_with("08") || code.starts_with("57P")
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// True for a deadlock or serialization failure: the transaction did nothing and may simply
/// run again.
pub(crate) fn is_conflict(e: &Error) -> bool {
    matches!(code(e).as_deref(), Some("40P01" | "40001"))
}

/// True when a stream version was already taken (a unique violation on the streams table):
/// the stream moved on, and checking the conditions again finds by how much.
pub(crate) fn is_stream_taken(e: &Error) -> bool {
    match sqlx_error(e) {
        Some(sqlx::Error::Database(d)) => {
            d.code().as_deref() == Some("23505") && d.constraint() == Some("streams_pkey")
        }
        _ => false,
    }
}

/// A copy of an error for each of several callers that share one failure.
pub(crate) fn shared(e: &Error) -> Error {
    match e {
        Error::Closed => Error::Closed,
        Error::Conflict(c) => Error::Conflict(c.clone()),
        Error::Invalid(m) => Error::Invalid(m.clone()),
        Error::Corrupt(m) => Error::Corrupt(m.clone()),
        Error::SchemaTooNew { found, supported } => Error::SchemaTooNew {
            found: *found,
            supported: *supported,
        },
        Error::Backend { message, source } => Error::Backend {
            message: match source {
                Some(source) => format!("{message}: {source}"),
                None => message.clone(),
            },
            source: None,
        },
        other => Error::Backend {
            message: other.to_string(),
            source: None,
        },
    }
}
