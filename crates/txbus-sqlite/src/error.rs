//! Turning SQLite errors into store errors that say what was being done.

use txbus_core::store::Error;

/// Wraps a rusqlite error with what was being done.
pub(crate) fn sql(doing: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| Error::backend(format!("sqlite: {doing}"), e)
}
