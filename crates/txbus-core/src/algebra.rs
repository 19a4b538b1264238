//! The commit algebra of design note 003: append (`C1 +> C2`) and diff (`C1 Δ C2`).
//!
//! - [`Commit::append`] makes one commit holding `self`'s changes and, after them, `other`'s. It
//!   fails with a [`Contradiction`] when the two cannot both hold: a key written with different
//!   values, two appends to one stream at the same expected version (or any pair of stream
//!   expectations that cannot both be met), one event in both, two operation ids.
//! - [`diff`] compares two commits entity by entity — events by message id, key–value writes by
//!   key — into the note's four parts: only in the left, the same in both, varied, only in the
//!   right. Disjoint commits (`same` and `varied` empty) can be applied in either order.
//!
//! ```
//! use serde_json::json;
//! use txbus_core::{algebra, Commit, Event, ExpectedVersion, KvWrite};
//!
//! let a = Commit::new()
//!     .stream("order-7", ExpectedVersion::Exact(3), [Event::new("order.item-added", json!({"sku": "A1"}))])
//!     .kv(KvWrite::put("orders/7/total", b"10".to_vec()));
//! let b = Commit::new()
//!     .stream("order-7", ExpectedVersion::Exact(4), [Event::new("order.item-added", json!({"sku": "B2"}))]);
//! let both = a.clone().append(b.clone()).unwrap();   // order-7 at 3, then two events
//! assert_eq!(both.len(), 2);
//!
//! // Two appends to one stream at the same version contradict each other.
//! let c = Commit::new()
//!     .stream("order-7", ExpectedVersion::Exact(3), [Event::new("order.cancelled", json!({}))]);
//! assert!(a.clone().append(c).is_err());
//!
//! let d = algebra::diff(&a, &b);
//! assert_eq!((d.only_left.len(), d.same.len(), d.varied.len(), d.only_right.len()), (2, 0, 0, 1));
//! ```

use std::collections::HashMap;

use crate::commit::Commit;
use crate::kv::{KvExpect, KvWrite};
use crate::message::{Event, MessageId, OperationId};
use crate::stream::ExpectedVersion;

/// Why two commits cannot be appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Contradiction {
    /// Both commits write one key, with different values (or one puts and one deletes).
    #[error("key {key:?} is written by both commits with different values")]
    Key {
        /// The key.
        key: String,
    },
    /// Both write one key with the same value but under conditions that cannot both hold.
    #[error("key {key:?} is written by both commits under different conditions")]
    KeyCondition {
        /// The key.
        key: String,
    },
    /// The second commit's expectation on a stream cannot hold after the first one's events,
    /// e.g. both append at the same expected version.
    #[error(
        "stream {stream:?}: the first commit appends {appended} event(s) expecting {first}; the second expects {second}, which cannot hold after them"
    )]
    Stream {
        /// The stream.
        stream: String,
        /// What the first commit expects.
        first: ExpectedVersion,
        /// How many events the first commit appends.
        appended: u64,
        /// What the second commit expects.
        second: ExpectedVersion,
    },
    /// One message id is in both commits.
    #[error("event {id} is in both commits; an event is committed once")]
    Event {
        /// The message id.
        id: MessageId,
    },
    /// The commits carry different caller-chosen operation ids.
    #[error("the commits carry different operation ids ({first} and {second})")]
    OperationId {
        /// The first commit's.
        first: OperationId,
        /// The second's.
        second: OperationId,
    },
}

/// The combined expectation of two appends to one stream, `first` with `appended` events and
/// then `second`; `None` when they contradict each other.
fn combine(
    first: ExpectedVersion,
    appended: u64,
    second: ExpectedVersion,
) -> Option<ExpectedVersion> {
    let start = match first {
        ExpectedVersion::Exact(v) => Some(v),
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Any => None,
    };
    match second {
        ExpectedVersion::Any => Some(first),
        // The first commit appends at least one event, so the stream exists after it.
        ExpectedVersion::NoStream => None,
        ExpectedVersion::Exact(w) => match start {
            Some(v) => (v.checked_add(appended) == Some(w)).then_some(first),
            // `Any` before: it held only if the stream was at `w - appended`.
            None => w.checked_sub(appended).map(|v| {
                if v == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(v)
                }
            }),
        },
    }
}

