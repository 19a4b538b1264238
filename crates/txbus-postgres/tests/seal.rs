//! The chain sealer: positions follow commit visibility, not id order, so that a slow or
//! rolled-back writer never stalls the log; and several processes share one chain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{Connection, Executor};
use txbus_core::chain;
use txbus_core::store::{CommitKind, Store};
use txbus_core::OperationId;

use common::{commit, open, raw, wait_sealed, TestSchema};

/// Inserts a commit row without messages, as a writer in another process would, in the
/// transaction `conn` has open. Returns its operation and commit id.
async fn insert_raw_commit(conn: &mut sqlx::PgConnection, schema: &str) -> (OperationId, i64) {
    let op = OperationId::new();
    let created = 1_700_000_000_000i64;
    let data = chain::data_hash(&op.0, CommitKind::Publish, created, [], &[]);
    let id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO \"{schema}\".commits
             (op_id, kind, created_at, message_count, data_hash, op_status, op_remaining)
         VALUES ($1::uuid, 2, $2, 0, $3, 1, 0) RETURNING id"
    ))
    .bind(op.to_string())
    .bind(created)
    .bind(&data[..])
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    (op, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_does_not_stall_the_chain_and_is_sealed_when_it_commits() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let store = open(&s).await;

    // A writer holds a transaction open after inserting a commit: it has the lowest id.
    let mut slow = raw().await;
    slow.execute("BEGIN").await.unwrap();
    let (slow_op, slow_id) = insert_raw_commit(&mut slow, &s).await;

    // Later commits with higher ids are sealed meanwhile.
    let mut appended = Vec::new();
    for n in 1..=3 {
        let c = commit(n, None);
        appended.push(c.operation_id);
        let receipt = store.append(c).await.unwrap();
        assert!(receipt.commit_id > u64::try_from(slow_id).unwrap());
    }
    let log = wait_sealed(&store, 3).await;
    assert_eq!(
        log.len(),
        3,
        "the open transaction's commit is not visible yet"
    );
    assert_eq!(
        log.iter().map(|c| c.position).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        log.iter().map(|c| c.operation_id).collect::<Vec<_>>(),
        appended
    );

    // Another writer inserts and rolls back: nothing is left to wait for.
    let mut gone = raw().await;
    gone.execute("BEGIN").await.unwrap();
    let (gone_op, _) = insert_raw_commit(&mut gone, &s).await;
    gone.execute("ROLLBACK").await.unwrap();

    // The slow writer commits: its commit is sealed next, at position 4.
    slow.execute("COMMIT").await.unwrap();
    let log = wait_sealed(&store, 4).await;
    assert_eq!(log.len(), 4);
    assert_eq!(log[3].position, 4);
    assert_eq!(log[3].operation_id, slow_op);
    assert!(log.iter().all(|c| c.operation_id != gone_op));

    let report = chain::verify(&store).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.verified, 4);
    slow.close().await.unwrap();
    gone.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_appending_at_once_share_one_chain() {
    const TASKS: usize = 8;
    const EACH: usize = 25;
    let schema = TestSchema::new();
    // Two stores on one schema stand for two processes.
    let stores = [
        Arc::new(open(&schema.name).await),
        Arc::new(open(&schema.name).await),
    ];
    let mut tasks = Vec::new();
    for store in &stores {
        for t in 0..TASKS {
            let store = Arc::clone(store);
            tasks.push(tokio::spawn(async move {
                let mut ops = Vec::with_capacity(EACH);
                for n in 0..EACH {
                    let c = commit((t * EACH + n) as u64, None);
                    ops.push(c.operation_id);
                    store.append(c).await.unwrap();
                }
                ops
            }));
        }
    }
    let mut expected = HashSet::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    let total = 2 * TASKS * EACH;
    assert_eq!(expected.len(), total);

    for store in &stores {
        let log = wait_sealed(store.as_ref(), total).await;
        assert_eq!(log.len(), total, "every commit is sealed exactly once");
        let positions: Vec<u64> = log.iter().map(|c| c.position).collect();
        assert_eq!(positions, (1..=total as u64).collect::<Vec<_>>());
        let seen: HashSet<OperationId> = log.iter().map(|c| c.operation_id).collect();
        assert_eq!(seen, expected);
        let report = chain::verify(store.as_ref()).await.unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.verified, total as u64);
    }
    let stats = stores[0].stats().await.unwrap();
    assert_eq!(stats.commits, total as u64);
    assert_eq!(stats.deliveries.pending, total as u64);
    for store in &stores {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sealer_moves_to_another_process_when_its_holder_closes() {
    let schema = TestSchema::new();
    let first = open(&schema.name).await;
    let second = open(&schema.name).await;
    for n in 1..=5 {
        first.append(commit(n, None)).await.unwrap();
    }
    wait_sealed(&second, 5).await;
    // Whichever held the lock, closing the first leaves the second to seal.
    first.close().await.unwrap();
    for n in 6..=10 {
        second.append(commit(n, None)).await.unwrap();
    }
    let log = wait_sealed(&second, 10).await;
    assert_eq!(log.len(), 10);
    assert!(chain::verify(&second).await.unwrap().is_intact());
    second.close().await.unwrap();
}
