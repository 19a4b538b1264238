//! Deliveries kept on their commit's row: a delivery leased to the committing bus that
//! succeeds on its first attempt never gets a row of its own; anything else about it (a retry,
//! a failure, a release, a takeover) gives it one, with its id, and from there it is handled
//! like any other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use txbus_core::store::{Completion, CompletionEffect, DeliveryResult, NewDelivery, Store};
use txbus_core::{Failure, FailureKind};

use common::{commit, open, raw, TestSchema};

/// Rows of the deliveries table: (id, status, attempts, fence, has owner).
async fn rows(schema: &str) -> Vec<(i64, i16, i32, i64, bool)> {
    let mut conn = raw().await;
    let rows = sqlx::query_as(&format!(
        "SELECT id, status, attempts, fence, owner IS NOT NULL FROM \"{schema}\".deliveries
         ORDER BY id"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    rows
}

fn ack(id: i64, commit: u64, fence: i64, attempts: u32, result: DeliveryResult) -> Completion {
    Completion {
        delivery_id: id,
        fence,
        commit_id: commit,
        attempts,
        handler: Arc::from("h"),
        result,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_success_writes_no_delivery_row() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    let receipt = store.append(commit(1, Some(owner))).await.unwrap();
    let id = receipt.delivery_ids[0];
    assert!(
        rows(&schema.name).await.is_empty(),
        "leased on the commit row"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.deliveries.leased, stats.pending_operations), (1, 1));

    let effects = store
        .complete(vec![ack(
            id,
            receipt.commit_id,
            1,
            1,
            DeliveryResult::Succeeded,
        )])
        .await
        .unwrap();
    match effects.as_slice() {
        [CompletionEffect::Applied(Some(outcome))] => assert!(outcome.is_ok()),
        other => panic!("unexpected {other:?}"),
    }
    assert!(rows(&schema.name).await.is_empty(), "still no row");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.deliveries.succeeded, 1);
    assert_eq!(stats.deliveries.leased, 0);
    assert_eq!(stats.pending_operations, 0);
    // A second ack of the same attempt finds it done: it changes nothing.
    let again = store
        .complete(vec![ack(
            id,
            receipt.commit_id,
            1,
            1,
            DeliveryResult::Succeeded,
        )])
        .await
        .unwrap();
    assert_eq!(again, vec![CompletionEffect::Stale]);
    assert_eq!(store.stats().await.unwrap().deliveries.succeeded, 1);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_materializes_the_delivery_as_a_row_of_its_own() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    // Two deliveries leased to the committing bus: one succeeds at once, one is retried.
    let mut c = commit(1, Some(owner));
    c.deliveries.push(NewDelivery {
        message_index: 0,
        handler: Arc::from("h2"),
        leased: true,
    });
    let receipt = store.append(c).await.unwrap();
    let (first, second) = (receipt.delivery_ids[0], receipt.delivery_ids[1]);
    assert_eq!(second, first + 1, "ids of one commit are contiguous");
    assert!(rows(&schema.name).await.is_empty());

    let effects = store
        .complete(vec![
            ack(first, receipt.commit_id, 1, 1, DeliveryResult::Succeeded),
            ack(
                second,
                receipt.commit_id,
                1,
                1,
                DeliveryResult::Retry {
                    next_at_ms: 0,
                    error: "try again".into(),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        effects,
        vec![
            CompletionEffect::Applied(None),
            CompletionEffect::Applied(None)
        ]
    );
    // Only the retried one has a row: still leased to its owner under fence 1, one attempt
    // made.
    assert_eq!(rows(&schema.name).await, vec![(second, 1, 1, 1, true)]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.deliveries.succeeded, stats.deliveries.leased),
        (1, 1)
    );
    assert_eq!(stats.pending_operations, 1);

    // Its next attempt succeeds through the row and finishes the operation.
    match store
        .complete(vec![ack(
            second,
            receipt.commit_id,
            1,
            2,
            DeliveryResult::Succeeded,
        )])
        .await
        .unwrap()
        .as_slice()
    {
        [CompletionEffect::Applied(Some(outcome))] => assert!(outcome.is_ok()),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(rows(&schema.name).await, vec![(second, 2, 2, 1, false)]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.deliveries.succeeded, stats.pending_operations),
        (2, 0)
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_the_first_attempt_is_a_row_and_fails_the_operation() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    let receipt = store.append(commit(1, Some(owner))).await.unwrap();
    let id = receipt.delivery_ids[0];
    let failure = Failure {
        event_index: 0,
        event_type: "thing.happened".into(),
        handler: "h".into(),
        kind: FailureKind::RetriesExhausted,
        reason: "down".into(),
        attempts: 1,
    };
    let effects = store
        .complete(vec![ack(
            id,
            receipt.commit_id,
            1,
            1,
            DeliveryResult::Failed {
                failure: failure.clone(),
                dead: true,
            },
        )])
        .await
        .unwrap();
    match effects.as_slice() {
        [CompletionEffect::Applied(Some(outcome))] => {
            assert_eq!(outcome.error.as_ref(), Some(&failure));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(rows(&schema.name).await, vec![(id, 4, 1, 1, false)]);
    let dead = store
        .dead_letters(txbus_core::DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].delivery_id, dead[0].error.as_str()), (id, "down"));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_turns_inline_leases_into_pending_rows_that_any_bus_claims() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    store.heartbeat(owner).await.unwrap();
    let receipt = store.append(commit(1, Some(owner))).await.unwrap();
    let id = receipt.delivery_ids[0];
    assert_eq!(store.release(owner).await.unwrap(), 1);
    assert_eq!(rows(&schema.name).await, vec![(id, 0, 0, 1, false)]);
    assert_eq!(store.stats().await.unwrap().deliveries.pending, 1);
    // The released lease's late ack counts for nothing.
    assert_eq!(
        store
            .complete(vec![ack(
                id,
                receipt.commit_id,
                1,
                1,
                DeliveryResult::Succeeded
            )])
            .await
            .unwrap(),
        vec![CompletionEffect::Stale]
    );
    let other = uuid::Uuid::now_v7();
    let claimed = store
        .claim(other, &["h".to_owned()], 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].id, claimed[0].fence), (id, 2));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_with_more_deliveries_than_bits_keeps_the_rest_as_rows() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    let mut c = commit(1, Some(owner));
    c.deliveries = (0..130)
        .map(|k| NewDelivery {
            message_index: 0,
            handler: Arc::from(format!("h{k}")),
            leased: true,
        })
        .collect();
    let receipt = store.append(c).await.unwrap();
    let ids = &receipt.delivery_ids;
    assert_eq!(ids.len(), 130);
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 130);
    assert!(ids[..64].windows(2).all(|w| w[1] == w[0] + 1));
    // 63 on the commit row, the other 67 leased rows.
    let stored = rows(&schema.name).await;
    assert_eq!(stored.len(), 67);
    let mut expected: Vec<i64> = ids[63..].to_vec();
    expected.sort_unstable();
    assert_eq!(stored.iter().map(|r| r.0).collect::<Vec<_>>(), expected);
    assert!(stored.iter().all(|r| r.1 == 1 && r.3 == 1 && r.4));
    assert_eq!(store.stats().await.unwrap().deliveries.leased, 130);

    let acks = ids
        .iter()
        .enumerate()
        .map(|(k, &id)| Completion {
            handler: Arc::from(format!("h{k}")),
            ..ack(id, receipt.commit_id, 1, 1, DeliveryResult::Succeeded)
        })
        .collect();
    let effects = store.complete(acks).await.unwrap();
    let finished = effects
        .iter()
        .filter(|e| matches!(e, CompletionEffect::Applied(Some(_))))
        .count();
    assert_eq!(finished, 1, "the operation finishes once");
    assert!(effects
        .iter()
        .all(|e| matches!(e, CompletionEffect::Applied(_))));
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.deliveries.succeeded, stats.deliveries.leased),
        (130, 0)
    );
    assert_eq!(stats.pending_operations, 0);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_acknowledging_an_inline_delivery_writes_no_row_and_a_stale_one_writes_nothing() {
    let schema = TestSchema::new();
    let store = open(&schema.name).await;
    let owner = uuid::Uuid::now_v7();
    let first = store.append(commit(1, Some(owner))).await.unwrap();
    let id = first.delivery_ids[0];

    // The handler's own commit carries its acknowledgement: one transaction for both.
    let mut step = commit(2, Some(owner));
    step.acks = vec![ack(id, first.commit_id, 1, 1, DeliveryResult::Succeeded)];
    let receipt = store.append(step).await.unwrap();
    match receipt.acked.as_slice() {
        [CompletionEffect::Applied(Some(outcome))] => assert!(outcome.is_ok()),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        rows(&schema.name).await.is_empty(),
        "both kept on commit rows"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.commits, 2);
    assert_eq!(
        (stats.deliveries.succeeded, stats.deliveries.leased),
        (1, 1)
    );

    // Acknowledging it again: the lease is gone, so the commit is refused and writes nothing.
    let mut again = commit(3, Some(owner));
    again.acks = vec![ack(id, first.commit_id, 1, 1, DeliveryResult::Succeeded)];
    match store.append(again).await {
        Err(txbus_core::store::Error::Conflict(txbus_core::Conflict::Lease { delivery_id })) => {
            assert_eq!(delivery_id, id);
        }
        other => panic!("unexpected {other:?}"),
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.commits, 2, "nothing written");
    assert_eq!(
        (stats.deliveries.succeeded, stats.deliveries.leased),
        (1, 1)
    );
    store.close().await.unwrap();
}
