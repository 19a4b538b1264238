//! Sessions (design note 003): a long-lived transaction that accumulates changes across calls —
//! the steps of a multi-step form, say — kept in the store so that it survives restarts, and
//! committed at the end.
//!
//! A session remembers the log position it was based on. When the log moved under it,
//! [`Session::rebase`] replays its changes on the new head: every condition the session's
//! commit carries (a stream's expected version, a key's expected version) is checked against
//! the head, and what fails is reported as a [`SessionConflict`] instead of being written.
//! [`Session::commit`] rebases, then writes the accumulated commit together with the removal
//! of the session's record, in one commit: a session is committed once.
//!
//! ```no_run
//! # async fn example(bus: txbus_core::Bus) -> Result<(), txbus_core::Error> {
//! use serde_json::json;
//! use txbus_core::{Commit, Event, ExpectedVersion};
//!
//! let mut session = bus.session("signup/42").await?;          // new, or resumed after a restart
//! session.add(Commit::new().event(Event::new("signup.step", json!({"step": 1})))).await?;
//! // … later, maybe in another process …
//! let mut session = bus.session("signup/42").await?;
//! session.add(Commit::new().stream("user-42", ExpectedVersion::NoStream,
//!     [Event::new("user.created", json!({"id": 42}))])).await?;
//! match session.commit().await? {
//!     Ok(op) => { op.outcome().await?; }
//!     Err(conflicts) => { /* the log moved: show `conflicts`, let the user decide */ }
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bus::Bus;
use crate::commit::Commit;
use crate::error::Error;
use crate::kv::{KvExpect, KvOp, KvWrite};
use crate::message::{Event, Headers, MessageId, OperationId};
use crate::operation::Operation;
use crate::stream::ExpectedVersion;

/// The key prefix of session records in the key–value space.
pub const PREFIX: &str = "txbus/session/";
/// How long an untouched session is kept by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A condition of the session's commit that does not hold at the head any more.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionConflict {
    /// The session appends to a stream that is no longer where it expects.
    Stream {
        /// The stream.
        stream: String,
        /// What the session expects.
        expected: ExpectedVersion,
        /// Where the stream is at the head.
        actual: u64,
    },
    /// The session writes a key that is no longer at the version it expects.
    Key {
        /// The key.
        key: String,
        /// What the session expects.
        expected: KvExpect,
        /// The key's version at the head (`None`: absent).
        actual: Option<u64>,
    },
}

impl std::fmt::Display for SessionConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stream {
                stream,
                expected,
                actual,
            } => write!(
                f,
                "stream {stream:?} is at version {actual}; the session expects {expected}"
            ),
            Self::Key {
                key,
                expected,
                actual,
            } => match actual {
                Some(v) => write!(
                    f,
                    "key {key:?} is at version {v}; the session expects {expected}"
                ),
                None => write!(f, "key {key:?} is absent; the session expects {expected}"),
            },
        }
    }
}

/// What a rebase found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebase {
    /// The position the session was based on.
    pub from: u64,
    /// The head it was replayed on.
    pub to: u64,
    /// Conditions that do not hold at the head; empty when the session moved to it.
    pub conflicts: Vec<SessionConflict>,
}

/// A long-lived transaction kept in the store. See the module docs.
#[derive(Debug)]
pub struct Session {
    bus: Bus,
    id: String,
    base: u64,
    commit: Commit,
    /// The version of the session's record (`None`: not stored yet).
    stored: Option<u64>,
    ttl: Duration,
}

/// The session as stored (JSON).
#[derive(Serialize, Deserialize)]
struct Doc {
    base: u64,
    operation_id: Option<OperationId>,
    events: Vec<EventDoc>,
    streams: Vec<(String, ExpectedVersion, Vec<usize>)>,
    kv: Vec<KvDoc>,
}

#[derive(Serialize, Deserialize)]
struct EventDoc {
    id: MessageId,
    event_type: String,
    module: Option<String>,
    payload: Value,
    headers: Headers,
}

#[derive(Serialize, Deserialize)]
struct KvDoc {
    key: String,
    /// Base64 of the value; `None` for a delete.
    value: Option<String>,
    ttl_ms: Option<u64>,
    expect: Option<u64>,
    absent: bool,
}

