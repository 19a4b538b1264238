//! A commit to hand to [`crate::Bus::commit`]: events, some of them appended to streams with
//! an expected version, and key–value writes — all atomic. A commit read back from the log
//! turns into one ([`CommitRecord::to_commit`], [`crate::Bus::commit_at`]), so that commits of
//! the log can be appended and diffed ([`crate::algebra`]) like the ones being built.

use std::sync::Arc;

use crate::ack::AckSlot;
use crate::error::Error;
use crate::kv::KvWrite;
use crate::message::{Event, Headers, Message, OperationId, StoredMessage};
use crate::store::{CommitRecord, Store};
use crate::stream::ExpectedVersion;

/// Events and conditions committed together: all or none.
///
/// ```
/// use serde_json::json;
/// use txbus_core::{Commit, Event, ExpectedVersion, KvWrite};
///
/// let commit = Commit::new()
///     .stream("order-7", ExpectedVersion::Exact(3), [Event::new("order.item-added", json!({"sku": "A1"}))])
///     .stream("stock-A1", ExpectedVersion::Any, [Event::new("stock.reserved", json!({"order": 7}))])
///     .event(Event::new("audit.order-changed", json!({"order": 7})))
///     .kv(KvWrite::put("orders/7/last-change", b"now".to_vec()));
/// assert_eq!(commit.len(), 3);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub(crate) events: Vec<Event>,
    /// (stream, expected version, indexes of its events in `events`).
    pub(crate) streams: Vec<(String, ExpectedVersion, Vec<usize>)>,
    pub(crate) kv: Vec<KvWrite>,
    /// A caller-chosen operation id; a new one is generated when `None`.
    pub(crate) operation_id: Option<OperationId>,
    /// Deliveries whose success this commit records (see [`Commit::acknowledging`]).
    pub(crate) acks: Vec<Arc<AckSlot>>,
    /// Messages handed to [`Commit::acknowledging`] that no bus delivered (built by hand):
    /// there is nothing to acknowledge, and the commit is refused rather than silently
    /// acknowledging nothing.
    pub(crate) unackable: usize,
}

impl Commit {
    /// An empty commit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event that belongs to no stream.
    pub fn event(mut self, event: Event) -> Self {
        self.events.push(event);
        self
    }

    /// Adds events that belong to no stream.
    pub fn events(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        self.events.extend(events);
        self
    }

    /// Appends `events` to `stream`, which must be at `expected` when the commit is written;
    /// otherwise the commit fails with [`crate::Error::Conflict`] and nothing is written. A
    /// stream may appear once per commit.
    pub fn stream(
        mut self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = Event>,
    ) -> Self {
        let start = self.events.len();
        self.events.extend(events);
        let indexes = (start..self.events.len()).collect();
        self.streams.push((stream.into(), expected, indexes));
        self
    }

    /// Adds a key–value write, applied with the commit (its condition is checked too).
    pub fn kv(mut self, write: KvWrite) -> Self {
        self.kv.push(write);
        self
    }

    /// Uses a caller-chosen operation id instead of a generated one, so that the caller can
    /// record it (e.g. in a key–value write of the same commit) before the commit is written.
    /// It must be new: a commit under an id the store already holds fails and writes nothing.
    pub fn operation_id(mut self, id: OperationId) -> Self {
        self.operation_id = Some(id);
        self
    }

    /// Records, in this commit, that the handler handling `msg` succeeded: the store writes
    /// the delivery's acknowledgement in the same transaction as the commit, so a handler whose
    /// work is this commit (a saga step, a command's save, a checkpoint) costs one durable write
    /// instead of two, and the bus does not acknowledge the delivery again when the handler
    /// returns.
    ///
    /// The commit is fenced by the attempt's lease: if another worker took the delivery over
    /// meanwhile (or it was acknowledged already), the commit fails with
    /// [`crate::Conflict::Lease`] and writes nothing. Once the commit is durable the delivery
    /// has succeeded, whatever the handler returns afterwards. Only a commit made through the
    /// bus that delivered `msg` may carry it; one made elsewhere, or with a message built by
    /// hand, fails with [`crate::Error::InvalidCommit`].
    pub fn acknowledging(mut self, msg: &Message) -> Self {
        match msg.ack_slot() {
            Some(slot) => {
                if !self.acks.iter().any(|a| Arc::ptr_eq(a, slot)) {
                    self.acks.push(Arc::clone(slot));
                }
            }
            None => self.unackable += 1,
        }
        self
    }