impl Commit {
    /// `self +> other`: one commit with `self`'s changes and, after them, `other`'s (events in
    /// that order, stream appends joined with the expectation that makes both hold, key writes
    /// merged). Fails with the first [`Contradiction`] found; nothing is combined then.
    pub fn append(self, other: Commit) -> Result<Commit, Contradiction> {
        let operation_id = match (self.operation_id, other.operation_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(Contradiction::OperationId {
                    first: a,
                    second: b,
                })
            }
            (a, b) => a.or(b),
        };
        for e in &other.events {
            if self.events.iter().any(|x| x.id == e.id) {
                return Err(Contradiction::Event { id: e.id });
            }
        }
        // Key writes: the same key in both must be the same write.
        let mut kv = self.kv;
        for w in other.kv {
            match kv.iter_mut().find(|x| x.key == w.key) {
                None => kv.push(w),
                Some(x) if x.op != w.op => return Err(Contradiction::Key { key: w.key }),
                // One write: its conditions must agree, `Any` agreeing with every other.
                Some(x) if x.expect == w.expect || w.expect == KvExpect::Any => {}
                Some(x) if x.expect == KvExpect::Any => x.expect = w.expect,
                Some(_) => return Err(Contradiction::KeyCondition { key: w.key }),
            }
        }
        let offset = self.events.len();
        let mut streams = self.streams;
        for (stream, expected, indexes) in other.streams {
            let shifted = indexes.iter().map(|i| i + offset);
            match streams.iter_mut().find(|(s, _, _)| *s == stream) {
                None => streams.push((stream, expected, shifted.collect())),
                Some((_, first, first_indexes)) => {
                    let appended = first_indexes.len() as u64;
                    let combined = combine(*first, appended, expected).ok_or_else(|| {
                        Contradiction::Stream {
                            stream: stream.clone(),
                            first: *first,
                            appended,
                            second: expected,
                        }
                    })?;
                    *first = combined;
                    first_indexes.extend(shifted);
                }
            }
        }
        let mut events = self.events;
        events.extend(other.events);
        let mut acks = self.acks;
        for ack in other.acks {
            if !acks.iter().any(|a| std::sync::Arc::ptr_eq(a, &ack)) {
                acks.push(ack);
            }
        }
        Ok(Commit {
            events,
            streams,
            kv,
            operation_id,
            acks,
            unackable: self.unackable + other.unackable,
        })
    }
}

/// One entity of a commit, as [`diff`] compares them.
#[derive(Debug, Clone)]
pub enum Entity {
    /// An event (with the stream it is appended to, if any).
    Event {
        /// The event.
        event: Event,
        /// Its stream and the commit's expectation on that stream.
        stream: Option<(String, ExpectedVersion)>,
    },
    /// A key–value write.
    Key(KvWrite),
}

impl Entity {
    /// Its identity: `event:<message id>` or `key:<key>`.
    pub fn id(&self) -> String {
        match self {
            Self::Event { event, .. } => format!("event:{}", event.id),
            Self::Key(w) => format!("key:{}", w.key),
        }
    }
}

impl PartialEq for Entity {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Event {
                    event: a,
                    stream: sa,
                },
                Self::Event {
                    event: b,
                    stream: sb,
                },
            ) => {
                a.id == b.id
                    && a.event_type == b.event_type
                    && a.module == b.module
                    && a.payload == b.payload
                    && a.headers == b.headers
                    && sa == sb
            }
            (Self::Key(a), Self::Key(b)) => a == b,
            _ => false,
        }
    }
}

/// The four parts of `C1 Δ C2`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    /// Entities only in the left commit.
    pub only_left: Vec<Entity>,
    /// Entities equal in both.
    pub same: Vec<Entity>,
    /// Entities in both with different content: (left, right).
    pub varied: Vec<(Entity, Entity)>,
    /// Entities only in the right commit.
    pub only_right: Vec<Entity>,
}

impl Diff {
    /// True when the commits share no entity: they can be applied in either order.
    pub fn is_disjoint(&self) -> bool {
        self.same.is_empty() && self.varied.is_empty()
    }
}

fn entities(c: &Commit) -> Vec<Entity> {
    let mut stream_of: HashMap<usize, (String, ExpectedVersion)> = HashMap::new();
    for (stream, expected, indexes) in &c.streams {
        for &i in indexes {
            stream_of.insert(i, (stream.clone(), *expected));
        }
    }
    let mut out: Vec<Entity> = c
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| Entity::Event {
            event: e.clone(),
            stream: stream_of.remove(&i),
        })
        .collect();
    out.extend(c.kv.iter().cloned().map(Entity::Key));
    out
}

