//! The conditions of a write: the streams a commit appends to must be at the versions it
//! expects, the keys it writes must hold the versions it expects.
//!
//! A transaction takes an advisory lock for every stream and key its writes touch (all in one
//! statement, in key order, so that writers never deadlock on them), reads where they stand,
//! and checks the writes in order, each against the state the earlier writes of the same
//! transaction leave. A write whose condition fails is refused on its own; the others go on.
//! Every writer of a stream or key, in every process, holds its lock until its transaction
//! ends, so what was read stays true until this one commits; the primary keys of the streams
//! and keys tables stand behind that.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgConnection;
use txbus_core::kv::{self, KvOp, KvWrite};
use txbus_core::store::{Conflict, Error, NewCommit};
use txbus_core::stream::{StreamAppend, MAX_STREAM_ID_BYTES};

use crate::error::db;
use crate::row::{int, signed, unsigned};
use crate::schema::{Guarded, Schema};

/// The conditional part of one write: a commit's stream appends and key writes, or a bare
/// batch of key writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Input<'a> {
    pub(crate) streams: &'a [StreamAppend],
    pub(crate) kv: &'a [KvWrite],
}

/// One stream row to insert: stream, version, index of the message in its commit.
pub(crate) type StreamRow<'a> = (&'a str, i64, i32);

/// What a write whose conditions hold writes.
#[derive(Debug, Default)]
pub(crate) struct Granted<'a> {
    /// Its stream rows.
    pub(crate) streams: Vec<StreamRow<'a>>,
    /// Each key write's new version, in order (0 for a delete).
    pub(crate) versions: Vec<u64>,
}

/// A key as the transaction leaves it: its value, version and expiry, or `None` (removed).
pub(crate) type FinalKey<'a> = Option<(&'a [u8], i64, Option<i64>)>;

/// The checked writes of one transaction.
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    /// One verdict per input, in order.
    pub(crate) verdicts: Vec<Result<Granted<'a>, Conflict>>,
    /// Every key the granted writes touch, as they leave it, in key order.
    pub(crate) keys: BTreeMap<&'a str, FinalKey<'a>>,
}

/// Refuses what no store can write: a stream id that is empty, too long or holds a NUL, a
/// stream named twice, events out of range or in two streams, and key writes that break the
/// limits. Checked before anything is sent to the database.
pub(crate) fn check_commit(commit: &NewCommit) -> Result<(), Error> {
    let mut named: HashSet<&str> = HashSet::with_capacity(commit.streams.len());
    let mut used: HashSet<u32> = HashSet::new();
    for s in &commit.streams {
        if s.stream.is_empty() || s.stream.len() > MAX_STREAM_ID_BYTES || s.stream.contains('\0') {
            return Err(Error::Invalid(format!(
                "stream id {:?} must be 1 to {MAX_STREAM_ID_BYTES} bytes without NUL characters",
                s.stream
            )));
        }
        if !named.insert(&s.stream) {
            return Err(Error::Invalid(format!(
                "stream {:?} appears twice in one commit; put its events in one list",
                s.stream
            )));
        }
        if s.message_indexes.is_empty() {
            return Err(Error::Invalid(format!(
                "stream {:?} is given no events",
                s.stream
            )));
        }
        for &i in &s.message_indexes {
            if !usize::try_from(i).is_ok_and(|i| i < commit.messages.len()) {
                return Err(Error::Invalid(format!(
                    "stream {:?}: event index {i} is out of range ({} events)",
                    s.stream,
                    commit.messages.len()
                )));
            }
            if !used.insert(i) {
                return Err(Error::Invalid(format!(
                    "stream {:?}: event {i} is appended to a stream twice",
                    s.stream
                )));
            }
        }
    }
    check_writes(&commit.kv)
}