fn key_of(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn encode(base: u64, c: &Commit) -> Result<Vec<u8>, Error> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut events = Vec::with_capacity(c.events.len());
    for (i, e) in c.events.iter().enumerate() {
        let payload = e.payload.clone().map_err(|reason| Error::InvalidEvent {
            index: i,
            event_type: e.event_type.clone(),
            reason: format!("the payload does not serialize to JSON: {reason}"),
        })?;
        events.push(EventDoc {
            id: e.id,
            event_type: e.event_type.clone(),
            module: e.module.clone(),
            payload,
            headers: e.headers.clone(),
        });
    }
    let doc = Doc {
        base,
        operation_id: c.operation_id,
        events,
        streams: c.streams.clone(),
        kv: c
            .kv
            .iter()
            .map(|w| {
                let (value, ttl_ms) = match &w.op {
                    KvOp::Put { value, ttl } => (
                        Some(b64.encode(value)),
                        ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    ),
                    KvOp::Delete => (None, None),
                };
                KvDoc {
                    key: w.key.clone(),
                    value,
                    ttl_ms,
                    expect: match w.expect {
                        KvExpect::Version(v) => Some(v),
                        _ => None,
                    },
                    absent: w.expect == KvExpect::Absent,
                }
            })
            .collect(),
    };
    serde_json::to_vec(&doc)
        .map_err(|e| Error::InvalidCommit(format!("the session does not serialize: {e}")))
}

fn decode(id: &str, bytes: &[u8]) -> Result<(u64, Commit), Error> {
    let corrupt = |why: String| {
        Error::Store(crate::store::Error::Corrupt(format!(
            "session {id:?}: its stored record is unreadable: {why}"
        )))
    };
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut kv = Vec::with_capacity(doc.kv.len());
    for w in doc.kv {
        let op = match w.value {
            Some(v) => KvOp::Put {
                value: b64.decode(v).map_err(|e| corrupt(e.to_string()))?,
                ttl: w.ttl_ms.map(Duration::from_millis),
            },
            None => KvOp::Delete,
        };
        let expect = match (w.expect, w.absent) {
            (Some(v), _) => KvExpect::Version(v),
            (None, true) => KvExpect::Absent,
            (None, false) => KvExpect::Any,
        };
        kv.push(KvWrite {
            key: w.key,
            op,
            expect,
        });
    }
    let events = doc
        .events
        .into_iter()
        .map(|e| Event {
            id: e.id,
            event_type: e.event_type,
            module: e.module,
            payload: Ok(e.payload),
            headers: e.headers,
        })
        .collect::<Vec<_>>();
    if doc
        .streams
        .iter()
        .flat_map(|s| &s.2)
        .any(|&i| i >= events.len())
    {
        return Err(corrupt("a stream names an event it does not hold".into()));
    }
    Ok((
        doc.base,
        Commit {
            events,
            streams: doc.streams,
            kv,
            operation_id: doc.operation_id,
            ..Commit::default()
        },
    ))
}

impl Session {
    /// Opens session `id`: resumed from the store if it is there, else new and based on the
    /// log's head. Use [`Bus::session`].
    pub(crate) async fn open(bus: Bus, id: &str) -> Result<Self, Error> {
        if id.is_empty() || id.len() > 200 {
            return Err(Error::InvalidCommit(format!(
                "session id {id:?} must be 1 to 200 bytes"
            )));
        }
        match bus.kv_get(&key_of(id)).await? {
            Some(entry) => {
                let (base, commit) = decode(id, &entry.value)?;
                Ok(Self {
                    bus,
                    id: id.to_owned(),
                    base,
                    commit,
                    stored: Some(entry.version),
                    ttl: DEFAULT_TTL,
                })
            }
            None => {
                let base = bus.head_position().await?;
                Ok(Self {
                    bus,
                    id: id.to_owned(),
                    base,
                    commit: Commit::new(),
                    stored: None,
                    ttl: DEFAULT_TTL,
                })
            }
        }
    }

    /// Keeps the session this long after each change (default 24 h); past it, it is gone.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The log position the session is based on.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// What the session has accumulated so far.
    pub fn pending(&self) -> &Commit {
        &self.commit
    }