    /// The number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when the commit holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl<I: IntoIterator<Item = Event>> From<I> for Commit {
    fn from(events: I) -> Self {
        Self::new().events(events)
    }
}

impl CommitRecord {
    /// This commit of the log as a [`Commit`] value, to append or diff with others
    /// ([`crate::algebra`]): its events with their ids, types, modules, payloads and headers,
    /// grouped into the streams they were appended to, and its key–value writes with their
    /// conditions.
    ///
    /// What the log does not keep is left open: each stream's expectation is
    /// [`ExpectedVersion::Any`] ([`crate::Bus::commit_at`] fills in the version each stream
    /// was at), and the operation id is not carried over (every commit of the log has its own,
    /// so two of them could never be appended; the record still has it). Payloads are as
    /// stored: encrypted fields stay sealed ([`crate::Bus::open_message`] opens them).
    pub fn to_commit(&self) -> Commit {
        let mut commit = Commit::new();
        for (index, message) in self.messages.iter().enumerate() {
            let mut event = event_of(message);
            // The stream header is set by the bus from the commit; here it is the commit's
            // stream grouping again.
            if let Some(stream) = event.headers.stream.take() {
                match commit.streams.iter_mut().find(|(s, _, _)| *s == stream) {
                    Some((_, _, indexes)) => indexes.push(index),
                    None => commit
                        .streams
                        .push((stream, ExpectedVersion::Any, vec![index])),
                }
            }
            commit.events.push(event);
        }
        commit.kv = self.kv.clone();
        commit
    }
}

impl From<&CommitRecord> for Commit {
    fn from(record: &CommitRecord) -> Self {
        record.to_commit()
    }
}

/// A stored message as the event that was handed in. A record read for hashing keeps only the
/// stored text ([`Store::read_chain`]): the payload and headers are parsed from it then.
fn event_of(m: &StoredMessage) -> Event {
    let payload = if m.payload.is_null() && m.payload_json.trim() != "null" {
        serde_json::from_str(&m.payload_json)
            .map_err(|e| format!("message {}: stored payload is not JSON: {e}", m.id))
    } else {
        Ok(m.payload.clone())
    };
    let headers = if m.headers.is_empty() {
        serde_json::from_str::<Headers>(&m.headers_json).unwrap_or_default()
    } else {
        m.headers.clone()
    };
    Event {
        id: m.id,
        event_type: m.event_type.clone(),
        module: m.module.clone(),
        payload,
        headers,
    }
}

