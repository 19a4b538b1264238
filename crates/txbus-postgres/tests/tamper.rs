//! Rows edited by hand in the PostgreSQL store: `bus.verify()` names the commit, the bus keeps
//! running, and a pending message whose payload no longer parses is dead-lettered rather
//! than run or left stuck. The SQL that edits the store is all in [`tamper`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{options, TestSchema};
use serde_json::json;
use txbus_core::chain::Broken;
use txbus_core::{Bus, Event, Message, MessageId, On};

/// Hand edits of a store's rows, in one place, keyed by message id.
mod tamper {
    use txbus_core::MessageId;

    async fn edit(sql: String, id: MessageId) {
        let mut conn = super::common::raw().await;
        let done = sqlx::query(&sql)
            .bind(id.to_string())
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
        sqlx::Connection::close(conn).await.unwrap();
    }

    fn quoted(text: &str) -> String {
        format!("'{}'", text.replace('\'', "''"))
    }

    pub async fn set_payload(schema: &str, id: MessageId, text: &str) {
        let sql = format!(
            "UPDATE \"{schema}\".messages SET payload = {} WHERE id = $1::uuid",
            quoted(text)
        );
        edit(sql, id).await;
    }

    pub async fn set_headers(schema: &str, id: MessageId, text: &str) {
        let sql = format!(
            "UPDATE \"{schema}\".messages SET headers = {} WHERE id = $1::uuid",
            quoted(text)
        );
        edit(sql, id).await;
    }

    pub async fn set_event_type(schema: &str, id: MessageId, text: &str) {
        let sql = format!(
            "UPDATE \"{schema}\".messages SET event_type = {} WHERE id = $1::uuid",
            quoted(text)
        );
        edit(sql, id).await;
    }

    pub async fn delete_message(schema: &str, id: MessageId) {
        edit(
            format!("DELETE FROM \"{schema}\".messages WHERE id = $1::uuid"),
            id,
        )
        .await;
    }
}

/// The position of the commit holding message `id`, once sealed.
async fn position(bus: &Bus, id: MessageId) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut after = 0;
        loop {
            let page = bus.read_log(after, 1000).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.position;
            if let Some(c) = page.iter().find(|c| c.messages.iter().any(|m| m.id == id)) {
                return c.position;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message {id} was not sealed in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_edited_by_hand_are_named_by_verify() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let bus = Bus::builder()
        .store(options(&s).connect().await.unwrap())
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..12 {
        let events = [
            Event::new("t.e", json!({ "i": i })).correlation_id(format!("c-{i}")),
            Event::new("t.other", json!({ "i": i, "second": true })),
        ];
        ids.push((events[0].id(), events[1].id()));
        let op = bus.transact(events).await.unwrap();
        assert!(op.outcome().await.unwrap().is_ok());
    }
    let before = bus.verify().await.unwrap();
    assert!(before.is_intact(), "{before:?}");

    // Each edit is earlier in the log than the one before, so verify names each in turn.
    let edits: Vec<(usize, &str)> = vec![
        (10, "payload, other JSON"),
        (8, "payload, not JSON"),
        (6, "headers"),
        (4, "event type"),
        (2, "a message removed"),
    ];
    for (i, what) in edits {
        let (first, second) = ids[i];
        let at = position(&bus, first).await;
        match what {
            "payload, other JSON" => tamper::set_payload(&s, first, r#"{"i":999}"#).await,
            "payload, not JSON" => tamper::set_payload(&s, first, "{not json").await,
            "headers" => tamper::set_headers(&s, first, r#"{"correlation_id":"forged"}"#).await,
            "event type" => tamper::set_event_type(&s, first, "t.forged").await,
            _ => tamper::delete_message(&s, second).await,
        }
        let report = bus.verify().await.unwrap();
        assert_eq!(
            report.first_broken,
            Some((at, Broken::DataMismatch)),
            "{what}: {report:?}"
        );
        assert_eq!(report.verified, at - 1, "{what}");
    }
    // The bus still works on the damaged log.
    let op = bus.transact([Event::new("t.e", json!({}))]).await.unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_message_edited_into_garbage_is_dead_lettered_not_run() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let paused = Bus::builder()
        .store(options(&s).connect().await.unwrap())
        .start_paused(true)
        .handler("h", On::event("t.e"), |_m: Message| async { Ok(()) })
        .build()
        .await
        .unwrap();
    let event = Event::new("t.e", json!({"fine": true}));
    let id = event.id();
    let op = paused.transact([event]).await.unwrap();
    let op_id = op.id();
    paused.shutdown(Duration::from_secs(5)).await.unwrap();
    tamper::set_payload(&s, id, "{garbage").await;

    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    let bus = Bus::builder()
        .store(options(&s).connect().await.unwrap())
        .poll_interval(Duration::from_millis(50))
        .handler("h", On::event("t.e"), move |_m: Message| {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok(()) }
        })
        .build()
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), bus.wait(op_id))
        .await
        .expect("the operation must finish, not stay stuck")
        .unwrap();
    assert!(outcome.error.is_some(), "{outcome:?}");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
