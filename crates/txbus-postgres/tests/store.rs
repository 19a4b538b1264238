//! The store contract on PostgreSQL: leases and fencing, the hash chain against edits made
//! directly in the database, and schema versions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, Executor, Row};
use txbus_core::chain::{self, Broken};
use txbus_core::store::{
    CommitKind, Completion, CompletionEffect, DeliveryResult, LogMessage, Store,
};

use common::{commit, open, raw, wait_sealed, TestSchema};

// Fencing (a late ack from a superseded lease) is a case of the conformance suite.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_stopped_process_are_taken_over() {
    let schema = TestSchema::new();
    let gone = uuid::Uuid::now_v7();
    {
        // A process heartbeats, takes work and stops without releasing it.
        let store = open(&schema.name).await;
        store.heartbeat(gone).await.unwrap();
        store.append(commit(1, Some(gone))).await.unwrap();
        store.close().await.unwrap();
    }
    let store = open(&schema.name).await;
    let me = uuid::Uuid::now_v7();
    store.heartbeat(me).await.unwrap();
    let handlers = ["h".to_owned()];
    // Other processes may still be alive: a lease is taken over only once its holder's
    // heartbeat is older than the ttl.
    assert!(store
        .claim(me, &handlers, 10, Duration::from_secs(3600))
        .await
        .unwrap()
        .is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got = store
            .claim(me, &handlers, 10, Duration::from_millis(100))
            .await
            .unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].fence, 2);
    assert_eq!(got[0].message.payload, json!({"n": 1}));
    store.close().await.unwrap();
}

