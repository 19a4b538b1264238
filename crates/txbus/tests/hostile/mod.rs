//! Hostile HTTP clients against an example served by its own process: raw requests, slow
//! clients, floods, and the child's resident memory read from /proc. Shared by the tests of
//! the `register` and `orders` examples.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bound on how long a step may take before the test is declared hung; never a measurement.
pub const HANG: Duration = Duration::from_secs(60);

/// An example binary running in its own process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    pub _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of example `name` of package `package`, built beside this test binary (a whole
/// workspace test run builds the examples; a run of this test alone builds it here).
fn example(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "building example {name}");
    }
    assert!(
        path.exists(),
        "example {name} is not built at {}",
        path.display()
    );
    path
}

impl Served {
    /// Starts example `name` of `package` on a free port with `env` (and `data_var` set to a fresh
    /// directory's `file`), and waits until it accepts connections.
    pub async fn start(
        package: &str,
        name: &str,
        data_var: &str,
        file: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut cmd = Command::new(example(package, name));
        cmd.env("ADDR", addr.to_string())
            .env(data_var, dir.path().join(file))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let served = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + HANG;
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "{name} did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        served
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// (resident, peak resident) memory of the process, in MiB.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |field: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{field} in /proc status"))
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }
}

/// An HTTP answer: status and body (empty when the server closed without answering).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Sends raw request bytes, reads the answer until the server closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    tokio::time::timeout(HANG, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before the whole body is sent: a failed write is
        // an answer too.
        let _ = stream.write_all(request).await;
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Reply { status, body }
    })
    .await
    .expect("the request hung")
}

/// A request with the given method, path, headers and body.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

/// A JSON request.
pub async fn json(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    send(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

/// Opens `n` connections that send a request head a byte at a time, one byte per `every`, for
/// `for_how_long`, never finishing it; returns how many the server had closed by then.
pub async fn slow_clients(
    addr: SocketAddr,
    n: usize,
    every: Duration,
    for_how_long: Duration,
) -> usize {
    let head = b"POST /users HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\nContent-Length: 10\r\nX-Slow: ";
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return true;
            };
            let end = Instant::now() + for_how_long;
            let mut i = 0;
            while Instant::now() < end {
                if s.write_all(&[head[i % head.len()]]).await.is_err() {
                    return true;
                }
                i += 1;
                tokio::time::sleep(every).await;
            }
            false
        }));
    }
    let mut closed = 0;
    for t in tasks {
        if t.await.unwrap() {
            closed += 1;
        }
    }
    closed
}