/// `left Δ right`, grouped by entity id (events by message id, key writes by key), each part in
/// the order of the commit it comes from.
pub fn diff(left: &Commit, right: &Commit) -> Diff {
    let left = entities(left);
    let right = entities(right);
    let right_ids: HashMap<String, usize> =
        right.iter().enumerate().map(|(i, e)| (e.id(), i)).collect();
    let mut matched = vec![false; right.len()];
    let mut d = Diff::default();
    for l in left {
        match right_ids.get(&l.id()) {
            None => d.only_left.push(l),
            Some(&i) => {
                matched[i] = true;
                if l == right[i] {
                    d.same.push(l);
                } else {
                    d.varied.push((l, right[i].clone()));
                }
            }
        }
    }
    d.only_right = right
        .into_iter()
        .zip(matched)
        .filter_map(|(e, m)| (!m).then_some(e))
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Events with ids drawn from a small pool (so commits share some), on a few streams, and
    /// key writes over a few keys and values.
    fn arb_commit() -> impl Strategy<Value = Commit> {
        let event = (0u8..12, 0u8..3).prop_map(|(id, v)| {
            Event::new("t.e", json!({ "v": v }))
                .with_id(MessageId(uuid::Uuid::from_u128(u128::from(id) + 1)))
        });
        let expected = prop_oneof![
            Just(ExpectedVersion::Any),
            Just(ExpectedVersion::NoStream),
            (0u64..6).prop_map(ExpectedVersion::Exact),
        ];
        let stream = (0u8..3, expected, prop::collection::vec(event.clone(), 1..3));
        let kv = (0u8..4, 0u8..2, prop::bool::ANY).prop_map(|(k, v, any)| {
            let w = KvWrite::put(format!("k{k}"), vec![v]);
            if any {
                w
            } else {
                w.expect(crate::KvExpect::Absent)
            }
        });
        (
            prop::collection::vec(event, 0..3),
            prop::collection::vec(stream, 0..3),
            prop::collection::vec(kv, 0..3),
        )
            .prop_map(|(events, streams, kvs)| {
                let mut c = Commit::new().events(events);
                let mut seen_streams = Vec::new();
                for (s, expected, events) in streams {
                    if !seen_streams.contains(&s) {
                        seen_streams.push(s);
                        c = c.stream(format!("s{s}"), expected, events);
                    }
                }
                let mut seen_keys: Vec<String> = Vec::new();
                for w in kvs {
                    if !seen_keys.contains(&w.key) {
                        seen_keys.push(w.key.clone());
                        c = c.kv(w);
                    }
                }
                c
            })
            .prop_filter("one message id once per commit", |c| {
                let mut ids: Vec<_> = c.events.iter().map(|e| e.id).collect();
                ids.sort();
                ids.dedup();
                ids.len() == c.events.len()
            })
    }

    /// A commit's content in a comparable form: events in order, streams (as id, expectation
    /// and message ids), key writes by key.
    type Shape = (
        Vec<String>,
        Vec<(String, ExpectedVersion, Vec<MessageId>)>,
        Vec<KvWrite>,
    );

    fn shape(c: &Commit) -> Shape {
        let events = c
            .events
            .iter()
            .map(|e| format!("{}:{:?}", e.id, e.payload))
            .collect();
        let mut streams: Vec<_> = c
            .streams
            .iter()
            .map(|(s, x, idx)| {
                // Exact(0) and NoStream admit the same streams.
                let x = if *x == ExpectedVersion::Exact(0) {
                    ExpectedVersion::NoStream
                } else {
                    *x
                };
                (s.clone(), x, idx.iter().map(|&i| c.events[i].id).collect())
            })
            .collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kv = c.kv.clone();
        kv.sort_by(|a, b| a.key.cmp(&b.key));
        (events, streams, kv)
    }

    proptest! {
        #[test]
        fn append_is_associative_where_defined(a in arb_commit(), b in arb_commit(), c in arb_commit()) {
            let left = a.clone().append(b.clone()).and_then(|ab| ab.append(c.clone()));
            let right = b.append(c).and_then(|bc| a.append(bc));
            match (left, right) {
                (Ok(l), Ok(r)) => prop_assert_eq!(shape(&l), shape(&r)),
                (Err(_), Err(_)) => {}
                (l, r) => prop_assert!(false, "defined on one side only: {:?} / {:?}", l.map(|c| shape(&c)), r.map(|c| shape(&c))),
            }
        }

        #[test]
        fn the_empty_commit_is_neutral(a in arb_commit()) {
            prop_assert_eq!(shape(&Commit::new().append(a.clone()).unwrap()), shape(&a));
            prop_assert_eq!(shape(&a.clone().append(Commit::new()).unwrap()), shape(&a));
        }

        #[test]
        fn diff_with_itself_is_all_same(a in arb_commit()) {
            let d = diff(&a, &a);
            prop_assert!(d.only_left.is_empty() && d.varied.is_empty() && d.only_right.is_empty());
            prop_assert_eq!(d.same.len(), a.events.len() + a.kv.len());
        }

        #[test]
        fn diff_is_symmetric(a in arb_commit(), b in arb_commit()) {
            let ab = diff(&a, &b);
            let ba = diff(&b, &a);
            prop_assert_eq!(ab.only_left.len(), ba.only_right.len());
            prop_assert_eq!(ab.only_right.len(), ba.only_left.len());
            prop_assert_eq!(ab.same.len(), ba.same.len());
            prop_assert_eq!(ab.varied.len(), ba.varied.len());
            // Every entity of each side lands in exactly one part.
            prop_assert_eq!(ab.only_left.len() + ab.same.len() + ab.varied.len(), a.events.len() + a.kv.len());
        }

        #[test]
        fn disjoint_commits_append_in_either_order(a in arb_commit(), b in arb_commit()) {
            let d = diff(&a, &b);
            let shares_stream = a.streams.iter().any(|(s, _, _)| b.streams.iter().any(|(t, _, _)| s == t));
            if d.is_disjoint() && !shares_stream && (a.operation_id.is_none() || b.operation_id.is_none()) {
                let ab = a.clone().append(b.clone()).unwrap();
                let ba = b.append(a).unwrap();
                let (_, mut s1, k1) = shape(&ab);
                let (_, mut s2, k2) = shape(&ba);
                s1.sort_by(|x, y| x.0.cmp(&y.0));
                s2.sort_by(|x, y| x.0.cmp(&y.0));
                prop_assert_eq!(s1, s2);
                prop_assert_eq!(k1, k2);
            }
        }
    }

    #[test]
    fn contradictions_are_named() {
        let put = |v: &[u8]| KvWrite::put("cart/1", v.to_vec());
        let err = Commit::new()
            .kv(put(b"a"))
            .append(Commit::new().kv(put(b"b")))
            .unwrap_err();
        assert_eq!(
            err,
            Contradiction::Key {
                key: "cart/1".into()
            }
        );
        assert!(err.to_string().contains("cart/1"), "{err}");
        let at = |v| {
            Commit::new().stream(
                "order-1",
                ExpectedVersion::Exact(v),
                [Event::new("o.e", json!({}))],
            )
        };
        let err = at(2).append(at(2)).unwrap_err();
        assert!(
            matches!(&err, Contradiction::Stream { stream, .. } if stream == "order-1"),
            "{err}"
        );
        assert!(err.to_string().contains("version 2"), "{err}");
        // One after the other is fine: 2 -> 3, then at 3.
        let both = at(2).append(at(3)).unwrap();
        assert_eq!(both.streams[0].1, ExpectedVersion::Exact(2));
        assert_eq!(both.streams[0].2, vec![0, 1]);
        // The same write twice is one write.
        let same = Commit::new()
            .kv(put(b"a"))
            .append(Commit::new().kv(put(b"a")))
            .unwrap();
        assert_eq!(same.kv.len(), 1);
        // `Any` followed by an exact version fixes where the stream must start.
        let any = Commit::new().stream(
            "s",
            ExpectedVersion::Any,
            [Event::new("o.e", json!({})), Event::new("o.e", json!({}))],
        );
        let fixed = any
            .append(Commit::new().stream(
                "s",
                ExpectedVersion::Exact(5),
                [Event::new("o.e", json!({}))],
            ))
            .unwrap();
        assert_eq!(fixed.streams[0].1, ExpectedVersion::Exact(3));
    }

    #[test]
    fn diff_sorts_into_four_parts() {
        let shared = Event::new("a.b", json!({"x": 1}));
        let changed = Event::new("a.b", json!({"x": 1}));
        let mut changed_later = changed.clone();
        changed_later.payload = Ok(json!({"x": 2}));
        let left = Commit::new()
            .event(shared.clone())
            .event(changed)
            .kv(KvWrite::put("only-left", b"1".to_vec()));
        let right = Commit::new()
            .event(shared)
            .event(changed_later)
            .kv(KvWrite::put("only-right", b"1".to_vec()));
        let d = diff(&left, &right);
        assert_eq!(d.same.len(), 1);
        assert_eq!(d.varied.len(), 1);
        assert_eq!(d.only_left[0].id(), "key:only-left");
        assert_eq!(d.only_right[0].id(), "key:only-right");
        assert!(!d.is_disjoint());
    }
}
