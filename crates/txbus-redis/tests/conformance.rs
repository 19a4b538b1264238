//! The relay brokers' conformance suite (`txbus_relay::conformance`) on the real Redis: a
//! stream of its own per check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::Duration;

use txbus_core::{Bus, StoredMessage};
use txbus_redis::{RedisPublisher, RedisSource};
use txbus_relay::conformance::{self, Broker};
use txbus_relay::Route;
use txbus_sqlite::SqliteStore;

const REDIS: &str = "redis://127.0.0.1:6379";

struct Redis {
    /// The streams used, deleted at the end.
    streams: Mutex<Vec<String>>,
}

impl Redis {
    fn stream(&self, scope: &str) -> String {
        let name = format!("conf-{scope}");
        let mut streams = self.streams.lock().unwrap();
        if !streams.contains(&name) {
            streams.push(name.clone());
        }
        name
    }
}

impl Broker for Redis {
    type Publisher = RedisPublisher;
    type Source = RedisSource;

    async fn publisher(&self, _scope: &str) -> RedisPublisher {
        RedisPublisher::new(REDIS).unwrap()
    }

    fn route(&self, scope: &str) -> Box<dyn Route> {
        let stream = self.stream(scope);
        Box::new(move |_: &StoredMessage| stream.clone())
    }

    /// A group of its own, from the start of the stream; a message handed back is taken
    /// over again after a short idle time.
    async fn source(&self, scope: &str, name: &str) -> RedisSource {
        RedisSource::new(REDIS, self.stream(scope), name, name)
            .unwrap()
            .claim_idle(Duration::from_millis(100))
            .block(Duration::from_millis(200))
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
async fn redis_streams_pass_the_relay_conformance_suite() {
    let broker = Redis {
        streams: Mutex::default(),
    };
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(&broker, || new_bus(&dirs)).await;
    let streams = broker.streams.lock().unwrap().clone();
    let mut conn = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: redis::RedisResult<redis::Value> =
        redis::cmd("DEL").arg(&streams).query_async(&mut conn).await;
}
