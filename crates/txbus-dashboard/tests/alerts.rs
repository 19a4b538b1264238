//! Alerts: dead letters, lag and pending age raise one `txbus.alert` event each, once until
//! the condition clears, and a handler receives it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use txbus_core::store::{DeadLetterQuery, NewDelivery};
use txbus_core::{Bus, Commit, Event, KvWrite, Message, On};
use txbus_dashboard::{Alert, AlertCondition, Alerts, CheckReport, ALERT_EVENT};

const HANG: Duration = Duration::from_secs(60);

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    tokio::time::timeout(HANG, async {
        loop {
            if let Some(v) = f() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_raise_one_alert_each_until_they_clear() {
    let dir = tempfile::tempdir().unwrap();
    let received: Arc<Mutex<Vec<Alert>>> = Arc::default();
    let r = Arc::clone(&received);
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(dir.path().join("a.db")).unwrap())
        .max_retries(0)
        .handler("fragile", On::event("job"), |_m: Message| async {
            Err(std::io::Error::other("down").into())
        })
        .handler("pager", On::event(ALERT_EVENT), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                r.lock()
                    .unwrap()
                    .push(serde_json::from_value(m.payload().clone()).unwrap());
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let alerts = Alerts::builder(bus.clone())
        .on_dead_letters()
        .on_lag_above(3)
        .on_pending_older_than(Duration::from_millis(1))
        .build();
    assert_eq!(
        alerts.check().await.unwrap(),
        Default::default(),
        "nothing holds yet"
    );

    // Two dead letters of one handler: one alert.
    for n in 0..2 {
        let id = bus
            .publish(Event::new("job", json!({"n": n})))
            .await
            .unwrap();
        bus.wait(id).await.unwrap();
    }
    // A relay five commits behind the log.
    bus.kv_write(vec![KvWrite::put(
        "relay/to-nats/checkpoint",
        b"0".to_vec(),
    )])
    .await
    .unwrap();
    for n in 0..5 {
        bus.publish(Event::new("noise", json!({"n": n})))
            .await
            .unwrap();
    }
    // A delivery waiting for a handler no running bus has.
    let mut waiting = bus
        .prepare(Commit::new().event(Event::new("far.away", json!({}))))
        .unwrap();
    waiting.deliveries.push(NewDelivery {
        message_index: 0,
        handler: Arc::from("elsewhere"),
        leased: false,
    });
    bus.store().append(waiting).await.unwrap();

    tokio::time::timeout(HANG, async {
        loop {
            let counts = bus.inspect().handler_counts().await.unwrap();
            let now = txbus_core::time::now_ms();
            if counts
                .iter()
                .any(|h| h.handler == "elsewhere" && h.oldest_pending_age_ms(now) > 1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the pending delivery gets older than its threshold");
    let report = alerts.check().await.unwrap();
    let mut raised: Vec<String> = report.raised.iter().map(AlertCondition::key).collect();
    raised.sort();
    assert_eq!(
        raised,
        vec![
            "dead-letters/fragile".to_owned(),
            "lag/relay/to-nats".to_owned(),
            "pending-too-long/elsewhere".to_owned()
        ]
    );
    let got = until("the pager receives three alerts", || {
        let v = received.lock().unwrap().clone();
        (v.len() >= 3).then_some(v)
    })
    .await;
    let dead = got
        .iter()
        .find(|a| {
            a.condition
                == AlertCondition::DeadLetters {
                    handler: "fragile".into(),
                }
        })
        .unwrap();
    assert_eq!((dead.state.as_str(), dead.value), ("raised", 2));
    let lag = got
        .iter()
        .find(|a| matches!(&a.condition, AlertCondition::Lag { name, .. } if name == "to-nats"))
        .unwrap();
    assert_eq!(lag.threshold, 3);
    assert!(lag.value > 3, "{lag:?}");

    // Checked again, and by a second checker (another process would be the same): no storm.
    let again = alerts.check().await.unwrap();
    assert!(
        again.raised.is_empty() && again.cleared.is_empty(),
        "{again:?}"
    );
    // One that watches fewer conditions leaves the others' alerts alone.
    let other = Alerts::builder(bus.clone())
        .on_dead_letters()
        .on_lag_above(3)
        .build();
    assert_eq!(other.check().await.unwrap(), Default::default());

    // The dead letters go, the relay catches up: each condition clears once.
    let ids: Vec<i64> = bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|d| d.delivery_id)
        .collect();
    bus.inspect().discard(&ids).await.unwrap();
    let head = bus.inspect().head().await.unwrap();
    bus.kv_write(vec![KvWrite::put(
        "relay/to-nats/checkpoint",
        head.to_string().into_bytes(),
    )])
    .await
    .unwrap();
    let report = alerts.check().await.unwrap();
    let mut cleared: Vec<String> = report.cleared.iter().map(AlertCondition::key).collect();
    cleared.sort();
    assert_eq!(
        cleared,
        vec![
            "dead-letters/fragile".to_owned(),
            "lag/relay/to-nats".to_owned()
        ]
    );
    let got = until("the pager receives the two clears", || {
        let v = received.lock().unwrap().clone();
        (v.len() >= 5).then_some(v)
    })
    .await;
    assert_eq!(got.iter().filter(|a| a.state == "cleared").count(), 2);
    assert!(alerts.check().await.unwrap().cleared.is_empty());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_too_long_alert_clears_once_the_delivery_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let pager = |received: Arc<Mutex<Vec<Alert>>>| {
        move |m: Message| {
            let r = Arc::clone(&received);
            async move {
                r.lock()
                    .unwrap()
                    .push(serde_json::from_value(m.payload().clone()).unwrap());
                Ok(())
            }
        }
    };
    let pending = AlertCondition::PendingTooLong {
        handler: "elsewhere".into(),
    };

    // A bus without the handler `elsewhere`: its delivery waits.
    let first: Arc<Mutex<Vec<Alert>>> = Arc::default();
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(&db).unwrap())
        .handler("pager", On::event(ALERT_EVENT), pager(Arc::clone(&first)))
        .build()
        .await
        .unwrap();
    let mut waiting = bus
        .prepare(Commit::new().event(Event::new("far.away", json!({"n": 1}))))
        .unwrap();
    waiting.deliveries.push(NewDelivery {
        message_index: 0,
        handler: Arc::from("elsewhere"),
        leased: false,
    });
    bus.store().append(waiting).await.unwrap();
    let alerts = Alerts::builder(bus.clone())
        .on_pending_older_than(Duration::from_millis(1))
        .build();
    let b = bus.clone();
    tokio::time::timeout(HANG, async {
        loop {
            let counts = b.inspect().handler_counts().await.unwrap();
            let now = txbus_core::time::now_ms();
            if counts
                .iter()
                .any(|h| h.handler == "elsewhere" && h.oldest_pending_age_ms(now) > 1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the pending delivery gets older than its threshold");
    let report = alerts.check().await.unwrap();
    assert_eq!(report.raised, vec![pending.clone()]);
    let raised = until("the pager receives the alert", || {
        first.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        (&raised.condition, raised.state.as_str()),
        (&pending, "raised")
    );
    // While it still waits, the alert holds.
    assert_eq!(alerts.check().await.unwrap(), Default::default());
    drop(alerts);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(bus);

    // The service comes back with the handler: the delivery runs, and the alert clears.
    let ran: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let r = Arc::clone(&ran);
    let second: Arc<Mutex<Vec<Alert>>> = Arc::default();
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(&db).unwrap())
        .handler("elsewhere", On::event("far.away"), move |m: Message| {
            let r = Arc::clone(&r);
            async move {
                r.lock().unwrap().push(m.payload().clone());
                Ok(())
            }
        })
        .handler("pager", On::event(ALERT_EVENT), pager(Arc::clone(&second)))
        .build()
        .await
        .unwrap();
    let alerts = Alerts::builder(bus.clone())
        .on_pending_older_than(Duration::from_millis(1))
        .build();
    let b = bus.clone();
    let done = tokio::time::timeout(HANG, async {
        loop {
            let counts = b.inspect().handler_counts().await.unwrap();
            if let Some(h) = counts.into_iter().find(|h| h.handler == "elsewhere") {
                if h.succeeded == 1 && h.pending == 0 && h.leased == 0 {
                    return h;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the waiting delivery runs");
    assert_eq!(done.oldest_pending_due_ms, None);
    assert_eq!(*ran.lock().unwrap(), vec![json!({"n": 1})]);
    let report = alerts.check().await.unwrap();
    assert_eq!(
        report,
        CheckReport {
            raised: vec![],
            cleared: vec![pending.clone()],
        }
    );
    let cleared = until("the pager receives the clear", || {
        second.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        (&cleared.condition, cleared.state.as_str()),
        (&pending, "cleared")
    );
    assert_eq!(alerts.check().await.unwrap(), Default::default());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