/// Refuses key writes that break the limits, or whose key holds a NUL character (which
/// PostgreSQL text cannot store).
pub(crate) fn check_writes(writes: &[KvWrite]) -> Result<(), Error> {
    kv::check_writes(writes).map_err(Error::Invalid)?;
    if let Some((i, w)) = writes
        .iter()
        .enumerate()
        .find(|(_, w)| w.key.contains('\0'))
    {
        return Err(Error::Invalid(format!(
            "key-value write {i} ({:?}): the key holds a NUL character",
            w.key
        )));
    }
    Ok(())
}

/// Locks, reads and checks the conditions of `inputs` in the caller's transaction, at `now`.
pub(crate) async fn plan<'a>(
    conn: &mut PgConnection,
    schema: &Schema,
    inputs: &[Input<'a>],
    now: i64,
) -> Result<Plan<'a>, Error> {
    let mut streams: Vec<&str> = inputs
        .iter()
        .flat_map(|i| i.streams.iter().map(|s| s.stream.as_str()))
        .collect();
    streams.sort_unstable();
    streams.dedup();
    let mut keys: Vec<&str> = inputs
        .iter()
        .flat_map(|i| i.kv.iter().map(|w| w.key.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if streams.is_empty() && keys.is_empty() {
        return Ok(Plan {
            verdicts: inputs.iter().map(|_| Ok(Granted::default())).collect(),
            keys: BTreeMap::new(),
        });
    }

    let mut locks: Vec<i64> = streams
        .iter()
        .map(|s| schema.lock_key(Guarded::Stream, s))
        .chain(keys.iter().map(|k| schema.lock_key(Guarded::Key, k)))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    // The array is sorted and a function scan yields it in order: every transaction takes its
    // locks in the same order, so none waits in a circle.
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::BIGINT[]) AS k")
        .bind(&locks)
        .execute(&mut *conn)
        .await
        .map_err(db("locking streams and keys"))?;

    // A statement of its own, after the locks: its snapshot sees what their last holders
    // committed.
    let rows: Vec<(i16, String, i64, Option<i64>)> = sqlx::query_as(&schema.sql(
        "SELECT 0::SMALLINT, u.s,
                COALESCE((SELECT MAX(version) FROM {s}.streams WHERE stream = u.s), 0),
                NULL::BIGINT
         FROM UNNEST($1::TEXT[]) AS u(s)
         UNION ALL
         SELECT 1::SMALLINT, key, version, expires_at FROM {s}.kv WHERE key = ANY($2::TEXT[])",
    ))
    .bind(&streams)
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading stream versions and key versions"))?;

    let mut stream_at: HashMap<&str, u64> = streams.iter().map(|s| (*s, 0)).collect();
    let mut key_at: HashMap<&str, Option<u64>> = keys.iter().map(|k| (*k, None)).collect();
    for (what, name, version, expires_at) in &rows {
        if *what == 0 {
            if let Some(v) = stream_at.get_mut(name.as_str()) {
                *v = unsigned(*version);
            }
        } else if expires_at.is_none_or(|at| at > now) {
            // An expired entry reads as absent.
            if let Some(v) = key_at.get_mut(name.as_str()) {
                *v = Some(unsigned(*version));
            }
        }
    }
    Ok(check(inputs, stream_at, key_at, now))
}

