//! The system transaction of design note 003: the bus records its own start and shutdown in the
//! log (instead of a log file), as system commits. A system commit creates no deliveries, no
//! caller waits for it, relays and projections skip it unless asked, and `verify` covers it
//! like any other commit.
//!
//! The start record (`txbus.started`, module `txbus`) holds the txbus version, the host, the
//! process id, the bus's owner id, its handlers (name and filter), the store's backend and
//! schema version, the event types with a registered JSON Schema, and whether the bus signs
//! and encrypts. The shutdown record (`txbus.stopped`) holds the owner id and how the drain went.

use serde_json::json;

use crate::engine::Engine;
use crate::message::Event;

/// The event type of the start record.
pub const STARTED: &str = "txbus.started";
/// The event type of the shutdown record.
pub const STOPPED: &str = "txbus.stopped";
/// The module of system events.
pub const MODULE: &str = "txbus";

/// The machine's name, from the environment or the kernel; `unknown` when neither says.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Commits the start record; returns its position (its commit id).
pub(crate) async fn record_start(
    engine: &Engine,
    signing_key: Option<&str>,
) -> Result<u64, crate::Error> {
    let store = engine.store.describe();
    let handlers: Vec<_> = engine
        .handlers
        .iter()
        .map(|h| json!({"name": &*h.name, "filter": &h.filter}))
        .collect();
    let payload = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "host": host_name(),
        "pid": std::process::id(),
        "owner": engine.owner.to_string(),
        "handlers": handlers,
        "store": {"backend": store.backend, "schema_version": store.schema_version},
        "schemas": engine.settings.schemas.event_types(),
        "signing_key": signing_key,
        "encrypted_event_types": engine.settings.encryption.as_ref().map(|e| e.event_types()),
    });
    engine
        .commit_system(Event::new(STARTED, payload).module(MODULE))
        .await
}

/// Commits the shutdown record; a failure is logged (the bus is going away either way).
pub(crate) async fn record_stop(engine: &Engine, drained: bool, cancelled: usize) {
    let payload = json!({
        "owner": engine.owner.to_string(),
        "host": host_name(),
        "pid": std::process::id(),
        "drained": drained,
        "cancelled": cancelled,
    });
    if let Err(e) = engine
        .commit_system(Event::new(STOPPED, payload).module(MODULE))
        .await
    {
        tracing::warn!(error = %e, "could not record the shutdown in the log");
    }
}
