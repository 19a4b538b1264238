//! What is stored under an idempotency key: the claim of a running request, then its response.
//!
//! A record is one key–value entry: a line of JSON (state, fingerprint, status, headers), a
//! newline, then the body's raw bytes, so a body is stored as it is, without re-encoding.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::fingerprint::Fingerprint;

/// A response kept for replay: its status, the headers worth keeping, and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code (an HTTP status for the HTTP layer; 200 or 422 for commands).
    pub status: u16,
    /// The headers kept for replay, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl StoredResponse {
    /// A response with no headers.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A request holds the key and is running.
    InProgress {
        /// What it asked for.
        fingerprint: Fingerprint,
        /// Until when it holds the key, ms since the epoch; after that a repeat may take the
        /// key over (the request is presumed dead).
        locked_until_ms: i64,
    },
    /// The request finished; its response is kept for replay.
    Done {
        /// What it asked for.
        fingerprint: Fingerprint,
        /// What it answered.
        response: StoredResponse,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    InProgress,
    Done,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    v: u8,
    state: State,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    locked_until_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
}

const FORMAT_VERSION: u8 = 1;

impl Record {
    /// The fingerprint of the request that holds (or held) the key.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        match self {
            Self::InProgress { fingerprint, .. } | Self::Done { fingerprint, .. } => *fingerprint,
        }
    }

    /// The stored form.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let (meta, body) = match self {
            Self::InProgress {
                fingerprint,
                locked_until_ms,
            } => (
                Meta {
                    v: FORMAT_VERSION,
                    state: State::InProgress,
                    fingerprint: fingerprint.to_hex(),
                    locked_until_ms: Some(*locked_until_ms),
                    status: None,
                    headers: Vec::new(),
                },
                &[][..],
            ),
            Self::Done {
                fingerprint,
                response,
            } => (
                Meta {
                    v: FORMAT_VERSION,
                    state: State::Done,
                    fingerprint: fingerprint.to_hex(),
                    locked_until_ms: None,
                    status: Some(response.status),
                    headers: response.headers.clone(),
                },
                &response.body[..],
            ),
        };
        // Compact JSON escapes every newline, so the first newline ends the metadata.
        let mut out = serde_json::to_vec(&meta)?;
        out.reserve(1 + body.len());
        out.push(b'\n');
        out.extend_from_slice(body);
        Ok(out)
    }

    /// Reads a stored record; the error says what is wrong with it.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let split = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no end of metadata")?;
        let (head, body) = (&bytes[..split], &bytes[split + 1..]);
        let meta: Meta = serde_json::from_slice(head).map_err(|e| format!("metadata: {e}"))?;
        if meta.v != FORMAT_VERSION {
            return Err(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                meta.v
            ));
        }
        let fingerprint = Fingerprint::from_hex(&meta.fingerprint)
            .ok_or_else(|| format!("fingerprint {:?} is not 64 hex digits", meta.fingerprint))?;
        Ok(match meta.state {
            State::InProgress => Self::InProgress {
                fingerprint,
                locked_until_ms: meta.locked_until_ms.unwrap_or(0),
            },
            State::Done => Self::Done {
                fingerprint,
                response: StoredResponse {
                    status: meta.status.ok_or("a finished record without a status")?,
                    headers: meta.headers,
                    body: Bytes::copy_from_slice(body),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_binary_bodies() {
        let fingerprint = Fingerprint::of_parts([b"x".as_slice()]);
        let running = Record::InProgress {
            fingerprint,
            locked_until_ms: 42,
        };
        assert_eq!(Record::decode(&running.encode().unwrap()).unwrap(), running);
        let done = Record::Done {
            fingerprint,
            response: StoredResponse::new(201, Bytes::from_static(b"line\nbreak\0\xff"))
                .header("content-type", "text/plain\nx"),
        };
        assert_eq!(Record::decode(&done.encode().unwrap()).unwrap(), done);
    }

    #[test]
    fn damaged_records_are_reported() {
        assert!(Record::decode(b"no newline").is_err());
        assert!(Record::decode(b"{\"v\":9,\"state\":\"done\",\"fingerprint\":\"\"}\n").is_err());
        assert!(Record::decode(b"{\"v\":1,\"state\":\"done\",\"fingerprint\":\"ab\"}\n").is_err());
    }
}
