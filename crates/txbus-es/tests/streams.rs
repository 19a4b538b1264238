//! The streams API: appends with expected versions, conflicts callers can match and retry,
//! several streams in one atomic commit, reads forward, backward and of the whole log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::json;
use txbus_core::{Conflict, Event, ExpectedVersion, KvExpect, KvWrite};
use txbus_es::{Error, EventStore};

use common::{sqlite_bus, ItemAdded, OrderEvent};

fn ev(n: u64) -> Event {
    Event::new("test.numbered", json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_returns_the_new_version_for_each_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);

    let a = store
        .append("s-1", ExpectedVersion::NoStream, [ev(1), ev(2)])
        .await
        .unwrap();
    assert_eq!(a.version, 2);
    let a = store
        .append("s-1", ExpectedVersion::Exact(2), [ev(3)])
        .await
        .unwrap();
    assert_eq!(a.version, 3);
    let a = store
        .append("s-1", ExpectedVersion::Any, [ev(4), ev(5), ev(6)])
        .await
        .unwrap();
    assert_eq!(a.version, 6);
    // Any on a stream that does not exist yet.
    let a = store
        .append("s-2", ExpectedVersion::Any, [ev(1)])
        .await
        .unwrap();
    assert_eq!(a.version, 1);
    assert_eq!(store.stream_version("s-1").await.unwrap(), 6);
    assert_eq!(store.stream_version("s-2").await.unwrap(), 1);
    assert_eq!(store.stream_version("s-3").await.unwrap(), 0);

    // The returned operation finishes (no handler is subscribed).
    assert!(a.operation.outcome().await.unwrap().is_ok());

    // Typed appends decode back into the aggregate's events.
    let typed = [OrderEvent::from(ItemAdded {
        sku: "A1".into(),
        qty: 2,
    })];
    let a = store
        .append_typed("order-typed", ExpectedVersion::NoStream, &typed)
        .await
        .unwrap();
    assert_eq!(a.version, 1);
    let read = store.read_forward("order-typed", 1, 10).await.unwrap();
    assert_eq!(read[0].event_type, "order.item-added");
    assert_eq!(read[0].module.as_deref(), Some("order"));
    assert_eq!(read[0].typed::<ItemAdded>().unwrap().unwrap().qty, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_matchable_and_a_retry_after_reload_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    store
        .append("acc-1", ExpectedVersion::NoStream, [ev(1), ev(2)])
        .await
        .unwrap();

    // NoStream on an existing stream.
    let err = store
        .append("acc-1", ExpectedVersion::NoStream, [ev(3)])
        .await
        .unwrap_err();
    match &err {
        Error::Conflict(Conflict::Stream {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, "acc-1");
            assert_eq!(*expected, ExpectedVersion::NoStream);
            assert_eq!(*actual, 2);
        }
        other => panic!("expected a stream conflict, got {other:?}"),
    }
    assert!(err.conflict().is_some());

    // A stale exact version: reload and retry, as a caller would.
    let mut expected = ExpectedVersion::Exact(1);
    let mut attempts = 0;
    let appended = loop {
        attempts += 1;
        match store.append("acc-1", expected, [ev(3)]).await {
            Ok(a) => break a,
            Err(Error::Conflict(Conflict::Stream { actual, .. })) => {
                expected = ExpectedVersion::Exact(actual);
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(attempts, 2);
    assert_eq!(appended.version, 3);
    // Exactly one event 3 was written: the failed attempt wrote nothing.
    let all = store.read_forward("acc-1", 1, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_streams_commit_atomically_and_one_conflict_writes_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    store
        .append("account-a", ExpectedVersion::NoStream, [ev(1)])
        .await
        .unwrap();
    store
        .append("account-b", ExpectedVersion::NoStream, [ev(1), ev(2)])
        .await
        .unwrap();

    let committed = store
        .transaction()
        .append(
            "account-a",
            ExpectedVersion::Exact(1),
            [Event::new("account.debited", json!({"cents": 5}))],
        )
        .append(
            "account-b",
            ExpectedVersion::Exact(2),
            [Event::new("account.credited", json!({"cents": 5}))],
        )
        .append("account-c", ExpectedVersion::Any, [ev(1), ev(2)])
        .event(Event::new("audit.transfer", json!({"cents": 5})))
        .kv(KvWrite::put("transfers/1", b"done".to_vec()))
        .commit()
        .await
        .unwrap();
    assert_eq!(committed.version("account-a"), Some(2));
    assert_eq!(committed.version("account-b"), Some(3));
    assert_eq!(committed.version("account-c"), Some(2));
    // All in one commit.
    let a = store.read_forward("account-a", 2, 1).await.unwrap();
    let b = store.read_forward("account-b", 3, 1).await.unwrap();
    assert_eq!(a[0].commit_id, b[0].commit_id);

    // One stale stream among three: nothing of the commit is written, not even its key.
    let err = store
        .transaction()
        .append("account-a", ExpectedVersion::Exact(2), [ev(9)])
        .append("account-b", ExpectedVersion::Exact(1), [ev(9)]) // stale: it is at 3
        .append("account-d", ExpectedVersion::NoStream, [ev(9)])
        .kv(KvWrite::put("transfers/2", b"done".to_vec()))
        .commit()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(Conflict::Stream { stream, actual: 3, .. }) if stream == "account-b"),
        "{err:?}"
    );
    assert_eq!(store.stream_version("account-a").await.unwrap(), 2);
    assert_eq!(store.stream_version("account-b").await.unwrap(), 3);
    assert_eq!(store.stream_version("account-d").await.unwrap(), 0);
    assert!(store.bus().kv_get("transfers/2").await.unwrap().is_none());

    // A key condition that fails stops the streams too.
    let err = store
        .transaction()
        .append("account-a", ExpectedVersion::Exact(2), [ev(9)])
        .kv(KvWrite::put("transfers/1", b"again".to_vec()).expect(KvExpect::Absent))
        .commit()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(Conflict::Key { .. })),
        "{err:?}"
    );
    assert_eq!(store.stream_version("account-a").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_read_forward_and_backward_from_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    for n in 1..=10 {
        store
            .append("r-1", ExpectedVersion::Any, [ev(n)])
            .await
            .unwrap();
        store
            .append("r-other", ExpectedVersion::Any, [ev(100 + n)])
            .await
            .unwrap();
    }
    let ns = |v: &[txbus_es::RecordedEvent]| {
        v.iter()
            .map(|e| (e.version, e.payload["n"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    let fwd = store.read_forward("r-1", 4, 3).await.unwrap();
    assert_eq!(ns(&fwd), [(4, 4), (5, 5), (6, 6)]);
    let back = store.read_backward("r-1", 4, 3).await.unwrap();
    assert_eq!(ns(&back), [(4, 4), (3, 3), (2, 2)]);
    let last = store.read_backward("r-1", u64::MAX, 2).await.unwrap();
    assert_eq!(ns(&last), [(10, 10), (9, 9)]);
    assert!(store.read_forward("r-1", 11, 10).await.unwrap().is_empty());
    assert!(store
        .read_forward("r-none", 1, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(fwd
        .iter()
        .all(|e| e.stream == "r-1" && e.stream() == Some("r-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_reads_in_order_from_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::new(sqlite_bus(&dir.path().join("es.db")).await);
    for n in 1..=6 {
        store
            .transaction()
            .append(format!("log-{}", n % 2), ExpectedVersion::Any, [ev(n)])
            .event(Event::new("test.side", json!({ "n": n })))
            .commit()
            .await
            .unwrap();
    }
    let all = store.read_log(0, 100).await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(all
        .windows(2)
        .all(|w| (w[0].position, w[0].index) < (w[1].position, w[1].index)));
    let head = all.last().unwrap().position;
    assert_eq!(store.head_position(0).await.unwrap(), head);
    // From a position: only later commits; `limit` counts commits.
    let third = all[4].position;
    let rest = store.read_log(third, 2).await.unwrap();
    assert_eq!(rest.len(), 4);
    assert!(rest.iter().all(|e| e.position > third));
    assert_eq!(rest[0].payload["n"], 4);
    assert_eq!(rest[0].stream(), Some("log-0"));
    assert_eq!(rest[1].stream(), None);
    assert!(store.read_log(head, 10).await.unwrap().is_empty());
}
