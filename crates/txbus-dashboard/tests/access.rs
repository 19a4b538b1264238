//! Access control, CSRF and bad input, over real HTTP against the example service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{basic, csrf_of, http, start, OPERATOR_PASSWORD, VIEWER_PASSWORD};
use txbus_core::store::DeadLetterQuery;
use txbus_dashboard::{Dashboard, Error, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_refuses_requests_without_valid_credentials() {
    let s = start().await;
    for path in [
        "/admin/queues",
        "/admin/queues/operations",
        "/admin/queues/dead-letters",
        "/admin/queues/live/overview",
        "/admin/queues/assets/app.js",
        "/admin/queues/nope",
    ] {
        let r = http(s.addr, "GET", path, &[], b"").await;
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert!(
            r.headers.contains("www-authenticate: Basic"),
            "{}",
            r.headers
        );
        let wrong = basic("operator", "not the password");
        let r = http(s.addr, "GET", path, &[("Authorization", &wrong)], b"").await;
        assert_eq!(r.status, 401, "{path} with a wrong password");
        let unknown = basic("mallory", OPERATOR_PASSWORD);
        let r = http(s.addr, "GET", path, &[("Authorization", &unknown)], b"").await;
        assert_eq!(r.status, 401, "{path} with an unknown user");
    }
    // A POST without credentials changes nothing either.
    let dead = s
        .demo
        .bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let body = format!("id={}", dead[0].delivery_id);
    let r = http(
        s.addr,
        "POST",
        "/admin/queues/dead-letters/replay",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    let after = s
        .demo
        .bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.len(), dead.len());
    s.demo.bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_operator_role_and_a_token_from_the_dashboard() {
    let s = start().await;
    let viewer = basic("viewer", VIEWER_PASSWORD);
    let operator = basic("operator", OPERATOR_PASSWORD);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let dead = s
        .demo
        .bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!dead.is_empty());
    let id = dead[0].delivery_id;

    // The viewer reads, sees no action buttons, and is refused with its own valid token.
    let page = http(
        s.addr,
        "GET",
        "/admin/queues/dead-letters",
        &[("Authorization", &viewer)],
        b"",
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(
        !page.body.contains("replay-selected"),
        "a viewer sees no replay button"
    );
    let token = csrf_of(&page.body);
    let body = format!("csrf={token}&id={id}");
    let r = http(
        s.addr,
        "POST",
        "/admin/queues/dead-letters/replay",
        &[("Authorization", &viewer), form],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("operator role"), "{}", r.body);

    // The operator: without a token, with another user's token, or from another site: refused.
    let page = http(
        s.addr,
        "GET",
        "/admin/queues/dead-letters",
        &[("Authorization", &operator)],
        b"",
    )
    .await;
    assert!(page.body.contains("replay-selected"));
    let token = csrf_of(&page.body);
    for (body, extra) in [
        (format!("id={id}"), None),
        (
            format!(
                "csrf={}&id={id}",
                csrf_of(
                    &http(
                        s.addr,
                        "GET",
                        "/admin/queues/dead-letters",
                        &[("Authorization", &viewer)],
                        b""
                    )
                    .await
                    .body
                )
            ),
            None,
        ),
        (
            format!("csrf={token}&id={id}"),
            Some(("Sec-Fetch-Site", "cross-site")),
        ),
        (
            format!("csrf={token}&id={id}"),
            Some(("Origin", "http://evil.example")),
        ),
    ] {
        let mut headers = vec![("Authorization", operator.as_str()), form];
        headers.extend(extra);
        let r = http(
            s.addr,
            "POST",
            "/admin/queues/dead-letters/replay",
            &headers,
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 403, "{body} {extra:?}: {}", r.body);
    }
    let still = s
        .demo
        .bus
        .dead_letters(DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(still.len(), dead.len(), "nothing was replayed");
    let audit = txbus_dashboard::recent_audit(&s.demo.bus, 10)
        .await
        .unwrap();
    assert!(
        audit.is_empty(),
        "refused requests are no actions: {audit:?}"
    );

    // With everything right, the discard is applied and audited.
    let body = format!("csrf={token}&id={id}");
    let r = http(
        s.addr,
        "POST",
        "/admin/queues/dead-letters/discard",
        &[
            ("Authorization", &operator),
            form,
            ("Origin", &format!("http://{}", s.addr)),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let audit = txbus_dashboard::recent_audit(&s.demo.bus, 10)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].user.as_str(), audit[0].action.as_str()),
        ("operator", "discard")
    );
    assert_eq!(audit[0].applied, vec![id]);
    let page = http(
        s.addr,
        "GET",
        "/admin/queues/audit",
        &[("Authorization", &viewer)],
        b"",
    )
    .await;
    assert!(
        page.body.contains("discard") && page.body.contains("operator"),
        "the trail is readable"
    );
    s.demo.bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_with_a_client_error_naming_it() {
    let s = start().await;
    let operator = basic("operator", OPERATOR_PASSWORD);
    let auth = ("Authorization", operator.as_str());
    for (path, status, says) in [
        (
            "/admin/queues/operations/not-a-uuid",
            400,
            "is not an operation id",
        ),
        (
            "/admin/queues/operations/01a200b8-fcf8-7760-a1d8-ad67d6ae4f43",
            404,
            "no operation",
        ),
        (
            "/admin/queues/operations?status=sleeping",
            400,
            "unknown status",
        ),
        (
            "/admin/queues/operations?since=-5",
            400,
            "not a number of minutes",
        ),
        ("/admin/queues/dead-letters/abc", 400, "not a delivery id"),
        ("/admin/queues/dead-letters/999999", 404, "no dead letter"),
        (
            "/admin/queues/sagas?status=bored",
            400,
            "unknown saga status",
        ),
        ("/admin/queues/sagas/no-such-saga", 404, ""),
        ("/admin/queues/log?after=abc", 400, ""),
    ] {
        let r = http(s.addr, "GET", path, &[auth], b"").await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(says), "{path}: {}", r.body);
    }
    let page = http(s.addr, "GET", "/admin/queues/dead-letters", &[auth], b"").await;
    let token = csrf_of(&page.body);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    for body in [format!("csrf={token}&id=12x"), format!("csrf={token}")] {
        let r = http(
            s.addr,
            "POST",
            "/admin/queues/dead-letters/replay",
            &[auth, form],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    // Projections and relays: checkpoint, lag and the last error their runner recorded.
    let bus = &s.demo.bus;
    bus.kv_write(vec![txbus_core::KvWrite::put(
        "relay/to-nats/checkpoint",
        b"3".to_vec(),
    )])
    .await
    .unwrap();
    txbus_core::inspect::record_runner_error(
        bus,
        "relay",
        "to-nats",
        Some("nats: connection reset"),
    )
    .await
    .unwrap();
    let page = http(s.addr, "GET", "/admin/queues/subscriptions", &[auth], b"").await;
    assert!(
        page.body.contains("to-nats") && page.body.contains("nats: connection reset"),
        "{}",
        page.body
    );
    let head = bus.inspect().head().await.unwrap();
    assert!(
        page.body
            .contains(&format!("<strong>{}</strong>", head - 3)),
        "the lag is shown: {}",
        page.body
    );

    let huge = format!("csrf={token}&{}", "id=1&".repeat(20_000));
    let r = http(
        s.addr,
        "POST",
        "/admin/queues/dead-letters/replay",
        &[auth, form],
        huge.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413, "a body past the limit");
    s.demo.bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_without_credentials_or_with_a_weak_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = txbus_core::Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(dir.path().join("d.db")).unwrap())
        .build()
        .await
        .unwrap();
    assert!(matches!(
        Dashboard::builder(bus.clone()).build(),
        Err(Error::NoCredentials)
    ));
    assert!(matches!(
        Dashboard::builder(bus.clone())
            .user("ada", "short", Role::Operator)
            .build(),
        Err(Error::WeakSecret { .. })
    ));
    assert!(matches!(
        Dashboard::builder(bus.clone())
            .user("a:b", "long enough secret", Role::Viewer)
            .build(),
        Err(Error::BadName(_))
    ));
    assert!(Dashboard::builder(bus.clone())
        .token("ci", "a long bearer token", Role::Viewer)
        .build()
        .is_ok());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_reads_but_a_viewer_token_cannot_act() {
    let dir = tempfile::tempdir().unwrap();
    let bus = txbus_core::Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(dir.path().join("d.db")).unwrap())
        .build()
        .await
        .unwrap();
    let dashboard = Dashboard::builder(bus.clone())
        .token("monitoring", "monitoring-token-123", Role::Viewer)
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = dashboard.mount(axum::Router::new(), "/ops");
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = http(addr, "GET", "/ops/", &[], b"").await;
    assert_eq!(r.status, 308, "a trailing slash is sent on");
    let r = http(
        addr,
        "GET",
        "/ops",
        &[("Authorization", "Bearer monitoring-token-123")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("href=\"/ops/dead-letters\""),
        "links follow the mount point"
    );
    let r = http(
        addr,
        "GET",
        "/ops",
        &[("Authorization", "Bearer wrong-token-123")],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
