//! The `register` example over real HTTP: registration, a duplicate e-mail rejected by the
//! handler, bad input, the 202 path followed over server-sent events, and operation lookups.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/register/app.rs"]
mod app;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bound on how long a step may take before the test is declared hung; never a measurement.
const HANG: Duration = Duration::from_secs(30);

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

/// The example app served on an ephemeral port, with its data in a temporary directory.
struct Server {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    bus: txbus::Bus,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(wait: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (router, bus) = app::build(dir.path(), wait).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            dir,
            bus,
            task,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        within(request(self.addr, "GET", path, None)).await
    }

    async fn post(&self, path: &str, body: &str) -> Reply {
        within(request(self.addr, "POST", path, Some(body))).await
    }

    async fn stop(self) {
        self.task.abort();
        within(self.bus.shutdown(Duration::from_secs(5)))
            .await
            .unwrap();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client: one request per connection, read to EOF.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();

    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut reply = Reply {
        status: status.parse().unwrap(),
        headers,
        body: body.to_owned(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        reply.body = dechunk(body);
    }
    reply
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap();
    }
}

fn register_body(email: &str) -> String {
    json!({ "email": email }).to_string()
}

/// Polls `GET /operations/{id}` until it reports `finished`.
async fn finished_state(server: &Server, operation_id: &str) -> Value {
    within(async {
        loop {
            let reply = server.get(&format!("/operations/{operation_id}")).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            let state = reply.json();
            if state["status"] == "finished" {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_a_user_and_rejects_a_duplicate_email() {
    let server = Server::start(Duration::from_secs(20)).await;

    // 1. A new e-mail: both handlers succeed within the wait.
    let reply = server
        .post("/users", &register_body("ada@example.com"))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let created = reply.json();
    let user_id = created["user_id"].as_str().unwrap();
    let operation_id = created["operation_id"].as_str().unwrap();

    let user = server.get(&format!("/users/{user_id}")).await;
    assert_eq!(user.status, 200, "{user:?}");
    assert_eq!(
        user.json(),
        json!({ "id": user_id, "email": "ada@example.com" })
    );

    let state = server.get(&format!("/operations/{operation_id}")).await;
    assert_eq!(state.status, 200, "{state:?}");
    let state = state.json();
    assert_eq!(state["status"], "finished", "{state}");
    assert_eq!(state["operation_id"], operation_id);
    assert!(state["error"].is_null(), "{state}");

    // 2. The same e-mail again: the user-writer rejects it, nothing more is written.
    let reply = server
        .post("/users", &register_body("ada@example.com"))
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    let failed = reply.json();
    assert!(failed["operation_id"].is_string(), "{failed}");
    let error = &failed["error"];
    assert_eq!(error["handler"], "user-writer", "{failed}");
    assert_eq!(error["kind"], "rejected", "{failed}");
    assert!(
        error["reason"]
            .as_str()
            .unwrap()
            .contains("ada@example.com"),
        "{failed}"
    );

    let db = rusqlite::Connection::open(server.dir.path().join("app.db")).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM users WHERE email = ?1",
            ["ada@example.com"],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);

    // 3. Bad input: nothing is transacted.
    let commits = server.bus.stats().await.unwrap().commits;
    for body in [
        r#"{"email":"nope"}"#,
        r#"{"email":""}"#,
        "{}",
        "this is not json",
    ] {
        let reply = server.post("/users", body).await;
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        assert!(
            reply.json()["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{reply:?}"
        );
    }
    assert_eq!(server.bus.stats().await.unwrap().commits, commits);

    let unknown_user = server
        .get(&format!("/users/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(unknown_user.status, 404, "{unknown_user:?}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_202_and_streams_the_outcome() {
    // 4. No wait at all: the POST answers 202 and the outcome is followed over SSE.
    let server = Server::start(Duration::ZERO).await;

    let reply = server
        .post("/users", &register_body("grace@example.com"))
        .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let accepted = reply.json();
    let operation_id = accepted["operation_id"].as_str().unwrap();
    assert_eq!(
        accepted["status_url"],
        format!("/operations/{operation_id}")
    );

    let events = server
        .get(&format!("/operations/{operation_id}/events"))
        .await;
    assert_eq!(events.status, 200, "{events:?}");
    assert!(
        events
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{events:?}"
    );
    let mut lines = events.body.lines();
    lines
        .find(|l| *l == "event: outcome")
        .unwrap_or_else(|| panic!("no outcome event: {:?}", events.body));
    let data = lines
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or_else(|| panic!("no data line: {:?}", events.body));
    let outcome: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(outcome["operation_id"], operation_id, "{outcome}");
    assert!(outcome["error"].is_null(), "{outcome}");

    let state = finished_state(&server, operation_id).await;
    assert!(state["error"].is_null(), "{state}");

    let user_id = accepted["user_id"].as_str().unwrap();
    let user = server.get(&format!("/users/{user_id}")).await;
    assert_eq!(user.status, 200, "{user:?}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_operation_ids() {
    // 5. Lookups of operations that do not exist, or ids that are not ids.
    let server = Server::start(Duration::from_secs(20)).await;
    let unknown = uuid::Uuid::now_v7();

    let reply = server.get(&format!("/operations/{unknown}")).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    let reply = server.get(&format!("/operations/{unknown}/events")).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    let reply = server.get("/operations/not-a-uuid").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = server.get("/operations/not-a-uuid/events").await;
    assert_eq!(reply.status, 400, "{reply:?}");

    server.stop().await;
}
