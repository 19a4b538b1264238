//! The relay core with a broker kept in memory by the test: the checkpoint advances only
//! over confirmed batches, a failed batch is sent again from the checkpoint in order, and a
//! checkpoint moved by another relay of the same name is reloaded. (The same relay against
//! the real NATS JetStream is tested in `txbus-nats`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::sync::watch;
use txbus_core::{Backoff, Bus, Event, KvExpect, KvWrite, MessageId};
use txbus_relay::{checkpoint_key, read_checkpoint, OutboundMessage, Publisher, Relay};
use txbus_sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fail(String);

/// A batch as the broker received it, and whether it refused it.
type Batch = (Vec<MessageId>, bool);

/// A broker in memory: receives batches in the order sent, stores each once confirmed.
/// Confirmations wait until `open` is true; the confirmation of batch number `fail_batch`
/// fails once (that batch is not stored).
#[derive(Clone)]
struct MemoryBroker {
    /// Every batch received, in order, with whether it was refused.
    received: Arc<Mutex<Vec<Batch>>>,
    sent: Arc<AtomicUsize>,
    open: watch::Receiver<bool>,
    fail_batch: Option<usize>,
}

impl MemoryBroker {
    fn new(open: watch::Receiver<bool>, fail_batch: Option<usize>) -> Self {
        Self {
            received: Arc::default(),
            sent: Arc::default(),
            open,
            fail_batch,
        }
    }
    /// The messages stored, in the order the broker received them.
    fn stored(&self) -> Vec<MessageId> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, refused)| !refused)
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect()
    }
}

impl Publisher for MemoryBroker {
    type Error = Fail;
    type Confirm = BoxFuture<'static, Result<(), Fail>>;

    async fn send_batch(&self, batch: &[OutboundMessage]) -> Result<Self::Confirm, Fail> {
        self.sent.fetch_add(batch.len(), Ordering::SeqCst);
        let mut received = self.received.lock().unwrap();
        let number = received.len();
        let refused = self.fail_batch == Some(number);
        received.push((batch.iter().map(|m| m.id).collect(), refused));
        let mut open = self.open.clone();
        Ok(Box::pin(async move {
            open.wait_for(|o| *o)
                .await
                .map_err(|e| Fail(e.to_string()))?;
            if refused {
                return Err(Fail(format!("batch {number} refused")));
            }
            Ok(())
        }))
    }
}

async fn bus(dir: &tempfile::TempDir) -> Bus {
    Bus::builder()
        .store(SqliteStore::open(dir.path().join("bus.db")).unwrap())
        .build()
        .await
        .unwrap()
}

async fn commit_events(bus: &Bus, n: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let e = Event::new("thing.happened", json!({"i": i})).module("m");
        ids.push(e.id());
        bus.publish(e).await.unwrap();
    }
    ids
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_advances_only_after_the_broker_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    let ids = commit_events(&bus, 10).await;
    let (open_tx, open_rx) = watch::channel(false);
    let broker = MemoryBroker::new(open_rx, None);
    let relay = Relay::builder(bus.clone(), "gated", broker.clone())
        .read_batch(3)
        .start()
        .await
        .unwrap();
    // Everything is handed to the broker (pipelined), nothing is confirmed yet.
    wait_until("all sent", || broker.sent.load(Ordering::SeqCst) == 10).await;
    wait_until("relay caught up", || relay.status().head == 10).await;
    let status = relay.status();
    assert_eq!(status.in_flight, 10, "many messages in flight at once");
    assert_eq!(status.checkpoint, 0);
    assert_eq!(status.confirmed, 0);
    assert_eq!(
        read_checkpoint(&bus, "gated").await.unwrap(),
        0,
        "nothing stored before confirmation"
    );
    assert_eq!(status.lag(), 10);

    open_tx.send_replace(true);
    let status = relay.drained().await.unwrap();
    assert_eq!(status.checkpoint, 10);
    assert_eq!(status.lag(), 0);
    assert_eq!(read_checkpoint(&bus, "gated").await.unwrap(), 10);
    assert_eq!(broker.stored(), ids, "in log order");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_sent_again_from_the_checkpoint_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    let ids = commit_events(&bus, 20).await;
    let (_open_tx, open_rx) = watch::channel(true);
    let broker = MemoryBroker::new(open_rx, Some(1));
    let relay = Relay::builder(bus.clone(), "flaky", broker.clone())
        .read_batch(4)
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    let status = relay.drained().await.unwrap();
    assert_eq!(status.checkpoint, 20);
    assert_eq!(status.failures, 1);
    let stored = broker.stored();
    // Batch 0 stored, batch 1 refused, then everything from the checkpoint (4) on, in order:
    // the broker saw every message, and the ones after the failure possibly twice.
    let mut first_seen = Vec::new();
    for id in &stored {
        if !first_seen.contains(id) {
            first_seen.push(*id);
        }
    }
    assert_eq!(first_seen, ids, "every message, in log order");
    assert_eq!(&stored[..4], &ids[..4]);
    assert_eq!(
        &stored[4..8],
        &ids[4..8],
        "resent from the checkpoint, not from the failure on"
    );
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_moved_by_another_relay_is_reloaded_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&dir).await;
    commit_events(&bus, 5).await;
    let (_open_tx, open_rx) = watch::channel(true);
    let broker = MemoryBroker::new(open_rx, None);
    let relay = Relay::builder(bus.clone(), "twin", broker.clone())
        .backoff(Backoff::fixed(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    relay.drained().await.unwrap();
    // Another relay with the same name writes the checkpoint (further on).
    let key = checkpoint_key("twin");
    let entry = bus.kv_get(&key).await.unwrap().unwrap();
    bus.kv_write(vec![
        KvWrite::put(key.clone(), b"7".to_vec()).expect(KvExpect::Version(entry.version))
    ])
    .await
    .unwrap();
    let later = commit_events(&bus, 4).await;
    let status = relay.drained().await.unwrap();
    assert!(status.failures >= 1, "the stale write was refused");
    assert_eq!(status.checkpoint, 9);
    assert_eq!(read_checkpoint(&bus, "twin").await.unwrap(), 9);
    let stored = broker.stored();
    for id in &later[2..] {
        assert!(
            stored.contains(id),
            "resumed from the other relay's checkpoint"
        );
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}
