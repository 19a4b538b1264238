//! The relay brokers' conformance suite (`txbus_relay::conformance`) on the real JetStream:
//! one stream per check, its subjects under a unique prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use txbus_core::Bus;
use txbus_nats::{ConsumerSpec, JetStreamPublisher, JetStreamSource, StreamSpec};
use txbus_relay::conformance::{self, Broker};
use txbus_relay::{Route, SubjectRoute};
use txbus_sqlite::SqliteStore;

struct Nats {
    js: async_nats::jetstream::Context,
    /// The streams made, deleted at the end.
    streams: Mutex<Vec<String>>,
}

impl Nats {
    fn stream(scope: &str) -> String {
        format!("CONF_{scope}")
    }

    async fn ensure(&self, scope: &str) {
        let name = Self::stream(scope);
        StreamSpec::new(&name, [format!("{scope}.>")])
            .max_age(Duration::from_secs(3600))
            .ensure(&self.js)
            .await
            .unwrap();
        let mut streams = self.streams.lock().unwrap();
        if !streams.contains(&name) {
            streams.push(name);
        }
    }
}

impl Broker for Nats {
    type Publisher = JetStreamPublisher;
    type Source = JetStreamSource;

    async fn publisher(&self, scope: &str) -> JetStreamPublisher {
        self.ensure(scope).await;
        JetStreamPublisher::new(self.js.clone())
    }

    fn route(&self, scope: &str) -> Box<dyn Route> {
        Box::new(SubjectRoute::new(scope))
    }

    async fn source(&self, scope: &str, name: &str) -> JetStreamSource {
        self.ensure(scope).await;
        JetStreamSource::new(
            self.js.clone(),
            ConsumerSpec::new(Self::stream(scope), name),
        )
        .await
        .unwrap()
    }
}

async fn new_bus(dirs: &Mutex<Vec<tempfile::TempDir>>) -> Bus {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap();
    dirs.lock().unwrap().push(dir);
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_passes_the_relay_conformance_suite() {
    let (_client, js) = connect().await;
    let broker = Nats {
        js: js.clone(),
        streams: Mutex::default(),
    };
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(&broker, || new_bus(&dirs)).await;
    let streams = broker.streams.lock().unwrap().clone();
    for name in streams {
        delete_stream(&js, &name).await;
    }
}
