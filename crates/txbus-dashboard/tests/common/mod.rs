//! What the dashboard's tests share: the example service on a real port, and plain HTTP/1.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbus_core::Bus;
use txbus_dashboard::{Dashboard, Role};

#[path = "../../examples/dashboard.rs"]
#[allow(dead_code, clippy::print_stdout, clippy::print_stderr)]
pub mod example;

pub const OPERATOR_PASSWORD: &str = "correct horse battery staple";
pub const VIEWER_PASSWORD: &str = "read only, please";

/// A bound on waits that only a stuck test reaches; never a measurement.
pub const HANG: Duration = Duration::from_secs(60);

pub struct Running {
    pub addr: SocketAddr,
    pub demo: example::Demo,
    pub _dir: tempfile::TempDir,
}

/// Starts the example service on a free port of the loopback.
pub async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let demo = example::demo(
        dir.path(),
        example::Users {
            operator: OPERATOR_PASSWORD.into(),
            viewer: VIEWER_PASSWORD.into(),
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = demo.app.clone();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Running {
        addr,
        demo,
        _dir: dir,
    }
}

/// Serves the dashboard of `bus` at `/admin/queues` on a free loopback port (users `operator`
/// and `viewer`), refreshing live pages quickly.
pub async fn serve(bus: &Bus) -> SocketAddr {
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

pub fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let bytes = input.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// One HTTP/1.1 request over a new connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    conn.write_all(req.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(HANG, conn.read_to_end(&mut raw))
        .await
        .expect("the server answers")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The value of the first `name="csrf"` input of a page.
pub fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token");
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// A page's text with its tags left out and its entities decoded, whitespace squeezed.
pub fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The rows of the first table body of a page (or of the part after `from`), each as the
/// text of its cells.
pub fn rows(page: &str, from: &str) -> Vec<Vec<String>> {
    let at = page
        .find(from)
        .unwrap_or_else(|| panic!("no {from:?} in\n{page}"));
    let page = &page[at..];
    let start = page.find("<tbody>").expect("a table body") + "<tbody>".len();
    let end = start + page[start..].find("</tbody>").expect("the body's end");
    page[start..end]
        .split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let inner = &cell[cell.find('>').unwrap() + 1..];
                    text(inner.split("</td>").next().unwrap())
                })
                .collect()
        })
        .collect()
}

/// The targets of the links of a page that start with `prefix`, in order.
pub fn links(page: &str, prefix: &str) -> Vec<String> {
    let needle = format!("href=\"{prefix}");
    let mut out = Vec::new();
    let mut rest = page;
    while let Some(at) = rest.find(&needle) {
        let from = at + "href=\"".len();
        let len = rest[from..].find('"').unwrap();
        out.push(rest[from..from + len].to_owned());
        rest = &rest[from + len..];
    }
    out
}

/// The `Location` header of a redirect.
pub fn location(reply: &Reply) -> String {
    reply
        .headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Location in\n{}", reply.headers))
}
