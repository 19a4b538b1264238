//! The sink against the real ClickHouse server (http://127.0.0.1:8123) and the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use txbus_clickhouse::{ClickHouseSink, Client};
use txbus_core::{
    Backoff, Bus, Event, Handler, HandlerError, Message, On, Operation, PolicyOverride,
};
use txbus_sqlite::SqliteStore;

const CLICKHOUSE: &str = "http://127.0.0.1:8123";
/// A hang guard, never a timed assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn unique_table(test: &str) -> String {
    format!("t_{test}_{}", uuid::Uuid::now_v7().simple())
}

async fn count(client: &Client, sql: &str) -> u64 {
    client.query(sql).await.unwrap().trim().parse().unwrap()
}

async fn bus_with(dir: &tempfile::TempDir, policy: PolicyOverride, handler: impl Handler) -> Bus {
    Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .handler_with("analytics", On::event("promo.*"), policy, handler)
        .build()
        .await
        .unwrap()
}

async fn all_ok(ops: Vec<Operation>) {
    for op in ops {
        let outcome = tokio::time::timeout(HANG_GUARD, op.outcome())
            .await
            .expect("outcome within the hang guard")
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_inserted_once_and_concurrent_deliveries_share_inserts() {
    let table = unique_table("shared");
    let client = Client::new(CLICKHOUSE).unwrap();
    let sink = ClickHouseSink::builder(client.clone(), &table)
        .max_wait(Duration::from_millis(50))
        .build()
        .unwrap();
    sink.create_default_table().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_with(
        &dir,
        PolicyOverride::default().concurrency(1000),
        sink.clone(),
    )
    .await;

    let n = 400;
    let mut ops = Vec::new();
    let mut commits = tokio::task::JoinSet::new();
    for i in 0..n {
        let bus = bus.clone();
        commits.spawn(async move {
            bus.transact([Event::new(
                "promo.applied",
                json!({"code": format!("C{}", i % 4), "i": i}),
            )
            .module("promo")])
                .await
                .unwrap()
        });
    }
    while let Some(op) = commits.join_next().await {
        ops.push(op.unwrap());
    }
    all_ok(ops).await;

    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table} FINAL")).await,
        n
    );
    assert_eq!(
        count(
            &client,
            &format!("SELECT uniqExact(message_id) FROM {table}")
        )
        .await,
        n
    );
    let row = client
        .query(&format!(
            "SELECT event_type, module, JSONExtractString(payload, 'code') FROM {table} LIMIT 1"
        ))
        .await;
    // JSONExtract* arrived after 18.16: fall back to visitParam on older servers.
    let row = match row {
        Ok(r) => r,
        Err(_) => client
            .query(&format!(
                "SELECT event_type, module, visitParamExtractString(payload, 'code') FROM {table} LIMIT 1"
            ))
            .await
            .unwrap(),
    };
    let cols: Vec<&str> = row.trim().split('\t').collect();
    assert_eq!(cols[0], "promo.applied");
    assert_eq!(cols[1], "promo");
    assert!(cols[2].starts_with('C'), "{row}");
    let stats = sink.stats();
    assert_eq!(stats.rows, n);
    assert!(
        stats.inserts < n,
        "concurrent deliveries share inserts: {stats:?}"
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    client
        .execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// Succeeds in the sink, then fails the first attempt after the row is in: the bus redelivers,
/// as after a crash between the insert and the acknowledgement.
struct FailAfterInsert(ClickHouseSink);

impl Handler for FailAfterInsert {
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        let first = message.attempt() == 1;
        self.0.handle(message).await?;
        if first {
            return Err(HandlerError::transient("lost the acknowledgement"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_does_not_double_count() {
    let table = unique_table("redelivery");
    let client = Client::new(CLICKHOUSE).unwrap();
    let sink = ClickHouseSink::builder(client.clone(), &table)
        .build()
        .unwrap();
    sink.create_default_table().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = PolicyOverride::default()
        .concurrency(100)
        .backoff(Backoff::fixed(Duration::from_millis(20)));
    let bus = bus_with(&dir, policy, FailAfterInsert(sink.clone())).await;

    let n = 20;
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(
            bus.transact([Event::new("promo.applied", json!({"code": "DUP", "i": i}))])
                .await
                .unwrap(),
        );
    }
    all_ok(ops).await;

    // Every row went in twice (background merges may already have dropped some copies);
    // queries that read with FINAL count each message once.
    assert_eq!(sink.stats().rows, 2 * n);
    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table} FINAL")).await,
        n
    );
    // Merging drops the copies for good.
    client
        .execute(&format!("OPTIMIZE TABLE {table} FINAL"))
        .await
        .unwrap();
    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table}")).await,
        n
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    client
        .execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliveries_of_one_message_count_once() {
    let table = unique_table("same_batch");
    let client = Client::new(CLICKHOUSE).unwrap();
    let sink = ClickHouseSink::builder(client.clone(), &table)
        .max_wait(Duration::from_millis(200))
        .build()
        .unwrap();
    sink.create_default_table().await.unwrap();
    // Two deliveries of one message (two handler names on one bus), most likely in one batch.
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .handler("analytics-a", On::event("promo.applied"), sink.clone())
        .handler("analytics-b", On::event("promo.applied"), sink.clone())
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new("promo.applied", json!({"code": "TWICE"}))])
        .await
        .unwrap();
    all_ok(vec![op]).await;
    assert_eq!(sink.stats().rows, 2);
    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table} FINAL")).await,
        1
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    client
        .execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// Forwards every connection on `listener` to ClickHouse: the server "comes back" at the
/// address the sink was given.
async fn forward_to_clickhouse(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:8123").await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_then_up_retries_and_loses_nothing() {
    let table = unique_table("down_up");
    let client = Client::new(CLICKHOUSE).unwrap();
    client
        .execute(&txbus_clickhouse::default_table_ddl(&table))
        .await
        .unwrap();

    // A port nobody listens on: the sink's server is down.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let down = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let sink = ClickHouseSink::builder(down, &table).build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = PolicyOverride::default()
        .concurrency(100)
        .max_retries(10_000)
        .backoff(Backoff::fixed(Duration::from_millis(100)));
    let bus = bus_with(&dir, policy, sink.clone()).await;

    let n = 50;
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(
            bus.transact([Event::new("promo.applied", json!({"code": "DOWN", "i": i}))])
                .await
                .unwrap(),
        );
    }
    // Wait until inserts have failed and been retried a few times.
    tokio::time::timeout(HANG_GUARD, async {
        while sink.stats().failed_inserts < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("failed inserts within the hang guard");
    assert_eq!(sink.stats().rows, 0);
    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table}")).await,
        0
    );

    // The server comes back at the sink's address.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let proxy = tokio::spawn(forward_to_clickhouse(listener));
    all_ok(ops).await;

    assert_eq!(
        count(&client, &format!("SELECT count() FROM {table} FINAL")).await,
        n
    );
    let stats = sink.stats();
    assert!(stats.failed_inserts >= 3 && stats.rows >= n, "{stats:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    proxy.abort();
    client
        .execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_server_refuses_fails_alone() {
    let table = unique_table("refused");
    let client = Client::new(CLICKHOUSE).unwrap();
    client
        .execute(&format!(
            "CREATE TABLE {table} (message_id String, amount UInt64) ENGINE = ReplacingMergeTree() ORDER BY message_id"
        ))
        .await
        .unwrap();
    let sink = ClickHouseSink::builder(client.clone(), &table)
        .max_wait(Duration::from_millis(200))
        .row(|m: &Message| {
            let mut row = serde_json::Map::new();
            row.insert("message_id".into(), json!(m.id().to_string()));
            row.insert("amount".into(), m.payload()["amount"].clone());
            Ok(row)
        })
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = PolicyOverride::default()
        .concurrency(100)
        .max_retries(1)
        .backoff(Backoff::fixed(Duration::from_millis(10)));
    let bus = bus_with(&dir, policy, sink.clone()).await;

    let mut good = Vec::new();
    for amount in [1, 2, 3] {
        good.push(
            bus.transact([Event::new("promo.applied", json!({"amount": amount}))])
                .await
                .unwrap(),
        );
    }
    let bad = bus
        .transact([Event::new(
            "promo.applied",
            json!({"amount": "not a number"}),
        )])
        .await
        .unwrap();
    all_ok(good).await;
    let outcome = tokio::time::timeout(HANG_GUARD, bad.outcome())
        .await
        .unwrap()
        .unwrap();
    assert!(!outcome.is_ok(), "the unparsable row fails its delivery");
    assert_eq!(
        count(&client, &format!("SELECT sum(amount) FROM {table} FINAL")).await,
        6
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    client
        .execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn sink_settings_are_checked() {
    let client = Client::new(CLICKHOUSE).unwrap();
    assert!(ClickHouseSink::builder(client.clone(), "bad name")
        .build()
        .is_err());
    assert!(ClickHouseSink::builder(client, "fine")
        .max_rows(0)
        .build()
        .is_err());
}
