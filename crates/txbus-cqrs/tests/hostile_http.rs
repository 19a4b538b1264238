//! The `orders` example (axum behind the idempotency layer), served by its own process, under
//! hostile clients: malformed JSON, a 50 MiB body (with and without an idempotency key), wrong
//! content types, garbage ids and keys, slow clients and 500 concurrent requests. Each gets a
//! 4xx (or its normal answer), the process stays up, and its resident memory stays bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../../txbus/tests/hostile/mod.rs"]
mod hostile;

use std::time::Duration;

use hostile::{json, send, slow_clients, Served};

/// Peak resident memory the service may reach in this test, whatever the clients send.
const MAX_RSS_MIB: f64 = 256.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_and_the_process_stays_up_with_bounded_memory() {
    let mut s = Served::start("txbus-cqrs", "orders", "ORDERS_DB", "orders.db", &[]).await;
    let a = s.addr;
    let ok = json(a, "POST", "/orders", r#"{"customer":"ada"}"#).await;
    assert!((200..300).contains(&ok.status), "{ok:?}");

    let ct = ("Content-Type", "application/json");
    for body in ["{", "null", "[]", r#"{"customer":1}"#, "\u{0}"] {
        for key in [None, Some("k-malformed")] {
            let mut headers = vec![ct];
            if let Some(k) = key {
                headers.push(("Idempotency-Key", k));
            }
            let r = send(a, "POST", "/orders", &headers, body.as_bytes()).await;
            assert!((400..500).contains(&r.status), "{body:?} {key:?}: {r:?}");
        }
    }
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let r = json(a, "POST", "/orders", &deep).await;
    assert!((400..500).contains(&r.status), "deep JSON: {r:?}");
    for ct in ["text/plain", "application/xml"] {
        let r = send(
            a,
            "POST",
            "/orders",
            &[("Content-Type", ct)],
            br#"{"customer":"x"}"#,
        )
        .await;
        assert_eq!(r.status, 415, "{ct}: {r:?}");
    }
    let big = vec![b'a'; 50 * 1024 * 1024];
    for key in [None, Some("k-big")] {
        let mut headers = vec![ct];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        let r = send(a, "POST", "/orders", &headers, &big).await;
        assert_eq!(r.status, 413, "{key:?}: {}", r.body);
    }
    drop(big);
    // Garbage keys: not printable ASCII, too long.
    let long_key = "k".repeat(300);
    for key in ["\u{7f}bad", long_key.as_str(), " "] {
        let r = send(
            a,
            "POST",
            "/orders",
            &[ct, ("Idempotency-Key", key)],
            br#"{"customer":"x"}"#,
        )
        .await;
        assert_eq!(r.status, 400, "key {key:?}: {r:?}");
    }
    for path in [
        "/orders/not-an-id",
        "/orders/%00%ff",
        "/orders/..%2f..%2f",
        "/nothing",
    ] {
        let r = send(a, "GET", path, &[], b"").await;
        assert!((400..500).contains(&r.status), "{path}: {r:?}");
    }
    let r = json(
        a,
        "POST",
        "/orders/not-an-id/items",
        r#"{"sku":"A","quantity":1}"#,
    )
    .await;
    assert!((400..500).contains(&r.status), "{r:?}");

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
            "/orders",
            &format!(r#"{{"customer":"slow-{i}"}}"#),
        )
        .await;
        assert!((200..300).contains(&r.status), "{r:?}");
    }
    slow.await.unwrap();

    let mut tasks = Vec::new();
    for i in 0..500 {
        tasks.push(tokio::spawn(async move {
            let key = format!("k-many-{}", i % 250);
            send(
                a,
                "POST",
                "/orders",
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", &key),
                ],
                format!(r#"{{"customer":"many-{}"}}"#, i % 250).as_bytes(),
            )
            .await
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().status).or_insert(0) += 1;
    }
    // Two requests per key: each runs once; a repeat is replayed, or told the first still runs.
    assert!(
        statuses.keys().all(|s| (200..300).contains(s) || *s == 409),
        "500 concurrent requests: {statuses:?}"
    );

    assert!(s.alive(), "the service died");
    let (rss, peak) = s.rss_mib();
    println!("orders under hostile clients: resident {rss:.1} MiB, peak {peak:.1} MiB");
    assert!(peak < MAX_RSS_MIB, "peak resident memory {peak:.1} MiB");
    let r = json(a, "POST", "/orders", r#"{"customer":"last"}"#).await;
    assert!((200..300).contains(&r.status), "{r:?}");
}
