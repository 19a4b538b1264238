//! The relay brokers' conformance suite (`txbus_relay::conformance`) on the real RabbitMQ: an
//! exchange and a queue of its own per check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use txbus_core::Bus;
use txbus_rabbitmq::{RabbitPublisher, RabbitSource};
use txbus_relay::conformance::{self, Broker};
use txbus_relay::{Route, SubjectRoute};
use txbus_sqlite::SqliteStore;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Rabbit {
    channel: Channel,
    /// The scopes whose exchange and queue exist, removed at the end.
    scopes: Mutex<Vec<String>>,
}

impl Rabbit {
    /// The scope's exchange, and its queue bound to all of it: messages published before
    /// the source starts wait there.
    async fn ensure(&self, scope: &str) {
        if self.scopes.lock().unwrap().iter().any(|s| s == scope) {
            return;
        }
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.channel
            .exchange_declare(
                scope.into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_declare(
                scope.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                scope.into(),
                scope.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.scopes.lock().unwrap().push(scope.to_owned());
    }
}

impl Broker for Rabbit {
    type Publisher = RabbitPublisher;
    type Source = RabbitSource;

    async fn publisher(&self, scope: &str) -> RabbitPublisher {
        self.ensure(scope).await;
        RabbitPublisher::new(AMQP, scope)
    }

    fn route(&self, scope: &str) -> Box<dyn Route> {
        Box::new(SubjectRoute::new(scope))
    }

    async fn source(&self, scope: &str, _name: &str) -> RabbitSource {
        self.ensure(scope).await;
        RabbitSource::new(AMQP, scope).bind(scope, "#")
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
async fn rabbitmq_passes_the_relay_conformance_suite() {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let broker = Rabbit {
        channel: conn.create_channel().await.unwrap(),
        scopes: Mutex::default(),
    };
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(&broker, || new_bus(&dirs)).await;
    let scopes = broker.scopes.lock().unwrap().clone();
    for scope in scopes {
        let _ = broker
            .channel
            .queue_delete(scope.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = broker
            .channel
            .exchange_delete(scope.as_str().into(), Default::default())
            .await;
    }
}
