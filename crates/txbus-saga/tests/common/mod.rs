//! What the saga tests share: a bus with sagas on a fresh SQLite file, a journal of what the
//! steps did, and hang guards.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use txbus_core::{Backoff, Bus, BusBuilder};
use txbus_saga::{SagaId, SagaRuntime, SagaState, Sagas};
use txbus_sqlite::SqliteStore;

/// A generous bound on anything a test waits for: a hang guard, not a timing assertion.
pub const HANG: Duration = Duration::from_secs(60);

/// A short backoff, so that retries do not slow the tests down.
pub fn quick() -> Backoff {
    Backoff::fixed(Duration::from_millis(5))
}

/// A bus builder on `dir/bus.db`.
pub fn bus_builder(dir: &Path) -> BusBuilder {
    Bus::builder()
        .store(SqliteStore::open(dir.join("bus.db")).unwrap())
        .poll_interval(Duration::from_millis(50))
}

/// A running bus with `sagas` installed, in a fresh temp dir.
pub struct Env {
    pub dir: TempDir,
    pub bus: Bus,
    pub runtime: SagaRuntime,
}

impl Env {
    pub async fn new(sagas: &Sagas) -> Self {
        Self::with(sagas, |b| b).await
    }

    pub async fn with(sagas: &Sagas, tweak: impl FnOnce(BusBuilder) -> BusBuilder) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus = sagas
            .install(tweak(bus_builder(dir.path())))
            .build()
            .await
            .unwrap();
        let runtime = sagas.attach(bus.clone());
        Self { dir, bus, runtime }
    }

    pub async fn wait(&self, id: &SagaId) -> SagaState {
        tokio::time::timeout(HANG, self.runtime.wait(id))
            .await
            .expect("the saga settled within the hang guard")
            .unwrap()
    }
}

/// What steps and compensations did, in order.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn count(&self, entry: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == entry)
            .count()
    }
}
