//! Conformance cases for streams and the key–value space.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{builder, within, Harness};
use crate::{
    Commit, Conflict, Direction, Error, Event, ExpectedVersion, KvExpect, KvWrite, Message, On,
};

fn ev(n: u64) -> Event {
    Event::new("order.item-added", json!({"n": n}))
}

/// Expected versions (any, no stream, exact) hold; a conflict is its own variant and writes
/// nothing; a stream reads forward and backward from a version.
pub async fn streams_append_with_expected_versions_and_read_both_ways(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    assert_eq!(bus.stream_version("order-1").await.unwrap(), 0);
    bus.commit(Commit::new().stream("order-1", ExpectedVersion::NoStream, [ev(1), ev(2)]))
        .await
        .unwrap();
    // The stream exists now: "no stream" conflicts and names where it is.
    let err = bus
        .commit(Commit::new().stream("order-1", ExpectedVersion::NoStream, [ev(99)]))
        .await
        .unwrap_err();
    match err {
        Error::Conflict(Conflict::Stream {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, "order-1");
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, 2);
        }
        other => panic!("expected a stream conflict, got {other:?}"),
    }
    let err = bus
        .commit(Commit::new().stream("order-1", ExpectedVersion::Exact(1), [ev(99)]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Conflict(Conflict::Stream { actual: 2, .. })
    ));
    bus.commit(Commit::new().stream("order-1", ExpectedVersion::Exact(2), [ev(3)]))
        .await
        .unwrap();
    bus.commit(Commit::new().stream("order-1", ExpectedVersion::Any, [ev(4), ev(5)]))
        .await
        .unwrap();
    assert_eq!(bus.stream_version("order-1").await.unwrap(), 5);
    let stats = bus.stats().await.unwrap();
    // Five stream events and the bus's start-up record (a system commit).
    assert_eq!(stats.messages, 5 + 1, "conflicting commits wrote nothing");

    let forward = bus
        .read_stream("order-1", 2, Direction::Forward, 10)
        .await
        .unwrap();
    let got: Vec<(u64, u64)> = forward
        .iter()
        .map(|e| (e.version, e.message.payload["n"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, vec![(2, 2), (3, 3), (4, 4), (5, 5)]);
    assert!(forward
        .iter()
        .all(|e| e.stream == "order-1" && e.message.headers.stream.as_deref() == Some("order-1")));
    let backward = bus
        .read_stream("order-1", u64::MAX, Direction::Backward, 2)
        .await
        .unwrap();
    assert_eq!(
        backward.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![5, 4]
    );
    let backward = bus
        .read_stream("order-1", 3, Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(
        backward.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    assert!(bus
        .read_stream("order-2", 1, Direction::Forward, 10)
        .await
        .unwrap()
        .is_empty());
    // Bad stream ids are refused before anything is written.
    let err = bus
        .commit(Commit::new().stream("", ExpectedVersion::Any, [ev(1)]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidCommit(_)), "{err:?}");
    let err = bus
        .commit(
            Commit::new()
                .stream("s", ExpectedVersion::Any, [ev(1)])
                .stream("s", ExpectedVersion::Any, [ev(2)]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidCommit(_)), "{err:?}");
    assert_eq!(bus.stats().await.unwrap().messages, 5 + 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Several streams in one commit: all are appended, or (one condition failing) none is.
pub async fn several_streams_commit_atomically_or_not_at_all(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    bus.commit(
        Commit::new()
            .stream("a", ExpectedVersion::NoStream, [ev(1)])
            .stream("b", ExpectedVersion::NoStream, [ev(2), ev(3)])
            .event(Event::new("audit.changed", json!({}))),
    )
    .await
    .unwrap();
    assert_eq!(bus.stream_version("a").await.unwrap(), 1);
    assert_eq!(bus.stream_version("b").await.unwrap(), 2);
    // "a" is fine, "b" is not: nothing of the commit is written.
    let err = bus
        .commit(
            Commit::new()
                .stream("a", ExpectedVersion::Exact(1), [ev(4)])
                .stream("b", ExpectedVersion::Exact(1), [ev(5)])
                .stream("c", ExpectedVersion::NoStream, [ev(6)]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(Conflict::Stream { stream, actual: 2, .. }) if stream == "b"),
        "{err:?}"
    );
    assert_eq!(bus.stream_version("a").await.unwrap(), 1);
    assert_eq!(bus.stream_version("c").await.unwrap(), 0);
    // Four stream events and the bus's start-up record (a system commit).
    assert_eq!(bus.stats().await.unwrap().messages, 4 + 1);
    // The log holds the stream events as ordinary messages, in order. Some stores seal the
    // log shortly after a commit returns (PostgreSQL does): wait until it is there.
    let log = within(async {
        loop {
            let log = bus.read_log(0, 10).await.unwrap();
            if log.len() >= 2 {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The bus's start-up record (a system commit), then the one commit.
    assert_eq!(log.len(), 2);
    assert!(log[0].is_system());
    assert_eq!(log[1].messages.len(), 4);
    assert_eq!(log[1].messages[1].headers.stream.as_deref(), Some("b"));
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Handlers subscribed to a stream event's type run as usual, in the commit's operation.
pub async fn stream_events_run_their_handlers_in_the_same_operation(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let bus = builder(store)
        .handler(
            "projector",
            On::event("order.item-added"),
            move |m: Message| {
                let s = s.clone();
                async move {
                    assert_eq!(m.headers().stream.as_deref(), Some("order-9"));
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let op = bus
        .commit(Commit::new().stream("order-9", ExpectedVersion::NoStream, [ev(1), ev(2)]))
        .await
        .unwrap();
    let outcome = within(op.outcome()).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Many writers race on one stream with exact expectations: each version is taken once, the
/// losers get conflicts, and the stream has no gap.
pub async fn a_conflict_inside_a_group_commit_fails_only_its_own_commit(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..20u64 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            // Everybody expects the stream to be empty; one wins.
            let r = bus
                .commit(Commit::new().stream("race", ExpectedVersion::NoStream, [ev(n)]))
                .await;
            // Everybody also writes a stream of its own, which never conflicts.
            let own = bus
                .commit(Commit::new().stream(
                    format!("own-{n}"),
                    ExpectedVersion::NoStream,
                    [ev(n)],
                ))
                .await;
            (r.is_ok(), matches!(r, Err(Error::Conflict(_))), own.is_ok())
        }));
    }
    let mut won = 0;
    let mut conflicted = 0;
    for t in tasks {
        let (ok, conflict, own) = within(t).await.unwrap();
        won += usize::from(ok);
        conflicted += usize::from(conflict);
        assert!(own);
    }
    assert_eq!((won, conflicted), (1, 19));
    assert_eq!(bus.stream_version("race").await.unwrap(), 1);
    // 20 racers' commits and the bus's start-up record (a system commit).
    assert_eq!(bus.stats().await.unwrap().messages, 21 + 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Compare-and-set on versions, absent-only creation, deletes, expiry, prefix scans, and
/// all-or-none batches.
pub async fn key_value_compare_and_set_and_expiry(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    assert!(bus.kv_get("k").await.unwrap().is_none());
    let v = bus
        .kv_write(vec![
            KvWrite::put("k", b"one".to_vec()).expect(KvExpect::Absent)
        ])
        .await
        .unwrap();
    assert_eq!(v, vec![1]);
    let err = bus
        .kv_write(vec![
            KvWrite::put("k", b"again".to_vec()).expect(KvExpect::Absent)
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(Conflict::Key { key, actual: Some(1), .. }) if key == "k"),
        "{err:?}"
    );
    let v = bus
        .kv_write(vec![
            KvWrite::put("k", b"two".to_vec()).expect(KvExpect::Version(1))
        ])
        .await
        .unwrap();
    assert_eq!(v, vec![2]);
    let e = bus.kv_get("k").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (&b"two"[..], 2));
    // A stale version writes nothing, and neither does the rest of its batch.
    let err = bus
        .kv_write(vec![
            KvWrite::put("other", b"x".to_vec()),
            KvWrite::put("k", b"three".to_vec()).expect(KvExpect::Version(1)),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Key { .. })),
        "{err:?}"
    );
    assert!(bus.kv_get("other").await.unwrap().is_none());
    assert_eq!(bus.kv_get("k").await.unwrap().unwrap().version, 2);
    // Deletes.
    assert_eq!(
        bus.kv_write(vec![KvWrite::delete("k").expect(KvExpect::Version(2))])
            .await
            .unwrap(),
        vec![0]
    );
    assert!(bus.kv_get("k").await.unwrap().is_none());
    // Expiry: an expired entry reads as absent and can be created again.
    bus.kv_write(vec![
        KvWrite::put("ttl/a", b"a".to_vec()).ttl(Duration::from_millis(50))
    ])
    .await
    .unwrap();
    assert!(bus.kv_get("ttl/a").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(bus.kv_get("ttl/a").await.unwrap().is_none());
    bus.kv_write(vec![
        KvWrite::put("ttl/a", b"b".to_vec()).expect(KvExpect::Absent)
    ])
    .await
    .unwrap();
    bus.kv_write(vec![
        KvWrite::put("ttl/gone", b"g".to_vec()).ttl(Duration::from_millis(10))
    ])
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    let report = bus.prune().await.unwrap();
    assert_eq!(report.expired_keys, 1);
    // Scans by prefix, in key order, paged.
    for k in ["scan/c", "scan/a", "scan/b", "scanx"] {
        bus.kv_write(vec![KvWrite::put(k, k.as_bytes().to_vec())])
            .await
            .unwrap();
    }
    let page = bus.kv_scan("scan/", None, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        vec!["scan/a", "scan/b"]
    );
    let page = bus.kv_scan("scan/", Some("scan/b"), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        vec!["scan/c"]
    );
    // Prefixes are literal: no pattern characters.
    bus.kv_write(vec![KvWrite::put("p%_q", b"1".to_vec())])
        .await
        .unwrap();
    bus.kv_write(vec![KvWrite::put("pxxq", b"1".to_vec())])
        .await
        .unwrap();
    let page = bus.kv_scan("p%_", None, 10).await.unwrap();
    assert_eq!(page.len(), 1);
    // Bad input is refused.
    let err = bus
        .kv_write(vec![KvWrite::put("", b"x".to_vec())])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidCommit(_)), "{err:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Key–value writes in a commit apply with it; a failing condition writes neither.
pub async fn key_value_writes_commit_with_events_atomically(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    bus.commit(
        Commit::new()
            .event(Event::new("inbox.received", json!({"n": 1})))
            .kv(KvWrite::put("inbox/m1", b"1".to_vec()).expect(KvExpect::Absent)),
    )
    .await
    .unwrap();
    assert_eq!(bus.kv_get("inbox/m1").await.unwrap().unwrap().version, 1);
    let err = bus
        .commit(
            Commit::new()
                .event(Event::new("inbox.received", json!({"n": 1})))
                .kv(KvWrite::put("inbox/m1", b"1".to_vec()).expect(KvExpect::Absent)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Key { .. })),
        "{err:?}"
    );
    let err = bus
        .commit(
            Commit::new()
                .stream("s", ExpectedVersion::Exact(7), [ev(1)])
                .kv(KvWrite::put("inbox/m2", b"1".to_vec())),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Stream { .. })),
        "{err:?}"
    );
    assert!(bus.kv_get("inbox/m2").await.unwrap().is_none());
    // The one commit and the bus's start-up record (a system commit).
    assert_eq!(bus.stats().await.unwrap().messages, 1 + 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Streams and keys are durable: a reopened store has them.
pub async fn streams_and_keys_survive_a_restart(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    bus.commit(Commit::new().stream("order-1", ExpectedVersion::NoStream, [ev(1), ev(2)]))
        .await
        .unwrap();
    bus.kv_write(vec![KvWrite::put("snap/order-1", b"{}".to_vec())])
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(bus);
    let store = h.reopen(&key).await;
    let bus = builder(store).build().await.unwrap();
    assert_eq!(bus.stream_version("order-1").await.unwrap(), 2);
    assert_eq!(
        bus.read_stream("order-1", 1, Direction::Forward, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        bus.kv_get("snap/order-1").await.unwrap().unwrap().value,
        b"{}"
    );
    bus.commit(Commit::new().stream("order-1", ExpectedVersion::Exact(2), [ev(3)]))
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
