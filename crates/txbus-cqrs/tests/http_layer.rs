//! The `Idempotency-Key` layer over real HTTP: an axum router served on loopback, a plain
//! HTTP/1.1 client, the keys on a SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{within, Request, TestBus};
use tokio::net::TcpListener;
use tokio::sync::Barrier;
use txbus_cqrs::http::IdempotencyLayer;
use txbus_cqrs::idempotency::{Idempotency, Options};

#[derive(Default)]
struct App {
    runs: AtomicU64,
    /// When set, each run meets the test at `entered`, then waits for it at `release`.
    gate: std::sync::Mutex<Option<(Arc<Barrier>, Arc<Barrier>)>>,
}

impl App {
    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn create(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let gate = app.gate.lock().unwrap().clone();
    if let Some((entered, release)) = gate {
        entered.wait().await;
        release.wait().await;
    }
    let echo = String::from_utf8_lossy(&body).into_owned();
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/orders/{n}")),
            (header::HeaderName::from_static("x-run"), n.to_string()),
        ],
        axum::Json(serde_json::json!({ "run": n, "echo": echo })),
    )
        .into_response()
}

async fn list(State(app): State<Arc<App>>) -> String {
    app.runs.fetch_add(1, Ordering::SeqCst);
    "list".to_owned()
}

/// 100 KiB in 1 KiB chunks, streamed (no content length).
async fn big(State(app): State<Arc<App>>) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    Body::new(Chunks(0)).into_response()
}

/// A body of 100 one-KiB frames, yielded one at a time.
struct Chunks(u8);

impl axum::body::HttpBody for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let i = self.0;
        if i == 100 {
            return std::task::Poll::Ready(None);
        }
        self.0 += 1;
        let chunk = Bytes::from(vec![b'a' + i % 26; 1024]);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

async fn flaky(State(app): State<Arc<App>>) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
    } else {
        (StatusCode::CREATED, format!("made on run {n}")).into_response()
    }
}

struct Server {
    addr: SocketAddr,
    app: Arc<App>,
    bus: TestBus,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(
        options: Options,
        layer: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
    ) -> Self {
        let bus = TestBus::new().await;
        let app = Arc::new(App::default());
        let keys = Idempotency::new(bus.bus.clone(), options);
        let router = Router::new()
            .route("/orders", post(create).get(list).put(create))
            .route("/big", post(big))
            .route("/flaky", post(flaky))
            .layer(layer(IdempotencyLayer::new(keys)))
            .with_state(app.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            app,
            bus,
            task,
        }
    }

