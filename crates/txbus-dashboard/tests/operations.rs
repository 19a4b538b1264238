//! One operation's page over real HTTP: the compensations of a failed compensating transact,
//! and the live stream (server-sent events) of an operation opened while it still runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{basic, http, serve, HANG, VIEWER_PASSWORD};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbus_core::{Backoff, Bus, BusBuilder, Event, HandlerError, Message, On};
use txbus_saga::compensating::{Compensation, Compensations};
use txbus_sqlite::SqliteStore;

fn bus_builder(dir: &std::path::Path) -> BusBuilder {
    Bus::builder()
        .store(SqliteStore::open(dir.join("ops.db")).unwrap())
        .max_retries(0)
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .poll_interval(Duration::from_millis(50))
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

/// The operations listed by a search page, in order, as (id, status), leaving out the bus's
/// own system commits (its start).
fn listed_with_status(page: &common::Reply) -> Vec<(String, String)> {
    assert_eq!(page.status, 200, "{}", page.body);
    common::rows(&page.body, "<table>")
        .into_iter()
        .filter(|r| r.len() == 8 && r[2] != "system")
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

/// The operation ids listed by a search page, in order.
fn listed(page: &common::Reply) -> Vec<String> {
    listed_with_status(page)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_found_by_id_by_status_and_by_time_window() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_builder(dir.path())
        .handler(
            "billing",
            On::event("order.placed"),
            |m: Message| async move {
                if m.payload()["card"] == "declined" {
                    return Err(HandlerError::reject("card declined by the issuer"));
                }
                Ok(())
            },
        )
        .build()
        .await
        .unwrap();
    let run = |card: &'static str| {
        let bus = bus.clone();
        async move {
            let op = bus
                .transact([Event::new("order.placed", json!({ "card": card }))])
                .await
                .unwrap();
            tokio::time::timeout(HANG, op.outcome())
                .await
                .unwrap()
                .unwrap();
            let detail = bus.inspect().operation(op.id()).await.unwrap().unwrap();
            (op.id().to_string(), detail.summary.created_at_ms)
        }
    };
    let (paid, paid_at) = run("visa").await;
    // The second one is committed in a later millisecond, so a window can part them.
    tokio::time::timeout(HANG, async {
        while txbus_core::time::now_ms() <= paid_at {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let (declined, declined_at) = run("declined").await;
    assert!(declined_at > paid_at);

    let addr = serve(&bus).await;
    let auth = basic("viewer", VIEWER_PASSWORD);
    let get = |path: String| {
        let auth = auth.clone();
        async move { http(addr, "GET", &path, &[("Authorization", &auth)], b"").await }
    };

    // By id: the search leads to that operation's page, and to no other.
    for id in [&paid, &declined] {
        let found = get(format!("/admin/queues/operations?id={id}")).await;
        assert_eq!(found.status, 303, "{}", found.body);
        assert_eq!(
            common::location(&found),
            format!("/admin/queues/operations/{id}")
        );
        let page = get(common::location(&found)).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let other = if id == &paid { &declined } else { &paid };
        assert!(
            page.body.contains(&format!("<code>{id}</code>")),
            "{}",
            page.body
        );
        assert!(!page.body.contains(other.as_str()), "{}", page.body);
    }
    let expected_status = |id: &str| {
        if id == paid {
            "succeeded"
        } else {
            "failed"
        }
    };
    for id in [&paid, &declined] {
        let page = get(format!("/admin/queues/operations/{id}")).await;
        assert!(
            page.body.contains(&format!(
                "Operation <span class=\"badge {s}\">{s}</span>",
                s = expected_status(id)
            )),
            "{}",
            page.body
        );
    }

    // By status: each lists its operation only.
    assert_eq!(
        listed_with_status(&get("/admin/queues/operations?status=succeeded".into()).await),
        vec![(paid.clone(), "succeeded".to_owned())]
    );
    assert_eq!(
        listed_with_status(&get("/admin/queues/operations?status=failed".into()).await),
        vec![(declined.clone(), "failed".to_owned())]
    );
    // Without a status, both.
    assert_eq!(
        listed(&get("/admin/queues/operations".into()).await),
        vec![declined.clone(), paid.clone()]
    );
    assert_eq!(
        listed(&get("/admin/queues/operations?status=pending".into()).await),
        Vec::<String>::new()
    );

    // By time: `from_ms` is included, `to_ms` is not.
    let window = |from: Option<i64>, to: Option<i64>| {
        let mut path = "/admin/queues/operations?".to_owned();
        if let Some(f) = from {
            path.push_str(&format!("from_ms={f}&"));
        }
        if let Some(t) = to {
            path.push_str(&format!("to_ms={t}&"));
        }
        get(path)
    };
    let only_paid = listed(&window(Some(paid_at), Some(paid_at + 1)).await);
    assert!(only_paid.contains(&paid), "{only_paid:?}");
    assert!(!only_paid.contains(&declined), "{only_paid:?}");
    let before_declined = listed(&window(None, Some(declined_at)).await);
    assert!(before_declined.contains(&paid), "{before_declined:?}");
    assert!(!before_declined.contains(&declined), "{before_declined:?}");
    let from_declined = listed(&window(Some(declined_at), None).await);
    assert!(from_declined.contains(&declined), "{from_declined:?}");
    assert!(!from_declined.contains(&paid), "{from_declined:?}");
    let both = listed(&window(Some(paid_at), Some(declined_at + 1)).await);
    assert!(both.contains(&paid) && both.contains(&declined), "{both:?}");
    // Newest first.
    let at = |id: &str| both.iter().position(|x| x == id).unwrap();
    assert!(at(&declined) < at(&paid), "{both:?}");
    // Time and status together.
    assert_eq!(
        listed(
            &get(format!(
                "/admin/queues/operations?status=failed&to_ms={declined_at}"
            ))
            .await
        ),
        Vec::<String>::new()
    );
    // The last minutes, as the form offers them.
    let recent = listed(&get("/admin/queues/operations?since=15".into()).await);
    assert!(
        recent.contains(&paid) && recent.contains(&declined),
        "{recent:?}"
    );
    // A window that is no time is refused, naming the parameter.
    for (query, says) in [
        ("from_ms=yesterday", "from_ms"),
        ("to_ms=1e3", "to_ms"),
        ("since=soon", "since"),
    ] {
        let r = get(format!("/admin/queues/operations?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.contains(says), "{query}: {}", r.body);
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
