//! The `register` example, served by its own process, under hostile clients: malformed JSON,
//! a 50 MiB body, wrong content types, garbage ids, slow clients and 500 concurrent
//! requests. Each gets a 4xx (or its normal answer), the process stays up, and its resident
//! memory stays bounded (read from /proc).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod hostile;

use std::time::Duration;

use hostile::{json, send, slow_clients, Served};

/// Peak resident memory the service may reach in this test, whatever the clients send.
const MAX_RSS_MIB: f64 = 256.0;

async fn register() -> Served {
    Served::start(
        "txbus",
        "register",
        "TXBUS_DATA_DIR",
        "data",
        &[("WAIT_MS", "2000")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_and_the_process_stays_up_with_bounded_memory() {
    let mut s = register().await;
    let a = s.addr;
    let ok = json(a, "POST", "/users", r#"{"email":"first@example.com"}"#).await;
    assert_eq!(ok.status, 200, "{ok:?}");

    for body in [
        "{",
        "null",
        "[]",
        r#"{"email":1}"#,
        "\u{0}\u{1}",
        r#"{"email":"no-at"}"#,
    ] {
        let r = json(a, "POST", "/users", body).await;
        assert_eq!(r.status, 400, "{body:?}: {r:?}");
    }
    // Deep JSON: refused by the parser's depth limit, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(8_000), "]".repeat(8_000));
    assert_eq!(json(a, "POST", "/users", &deep).await.status, 400);
    // Wrong or missing content type.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
    ] {
        let r = send(
            a,
            "POST",
            "/users",
            &[("Content-Type", ct)],
            br#"{"email":"c@example.com"}"#,
        )
        .await;
        assert_eq!(r.status, 415, "{ct}: {r:?}");
    }
    let r = send(a, "POST", "/users", &[], br#"{"email":"c@example.com"}"#).await;
    assert_eq!(r.status, 415, "no content type: {r:?}");
    // A 50 MiB body: refused at the body limit, without reading it all into memory.
    let big = vec![b'a'; 50 * 1024 * 1024];
    for _ in 0..4 {
        let r = send(
            a,
            "POST",
            "/users",
            &[("Content-Type", "application/json")],
            &big,
        )
        .await;
        assert_eq!(r.status, 413, "{}", r.body);
    }
    drop(big);
    // Garbage ids and paths.
    for path in [
        "/users/not-an-id",
        "/users/%00%ff",
        "/operations/not-a-uuid",
        "/operations/00000000-0000-0000-0000-000000000000",
        "/operations/00000000-0000-0000-0000-000000000000/events",
        "/operations/%2e%2e%2f%2e%2e",
        "/nothing/here",
    ] {
        let r = send(a, "GET", path, &[], b"").await;
        assert!((400..500).contains(&r.status), "{path}: {r:?}");
    }
    let long = format!("/operations/{}", "9".repeat(60_000));
    let r = send(a, "GET", &long, &[], b"").await;
    assert!((400..500).contains(&r.status), "a 60 kB path: {}", r.status);
    let r = hostile::raw(a, b"GARBAGE\r\n\r\n").await;
    assert!(r.status == 0 || (400..500).contains(&r.status), "{r:?}");

    // Slow clients hold connections open; the service keeps answering everyone else.
    let slow = tokio::spawn(slow_clients(
        a,
        200,
        Duration::from_millis(100),
        Duration::from_secs(3),
    ));
    for i in 0..20 {
        let r = json(
            a,
            "POST",
            "/users",
            &format!(r#"{{"email":"during-slow-{i}@example.com"}}"#),
        )
        .await;
        assert!(r.status == 200 || r.status == 202, "{r:?}");
    }
    slow.await.unwrap();

    // 500 concurrent registrations: each answered, none lost.
    let mut tasks = Vec::new();
    for i in 0..500 {
        tasks.push(tokio::spawn(async move {
            json(
                a,
                "POST",
                "/users",
                &format!(r#"{{"email":"many-{i}@example.com"}}"#),
            )
            .await
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().status).or_insert(0) += 1;
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 202),
        "500 concurrent registrations: {statuses:?}"
    );

    assert!(s.alive(), "the service died");
    let (rss, peak) = s.rss_mib();
    println!("register under hostile clients: resident {rss:.1} MiB, peak {peak:.1} MiB");
    assert!(peak < MAX_RSS_MIB, "peak resident memory {peak:.1} MiB");
    let r = json(a, "POST", "/users", r#"{"email":"last@example.com"}"#).await;
    assert!(r.status == 200 || r.status == 202, "{r:?}");
}
