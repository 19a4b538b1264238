//! The store conformance suite on PostgreSQL: every bus behaviour, each case in a fresh schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use txbus_core::conformance::Harness;
use txbus_core::store::Store;

use common::TestSchema;

/// Fresh schemas that live (and are dropped) with the harness.
#[derive(Default)]
struct PostgresHarness {
    schemas: Mutex<Vec<TestSchema>>,
}

#[async_trait]
impl Harness for PostgresHarness {
    async fn create(&self) -> (String, Arc<dyn Store>) {
        let schema = TestSchema::new();
        let name = schema.name.clone();
        self.schemas.lock().unwrap().push(schema);
        (name.clone(), Arc::new(common::open(&name).await))
    }

    async fn reopen(&self, key: &str) -> Arc<dyn Store> {
        Arc::new(common::open(key).await)
    }
}

txbus_core::conformance_tests!(PostgresHarness::default());