    async fn store(&mut self) -> Result<(), Error> {
        let bytes = encode(self.base, &self.commit)?;
        let expect = match self.stored {
            Some(v) => KvExpect::Version(v),
            None => KvExpect::Absent,
        };
        let versions = self
            .bus
            .kv_write(vec![KvWrite::put(key_of(&self.id), bytes)
                .expect(expect)
                .ttl(self.ttl)])
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::ChangedElsewhere(format!(
                    "session {:?} was changed elsewhere since it was opened; open it again",
                    self.id
                )),
                other => other,
            })?;
        self.stored = versions.first().copied();
        Ok(())
    }

    /// Adds `changes` after what the session holds (the algebra's append: a contradiction is an
    /// error and changes nothing), and stores the session.
    pub async fn add(&mut self, changes: Commit) -> Result<(), Error> {
        if !changes.acks.is_empty() || changes.unackable > 0 {
            return Err(Error::InvalidCommit(format!(
                "session {:?}: a session is kept across calls and restarts, longer than a delivery's attempt, so it cannot acknowledge one; commit the acknowledgement through the bus",
                self.id
            )));
        }
        let combined = self
            .commit
            .clone()
            .append(changes)
            .map_err(|c| Error::InvalidCommit(format!("session {:?}: {c}", self.id)))?;
        let limit = self.bus.limits().max_events_per_commit;
        if combined.len() > limit {
            return Err(Error::TooManyEvents {
                count: combined.len(),
                limit,
            });
        }
        let previous = std::mem::replace(&mut self.commit, combined);
        if let Err(e) = self.store().await {
            self.commit = previous;
            return Err(e);
        }
        Ok(())
    }

    /// The conditions of the session's commit that do not hold at the head.
    async fn conflicts(&self) -> Result<Vec<SessionConflict>, Error> {
        let mut out = Vec::new();
        for (stream, expected, _) in &self.commit.streams {
            let actual = self.bus.stream_version(stream).await?;
            if !expected.admits(actual) {
                out.push(SessionConflict::Stream {
                    stream: stream.clone(),
                    expected: *expected,
                    actual,
                });
            }
        }
        for w in &self.commit.kv {
            let actual = self.bus.kv_get(&w.key).await?.map(|e| e.version);
            if !w.expect.admits(actual) {
                out.push(SessionConflict::Key {
                    key: w.key.clone(),
                    expected: w.expect,
                    actual,
                });
            }
        }
        Ok(out)
    }

    /// Replays the session's changes on the log's head: when every condition still holds, the
    /// session moves to the head (and is stored so); otherwise nothing moves and the report
    /// lists the conflicts.
    pub async fn rebase(&mut self) -> Result<Rebase, Error> {
        let head = self.bus.head_position().await?;
        let conflicts = self.conflicts().await?;
        let report = Rebase {
            from: self.base,
            to: head,
            conflicts,
        };
        if report.conflicts.is_empty() && head != self.base {
            let previous = self.base;
            self.base = head;
            if let Err(e) = self.store().await {
                self.base = previous;
                return Err(e);
            }
        }
        Ok(report)
    }

    /// Rebases, then commits what the session holds together with the removal of its record,
    /// atomically. `Ok(Err(rebase))` when conditions no longer hold: nothing is written and the
    /// session stays as it was, to fix and commit again.
    pub async fn commit(mut self) -> Result<Result<Operation, Rebase>, Error> {
        let rebase = self.rebase().await?;
        if !rebase.conflicts.is_empty() {
            return Ok(Err(rebase));
        }
        let mut commit = self.commit.clone();
        if let Some(v) = self.stored {
            commit = commit.kv(KvWrite::delete(key_of(&self.id)).expect(KvExpect::Version(v)));
        }
        Ok(Ok(self.bus.commit(commit).await?))
    }

    /// Drops the session and its record without committing anything.
    pub async fn abandon(self) -> Result<(), Error> {
        if let Some(v) = self.stored {
            self.bus
                .kv_write(vec![
                    KvWrite::delete(key_of(&self.id)).expect(KvExpect::Version(v))
                ])
                .await?;
        }
        Ok(())
    }
}

/// Lists up to `limit` stored sessions' ids after `after` (for operators).
pub(crate) async fn list(
    bus: &Bus,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, Error> {
    let after = after.map(key_of);
    Ok(bus
        .kv_scan(PREFIX, after.as_deref(), limit)
        .await?
        .into_iter()
        .filter_map(|e| e.key.strip_prefix(PREFIX).map(str::to_owned))
        .collect::<Vec<_>>())
}
