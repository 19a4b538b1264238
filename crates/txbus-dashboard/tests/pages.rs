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
use txbus_core::{Backoff, Bus, BusBuilder, Event, Message, On, OperationId};
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
