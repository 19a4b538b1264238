//! Dead letters, sagas and the log over real HTTP, each against a bus of its own on a SQLite
//! file: replaying many dead letters at once, sagas by status with one saga's history, and the
//! log paged by position with `verify` naming an edited commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{basic, csrf_of, http, location, rows, serve, Reply, HANG, OPERATOR_PASSWORD};
use serde_json::json;
use txbus_core::inspect::DeliveryStatus;
use txbus_core::store::DeadLetterQuery;
use txbus_core::{Backoff, Bus, BusBuilder, Event, HandlerError, Message, On, OperationId};
use txbus_saga::{Saga, SagaStatus, Sagas, Step, StepContext};
use txbus_sqlite::SqliteStore;

fn bus_builder(db: &std::path::Path) -> BusBuilder {
    Bus::builder()
        .store(SqliteStore::open(db).unwrap())
        .max_retries(0)
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .poll_interval(Duration::from_millis(50))
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let auth = basic("operator", OPERATOR_PASSWORD);
    let r = http(addr, "GET", path, &[("Authorization", &auth)], b"").await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r
}

async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    tokio::time::timeout(HANG, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_dead_letters_replayed_at_once_run_again_and_the_action_is_audited() {
    // The warehouse fails every attempt until it is healed; billing fails every attempt.
    let healed = Arc::new(AtomicBool::new(false));
    let shipped: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (h, s) = (Arc::clone(&healed), Arc::clone(&shipped));
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_builder(&dir.path().join("dead.db"))
        .handler("warehouse", On::event("order.placed"), move |m: Message| {
            let (healed, shipped) = (Arc::clone(&h), Arc::clone(&s));
            async move {
                if !healed.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("warehouse API: connection refused").into());
                }
                shipped
                    .lock()
                    .unwrap()
                    .push(m.payload()["order"].as_u64().unwrap());
                Ok(())
            }
        })
        .handler("billing", On::event("invoice.sent"), |_m: Message| async {
            Err(std::io::Error::other("ledger unreachable").into())
        })
        .build()
        .await
        .unwrap();
    let mut ops: Vec<OperationId> = Vec::new();
    for order in 1..=4u64 {
        let op = bus
            .transact([Event::new("order.placed", json!({ "order": order }))])
            .await
            .unwrap();
        assert!(!op.outcome().await.unwrap().is_ok());
        ops.push(op.id());
    }
    let invoice = bus
        .transact([Event::new("invoice.sent", json!({ "invoice": 9 }))])
        .await
        .unwrap();
    assert!(!invoice.outcome().await.unwrap().is_ok());
    let dead = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 5);
    let mut chosen: Vec<i64> = dead
        .iter()
        .filter(|d| &*d.handler == "warehouse")
        .map(|d| d.delivery_id)
        .collect();
    chosen.sort_unstable();
    assert_eq!(chosen.len(), 4);
    let kept = dead
        .iter()
        .find(|d| &*d.handler == "billing")
        .unwrap()
        .delivery_id;

    let addr = serve(&bus).await;
    let operator = basic("operator", OPERATOR_PASSWORD);
    // The list offers each dead letter as a box to tick in one form.
    let page = get(addr, "/admin/queues/dead-letters").await;
    for id in chosen.iter().chain([&kept]) {
        assert!(
            page.body.contains(&format!(
                "<input type=\"checkbox\" name=\"id\" value=\"{id}\">"
            )),
            "{}",
            page.body
        );
    }
    assert!(page
        .body
        .contains("formaction=\"/admin/queues/dead-letters/replay\""));

    // Healed, the warehouse's four are replayed with one post of the form.
    healed.store(true, Ordering::SeqCst);
    let mut form = format!("csrf={}", csrf_of(&page.body));
    for id in &chosen {
        form.push_str(&format!("&id={id}"));
    }
    let r = http(
        addr,
        "POST",
        "/admin/queues/dead-letters/replay",
        &[
            ("Authorization", &operator),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", &format!("http://{addr}")),
        ],
        form.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let done = get(addr, &location(&r)).await;
    assert!(
        done.body.contains(
            "<div class=\"notice ok\" id=\"done\">4 of 4 dead letter(s) replayed; recorded as audit entry 1</div>"
        ),
        "{}",
        done.body
    );

    // Each replayed delivery runs again and succeeds; the one not chosen stays dead.
    let mut orders = until("the four replayed deliveries succeed", || {
        let shipped = Arc::clone(&shipped);
        async move {
            let v = shipped.lock().unwrap().clone();
            (v.len() >= 4).then_some(v)
        }
    })
    .await;
    orders.sort_unstable();
    assert_eq!(orders, vec![1, 2, 3, 4]);
    for op in &ops {
        let bus = bus.clone();
        let detail = until("the delivery's success is recorded", || {
            let bus = bus.clone();
            async move {
                let d = bus.inspect().operation(*op).await.unwrap().unwrap();
                (d.events[0].deliveries[0].status == DeliveryStatus::Succeeded).then_some(d)
            }
        })
        .await;
        let delivery = &detail.events[0].deliveries[0];
        assert_eq!(&*delivery.handler, "warehouse");
        assert!(chosen.contains(&delivery.delivery_id));
    }
    let left = get(addr, "/admin/queues/dead-letters").await;
    let listed: Vec<String> = rows(&left.body, "id=\"dead-letters\"")
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    assert_eq!(listed, vec![kept.to_string()], "{}", left.body);

    // The audit page says who replayed what.
    let audit = get(addr, "/admin/queues/audit").await;
    let trail = rows(&audit.body, "id=\"audit\"");
    let ids = chosen
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(
        (
            &trail[0][0],
            &trail[0][2],
            &trail[0][3],
            &trail[0][4],
            &trail[0][5]
        ),
        (
            &"1".to_owned(),
            &"operator".to_owned(),
            &"replay".to_owned(),
            &ids,
            &ids
        ),
        "{trail:?}"
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Sagas of type `fulfilment`: `reserve` (undone by a release), then `charge`, which rejects a
/// declined card.
fn fulfilment(released: Arc<Mutex<Vec<String>>>) -> Sagas {
    let saga = Saga::builder("fulfilment")
        .step(
            Step::action("reserve", |ctx: StepContext| async move {
                Ok(json!({"reservation": format!("r-{}", ctx.input_json()["order"])}))
            })
            .compensate(move |ctx: StepContext| {
                let released = Arc::clone(&released);
                async move {
                    released
                        .lock()
                        .unwrap()
                        .push(ctx.input_json()["order"].to_string());
                    Ok(())
                }
            }),
        )
        .step(Step::action("charge", |ctx: StepContext| async move {
            if ctx.input_json()["card"] == "declined" {
                return Err(HandlerError::reject("card declined by the issuer"));
            }
            Ok(json!({"payment": "p-1"}))
        }))
        .build()
        .unwrap();
    Sagas::builder().saga(saga).build().unwrap()
}

/// The rows of a saga's history page as (version, change, details).
fn history(page: &Reply) -> Vec<(u64, String, serde_json::Value)> {
    rows(&page.body, "<table>")
        .into_iter()
        .map(|r| {
            assert_eq!(r.len(), 4, "{r:?}");
            let details = serde_json::from_str(&r[3])
                .unwrap_or_else(|e| panic!("details of {r:?} are not JSON: {e}"));
            (r[0].parse().unwrap(), r[2].clone(), details)
        })
        .collect()
}

/// The (change, step name) of each row of a history, in order.
fn steps(rows: &[(u64, String, serde_json::Value)]) -> Vec<(&str, Option<&str>)> {
    rows.iter()
        .map(|(_, change, details)| {
            assert_eq!(details["change"], change.as_str(), "{details}");
            (change.as_str(), details["name"].as_str())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_listed_by_status_and_a_history_shows_its_steps_in_order() {
    let released: Arc<Mutex<Vec<String>>> = Arc::default();
    let sagas = fulfilment(Arc::clone(&released));
    let dir = tempfile::tempdir().unwrap();
    let bus = sagas
        .install(bus_builder(&dir.path().join("sagas.db")))
        .build()
        .await
        .unwrap();
    let runtime = sagas.attach(bus.clone());
    let mut ids = Vec::new();
    for (order, card, status) in [
        (1, "visa", SagaStatus::Completed),
        (2, "declined", SagaStatus::Failed),
    ] {
        let id = runtime
            .start("fulfilment", json!({ "order": order, "card": card }))
            .await
            .unwrap();
        let state = tokio::time::timeout(HANG, runtime.wait(&id))
            .await
            .expect("the saga settles")
            .unwrap();
        assert_eq!(state.status, status);
        ids.push(id.as_str().to_owned());
    }
    let (completed, failed) = (ids[0].clone(), ids[1].clone());
    assert_eq!(*released.lock().unwrap(), vec!["2".to_owned()]);
    let addr = serve(&bus).await;

    // By status: each list holds its saga only, with its type, step and error.
    let listed = |page: &Reply| rows(&page.body, "<table>");
    let done = listed(&get(addr, "/admin/queues/sagas?status=completed").await);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        (&done[0][0], &done[0][1], &done[0][2]),
        (
            &completed,
            &"fulfilment".to_owned(),
            &"completed".to_owned()
        ),
        "{done:?}"
    );
    let gone = listed(&get(addr, "/admin/queues/sagas?status=failed").await);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (&gone[0][0], &gone[0][1], &gone[0][2], &gone[0][4]),
        (
            &failed,
            &"fulfilment".to_owned(),
            &"failed".to_owned(),
            &"charge".to_owned()
        ),
        "{gone:?}"
    );
    assert!(
        gone[0][5].contains("card declined by the issuer"),
        "{gone:?}"
    );
    for status in ["running", "compensating", "needs-attention"] {
        let none = listed(&get(addr, &format!("/admin/queues/sagas?status={status}")).await);
        assert_eq!(
            none,
            vec![vec![format!("No saga is {}.", status.replace('-', " "))]],
            "{status}"
        );
    }
    // Without a status, the running ones.
    let running = listed(&get(addr, "/admin/queues/sagas").await);
    assert_eq!(running, vec![vec!["No saga is running.".to_owned()]]);
    // Each listed saga links to its history.
    let page = get(addr, "/admin/queues/sagas?status=failed").await;
    assert!(
        common::links(&page.body, "/admin/queues/sagas/")
            .contains(&format!("/admin/queues/sagas/{failed}")),
        "{}",
        page.body
    );

    // The failed saga's history: its steps, the failure and the compensation, in order.
    let page = get(addr, &format!("/admin/queues/sagas/{failed}")).await;
    assert!(
        page.body
            .contains(&format!("Saga <code>{failed}</code>, 8 change(s).")),
        "{}",
        page.body
    );
    let rows_failed = history(&page);
    assert_eq!(
        rows_failed.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<u64>>()
    );
    assert_eq!(
        steps(&rows_failed),
        vec![
            ("started", None),
            ("step-requested", Some("reserve")),
            ("step-completed", Some("reserve")),
            ("step-requested", Some("charge")),
            ("step-failed", Some("charge")),
            ("compensating", Some("reserve")),
            ("compensated", Some("reserve")),
            ("failed", None),
        ]
    );
    assert_eq!(rows_failed[0].2["steps"], json!(["reserve", "charge"]));
    assert_eq!(
        rows_failed[0].2["input"],
        json!({"order": 2, "card": "declined"})
    );
    assert_eq!(rows_failed[2].2["output"], json!({"reservation": "r-2"}));
    assert!(
        rows_failed[4].2["error"]
            .as_str()
            .unwrap()
            .contains("card declined by the issuer"),
        "{:?}",
        rows_failed[4]
    );

    // The completed one: both steps, then its completion.
    let rows_done = history(&get(addr, &format!("/admin/queues/sagas/{completed}")).await);
    assert_eq!(
        steps(&rows_done),
        vec![
            ("started", None),
            ("step-requested", Some("reserve")),
            ("step-completed", Some("reserve")),
            ("step-requested", Some("charge")),
            ("step-completed", Some("charge")),
            ("completed", None),
        ]
    );
    assert_eq!(rows_done[4].2["output"], json!({"payment": "p-1"}));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The positions of a log page's rows and the operation each links to, as shown (newest
/// first).
fn log_rows(page: &Reply) -> (Vec<u64>, Vec<String>) {
    let positions = rows(&page.body, "<table>")
        .iter()
        .map(|r| r[0].parse().unwrap())
        .collect();
    let operations = common::links(&page.body, "/admin/queues/operations/")
        .iter()
        .map(|l| l["/admin/queues/operations/".len()..].to_owned())
        .collect();
    (positions, operations)
}

/// The text of the result of `verify`.
fn verify_result(page: &Reply) -> String {
    let at = page
        .body
        .find("id=\"verify-result\"")
        .unwrap_or_else(|| panic!("no result in\n{}", page.body));
    let rest = &page.body[at..];
    common::text(&rest[rest.find('>').unwrap() + 1..rest.find("</div>").unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_pages_by_position_and_verify_names_an_edited_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let bus = bus_builder(&db).build().await.unwrap();
    let mut ops = Vec::new();
    for n in 0..130u64 {
        ops.push(
            bus.publish(Event::new("tick", json!({ "n": n })))
                .await
                .unwrap()
                .to_string(),
        );
    }
    // Where each landed (the bus's own start is a commit too).
    let log = bus.read_log(0, 1000).await.unwrap();
    let position_of = |op: &str| {
        log.iter()
            .find(|c| c.operation_id.to_string() == op)
            .unwrap()
            .position
    };
    let first = position_of(&ops[0]);
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(
            position_of(op),
            first + i as u64,
            "one commit after another"
        );
    }
    let addr = serve(&bus).await;
    let head = bus.inspect().head().await.unwrap();
    assert_eq!(head, first + 129);

    // After a position: the next 50 commits, newest first, each linking to its operation.
    let after = first + 9;
    let page = get(addr, &format!("/admin/queues/log?after={after}")).await;
    let (positions, operations) = log_rows(&page);
    assert_eq!(
        positions,
        (after + 1..=after + 50).rev().collect::<Vec<_>>()
    );
    let expected: Vec<String> = ops[10..60].iter().rev().cloned().collect();
    assert_eq!(operations, expected);
    assert!(page
        .body
        .contains(&format!("positions {}–{} of {head}", after + 1, after + 50)));
    // Its "newer" link leads to the 50 after those; the last page ends at the head.
    let newer = format!("/admin/queues/log?after={}", after + 50);
    assert!(
        common::links(&page.body, "/admin/queues/log?after=").contains(&newer),
        "{}",
        page.body
    );
    let (positions, operations) = log_rows(&get(addr, &newer).await);
    assert_eq!(
        positions,
        (after + 51..=after + 100).rev().collect::<Vec<_>>()
    );
    assert_eq!(
        operations,
        ops[60..110].iter().rev().cloned().collect::<Vec<_>>()
    );
    let (positions, _) =
        log_rows(&get(addr, &format!("/admin/queues/log?after={}", after + 100)).await);
    assert_eq!(positions, (after + 101..=head).rev().collect::<Vec<_>>());
    // Without a position: the latest 50.
    let (positions, _) = log_rows(&get(addr, "/admin/queues/log").await);
    assert_eq!(positions, (head - 49..=head).rev().collect::<Vec<_>>());

    // An intact chain verifies.
    let result = verify_result(&get(addr, "/admin/queues/log/verify").await);
    assert!(
        result.starts_with(&format!("intact Every commit verified: {head} commits")),
        "{result}"
    );

    // A payload edited in the file: verify names the commit's position and links to it.
    let edited = position_of(&ops[40]);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(HANG).unwrap();
        let changed = conn
            .execute(
                "UPDATE messages SET payload = '{\"n\":999}' WHERE position = ?1",
                [i64::try_from(edited).unwrap()],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }
    let page = get(addr, "/admin/queues/log/verify").await;
    let result = verify_result(&page);
    assert_eq!(
        result,
        format!(
            "broken The chain breaks at position {edited}: its content does not match its data \
             hash (the commit was edited). {} commit(s) before it verified.",
            edited - 1
        )
    );
    let around = format!("/admin/queues/log?around={edited}");
    assert!(
        page.body
            .contains(&format!("<a href=\"{around}\">{edited}</a>")),
        "{}",
        page.body
    );
    let (positions, _) = log_rows(&get(addr, &around).await);
    assert!(positions.contains(&edited), "{positions:?}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
