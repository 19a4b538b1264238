//! Compensating transacts: handlers register compensations; a failed operation runs those of
//! the handlers that had succeeded, in reverse order, and its outcome lists them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{quick, Journal, HANG};
use serde_json::json;
use txbus_core::{Bus, Commit, DeadLetterQuery, Event, HandlerError, Message, On};
use txbus_saga::compensating::{CompensatingBus, Compensation, Compensations, RUNNER};
use txbus_saga::Retry;

fn retry(max_retries: u32) -> Retry {
    Retry {
        timeout: Duration::from_secs(10),
        max_retries,
        backoff: quick(),
    }
}

/// Waits until `count` registrations of the message's operation are kept (their documented
/// place: `compensate/rec/<operation id>/…`), so that the order of successes is known.
async fn registered(cell: &OnceLock<Bus>, msg: &Message, count: usize) {
    let prefix = format!("compensate/rec/{}/", msg.operation_id());
    tokio::time::timeout(HANG, async {
        loop {
            if let Some(bus) = cell.get() {
                if bus.kv_scan(&prefix, None, 10).await.unwrap().len() >= count {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

/// "reserve" then "charge" register compensations on `order.placed` (charge only once
/// reserve's registration is kept); "ship" fails the operation once both have, when the order
/// says `"ship": false`.
async fn order_bus(
    journal: &Journal,
    refund_works: Arc<AtomicBool>,
) -> (tempfile::TempDir, CompensatingBus) {
    let (j1, j2) = (journal.clone(), journal.clone());
    let cell: Arc<OnceLock<Bus>> = Arc::new(OnceLock::new());
    let (c1, c2) = (Arc::clone(&cell), Arc::clone(&cell));
    let compensations = Compensations::builder()
        .handler(
            "reserve",
            On::event("order.placed"),
            |_msg: Message| async { Ok(Some(json!({"reservation": "r-1"}))) },
            move |c: Compensation| {
                let j = j1.clone();
                async move {
                    j.push(format!("release {}", c.registered.data["reservation"]));
                    Ok(())
                }
            },
        )
        .handler(
            "charge",
            On::event("order.placed"),
            move |msg: Message| {
                let cell = Arc::clone(&c1);
                async move {
                    if msg.payload()["free"] == json!(true) {
                        return Ok(None);
                    }
                    registered(&cell, &msg, 1).await;
                    Ok(Some(json!({"payment": "p-1"})))
                }
            },
            move |c: Compensation| {
                let (j, works) = (j2.clone(), Arc::clone(&refund_works));
                async move {
                    if !works.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient("payment service down"));
                    }
                    j.push(format!("refund {}", c.registered.data["payment"]));
                    Ok(())
                }
            },
        )
        .compensation_retry(retry(1))
        .sweep_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = compensations
        .install(common::bus_builder(dir.path()).handler(
            "ship",
            On::event("order.placed"),
            move |msg: Message| {
                let cell = Arc::clone(&c2);
                async move {
                    let expected = if msg.payload()["free"] == json!(true) {
                        1
                    } else {
                        2
                    };
                    registered(&cell, &msg, expected).await;
                    if msg.payload()["ship"] == json!(false) {
                        return Err(HandlerError::reject("no courier"));
                    }
                    Ok(())
                }
            },
        ))
        .build()
        .await
        .unwrap();
    let _ = cell.set(bus.clone());
    (dir, compensations.attach(bus))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_operation_compensates_the_handlers_that_succeeded_in_reverse_order() {
    let journal = Journal::default();
    let (_dir, cbus) = order_bus(&journal, Arc::new(AtomicBool::new(true))).await;
    let op = cbus
        .transact([Event::new("order.placed", json!({"ship": false}))])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();

    assert!(!result.is_ok());
    assert_eq!(result.outcome.error.as_ref().unwrap().handler, "ship");
    let undone: Vec<&str> = result
        .compensated
        .iter()
        .map(|c| c.handler.as_str())
        .collect();
    assert_eq!(undone, vec!["charge", "reserve"], "newest success first");
    assert_eq!(result.compensated[0].data, json!({"payment": "p-1"}));
    assert!(result.failed.is_none());
    assert_eq!(journal.entries(), vec!["refund \"p-1\"", "release \"r-1\""]);
    // The run and its result are in the log, linked to the operation.
    let log = cbus.bus().read_log(0, 100).await.unwrap();
    let types: Vec<&str> = log
        .iter()
        .flat_map(|c| c.messages.iter().map(|m| m.event_type.as_str()))
        .collect();
    assert!(types.contains(&"txbus.compensate") && types.contains(&"txbus.compensated"));
    // Asking again by id gives the same answer, without compensating twice.
    let again = cbus.outcome(op.id()).await.unwrap();
    assert_eq!(again.compensated, result.compensated);
    assert_eq!(journal.entries().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_operation_compensates_nothing_and_forgets_its_registrations() {
    let journal = Journal::default();
    let (_dir, cbus) = order_bus(&journal, Arc::new(AtomicBool::new(true))).await;
    let op = cbus
        .transact([Event::new("order.placed", json!({}))])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();

    assert!(result.is_ok());
    assert!(result.compensated.is_empty());
    assert!(journal.entries().is_empty());
    assert!(cbus
        .bus()
        .kv_scan("compensate/", None, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_registered_nothing_is_not_compensated() {
    let journal = Journal::default();
    let (_dir, cbus) = order_bus(&journal, Arc::new(AtomicBool::new(true))).await;
    let op = cbus
        .transact([Event::new(
            "order.placed",
            json!({"ship": false, "free": true}),
        )])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();

    let undone: Vec<&str> = result
        .compensated
        .iter()
        .map(|c| c.handler.as_str())
        .collect();
    assert_eq!(undone, vec!["reserve"]);
    assert_eq!(journal.entries(), vec!["release \"r-1\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_is_reported_and_can_be_replayed() {
    let journal = Journal::default();
    let works = Arc::new(AtomicBool::new(false));
    let (_dir, cbus) = order_bus(&journal, Arc::clone(&works)).await;
    let op = cbus
        .transact([Event::new("order.placed", json!({"ship": false}))])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();

    let failed = result.failed.clone().expect("the refund failed for good");
    assert_eq!(failed.handler, "charge");
    assert_eq!(failed.error, "payment service down");
    assert_eq!(failed.attempts, 2, "one attempt and one retry");
    assert!(
        result.compensated.is_empty(),
        "the run stops at the failed compensation"
    );
    assert!(journal.entries().is_empty());

    // Visible as a dead letter of the runner (once its last attempt is recorded); once the
    // cause is fixed, replay it.
    let dead = tokio::time::timeout(HANG, async {
        loop {
            let dead = cbus
                .bus()
                .dead_letters(DeadLetterQuery {
                    handler: Some(RUNNER.into()),
                    limit: 10,
                    ..DeadLetterQuery::default()
                })
                .await
                .unwrap();
            if !dead.is_empty() {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(dead.len(), 1);
    works.store(true, Ordering::SeqCst);
    cbus.bus().replay(dead[0].delivery_id).await.unwrap();
    let fixed = tokio::time::timeout(HANG, async {
        loop {
            let r = cbus.outcome(op.id()).await.unwrap();
            if r.failed.is_none() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let undone: Vec<&str> = fixed
        .compensated
        .iter()
        .map(|c| c.handler.as_str())
        .collect();
    assert_eq!(undone, vec!["charge", "reserve"]);
    assert_eq!(journal.entries(), vec!["refund \"p-1\"", "release \"r-1\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_left_behind_by_a_caller_that_did_not_wait_are_compensated() {
    let journal = Journal::default();
    let (_dir, cbus) = order_bus(&journal, Arc::new(AtomicBool::new(true))).await;
    // Committed straight on the bus: nobody waits through the compensating handle.
    let bus: &Bus = cbus.bus();
    bus.commit_unwatched(Commit::new().event(Event::new("order.placed", json!({"ship": false}))))
        .await
        .unwrap();
    tokio::time::timeout(HANG, async {
        while journal.entries().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the sweeper compensated");
    assert_eq!(journal.entries(), vec!["refund \"p-1\"", "release \"r-1\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_succeeds_after_its_operation_failed_is_compensated_too() {
    let journal = Journal::default();
    let j = journal.clone();
    let compensations = Compensations::builder()
        .handler(
            "slow-reserve",
            On::event("order.placed"),
            |_msg: Message| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(Some(json!("late")))
            },
            move |c: Compensation| {
                let j = j.clone();
                async move {
                    j.push(format!("release {}", c.registered.data));
                    Ok(())
                }
            },
        )
        .sweep_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = compensations
        .install(common::bus_builder(dir.path()).handler(
            "pay",
            On::event("order.placed"),
            |_msg: Message| async { Err(HandlerError::reject("declined")) },
        ))
        .build()
        .await
        .unwrap();
    let cbus = compensations.attach(bus);
    let op = cbus
        .transact([Event::new("order.placed", json!({}))])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();
    assert!(!result.is_ok());
    assert!(
        result.compensated.is_empty(),
        "nothing had succeeded when it failed"
    );

    tokio::time::timeout(HANG, async {
        while journal.entries().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the late success was compensated");
    assert_eq!(journal.entries(), vec!["release \"late\""]);
}