/// The commit at `position` as a [`Commit`], each stream expected at the version it had just
/// before it (`NoStream` when it had none): appending it to the commit before it in the log
/// holds, the other way round does not. `None` when the log has no commit there.
pub(crate) async fn read_at(
    store: &Arc<dyn Store>,
    position: u64,
) -> Result<Option<Commit>, Error> {
    if position == 0 {
        return Ok(None);
    }
    let page = store.read_log(position - 1, 1).await?;
    let Some(record) = page.into_iter().find(|c| c.position == position) else {
        return Ok(None);
    };
    let mut commit = record.to_commit();
    for (stream, expected, _) in &mut commit.streams {
        let before = store.stream_version_at(stream, position - 1).await?;
        *expected = if before == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(before)
        };
    }
    Ok(Some(commit))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::message::{MessageId, OperationId};
    use crate::store::CommitKind;

    fn stored(id: u128, stream: Option<&str>, payload: serde_json::Value) -> StoredMessage {
        let headers = Headers {
            stream: stream.map(str::to_owned),
            correlation_id: Some("req-1".into()),
            ..Headers::default()
        };
        StoredMessage {
            id: MessageId(uuid::Uuid::from_u128(id)),
            event_type: "order.changed".into(),
            module: Some("order".into()),
            payload_json: payload.to_string(),
            payload,
            headers_json: serde_json::to_string(&headers).unwrap(),
            headers,
        }
    }

    fn record(position: u64, messages: Vec<StoredMessage>, kv: Vec<KvWrite>) -> CommitRecord {
        CommitRecord {
            position,
            operation_id: OperationId::new(),
            kind: CommitKind::Transact,
            created_at_ms: 1,
            messages,
            data_hash: [0; 32],
            chain_hash: [0; 32],
            kv,
            signature: None,
        }
    }

    #[test]
    fn a_record_becomes_the_commit_that_was_handed_in() {
        let r = record(
            4,
            vec![
                stored(1, Some("order-1"), json!({"n": 1})),
                stored(2, None, json!({"n": 2})),
                stored(3, Some("order-1"), json!({"n": 3})),
            ],
            vec![KvWrite::put("cart/1", b"a".to_vec()).expect(crate::KvExpect::Absent)],
        );
        let c = Commit::from(&r);
        assert_eq!(c.len(), 3);
        assert_eq!(c.operation_id, None);
        assert_eq!(
            c.streams,
            vec![("order-1".to_owned(), ExpectedVersion::Any, vec![0, 2])]
        );
        assert_eq!(c.kv, r.kv);
        let first = &c.events[0];
        assert_eq!(first.id, MessageId(uuid::Uuid::from_u128(1)));
        assert_eq!(first.module.as_deref(), Some("order"));
        assert_eq!(first.payload, Ok(json!({"n": 1})));
        assert_eq!(
            first.headers.stream, None,
            "the stream is the commit's grouping"
        );
        assert_eq!(first.headers.correlation_id.as_deref(), Some("req-1"));

        // A record read for hashing holds only the stored text: the same commit comes out.
        let mut raw = r.clone();
        for m in &mut raw.messages {
            m.payload = serde_json::Value::Null;
            m.headers = Headers::default();
        }
        let from_raw = raw.to_commit();
        assert_eq!(from_raw.streams, c.streams);
        assert!(crate::algebra::diff(&from_raw, &c).only_left.is_empty());
        assert_eq!(crate::algebra::diff(&from_raw, &c).same.len(), 4);
    }

    #[test]
    fn two_records_append_and_diff() {
        let a = record(
            1,
            vec![stored(1, Some("order-1"), json!({"n": 1}))],
            vec![KvWrite::put("cart/1", b"a".to_vec())],
        );
        let b = record(
            2,
            vec![stored(2, Some("order-1"), json!({"n": 2}))],
            vec![KvWrite::put("cart/2", b"b".to_vec())],
        );
        let both = a.to_commit().append(b.to_commit()).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both.streams[0].2, vec![0, 1]);
        assert_eq!(both.kv.len(), 2);
        let d = crate::algebra::diff(&a.to_commit(), &b.to_commit());
        assert!(d.is_disjoint());
        assert_eq!((d.only_left.len(), d.only_right.len()), (2, 2));
        let itself = crate::algebra::diff(&a.to_commit(), &a.to_commit());
        assert_eq!(itself.same.len(), 2);
        assert!(itself.only_left.is_empty() && itself.varied.is_empty());
        // A key both write with different values is a contradiction, named.
        let c = record(3, vec![], vec![KvWrite::put("cart/1", b"z".to_vec())]);
        assert_eq!(
            a.to_commit().append(c.to_commit()).unwrap_err(),
            crate::algebra::Contradiction::Key {
                key: "cart/1".into()
            }
        );
    }
}
