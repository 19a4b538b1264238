//! What the integration tests share: a bus on a SQLite file in a fresh temporary directory,
//! a hang guard, and a minimal HTTP/1.1 client over a plain TCP connection.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use txbus_core::Bus;
use txbus_sqlite::SqliteStore;

/// A bound on how long a step may take before the test is declared hung; never a measurement.
pub const HANG: Duration = Duration::from_secs(30);

/// Runs `f`, failing the test if it hangs.
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

/// A bus on its own SQLite file.
pub struct TestBus {
    pub bus: Bus,
    pub dir: tempfile::TempDir,
}

impl TestBus {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus = open(dir.path()).await;
        Self { bus, dir }
    }

    pub async fn stop(self) {
        within(self.bus.shutdown(Duration::from_secs(5)))
            .await
            .unwrap();
    }
}

/// Opens the bus of the store in `dir`.
pub async fn open(dir: &std::path::Path) -> Bus {
    let store = SqliteStore::open(dir.join("bus.db")).unwrap();
    Bus::builder().store(store).build().await.unwrap()
}

/// One HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// A request to send.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            headers: Vec::new(),
            body: b"",
        }
    }

    pub fn key(mut self, key: &str) -> Self {
        self.headers.push(("Idempotency-Key", key.to_owned()));
        self
    }

    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self
    }

    /// Sends it on a new connection and reads the reply to the end (within the hang guard).
    pub async fn send(self, addr: SocketAddr) -> Reply {
        within(self.send_unguarded(addr)).await
    }

    async fn send_unguarded(self, addr: SocketAddr) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.method,
            self.path,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(self.body).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();

        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a reply head");
        let head = std::str::from_utf8(&raw[..split]).unwrap();
        let body = &raw[split + 4..];
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: body.to_vec(),
        };
        if reply
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            reply.body = dechunk(body);
        }
        reply
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = std::str::from_utf8(&rest[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
