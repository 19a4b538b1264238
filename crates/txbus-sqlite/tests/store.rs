//! The store contract on SQLite: leases and fencing, and the hash chain against edits made
//! directly in the database file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use txbus_core::chain::{self, Broken};
use txbus_core::store::{CommitKind, NewCommit, NewDelivery, Store};
use txbus_core::{OperationId, StoredMessage};
use txbus_sqlite::SqliteStore;

fn message(n: u64) -> Arc<StoredMessage> {
    let payload = json!({"n": n});
    Arc::new(StoredMessage {
        id: txbus_core::MessageId::new(),
        event_type: "thing.happened".into(),
        module: Some("things".into()),
        payload_json: payload.to_string(),
        payload,
        headers: Default::default(),
        headers_json: "{}".into(),
    })
}

fn commit(n: u64, lease_to: Option<uuid::Uuid>) -> NewCommit {
    NewCommit {
        operation_id: OperationId::new(),
        kind: CommitKind::Transact,
        created_at_ms: 1_700_000_000_000 + n as i64,
        messages: vec![message(n)],
        deliveries: vec![NewDelivery {
            message_index: 0,
            handler: Arc::from("h"),
            leased: true,
        }],
        lease_to,
        streams: Vec::new(),
        kv: Vec::new(),
        acks: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_process_that_is_gone_are_taken_over_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let gone = uuid::Uuid::now_v7();
    {
        let store = SqliteStore::open(&path).unwrap();
        store.heartbeat(gone).await.unwrap();
        store.append(commit(1, Some(gone))).await.unwrap();
        store.close().await.unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let me = uuid::Uuid::now_v7();
    store.heartbeat(me).await.unwrap();
    // A long ttl: the old owner is forgotten on open, so its lease is free at once.
    let got = store
        .claim(me, &["h".to_owned()], 10, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].fence, 2);
    assert_eq!(got[0].message.payload, json!({"n": 1}));
    store.close().await.unwrap();
}

fn rehash_commit(conn: &rusqlite::Connection, position: i64) -> [u8; 32] {
    let (op, created): (Vec<u8>, i64) = conn
        .query_row(
            "SELECT op_id, created_at FROM commits WHERE position = ?1",
            [position],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let (id, et, module, payload, headers): (Vec<u8>, String, Option<String>, String, String) =
        conn.query_row(
            "SELECT id, event_type, module, payload, headers FROM messages WHERE position = ?1",
            [position],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    chain::data_hash(
        &uuid::Uuid::from_slice(&op).unwrap(),
        CommitKind::Transact,
        created,
        [txbus_core::store::LogMessage {
            id: uuid::Uuid::from_slice(&id).unwrap(),
            event_type: &et,
            module: module.as_deref(),
            payload_json: &payload,
            headers_json: &headers,
        }],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_the_first_commit_edited_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        for n in 1..=10 {
            store.append(commit(n, None)).await.unwrap();
        }
        let report = chain::verify(&store).await.unwrap();
        assert!(report.is_intact());
        assert_eq!(report.verified, 10);
        store.close().await.unwrap();
    }
    // Someone edits a payload directly in the database file.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n = conn
            .execute(
                "UPDATE messages SET payload = '{\"n\":999}' WHERE position = 6",
                [],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    {
        let store = SqliteStore::open(&path).unwrap();
        let report = chain::verify(&store).await.unwrap();
        assert_eq!(report.first_broken, Some((6, Broken::DataMismatch)));
        assert_eq!(report.verified, 5);
        store.close().await.unwrap();
    }

    // Re-hashing the edited commit is not enough: its chain hash no longer matches.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let data = rehash_commit(&conn, 6);
        conn.execute(
            "UPDATE commits SET data_hash = ?1 WHERE position = 6",
            [&data[..]],
        )
        .unwrap();
    }
    {
        let store = SqliteStore::open(&path).unwrap();
        let report = chain::verify(&store).await.unwrap();
        assert_eq!(report.first_broken, Some((6, Broken::ChainMismatch)));
        store.close().await.unwrap();
    }

    // A removed commit is reported as a gap.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute("DELETE FROM commits WHERE position = 3", [])
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let report = chain::verify(&store).await.unwrap();
    assert_eq!(report.first_broken, Some((3, Broken::Gap { expected: 3 })));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    match SqliteStore::open(&path) {
        Err(txbus_core::store::Error::SchemaTooNew { found: 999, .. }) => {}
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_progress_after_each_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap());
    let total = 2 * chain::VERIFY_PAGE as u64 + 100;
    let appends = (1..=total).map(|n| {
        let store = store.clone();
        tokio::spawn(async move { store.append(commit(n, None)).await.unwrap() })
    });
    for append in appends.collect::<Vec<_>>() {
        append.await.unwrap();
    }
    let mut seen = Vec::new();
    let report =
        chain::verify_with_progress(store.as_ref(), |p| seen.push((p.verified, p.position)))
            .await
            .unwrap();
    assert!(report.is_intact());
    assert_eq!(report.verified, total);
    let page = chain::VERIFY_PAGE as u64;
    assert_eq!(
        seen,
        vec![(page, page), (2 * page, 2 * page), (total, total)]
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_by_a_process_can_be_read_read_only_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let held = SqliteStore::open(&path).unwrap();
    for n in 1..=3 {
        held.append(commit(n, None)).await.unwrap();
    }
    assert!(matches!(
        SqliteStore::open(&path),
        Err(txbus_core::store::Error::Locked { .. })
    ));
    let reader = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(reader.read_log(0, 10).await.unwrap().len(), 3);
    assert_eq!(reader.stats().await.unwrap().commits, 3);
    assert!(chain::verify(&reader).await.unwrap().is_intact());
    // What the holder commits later is seen.
    held.append(commit(4, None)).await.unwrap();
    assert_eq!(reader.read_log(3, 10).await.unwrap().len(), 1);
    let refused = reader
        .kv_write(vec![txbus_core::KvWrite::put("k", b"v".to_vec())])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, txbus_core::store::Error::ReadOnly { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("read-only"), "{refused}");
    assert!(reader.append(commit(5, None)).await.is_err());
    assert!(held.kv_get("k").await.unwrap().is_none());
    assert_eq!(held.read_log(0, 10).await.unwrap().len(), 4);
    // A path without a store is named, and no file is made.
    let missing = dir.path().join("none.db");
    let err = SqliteStore::open_read_only(&missing).unwrap_err();
    assert!(err.to_string().contains("no store file"), "{err}");
    assert!(!missing.exists());
    held.close().await.unwrap();
}