/// The data hash of the (one-message) commit at `position`, from what is stored.
async fn rehash_commit(conn: &mut sqlx::PgConnection, schema: &str, position: i64) -> [u8; 32] {
    let c = sqlx::query(&format!(
        "SELECT id, op_id::text, created_at FROM \"{schema}\".commits
         WHERE id = (SELECT commit_id FROM \"{schema}\".commit_seals WHERE position = $1)"
    ))
    .bind(position)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let (id, op, created): (i64, String, i64) = (c.get(0), c.get(1), c.get(2));
    let m = sqlx::query(&format!(
        "SELECT id::text, event_type, module, payload, headers FROM \"{schema}\".messages
         WHERE commit_id = $1"
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let (mid, et, module, payload, headers): (String, String, Option<String>, String, String) =
        (m.get(0), m.get(1), m.get(2), m.get(3), m.get(4));
    chain::data_hash(
        &op.parse().unwrap(),
        CommitKind::Transact,
        created,
        [LogMessage {
            id: mid.parse().unwrap(),
            event_type: &et,
            module: module.as_deref(),
            payload_json: &payload,
            headers_json: &headers,
        }],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_the_first_commit_edited_in_the_database() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let store = open(&s).await;
    for n in 1..=10 {
        store.append(commit(n, None)).await.unwrap();
    }
    wait_sealed(&store, 10).await;
    let report = chain::verify(&store).await.unwrap();
    assert!(report.is_intact());
    assert_eq!(report.verified, 10);

    // Someone edits a payload directly in the database.
    let mut conn = raw().await;
    let n = conn
        .execute(
            format!(
                "UPDATE \"{s}\".messages SET payload = '{{\"n\":999}}'
                 WHERE commit_id = (SELECT commit_id FROM \"{s}\".commit_seals WHERE position = 6)"
            )
            .as_str(),
        )
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1);
    let report = chain::verify(&store).await.unwrap();
    assert_eq!(report.first_broken, Some((6, Broken::DataMismatch)));
    assert_eq!(report.verified, 5);

    // Re-hashing the edited commit is not enough: its chain hash no longer matches.
    let data = rehash_commit(&mut conn, &s, 6).await;
    sqlx::query(&format!(
        "UPDATE \"{s}\".commits SET data_hash = $1
         WHERE id = (SELECT commit_id FROM \"{s}\".commit_seals WHERE position = 6)"
    ))
    .bind(&data[..])
    .execute(&mut conn)
    .await
    .unwrap();
    let report = chain::verify(&store).await.unwrap();
    assert_eq!(report.first_broken, Some((6, Broken::ChainMismatch)));

    // A removed commit is reported as a gap.
    conn.execute(
        format!(
            "DELETE FROM \"{s}\".commits
             WHERE id = (SELECT commit_id FROM \"{s}\".commit_seals WHERE position = 3)"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let report = chain::verify(&store).await.unwrap();
    assert_eq!(report.first_broken, Some((3, Broken::Gap { expected: 3 })));
    conn.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    store.close().await.unwrap();
    let mut conn = raw().await;
    conn.execute(
        format!(
            "INSERT INTO \"{}\".txbus_migrations (version) VALUES (999)",
            schema.name
        )
        .as_str(),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
    match common::options(&schema.name).connect().await {
        Err(txbus_core::store::Error::SchemaTooNew { found: 999, .. }) => {}
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schema_names_are_refused_and_a_closed_store_says_so() {
    for bad in ["1abc", "a-b", "a\"; DROP TABLE x; --", ""] {
        assert!(
            common::options(bad).connect().await.is_err(),
            "{bad:?} must be refused"
        );
    }
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    store.close().await.unwrap();
    assert!(matches!(
        store.append(commit(1, None)).await,
        Err(txbus_core::store::Error::Closed)
    ));
    assert!(matches!(
        store.stats().await,
        Err(txbus_core::store::Error::Closed)
    ));
    assert!(matches!(
        store
            .claim(
                uuid::Uuid::now_v7(),
                &["h".to_owned()],
                1,
                Duration::from_secs(1)
            )
            .await,
        Err(txbus_core::store::Error::Closed)
    ));
    // Closing twice is fine.
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_migrate_once() {
    let schema = TestSchema::new();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let name = schema.name.clone();
            tokio::spawn(async move { common::options(&name).connect().await })
        })
        .collect();
    let mut stores = Vec::new();
    for s in starts {
        stores.push(s.await.unwrap().unwrap());
    }
    let mut conn = raw().await;
    let versions: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}\".txbus_migrations ORDER BY version",
        schema.name
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let newest = i32::try_from(stores[0].describe().schema_version).unwrap();
    assert!(newest >= 5);
    assert_eq!(
        versions,
        (1..=newest).collect::<Vec<_>>(),
        "every migration applied exactly once"
    );
    conn.close().await.unwrap();
    for s in stores {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_append_fails_alone() {
    let schema = TestSchema::new();
    let store = std::sync::Arc::new(open(&schema.name).await);
    let first = commit(1, None);
    let mut twin = commit(2, None);
    twin.operation_id = first.operation_id;
    store.append(first).await.unwrap();
    // Many appends at once, so that the duplicate most likely shares a batch with others.
    let mut tasks = Vec::new();
    for n in 3..40 {
        let store = std::sync::Arc::clone(&store);
        tasks.push(tokio::spawn(
            async move { store.append(commit(n, None)).await },
        ));
    }
    let bad = store.append(twin).await;
    assert!(
        matches!(bad, Err(txbus_core::store::Error::Backend { .. })),
        "{bad:?}"
    );
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.stats().await.unwrap().commits, 38);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_replay_and_dead_letters() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    store.heartbeat(owner).await.unwrap();
    let mut receipts = Vec::new();
    for n in 1..=4 {
        receipts.push(store.append(commit(n, Some(owner))).await.unwrap());
    }
    // Release returns every lease of the owner to pending.
    assert_eq!(store.release(owner).await.unwrap(), 4);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.deliveries.pending, 4);
    assert_eq!(stats.deliveries.leased, 0);
    // Acks of the released leases count for nothing.
    let ack = Completion {
        delivery_id: receipts[0].delivery_ids[0],
        fence: 1,
        commit_id: receipts[0].commit_id,
        attempts: 1,
        handler: "h".into(),
        result: DeliveryResult::Succeeded,
    };
    assert_eq!(
        store.complete(vec![ack]).await.unwrap(),
        vec![CompletionEffect::Stale]
    );

    // Claim them again and kill them: two for handler h.
    let claimed = store
        .claim(owner, &["h".to_owned()], 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    assert!(claimed.iter().all(|c| c.fence == 2));
    let failure = |c: &txbus_core::store::ClaimedDelivery, dead: bool| Completion {
        delivery_id: c.id,
        fence: c.fence,
        commit_id: c.commit_id,
        attempts: 3,
        handler: c.handler.as_str().into(),
        result: DeliveryResult::Failed {
            failure: txbus_core::Failure {
                event_index: 0,
                event_type: "thing.happened".into(),
                handler: "h".into(),
                kind: txbus_core::FailureKind::RetriesExhausted,
                reason: format!("broken {}", c.id),
                attempts: 3,
            },
            dead,
        },
    };
    let effects = store
        .complete(vec![
            failure(&claimed[0], true),
            failure(&claimed[1], true),
            failure(&claimed[2], true),
            failure(&claimed[3], false),
        ])
        .await
        .unwrap();
    assert!(effects
        .iter()
        .all(|e| matches!(e, CompletionEffect::Applied(Some(o)) if o.error.is_some())));
    match store.operation(claimed[0].operation_id).await.unwrap() {
        Some(txbus_core::OperationState::Finished(o)) => {
            assert_eq!(o.error.unwrap().reason, format!("broken {}", claimed[0].id))
        }
        other => panic!("unexpected {other:?}"),
    }

    // Three dead letters (the rejection is not one), paged.
    let query = |after_id, limit| txbus_core::DeadLetterQuery {
        handler: Some("h".into()),
        after_id,
        limit,
    };
    let page = store.dead_letters(query(None, 2)).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = store
        .dead_letters(query(Some(page[1].delivery_id), 10))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert!(page[0].delivery_id < page[1].delivery_id);
    assert_eq!(page[0].error, format!("broken {}", page[0].delivery_id));
    assert_eq!(page[0].attempts, 3);
    assert!(page[0].message.payload["n"].is_u64());
    let other = txbus_core::DeadLetterQuery {
        handler: Some("nobody".into()),
        after_id: None,
        limit: 10,
    };
    assert!(store.dead_letters(other).await.unwrap().is_empty());

    // Replay puts a dead letter back to pending from attempt 1, once.
    let id = page[0].delivery_id;
    assert!(store.replay(id).await.unwrap());
    assert!(!store.replay(id).await.unwrap());
    let rejected = claimed[3].id;
    assert!(!store.replay(rejected).await.unwrap(), "only dead letters");
    let again = store
        .claim(owner, &["h".to_owned()], 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, id);
    assert_eq!(again[0].attempts, 0);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_goes_in_bounded_steps() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let store = open(&s).await;
    // 12 000 succeeded deliveries and finished outcomes, written directly.
    let mut conn = raw().await;
    conn.execute(
        format!(
            "INSERT INTO \"{s}\".commits (op_id, kind, created_at, message_count, data_hash,
                                          op_status, op_remaining, op_finished_at)
             SELECT gen_random_uuid(), 1, 0, 0, decode(repeat('00', 32), 'hex'), 1, 0, 1
             FROM generate_series(1, 12000);
             INSERT INTO \"{s}\".deliveries (commit_id, idx, handler, status, attempts, fence,
                                             next_at, updated_at)
             SELECT id, 0, 'h', 2, 1, 1, 0, 1 FROM \"{s}\".commits;"
        )
        .as_str(),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
    let keep = txbus_core::Keep::new(10, Duration::from_secs(365 * 24 * 3600 * 100));
    let retention = txbus_core::Retention {
        succeeded: keep,
        failed: keep,
        outcomes: keep,
        interval: Duration::from_secs(3600),
    };
    let report = store.prune(&retention).await.unwrap();
    assert_eq!(report.succeeded, 11_990);
    assert_eq!(report.outcomes, 11_990);
    assert_eq!(report.failed, 0);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 10);
    assert_eq!(store.prune(&retention).await.unwrap(), Default::default());
    store.close().await.unwrap();
}
