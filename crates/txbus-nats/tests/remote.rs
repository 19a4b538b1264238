//! `transact` across services over JetStream, with two processes: the origin (this test, its
//! own SQLite store) and the remote service (a child process, its own SQLite store).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;
use txbus_core::{Backoff, Bus, Event, FailureKind, MessageId, On, PolicyOverride};
use txbus_nats::{RemoteHandler, StreamSpec};
use txbus_relay::SubjectRoute;
use txbus_sqlite::SqliteStore;

struct Setup {
    js: async_nats::jetstream::Context,
    stream: String,
    remote_dir: tempfile::TempDir,
    origin_dir: tempfile::TempDir,
    args: Vec<String>,
    origin: Bus,
}

impl Setup {
    async fn new(reply_timeout: Duration) -> Self {
        let (client, js) = connect().await;
        let prefix = unique("t");
        let stream = unique("REMOTE_");
        let subjects = format!("{prefix}.remote");
        StreamSpec::new(&stream, [format!("{subjects}.>")])
            .ensure(&js)
            .await
            .unwrap();
        let remote_dir = tempfile::tempdir().unwrap();
        let origin_dir = tempfile::tempdir().unwrap();
        let args = vec![
            "remote".to_owned(),
            "--dir".into(),
            remote_dir.path().to_str().unwrap().to_owned(),
            "--stream".into(),
            stream.clone(),
            "--subjects".into(),
            subjects.clone(),
            "--durable".into(),
            "billing-in".into(),
        ];
        let handler = RemoteHandler::new(client, "billing")
            .route(SubjectRoute::new(subjects))
            .reply_prefix(format!("{prefix}.reply"))
            .reply_timeout(reply_timeout);
        let origin = Bus::builder()
            .store(SqliteStore::open(origin_dir.path().join("bus.db")).unwrap())
            .handler_with(
                "billing-remote",
                On::in_module("billing"),
                PolicyOverride::default()
                    .timeout(reply_timeout + Duration::from_secs(5))
                    .max_retries(50)
                    .backoff(Backoff::fixed(Duration::from_millis(200))),
                handler,
            )
            .build()
            .await
            .unwrap();
        Self {
            js,
            stream,
            remote_dir,
            origin_dir,
            args,
            origin,
        }
    }

    fn start_remote(&self) -> Node {
        Node::start(&self.args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    async fn finish(self) {
        self.origin.shutdown(Duration::from_secs(5)).await.unwrap();
        delete_stream(&self.js, &self.stream).await;
        drop(self.origin_dir);
    }
}

/// Messages with `id` in the remote service's log, read after the remote process is gone.
async fn remote_copies(dir: &Path, id: MessageId) -> usize {
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.join("bus.db")).unwrap())
        .start_paused(true)
        .build()
        .await
        .unwrap();
    let mut copies = 0;
    let mut after = 0;
    loop {
        let commits = bus.read_log(after, 500).await.unwrap();
        let Some(last) = commits.last() else { break };
        after = last.position;
        copies += commits
            .iter()
            .flat_map(|c| &c.messages)
            .filter(|m| m.id == id)
            .count();
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    copies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_transact_completes_when_the_remote_handler_succeeded() {
    let s = Setup::new(Duration::from_secs(10)).await;
    let node = s.start_remote();
    let event = Event::new("invoice.requested", json!({"amount": 42})).module("billing");
    let id = event.id();
    let op = s.origin.transact([event]).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), op.outcome())
        .await
        .expect("the outcome arrives")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(
        seen(s.remote_dir.path(), "done", &id.to_string()),
        1,
        "the remote handler ran"
    );
    drop(node);
    assert_eq!(remote_copies(s.remote_dir.path(), id).await, 1);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reject_fails_the_origin_operation_with_the_remote_reason() {
    let s = Setup::new(Duration::from_secs(10)).await;
    let node = s.start_remote();
    let event = Event::new(
        "invoice.requested",
        json!({"amount": 9, "reject": "card declined"}),
    )
    .module("billing");
    let id = event.id();
    let op = s.origin.transact([event]).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), op.outcome())
        .await
        .expect("the outcome arrives")
        .unwrap();
    let failure = outcome.error.expect("the operation failed");
    assert_eq!(failure.kind, FailureKind::Rejected);
    assert_eq!(failure.handler, "billing-remote");
    assert_eq!(failure.attempts, 1, "a rejection is not retried");
    assert!(
        failure.reason.contains("card declined"),
        "{}",
        failure.reason
    );
    assert!(
        failure.reason.contains("charger"),
        "names the remote handler: {}",
        failure.reason
    );
    assert_eq!(seen(s.remote_dir.path(), "reject", &id.to_string()), 1);
    drop(node);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_killed_mid_handler_and_restarted_still_completes_the_origin_once() {
    // Short reply wait: after the kill, the origin asks again soon.
    let s = Setup::new(Duration::from_secs(3)).await;
    let node = s.start_remote();
    let event =
        Event::new("invoice.requested", json!({"amount": 7, "slow_ms": 1500})).module("billing");
    let id = event.id();
    let key = id.to_string();
    let op = s.origin.transact([event]).await.unwrap();
    // The remote handler has started: kill the remote process in the middle of it.
    eventually(
        Duration::from_secs(60),
        "the remote handler started",
        || seen(s.remote_dir.path(), "start", &key) >= 1,
    )
    .await;
    node.kill();
    assert_eq!(
        seen(s.remote_dir.path(), "done", &key),
        0,
        "killed mid-handler"
    );

    let node = s.start_remote();
    let outcome = tokio::time::timeout(Duration::from_secs(120), op.outcome())
        .await
        .expect("the outcome arrives")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        seen(s.remote_dir.path(), "done", &key) >= 1,
        "the remote handler ran to success"
    );
    drop(node);
    assert_eq!(
        remote_copies(s.remote_dir.path(), id).await,
        1,
        "the message was committed once on the remote, however often it was sent"
    );
    s.finish().await;
}
