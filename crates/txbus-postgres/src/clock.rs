//! Time as the store records it, taken in Rust (like the SQLite store) so that every row of
//! one batch carries the same instant.

pub(crate) use txbus_core::time::{millis as ms, now_ms};
