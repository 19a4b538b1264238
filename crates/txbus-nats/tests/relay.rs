//! The relay on the real JetStream: order, message ids, filtering, and the checkpoint across a
//! SIGKILL of the relaying process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use txbus_core::{Bus, Event, Message, On};
use txbus_nats::{ConsumerSpec, JetStreamPublisher, JetStreamSource, StreamSpec};
use txbus_relay::{read_checkpoint, Inbox, Relay, SubjectRoute};
use txbus_sqlite::SqliteStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_in_log_order_with_message_ids_and_checkpoints() {
    let (_client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("RELAY_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap();

    // Commits of one and several events, two modules; only module `a` is relayed.
    let mut expected = Vec::new();
    for i in 0..300 {
        let mut events = vec![Event::new("item.added", json!({"i": i}))
            .module("a")
            .correlation_id(format!("c{i}"))];
        if i % 3 == 0 {
            events.push(Event::new("item.noise", json!({"i": i})).module("b"));
            events.push(Event::new("item.second", json!({"i": i})).module("a"));
        }
        let ids: Vec<_> = events
            .iter()
            .filter(|e| e.event_type() != "item.noise")
            .map(Event::id)
            .collect();
        bus.commit_unwatched(txbus_core::Commit::new().events(events))
            .await
            .unwrap();
        expected.extend(ids);
    }

    let relay = Relay::builder(
        bus.clone(),
        "orders-out",
        JetStreamPublisher::new(js.clone()),
    )
    .filter(On::in_module("a"))
    .route(SubjectRoute::new(prefix.clone()))
    .read_batch(16)
    .start()
    .await
    .unwrap();
    let status = relay.drained().await.unwrap();
    assert_eq!(status.lag(), 0);
    assert_eq!(
        status.checkpoint, 300,
        "every commit is covered, relayed or filtered out"
    );
    assert_eq!(read_checkpoint(&bus, "orders-out").await.unwrap(), 300);

    let got = read_all(&js, &stream, expected.len()).await;
    let ids: Vec<String> = got
        .iter()
        .map(|m| {
            let h = m.headers.as_ref().unwrap();
            let id = h
                .get(txbus_relay::wire::MESSAGE_ID)
                .unwrap()
                .as_str()
                .to_owned();
            assert_eq!(
                h.get("Nats-Msg-Id").unwrap().as_str(),
                id,
                "broker-side dedupe by message id"
            );
            id
        })
        .collect();
    let want: Vec<String> = expected.iter().map(ToString::to_string).collect();
    assert_eq!(ids, want, "relayed in log order, module b filtered out");
    let first = &got[0];
    assert_eq!(first.subject.as_str(), format!("{prefix}.a.item.added"));
    let h = first.headers.as_ref().unwrap();
    assert_eq!(
        h.get(txbus_relay::wire::CORRELATION_ID).unwrap().as_str(),
        "c0"
    );
    assert_eq!(stream_messages(&js, &stream).await, expected.len() as u64);

    // New commits after the drain are relayed too, woken by the bus.
    let late = Event::new("item.added", json!({"late": true})).module("a");
    let late_id = late.id().to_string();
    bus.publish(late).await.unwrap();
    let status = relay.drained().await.unwrap();
    assert_eq!(status.checkpoint, 301);
    let got = read_all(&js, &stream, expected.len() + 1).await;
    let last = got.last().unwrap();
    assert_eq!(
        last.headers
            .as_ref()
            .unwrap()
            .get(txbus_relay::wire::MESSAGE_ID)
            .unwrap()
            .as_str(),
        late_id
    );
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
}

/// Kills the relaying process with SIGKILL while batches are in flight, restarts it, and
/// checks with an inbox that every message arrives and each is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_batch_resumes_from_its_checkpoint_and_nothing_is_lost() {
    const N: usize = 6000;
    let (_client, js) = connect().await;
    let prefix = unique("t");
    let stream = unique("KILL_");
    StreamSpec::new(&stream, [format!("{prefix}.>")])
        .ensure(&js)
        .await
        .unwrap();
    let origin = tempfile::tempdir().unwrap();
    let dir = origin.path().to_str().unwrap().to_owned();
    let args = |commit: bool| {
        let mut a = vec![
            "relay".to_owned(),
            "--dir".into(),
            dir.clone(),
            "--stream".into(),
            stream.clone(),
            "--prefix".into(),
            prefix.clone(),
            "--name".into(),
            "out".into(),
            "--pace-ms".into(),
            "15".into(),
        ];
        if commit {
            a.extend(["--commit".into(), N.to_string()]);
        }
        a
    };
    let first: Vec<String> = args(true);
    let node = Node::start(&first.iter().map(String::as_str).collect::<Vec<_>>());
    // Kill it once part of the log is on the broker, while it is still relaying.
    let js2 = js.clone();
    let stream2 = stream.clone();
    let mut at_kill = 0;
    for _ in 0..6000 {
        at_kill = stream_messages(&js2, &stream2).await;
        if at_kill >= (N / 5) as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill();
    assert!(at_kill > 0, "the relay published before it was killed");
    // The checkpoint never covers more than the broker holds: it advanced only after
    // confirmations.
    let stored = stream_messages(&js, &stream).await;
    assert!(stored < N as u64, "killed before the relay was done");
    {
        let bus = Bus::builder()
            // Counts the commits and positions it makes: no start-up or shutdown record.
            .system_commits(false)
            .store(SqliteStore::open(origin.path().join("bus.db")).unwrap())
            .start_paused(true)
            .build()
            .await
            .unwrap();
        let checkpoint = read_checkpoint(&bus, "out").await.unwrap();
        assert!(
            checkpoint > 0,
            "some batches were confirmed and checkpointed"
        );
        assert!(
            checkpoint * 100 <= stored,
            "checkpoint at commit {checkpoint} (100 messages each) but the broker holds {stored}"
        );
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    let again: Vec<String> = args(false);
    let node = Node::start(&again.iter().map(String::as_str).collect::<Vec<_>>());
    let drained = node.expect_line("drained", Duration::from_secs(120));
    assert_eq!(
        drained,
        format!("drained {}", N / 100),
        "the checkpoint covers every commit"
    );
    drop(node);

    // Broker-side dedupe by Nats-Msg-Id keeps one copy of what was sent twice.
    assert_eq!(stream_messages(&js, &stream).await, N as u64);

    // An inbox on another bus: every message arrives, each handler run once.
    let receiver = tempfile::tempdir().unwrap();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let r = Arc::clone(&runs);
    let bus = Bus::builder()
        // Counts the commits and positions it makes: no start-up or shutdown record.
        .system_commits(false)
        .store(SqliteStore::open(receiver.path().join("bus.db")).unwrap())
        .handler("count", On::in_module("shop"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                *r.lock().unwrap().entry(m.id().to_string()).or_default() += 1;
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let source = JetStreamSource::new(js.clone(), ConsumerSpec::new(&stream, "in"))
        .await
        .unwrap();
    let inbox = Inbox::builder(bus.clone(), "in", source)
        .concurrency(64)
        .start()
        .unwrap();
    eventually(Duration::from_secs(120), "every message handled", || {
        runs.lock().unwrap().len() >= N
    })
    .await;
    let stats = inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), N, "every committed message arrived");
    assert!(runs.values().all(|&n| n == 1), "no message handled twice");
    assert_eq!(stats.committed, N as u64);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    delete_stream(&js, &stream).await;
}
