//! Versions (design note 003): a version is a state plus the sequence of commits that made it.
//! [`crate::Bus::state_at`] opens the version at a log position — the key–value space and the
//! stream heads just after that commit — and [`crate::Bus::diff_versions`] lists what changed
//! between two positions. Every read is bounded (a page of keys, streams or commits).
//!
//! The key–value space of a version is what the log's commits wrote (each commit keeps its key
//! writes, and the data hash covers them). Writes made outside any commit
//! ([`crate::Bus::kv_write`]) are not part of the log and not seen here, nor are the key writes
//! of commits made before the log kept them.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::Error;
use crate::past_page::PastPage;
use crate::store::{CommitRecord, KvVersion, Store};

/// The state just after the commit at one position.
#[derive(Clone)]
pub struct Version {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) position: u64,
    pub(crate) max_examined: usize,
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Version")
            .field("position", &self.position)
            .field("max_examined", &self.max_examined)
            .finish()
    }
}

impl Version {
    /// The position of the last commit of this version.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// How many keys or streams one call of [`kv_scan`](Self::kv_scan) or
    /// [`streams`](Self::streams) examines at most, present in this version or not:
    /// [`crate::past_page::MAX_EXAMINED`] unless set, at least 1, at most
    /// [`crate::past_page::MAX_EXAMINED_LIMIT`].
    pub fn max_examined(mut self, n: usize) -> Self {
        self.max_examined = crate::past_page::bounded(n);
        self
    }

    /// The value `key` held in this version; `None` when no commit up to it wrote the key, or
    /// the last one deleted it.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvVersion>, Error> {
        Ok(self.store.kv_at(key, self.position).await?)
    }

    /// Up to `limit` keys under `prefix` after `after`, in key order, with their values in this
    /// version. One call examines at most [`max_examined`](Self::max_examined) keys, present
    /// or not: continue from the page's `resume_after` until it is `None` (see
    /// [`crate::past_page`]).
    pub async fn kv_scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PastPage<KvVersion>, Error> {
        Ok(self
            .store
            .kv_scan_at(prefix, after, limit, self.position, self.max_examined)
            .await?)
    }

    /// The version of `stream` (its last event's number) in this version; 0 when it had none.
    pub async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        Ok(self.store.stream_version_at(stream, self.position).await?)
    }

    /// Up to `limit` stream heads after `after`, in stream id order. One call examines at most
    /// [`max_examined`](Self::max_examined) streams, with events in this version or not:
    /// continue from the page's `resume_after` until it is `None`.
    pub async fn streams(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PastPage<(String, u64)>, Error> {
        Ok(self
            .store
            .streams_at(after, limit, self.position, self.max_examined)
            .await?)
    }

    /// Up to `limit` of the commits that made this version, after `after_position`, in order.
    pub async fn commits(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<CommitRecord>, Error> {
        if after_position >= self.position {
            return Ok(Vec::new());
        }
        let room = usize::try_from(self.position - after_position).unwrap_or(usize::MAX);
        let mut page = self.store.read_log(after_position, limit.min(room)).await?;
        page.retain(|c| c.position <= self.position);
        Ok(page)
    }
}

/// How a key or stream differs between two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<T> {
    /// Absent in the first, present in the second.
    Added(T),
    /// Present in the first, absent in the second.
    Removed(T),
    /// Present in both, different: (first, second).
    Changed(T, T),
    /// Written in between, and the same in both.
    Same(T),
}

/// A key that commits between the two positions wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The key.
    pub key: String,
    /// Its value in each version.
    pub change: Change<Vec<u8>>,
}

/// A stream that commits between the two positions appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChange {
    /// The stream.
    pub stream: String,
    /// Its version in the first version.
    pub from: u64,
    /// Its version in the second.
    pub to: u64,
}

/// What changed between two positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionDiff {
    /// The first position.
    pub from: u64,
    /// The second position, or where the walk stopped when it was `truncated`.
    pub to: u64,
    /// Commits between them that were read.
    pub commits: u64,
    /// Keys written in between, in key order.
    pub keys: Vec<KeyChange>,
    /// Streams appended to in between, in stream id order.
    pub streams: Vec<StreamChange>,
    /// True when more than `max_commits` lay in between: call again from `to`.
    pub truncated: bool,
}

/// Commits read per page by [`diff`].
const PAGE: usize = 512;

/// What changed between positions `from` and `to` (`from < to`), reading at most `max_commits`.
pub(crate) async fn diff(
    store: &Arc<dyn Store>,
    from: u64,
    to: u64,
    max_commits: usize,
) -> Result<VersionDiff, Error> {
    if from >= to {
        return Err(Error::InvalidCommit(format!(
            "diff_versions needs the first position before the second; got {from} and {to}"
        )));
    }
    let mut keys = BTreeSet::new();
    let mut streams = BTreeSet::new();
    let mut at = from;
    let mut commits = 0u64;
    let mut truncated = false;
    'walk: while at < to {
        let want = PAGE.min(usize::try_from(to - at).unwrap_or(PAGE));
        let page = store.read_log(at, want).await?;
        if page.is_empty() {
            break;
        }
        for c in page {
            if c.position > to {
                break 'walk;
            }
            if commits as usize >= max_commits {
                truncated = true;
                break 'walk;
            }
            keys.extend(c.kv.iter().map(|w| w.key.clone()));
            streams.extend(c.messages.iter().filter_map(|m| m.headers.stream.clone()));
            commits += 1;
            at = c.position;
        }
    }
    let mut key_changes = Vec::with_capacity(keys.len());
    for key in keys {
        let before = store.kv_at(&key, from).await?.map(|v| v.value);
        let after = store.kv_at(&key, at).await?.map(|v| v.value);
        let change = match (before, after) {
            (None, None) => continue,
            (None, Some(v)) => Change::Added(v),
            (Some(v), None) => Change::Removed(v),
            (Some(a), Some(b)) if a == b => Change::Same(a),
            (Some(a), Some(b)) => Change::Changed(a, b),
        };
        key_changes.push(KeyChange { key, change });
    }
    let mut stream_changes = Vec::with_capacity(streams.len());
    for stream in streams {
        let from_v = store.stream_version_at(&stream, from).await?;
        let to_v = store.stream_version_at(&stream, at).await?;
        stream_changes.push(StreamChange {
            stream,
            from: from_v,
            to: to_v,
        });
    }
    Ok(VersionDiff {
        from,
        to: at,
        commits,
        keys: key_changes,
        streams: stream_changes,
        truncated,
    })
}