/// Checks each input in order against the state the granted ones before it leave.
fn check<'a>(
    inputs: &[Input<'a>],
    mut stream_at: HashMap<&'a str, u64>,
    mut key_at: HashMap<&'a str, Option<u64>>,
    now: i64,
) -> Plan<'a> {
    let mut plan = Plan {
        verdicts: Vec::with_capacity(inputs.len()),
        keys: BTreeMap::new(),
    };
    for input in inputs {
        let refused = input
            .streams
            .iter()
            .find_map(|s| {
                let actual = stream_at.get(s.stream.as_str()).copied().unwrap_or(0);
                (!s.expected.admits(actual)).then(|| Conflict::Stream {
                    stream: s.stream.clone(),
                    expected: s.expected,
                    actual,
                })
            })
            .or_else(|| {
                input.kv.iter().find_map(|w| {
                    let actual = key_at.get(w.key.as_str()).copied().flatten();
                    (!w.expect.admits(actual)).then(|| Conflict::Key {
                        key: w.key.clone(),
                        expected: w.expect,
                        actual,
                    })
                })
            });
        if let Some(conflict) = refused {
            plan.verdicts.push(Err(conflict));
            continue;
        }
        let mut granted = Granted::default();
        for s in input.streams {
            let at = stream_at.entry(s.stream.as_str()).or_insert(0);
            for &idx in &s.message_indexes {
                *at += 1;
                granted
                    .streams
                    .push((s.stream.as_str(), signed(*at), int(idx)));
            }
        }
        for w in input.kv {
            let at = key_at.entry(w.key.as_str()).or_insert(None);
            match &w.op {
                KvOp::Put { value, ttl } => {
                    let version = at.map_or(1, |v| v + 1);
                    *at = Some(version);
                    plan.keys.insert(
                        w.key.as_str(),
                        Some((value.as_slice(), signed(version), kv::expiry(now, *ttl))),
                    );
                    granted.versions.push(version);
                }
                KvOp::Delete => {
                    *at = None;
                    plan.keys.insert(w.key.as_str(), None);
                    granted.versions.push(0);
                }
            }
        }
        plan.verdicts.push(Ok(granted));
    }
    plan
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use txbus_core::kv::{KvExpect, KvWrite};
    use txbus_core::store::Conflict;
    use txbus_core::stream::{ExpectedVersion, StreamAppend};

    use super::{check, Input};

    fn append(stream: &str, expected: ExpectedVersion, n: u32) -> Vec<StreamAppend> {
        vec![StreamAppend {
            stream: stream.into(),
            expected,
            message_indexes: (0..n).collect(),
        }]
    }

    #[test]
    fn later_writes_of_a_batch_see_the_earlier_ones() {
        let a = append("s", ExpectedVersion::NoStream, 2);
        let b = append("s", ExpectedVersion::NoStream, 1);
        let c = append("s", ExpectedVersion::Exact(2), 1);
        let d = append("s", ExpectedVersion::Any, 2);
        let inputs: Vec<Input<'_>> = [&a, &b, &c, &d]
            .iter()
            .map(|s| Input {
                streams: s.as_slice(),
                kv: &[],
            })
            .collect();
        let plan = check(&inputs, HashMap::new(), HashMap::new(), 0);
        let rows: Vec<Vec<i64>> = plan
            .verdicts
            .iter()
            .filter_map(|v| v.as_ref().ok())
            .map(|g| g.streams.iter().map(|r| r.1).collect())
            .collect();
        assert_eq!(rows, vec![vec![1, 2], vec![3], vec![4, 5]]);
        assert_eq!(
            plan.verdicts[1].as_ref().unwrap_err(),
            &Conflict::Stream {
                stream: "s".into(),
                expected: ExpectedVersion::NoStream,
                actual: 2
            }
        );
    }

    #[test]
    fn a_refused_write_leaves_no_trace_for_the_next() {
        let first = [
            KvWrite::put("a", b"1".to_vec()),
            KvWrite::put("b", b"1".to_vec()).expect(KvExpect::Version(9)),
        ];
        let second = [KvWrite::put("a", b"2".to_vec()).expect(KvExpect::Absent)];
        let inputs = [
            Input {
                streams: &[],
                kv: &first,
            },
            Input {
                streams: &[],
                kv: &second,
            },
        ];
        let plan = check(&inputs, HashMap::new(), HashMap::new(), 0);
        assert!(matches!(
            plan.verdicts[0],
            Err(Conflict::Key { actual: None, .. })
        ));
        assert_eq!(plan.verdicts[1].as_ref().unwrap().versions, vec![1]);
        assert_eq!(plan.keys.len(), 1);
    }
}
