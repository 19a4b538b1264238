//! What the scrape tests share: a GET over plain HTTP/1.1 and a reader of the text format.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type Sample = (String, BTreeMap<String, String>, f64);
/// A series (name, labels to match) and the value it must have.
pub type Expected = (&'static str, Vec<(&'static str, &'static str)>, f64);

/// One GET over a fresh TCP connection; returns the status line and the body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

pub fn parse(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap();
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (n.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            (name, labels, value.parse::<f64>().unwrap())
        })
        .collect()
}

/// The sum of the series named `name` whose labels include `labels`; `None` when there is no
/// such series at all (so that a check of a 0 fails when the series is missing).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Scrapes `/metrics` until every series of `expected` has its value — a gauge may be set a
/// moment after what it reports happened — with a deadline only a stuck run reaches; then
/// asserts each one, so that a missing series or a wrong value fails, naming it. Returns the
/// last body.
pub async fn scrape_expecting(addr: std::net::SocketAddr, expected: &[Expected]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let body = loop {
        let (head, body) = get(addr, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let samples = parse(&body);
        let all = expected
            .iter()
            .all(|(n, l, v)| value(&samples, n, l) == Some(*v));
        if all || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let samples = parse(&body);
    for (name, labels, want) in expected {
        assert_eq!(
            value(&samples, name, labels),
            Some(*want),
            "{name} {labels:?} (None: no such series) in\n{body}"
        );
    }
    body
}
