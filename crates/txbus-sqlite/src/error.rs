//! Turning SQLite errors into store errors that say what was being done.

use rusqlite::ErrorCode;
use txbus_core::store::Error;

/// Wraps a rusqlite error with what was being done. A file that SQLite finds damaged (or that
/// is not a database at all) is reported as [`Error::Corrupt`], saying so.
pub(crate) fn sql(doing: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Error::Corrupt(format!(
            "sqlite: {doing}: the database file is damaged ({e}); restore it from a backup, \
             or salvage what is readable with the sqlite3 shell's .recover"
        )),
        Some(ErrorCode::DiskFull) => Error::backend(
            format!(
                "sqlite: {doing}: the disk is full; nothing of this call was written, \
                 free some space and call again"
            ),
            e,
        ),
        _ => Error::backend(format!("sqlite: {doing}"), e),
    }
}