    async fn stop(self) {
        self.task.abort();
        self.bus.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_runs_and_a_repeat_replays_its_response() {
    let s = Server::start(Options::default(), |l| l).await;
    let first = Request::new("POST", "/orders")
        .key("k-1")
        .body(b"{\"sku\":\"A\"}")
        .send(s.addr)
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.json()["run"], 1);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(s.app.runs(), 1);

    let again = Request::new("POST", "/orders")
        .key("k-1")
        .body(b"{\"sku\":\"A\"}")
        .send(s.addr)
        .await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.header("location"),
        Some("/orders/1"),
        "kept headers are replayed"
    );
    assert_eq!(again.header("content-type"), Some("application/json"));
    assert_eq!(
        again.header("x-run"),
        None,
        "headers not in the keep list are not stored"
    );
    assert_eq!(s.app.runs(), 1, "the handler did not run again");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_422() {
    let s = Server::start(Options::default(), |l| l).await;
    let first = Request::new("POST", "/orders")
        .key("k")
        .body(b"{\"sku\":\"A\"}")
        .send(s.addr)
        .await;
    assert_eq!(first.status, 201);
    let other = Request::new("POST", "/orders")
        .key("k")
        .body(b"{\"sku\":\"B\"}")
        .send(s.addr)
        .await;
    assert_eq!(other.status, 422, "{other:?}");
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
    assert_eq!(s.app.runs(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_while_the_first_still_runs_is_409() {
    let s = Server::start(Options::default(), |l| l).await;
    let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    *s.app.gate.lock().unwrap() = Some((entered.clone(), release.clone()));

    let addr = s.addr;
    let first = tokio::spawn(
        Request::new("POST", "/orders")
            .key("k")
            .body(b"{}")
            .send(addr),
    );
    within(entered.wait()).await; // the first request is inside its handler
    let repeat = Request::new("POST", "/orders")
        .key("k")
        .body(b"{}")
        .send(addr)
        .await;
    assert_eq!(repeat.status, 409, "{repeat:?}");
    assert_eq!(
        repeat.json()["error"]["code"],
        "idempotency_key_in_progress"
    );
    assert_eq!(repeat.header("retry-after"), Some("1"));
    *s.app.gate.lock().unwrap() = None;
    within(release.wait()).await;

    let first = within(first).await.unwrap();
    assert_eq!(first.status, 201);
    let after = Request::new("POST", "/orders")
        .key("k")
        .body(b"{}")
        .send(addr)
        .await;
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(after.body, first.body);
    assert_eq!(s.app.runs(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_ttl_the_request_runs_again() {
    let ttl = Duration::from_millis(400);
    let s = Server::start(Options::default().ttl(ttl), |l| l).await;
    let first = Request::new("POST", "/orders")
        .key("k")
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(first.json()["run"], 1);
    assert_eq!(
        Request::new("POST", "/orders")
            .key("k")
            .body(b"{}")
            .send(s.addr)
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    // The response was stored before it was sent, so it has expired once the TTL has passed
    // from here.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let later = Request::new("POST", "/orders")
        .key("k")
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(later.status, 201);
    assert_eq!(later.json()["run"], 2);
    assert_eq!(later.header("idempotent-replayed"), None);
    assert_eq!(s.app.runs(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_and_safe_methods_pass_through() {
    let s = Server::start(Options::default(), |l| l).await;
    for _ in 0..2 {
        let r = Request::new("POST", "/orders")
            .body(b"{}")
            .send(s.addr)
            .await;
        assert_eq!(r.status, 201);
        assert!(r.header("x-run").is_some());
    }
    for _ in 0..2 {
        let r = Request::new("GET", "/orders").key("k").send(s.addr).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(s.app.runs(), 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_key_is_enforced_and_bad_keys_or_bodies_are_refused() {
    let s = Server::start(Options::default(), |l| {
        l.required(true).max_request_bytes(64)
    })
    .await;
    let missing = Request::new("POST", "/orders")
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(missing.status, 400, "{missing:?}");
    assert_eq!(missing.json()["error"]["code"], "idempotency_key_missing");
    let too_long = Request::new("POST", "/orders")
        .key(&"x".repeat(300))
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(too_long.status, 400, "{too_long:?}");
    assert_eq!(too_long.json()["error"]["code"], "idempotency_key_invalid");
    let big = vec![b'x'; 65];
    let too_big = Request::new("POST", "/orders")
        .key("k")
        .body(&big)
        .send(s.addr)
        .await;
    assert_eq!(too_big.status, 413, "{too_big:?}");
    assert_eq!(s.app.runs(), 0);
    let ok = Request::new("POST", "/orders")
        .key("k")
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(ok.status, 201);
    assert_eq!(s.app.runs(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_above_the_limit_reaches_the_client_whole_and_is_not_stored() {
    let s = Server::start(Options::default().max_response_bytes(4096), |l| l).await;
    let expected: Vec<u8> = (0..100u8).flat_map(|i| vec![b'a' + i % 26; 1024]).collect();
    for run in 1..=2 {
        let r = Request::new("POST", "/big").key("k").send(s.addr).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), expected.len());
        assert!(r.body == expected, "the body arrives intact");
        assert_eq!(r.header("idempotent-replayed"), None);
        assert_eq!(s.app.runs(), run, "not stored: the repeat runs again");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_releases_the_key_so_a_retry_runs() {
    let s = Server::start(Options::default(), |l| l).await;
    let failed = Request::new("POST", "/flaky").key("k").send(s.addr).await;
    assert_eq!(failed.status, 503);
    let retried = Request::new("POST", "/flaky").key("k").send(s.addr).await;
    assert_eq!(retried.status, 201);
    assert_eq!(retried.text(), "made on run 2");
    let replay = Request::new("POST", "/flaky").key("k").send(s.addr).await;
    assert_eq!(replay.text(), "made on run 2");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.app.runs(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_covered_methods_are_configurable() {
    let s = Server::start(Options::default(), |l| l.methods([axum::http::Method::PUT])).await;
    let first = Request::new("PUT", "/orders")
        .key("k")
        .body(b"{}")
        .send(s.addr)
        .await;
    let again = Request::new("PUT", "/orders")
        .key("k")
        .body(b"{}")
        .send(s.addr)
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    // POST is no longer covered: it runs every time.
    for _ in 0..2 {
        let r = Request::new("POST", "/orders")
            .key("k2")
            .body(b"{}")
            .send(s.addr)
            .await;
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(s.app.runs(), 3);
    s.stop().await;
}
