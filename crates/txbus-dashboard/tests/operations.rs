//! One operation's page over real HTTP: the compensations of a failed compensating transact,
//! and the live stream (server-sent events) of an operation opened while it still runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{basic, http, HANG, OPERATOR_PASSWORD, VIEWER_PASSWORD};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbus_core::{Backoff, Bus, BusBuilder, Event, HandlerError, Message, On};
use txbus_dashboard::{Dashboard, Role};
use txbus_saga::compensating::{Compensation, Compensations};
use txbus_sqlite::SqliteStore;

fn bus_builder(dir: &std::path::Path) -> BusBuilder {
    Bus::builder()
        .store(SqliteStore::open(dir.join("ops.db")).unwrap())
        .max_retries(0)
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .poll_interval(Duration::from_millis(50))
}

/// Serves the dashboard of `bus` on a free loopback port, refreshing live pages quickly.
async fn serve(bus: &Bus) -> SocketAddr {
    let dashboard = Dashboard::builder(bus.clone())
        .user("operator", OPERATOR_PASSWORD, Role::Operator)
        .user("viewer", VIEWER_PASSWORD, Role::Viewer)
        .refresh(Duration::from_millis(200))
        .build()
        .unwrap();
    let app = dashboard.mount(axum::Router::new(), "/admin/queues");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_of_a_failed_compensating_transact_lists_its_compensation() {
    let undone: Arc<Mutex<Vec<String>>> = Arc::default();
    let u = Arc::clone(&undone);
    let cell: Arc<OnceLock<Bus>> = Arc::new(OnceLock::new());
    let c = Arc::clone(&cell);
    let compensations = Compensations::builder()
        .handler(
            "reserve-stock",
            On::event("order.placed"),
            |_m: Message| async { Ok(Some(json!({"reservation": "r-77"}))) },
            move |comp: Compensation| {
                let u = Arc::clone(&u);
                async move {
                    u.lock()
                        .unwrap()
                        .push(comp.registered.data["reservation"].to_string());
                    Ok(())
                }
            },
        )
        .sweep_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = compensations
        .install(bus_builder(dir.path()).handler(
            "ship",
            On::event("order.placed"),
            move |m: Message| {
                let cell = Arc::clone(&c);
                async move {
                    // Fails only once the reservation is registered, so it has something to undo.
                    let prefix = format!("compensate/rec/{}/", m.operation_id());
                    loop {
                        if let Some(bus) = cell.get() {
                            if !bus.kv_scan(&prefix, None, 10).await.unwrap().is_empty() {
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(HandlerError::reject("no courier for this address"))
                }
            },
        ))
        .build()
        .await
        .unwrap();
    let _ = cell.set(bus.clone());
    let cbus = compensations.attach(bus.clone());
    let op = cbus
        .transact([Event::new("order.placed", json!({"order": 77}))])
        .await
        .unwrap();
    let result = tokio::time::timeout(HANG, op.outcome())
        .await
        .unwrap()
        .unwrap();
    assert!(!result.is_ok());
    assert_eq!(result.compensated.len(), 1);
    assert_eq!(*undone.lock().unwrap(), vec!["\"r-77\"".to_owned()]);

    let addr = serve(&bus).await;
    let auth = basic("viewer", VIEWER_PASSWORD);
    let page = http(
        addr,
        "GET",
        &format!("/admin/queues/operations/{}", op.id()),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let body = &page.body;
    let section = body
        .find("<h2 style=\"margin-top:0\">Compensations</h2>")
        .map(|at| &body[at..])
        .unwrap_or_else(|| panic!("no compensations section in\n{body}"));
    // The run ended, and it undid reserve-stock's reservation.
    assert!(
        section.contains("Run <span class=\"badge completed\">completed</span>"),
        "{section}"
    );
    assert!(section.contains("<code>reserve-stock</code>"), "{section}");
    assert!(section.contains("r-77"), "{section}");
    assert!(
        section.contains("<span class=\"badge compensated\">compensated</span>"),
        "{section}"
    );
    assert!(!section.contains("badge pending"), "{section}");
    // And the failure that caused it.
    assert!(body.contains("no courier for this address"), "{body}");
    assert!(body.contains("<code>ship</code>"), "{body}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// One server-sent event.
#[derive(Debug)]
struct SseEvent {
    name: String,
    data: String,
}

/// The body decoded so far of a chunked response, and whether its last chunk came.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        if size == 0 {
            return (out, true);
        }
        let start = eol + 2;
        if raw.len() < start + size + 2 {
            return (out, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

/// The complete events of an event-stream body (keep-alive comments left out).
fn events(body: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(end) = rest.find("\n\n") {
        let block = &rest[..end];
        rest = &rest[end + 2..];
        let mut name = String::from("message");
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push(SseEvent {
                name,
                data: data.join("\n"),
            });
        }
    }
    out
}

/// A live stream read as it comes.
struct Stream {
    conn: tokio::net::TcpStream,
    raw: Vec<u8>,
    head: Option<String>,
}

impl Stream {
    async fn open(addr: SocketAddr, path: &str, auth: &str) -> Self {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        Self {
            conn,
            raw: Vec::new(),
            head: None,
        }
    }

    /// The events received so far and whether the stream ended.
    fn received(&mut self) -> (Vec<SseEvent>, bool) {
        let Some(at) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (Vec::new(), false);
        };
        if self.head.is_none() {
            self.head = Some(String::from_utf8_lossy(&self.raw[..at]).into_owned());
        }
        let (body, ended) = dechunk(&self.raw[at + 4..]);
        (events(&String::from_utf8(body).unwrap()), ended)
    }

    /// Reads until `done` holds for what was received; a closed connection ends the wait too.
    async fn until(&mut self, done: impl Fn(&[SseEvent], bool) -> bool) -> (Vec<SseEvent>, bool) {
        tokio::time::timeout(HANG, async {
            loop {
                let (events, ended) = self.received();
                if done(&events, ended) {
                    return (events, ended);
                }
                let mut buf = [0u8; 16 * 1024];
                let n = self.conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    return self.received();
                }
                self.raw.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the live stream sent what was awaited")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_of_a_running_operation_sends_its_end_when_it_finishes() {
    // The handler holds the operation open until the test lets it go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = Arc::clone(&gate);
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_builder(dir.path())
        .handler(
            "slow-export",
            On::event("export.requested"),
            move |_m: Message| {
                let g = Arc::clone(&g);
                async move {
                    g.acquire().await.unwrap().forget();
                    Ok(())
                }
            },
        )
        .build()
        .await
        .unwrap();
    let addr = serve(&bus).await;
    let auth = basic("viewer", VIEWER_PASSWORD);
    let op = bus
        .transact([Event::new("export.requested", json!({"report": "q3"}))])
        .await
        .unwrap();

    // The page of the running operation subscribes to its live stream.
    let page = http(
        addr,
        "GET",
        &format!("/admin/queues/operations/{}", op.id()),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let live_path = format!("/admin/queues/live/operations/{}", op.id());
    assert!(
        page.body.contains(&format!("data-live=\"{live_path}\"")),
        "{}",
        page.body
    );

    let mut stream = Stream::open(addr, &live_path, &auth).await;
    let (first, ended) = stream.until(|events, _| !events.is_empty()).await;
    let head = stream.head.clone().unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(!ended, "the stream of a running operation stays open");
    assert_eq!(first[0].name, "update", "{first:?}");
    assert!(
        first[0]
            .data
            .contains("Operation <span class=\"badge pending\">pending</span>"),
        "{}",
        first[0].data
    );
    assert!(first[0].data.contains("<code>slow-export</code>"));

    // The operation finishes while the stream is open: an update says so, then the stream ends.
    gate.add_permits(1);
    assert!(op.outcome().await.unwrap().is_ok());
    let (all, ended) = stream.until(|_, ended| ended).await;
    assert!(ended, "the stream ends after the final frame: {all:?}");
    let last = all.last().unwrap();
    assert_eq!(last.name, "update", "{all:?}");
    assert!(
        last.data
            .contains("Operation <span class=\"badge succeeded\">succeeded</span>"),
        "{}",
        last.data
    );
    assert!(
        last.data
            .contains("<span class=\"badge succeeded\">succeeded</span></td>"),
        "the delivery row is final too: {}",
        last.data
    );
    // Every frame before it showed the operation still running.
    for e in &all[..all.len() - 1] {
        assert!(e.data.contains("badge pending"), "{e:?}");
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
