//! Conformance cases for inspection: counters and minute buckets, operations searched and
//! shown as trees, dead letters inspected, replayed in bulk and discarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{builder, one_message_commit, within, Harness};
use crate::inspect::{DeliveryStatus, HandlerCounts, OperationQuery, OperationStatus, MINUTE_MS};
use crate::store::DeadLetterQuery;
use crate::{Bus, Error, Event, HandlerError, Keep, Message, On, Retention};

/// Waits until the counts of every handler named in `want` satisfy it.
async fn counts_until(
    bus: &Bus,
    want: impl Fn(&HashMap<String, HandlerCounts>) -> bool,
) -> HashMap<String, HandlerCounts> {
    within(async {
        loop {
            let counts: HashMap<String, HandlerCounts> = bus
                .inspect()
                .handler_counts()
                .await
                .unwrap()
                .into_iter()
                .map(|h| (h.handler.clone(), h))
                .collect();
            if want(&counts) {
                break counts;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn flaky_once() -> impl Fn(Message) -> futures_util::future::Ready<crate::HandlerResult> + Clone {
    move |m: Message| {
        futures_util::future::ready(if m.attempt() == 1 {
            Err(std::io::Error::other("first attempt fails").into())
        } else {
            Ok(())
        })
    }
}

/// Succeeded, retried, rejected and dead deliveries are counted per handler and per minute,
/// from the writer's counters; handlers of the bus are listed before they had work; pending
/// deliveries are counted with the oldest one's due time.
pub async fn inspection_counts_deliveries_by_handler_and_minute(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(Arc::clone(&store))
        .max_retries(1)
        .handler("ok", On::event("job"), |_m: Message| async { Ok(()) })
        .handler("flaky", On::event("job"), flaky_once())
        .handler("picky", On::event("job"), |m: Message| async move {
            if m.payload()["n"].as_u64().unwrap_or(0).is_multiple_of(2) {
                Err(HandlerError::reject("even numbers are refused"))
            } else {
                Ok(())
            }
        })
        .handler("doomed", On::event("doom"), |_m: Message| async {
            Err(std::io::Error::other("never works").into())
        })
        .handler("idle", On::event("nothing.ever"), |_m: Message| async {
            Ok(())
        })
        .build()
        .await
        .unwrap();
    let before = crate::time::now_ms();
    for n in 0..10u64 {
        let op = bus
            .transact([Event::new("job", json!({"n": n}))])
            .await
            .unwrap();
        within(op.outcome()).await.unwrap();
    }
    for n in 0..3u64 {
        let op = bus
            .transact([Event::new("doom", json!({"n": n}))])
            .await
            .unwrap();
        assert!(!within(op.outcome()).await.unwrap().is_ok());
    }
    let counts = counts_until(&bus, |c| {
        c.get("ok").is_some_and(|h| h.succeeded == 10)
            && c.get("flaky").is_some_and(|h| h.succeeded == 10)
            && c.get("picky")
                .is_some_and(|h| h.succeeded + h.rejected == 10)
            && c.get("doomed").is_some_and(|h| h.dead == 3)
    })
    .await;
    let get = |name: &str| counts.get(name).unwrap().clone();
    assert_eq!(
        (get("ok").succeeded, get("ok").retried, get("ok").rejected),
        (10, 0, 0)
    );
    assert_eq!((get("flaky").succeeded, get("flaky").retried), (10, 10));
    assert_eq!((get("picky").succeeded, get("picky").rejected), (5, 5));
    let doomed = get("doomed");
    assert_eq!(
        (doomed.dead, doomed.died, doomed.retried, doomed.succeeded),
        (3, 3, 3, 0)
    );
    // A handler of the bus without any work yet is listed, with nothing.
    assert_eq!(
        get("idle"),
        HandlerCounts {
            handler: "idle".into(),
            ..HandlerCounts::default()
        }
    );
    for h in ["ok", "flaky", "picky", "doomed"] {
        assert_eq!((get(h).pending, get(h).leased), (0, 0), "{h}");
    }

    // The minute buckets hold the same work, all handlers together and one by one.
    let minutes = bus.inspect().throughput(None, 60).await.unwrap();
    assert_eq!(minutes.len(), 60);
    assert!(minutes
        .windows(2)
        .all(|w| w[1].minute_ms - w[0].minute_ms == MINUTE_MS));
    let sum = |f: fn(&crate::inspect::MinuteCounts) -> u64| minutes.iter().map(f).sum::<u64>();
    assert_eq!(sum(|m| m.succeeded), 10 + 10 + 5);
    assert_eq!(sum(|m| m.rejected), 5);
    assert_eq!(sum(|m| m.died), 3);
    assert_eq!(sum(|m| m.retried), 10 + 3);
    assert!(minutes
        .iter()
        .filter(|m| m.finished() > 0)
        .all(|m| m.minute_ms + MINUTE_MS > before));
    let flaky: u64 = bus
        .inspect()
        .throughput(Some("flaky"), 60)
        .await
        .unwrap()
        .iter()
        .map(|m| m.succeeded)
        .sum();
    assert_eq!(flaky, 10);

    // Work waiting in the store, for a handler no bus runs here: pending, oldest due first.
    let first = one_message_commit(1, None);
    store.append(first).await.unwrap();
    store.append(one_message_commit(2, None)).await.unwrap();
    let counts = counts_until(&bus, |c| c.get("h").is_some_and(|h| h.pending == 2)).await;
    let waiting = counts.get("h").unwrap();
    assert_eq!((waiting.leased, waiting.succeeded), (0, 0));
    let due = waiting.oldest_pending_due_ms.expect("a due time");
    assert!(due >= before && due <= crate::time::now_ms(), "{due}");

    // The head of the log covers every commit (once sealed, on stores that seal later).
    let overview = within(async {
        loop {
            let o = bus.inspect().overview(15).await.unwrap();
            if o.head >= 15 {
                break o;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(overview.minutes.len(), 15);
    let totals = overview.totals();
    assert_eq!(totals.succeeded, 25);
    assert_eq!(totals.pending, 2);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Operations are listed newest first, by status and time, in pages that chain; one operation
/// reads back as a tree of its events and each handler's delivery, attempts and error.
pub async fn operations_are_searched_and_shown_as_a_tree(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store)
        // The case lists exactly the operations it makes: no start-up record.
        .system_commits(false)
        .max_retries(1)
        .handler("writer", On::event("order.placed"), |_m: Message| async {
            Ok(())
        })
        .handler("audit", On::in_module("audit"), flaky_once())
        .handler(
            "payment",
            On::event("order.placed"),
            |m: Message| async move {
                if m.payload()["card"] == "declined" {
                    Err(HandlerError::reject("card declined"))
                } else {
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let start = crate::time::now_ms();
    let mut ids = Vec::new();
    for n in 0..7u64 {
        let card = if n.is_multiple_of(3) {
            "declined"
        } else {
            "ok"
        };
        let op = bus
            .transact([
                Event::new("order.placed", json!({"n": n, "card": card})),
                Event::new("audit.order-placed", json!({"n": n})).module("audit"),
            ])
            .await
            .unwrap();
        within(op.outcome()).await.unwrap();
        ids.push(op.id());
    }
    // Every delivery finished, every commit sealed (on stores that seal later).
    counts_until(&bus, |c| {
        c.get("writer").is_some_and(|h| h.succeeded == 7)
            && c.get("audit").is_some_and(|h| h.succeeded == 7)
            && c.get("payment")
                .is_some_and(|h| h.succeeded + h.rejected == 7)
    })
    .await;
    let inspect = bus.inspect();
    let all = within(async {
        loop {
            let page = inspect
                .operations(&OperationQuery {
                    limit: 100,
                    ..OperationQuery::default()
                })
                .await
                .unwrap();
            let done =
                page.operations.len() == 7 && page.operations.iter().all(|o| o.position.is_some());
            if done {
                break page;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(all.next_before, None);
    let listed: Vec<_> = all.operations.iter().map(|o| o.operation_id).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert!(all
        .operations
        .iter()
        .all(|o| o.message_count == 2 && o.first_event_type.as_deref() == Some("order.placed")));

    // By status: the declined ones (n = 0, 3, 6) failed, naming the handler.
    let failed = inspect
        .operations(&OperationQuery {
            status: Some(OperationStatus::Failed),
            limit: 100,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    let failed_ids: Vec<_> = failed.operations.iter().map(|o| o.operation_id).collect();
    assert_eq!(failed_ids, vec![ids[6], ids[3], ids[0]]);
    assert!(failed.operations.iter().all(|o| o
        .failure
        .as_ref()
        .is_some_and(|f| f.handler == "payment" && f.reason == "card declined")));

    // Pages of two chain through all seven.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = inspect
            .operations(&OperationQuery {
                before,
                limit: 2,
                ..OperationQuery::default()
            })
            .await
            .unwrap();
        assert!(page.operations.len() <= 2);
        seen.extend(page.operations.iter().map(|o| o.operation_id));
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    // By time: none after now, all since the start.
    let later = inspect
        .operations(&OperationQuery {
            from_ms: Some(crate::time::now_ms() + 60_000),
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert!(later.operations.is_empty());
    let since = inspect
        .operations(&OperationQuery {
            from_ms: Some(start),
            to_ms: Some(crate::time::now_ms() + 1),
            limit: 100,
            ..OperationQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(since.operations.len(), 7);
    let backwards = inspect
        .operations(&OperationQuery {
            from_ms: Some(10),
            to_ms: Some(5),
            ..OperationQuery::default()
        })
        .await;
    assert!(matches!(backwards, Err(Error::Config(_))), "{backwards:?}");

    // One declined operation as a tree.
    let tree = inspect.operation(ids[3]).await.unwrap().expect("known");
    assert_eq!(tree.summary.operation_id, ids[3]);
    assert_eq!(tree.summary.status, OperationStatus::Failed);
    assert!(tree.chain_hash.is_some());
    assert_eq!(tree.events.len(), 2);
    assert_eq!(tree.events[0].message.event_type, "order.placed");
    assert_eq!(tree.events[0].message.payload["n"], 3);
    let by_handler = |e: usize| -> HashMap<String, crate::inspect::DeliveryDetail> {
        tree.events[e]
            .deliveries
            .iter()
            .map(|d| (d.handler.clone(), d.clone()))
            .collect()
    };
    let first = by_handler(0);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first["writer"].status, DeliveryStatus::Succeeded);
    assert_eq!(first["writer"].attempts, 1);
    assert_eq!(first["payment"].status, DeliveryStatus::Rejected);
    assert_eq!(
        first["payment"].last_error.as_deref(),
        Some("card declined")
    );
    assert!(first["payment"].updated_at_ms >= tree.summary.created_at_ms);
    let second = by_handler(1);
    assert_eq!(second["audit"].status, DeliveryStatus::Succeeded);
    assert_eq!(second["audit"].attempts, 2);

    assert!(inspect
        .operation(crate::OperationId::new())
        .await
        .unwrap()
        .is_none());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Dead letters are read one by one with payload and error, replayed several at once (they
/// then succeed) and discarded; the dead-letter counter follows, and pruning lowers it too.
pub async fn dead_letters_are_inspected_replayed_in_bulk_and_discarded(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let healed = Arc::new(AtomicBool::new(false));
    let hl = healed.clone();
    let bus = builder(store)
        .max_retries(0)
        .retention(Retention {
            failed: Keep::new(1, Duration::from_secs(3600)),
            // Pruned when the case says so, not in the background.
            interval: Duration::from_secs(3600),
            ..Retention::default()
        })
        .handler("fragile", On::event("job"), move |_m: Message| {
            let hl = hl.clone();
            async move {
                if hl.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(std::io::Error::other("disk on fire").into())
                }
            }
        })
        .build()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for n in 0..5u64 {
        let id = bus
            .publish(Event::new("job", json!({"n": n})))
            .await
            .unwrap();
        assert!(!within(bus.wait(id)).await.unwrap().is_ok());
        ops.push(id);
    }
    let inspect = bus.inspect();
    counts_until(&bus, |c| c.get("fragile").is_some_and(|h| h.dead == 5)).await;
    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..DeadLetterQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 5);
    let one = inspect.dead_letter(dead[2].delivery_id).await.unwrap();
    assert_eq!(one.operation_id, ops[2]);
    assert_eq!(one.message.payload, json!({"n": 2}));
    assert!(one.error.contains("disk on fire"), "{}", one.error);
    assert_eq!(one.attempts, 1);

    healed.store(true, Ordering::SeqCst);
    let replayed = inspect
        .replay(&[dead[0].delivery_id, dead[1].delivery_id, -5])
        .await
        .unwrap();
    assert_eq!(replayed, vec![dead[0].delivery_id, dead[1].delivery_id]);
    // Not a dead letter any more: a second replay does nothing.
    assert!(inspect
        .replay(&[dead[0].delivery_id])
        .await
        .unwrap()
        .is_empty());
    let counts = counts_until(&bus, |c| c.get("fragile").is_some_and(|h| h.succeeded == 2)).await;
    assert_eq!(counts["fragile"].dead, 3);
    assert_eq!(counts["fragile"].died, 5);
    let tree = inspect.operation(ops[0]).await.unwrap().expect("known");
    assert_eq!(
        tree.events[0].deliveries[0].status,
        DeliveryStatus::Succeeded
    );
    // The recorded outcome stays a failure.
    assert!(!bus.wait(ops[0]).await.unwrap().is_ok());

    let discarded = inspect.discard(&[dead[2].delivery_id]).await.unwrap();
    assert_eq!(discarded, vec![dead[2].delivery_id]);
    assert!(matches!(
        inspect.dead_letter(dead[2].delivery_id).await,
        Err(Error::UnknownDeadLetter(_))
    ));
    assert!(inspect
        .discard(&[dead[2].delivery_id])
        .await
        .unwrap()
        .is_empty());
    let counts = counts_until(&bus, |c| c.get("fragile").is_some_and(|h| h.dead == 2)).await;
    assert_eq!(counts["fragile"].died, 5);

    let too_many = vec![1i64; crate::inspect::MAX_BATCH_ACTION + 1];
    assert!(matches!(
        inspect.replay(&too_many).await,
        Err(Error::InvalidCommit(reason)) if reason.contains("exceed the limit")
    ));

    // Retention keeps one failed delivery: pruning removes the other dead letter and the
    // counter follows.
    bus.prune().await.unwrap();
    let left = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..DeadLetterQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    let counts = counts_until(&bus, |c| c.get("fragile").is_some_and(|h| h.dead == 1)).await;
    assert_eq!(counts["fragile"].succeeded, 2);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
