//! A small ClickHouse HTTP client: statements, queries and `JSONEachRow` inserts over pooled
//! HTTP/1.1 keep-alive connections.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::Error;

/// Connections kept open between requests, at most (default).
const DEFAULT_IDLE_CONNECTIONS: usize = 4;

/// A handle on one ClickHouse server, speaking its HTTP interface. Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), txbus_clickhouse::Error> {
/// let client = txbus_clickhouse::Client::new("http://127.0.0.1:8123")?;
/// client.execute("CREATE TABLE IF NOT EXISTS hits (id String) ENGINE = Memory").await?;
/// client.insert_rows("hits", b"{\"id\":\"a\"}\n".to_vec()).await?;
/// let count = client.query("SELECT count() FROM hits").await?;
/// assert_eq!(count.trim(), "1");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// host:port, for connecting and for messages.
    address: String,
    /// The `Host` header.
    host: String,
    /// Query-string parameters sent with every request (database, user, password).
    params: String,
    timeout: Duration,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    max_idle: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the server at `url` (`http://host:port`, default port 8123), database
    /// `default`, user `default` without password, 30 s per request.
    pub fn new(url: &str) -> Result<Self, Error> {
        ClientOptions::new(url).build()
    }

    /// The server's host:port.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Runs a statement (DDL, `OPTIMIZE`, …) and discards its output.
    pub async fn execute(&self, sql: &str) -> Result<(), Error> {
        self.query(sql).await.map(drop)
    }

    /// Runs a query and returns its output as text (`TabSeparated` unless the query names a
    /// `FORMAT`).
    pub async fn query(&self, sql: &str) -> Result<String, Error> {
        let body = self
            .request(String::new(), Bytes::copy_from_slice(sql.as_bytes()))
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Inserts rows given as `JSONEachRow` lines (one JSON object per line) into `table`, in
    /// one `INSERT`. Returns once the server acknowledged it: the rows are in the table.
    pub async fn insert_rows(&self, table: &str, json_lines: Vec<u8>) -> Result<(), Error> {
        let query = format!("INSERT INTO {table} FORMAT JSONEachRow");
        self.request(format!("query={}", encode(&query)), Bytes::from(json_lines))
            .await
            .map(drop)
    }

    /// One POST with `query_params` added to the configured ones. A kept-alive connection
    /// that the server closed while idle fails before any answer; the request is then sent
    /// once more on a new connection (safe for the sink: a repeated insert counts once).
    async fn request(&self, query_params: String, body: Bytes) -> Result<Bytes, Error> {
        let inner = &self.inner;
        let mut path = String::from("/?");
        path.push_str(&inner.params);
        if !query_params.is_empty() {
            if !inner.params.is_empty() {
                path.push('&');
            }
            path.push_str(&query_params);
        }
        let exchange = async {
            let (sender, reused) = self.connection().await?;
            match self.exchange(sender, &path, body.clone()).await {
                Err(Error::Http { .. }) if reused => {
                    let (sender, _) = self.new_connection().await?;
                    self.exchange(sender, &path, body).await
                }
                other => other,
            }
        };
        tokio::time::timeout(inner.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    address: inner.address.clone(),
                    after: inner.timeout,
                })
            })
    }

    async fn exchange(
        &self,
        mut sender: SendRequest<Full<Bytes>>,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, Error> {
        let request = http::Request::post(path)
            .header(http::header::HOST, &self.inner.host)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(body))
            .map_err(|e| Error::Config(format!("cannot build the HTTP request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| self.http_error(source))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| self.http_error(source))?
            .to_bytes();
        self.give_back(sender);
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(Error::Server {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&bytes).trim().to_owned(),
            })
        }
    }

    fn http_error(&self, source: hyper::Error) -> Error {
        Error::Http {
            address: self.inner.address.clone(),
            source,
        }
    }

    /// An idle pooled connection that is still open (`true`: reused), or a new one.
    async fn connection(&self) -> Result<(SendRequest<Full<Bytes>>, bool), Error> {
        loop {
            let pooled = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(mut sender) = pooled else { break };
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok((sender, true));
            }
        }
        self.new_connection().await
    }

    async fn new_connection(&self) -> Result<(SendRequest<Full<Bytes>>, bool), Error> {
        let address = &self.inner.address;
        let stream = TcpStream::connect(address.as_str())
            .await
            .map_err(|source| Error::Connect {
                address: address.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http_error(source))?;
        let address = address.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "ClickHouse connection closed");
            }
        });
        Ok((sender, false))
    }

    fn give_back(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.inner.max_idle {
            idle.push(sender);
        }
    }
}

/// How to reach a ClickHouse server.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    url: String,
    database: Option<String>,
    user: Option<String>,
    password: Option<String>,
    timeout: Duration,
    max_idle: usize,
}

impl ClientOptions {
    /// The server at `url` (`http://host:port`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: None,
            user: None,
            password: None,
            timeout: Duration::from_secs(30),
            max_idle: DEFAULT_IDLE_CONNECTIONS,
        }
    }

    /// The database that unqualified table names refer to (default: the user's default).
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = Some(database.into());
        self
    }

    /// The user and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// The longest one request may take, connecting included (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connections kept open between requests, at most (default 4).
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle = n;
        self
    }

    /// Checks the URL and makes the client. Connects lazily, on the first request.
    pub fn build(self) -> Result<Client, Error> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: self.url.clone(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = self.url.parse().map_err(|_| invalid("does not parse"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(invalid("only http:// is supported")),
            None => return Err(invalid("the scheme (http://) is missing")),
        }
        let host = uri.host().ok_or_else(|| invalid("the host is missing"))?;
        let port = uri.port_u16().unwrap_or(8123);
        if self.timeout.is_zero() {
            return Err(Error::Config(
                "the request timeout must be above zero".into(),
            ));
        }
        let mut params = Vec::new();
        for (name, value) in [
            ("database", &self.database),
            ("user", &self.user),
            ("password", &self.password),
        ] {
            if let Some(v) = value {
                params.push(format!("{name}={}", encode(v)));
            }
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Client {
            inner: Arc::new(Inner {
                host: address.clone(),
                address,
                params: params.join("&"),
                timeout: self.timeout,
                idle: Mutex::new(Vec::new()),
                max_idle: self.max_idle,
            }),
        })
    }
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode("INSERT INTO t FORMAT JSONEachRow"),
            "INSERT%20INTO%20t%20FORMAT%20JSONEachRow"
        );
        assert_eq!(encode("a&b=ü"), "a%26b%3D%C3%BC");
    }

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("http://127.0.0.1:8123").is_ok());
        assert_eq!(
            Client::new("http://localhost")
                .map(|c| c.address().to_owned())
                .ok(),
            Some("localhost:8123".to_owned())
        );
        assert!(matches!(
            Client::new("https://x:8443"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            Client::new("127.0.0.1:8123"),
            Err(Error::InvalidUrl { .. })
        ));
    }
}
