//! Snapshots of aggregates, in the store's key–value space under `snapshot/<stream>`.

use serde::{Deserialize, Serialize};
use txbus_core::KvEntry;

use crate::aggregate::Aggregate;
use crate::error::Error;

/// The prefix of every snapshot key.
pub const SNAPSHOT_PREFIX: &str = "snapshot/";

/// The key of `stream`'s snapshot.
pub fn snapshot_key(stream: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{stream}")
}

/// A snapshot as stored (JSON): the aggregate's state after `stream_version` events, in the
/// shape `snapshot_version` of [`Aggregate::SNAPSHOT_VERSION`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot<S> {
    /// The aggregate's snapshot version when it was written.
    pub snapshot_version: u32,
    /// How many events of the stream the state includes.
    pub stream_version: u64,
    /// The state.
    pub state: S,
}

/// Only the header, to decide whether to read the rest.
#[derive(Deserialize)]
struct Header {
    snapshot_version: u32,
}

/// What a stored snapshot is good for.
pub(crate) enum Found<A> {
    /// Usable: the state and the stream version it includes.
    Usable(A, u64),
    /// Of another shape or unreadable: ignore it (and replace it).
    Stale(String),
}

/// Reads a stored snapshot for `A`.
pub(crate) fn decode<A: Aggregate>(entry: &KvEntry) -> Found<A> {
    let header: Header = match serde_json::from_slice(&entry.value) {
        Ok(h) => h,
        Err(e) => return Found::Stale(format!("unreadable: {e}")),
    };
    if header.snapshot_version != A::SNAPSHOT_VERSION {
        return Found::Stale(format!(
            "snapshot version {} is not the aggregate's {}",
            header.snapshot_version,
            A::SNAPSHOT_VERSION
        ));
    }
    match serde_json::from_slice::<Snapshot<A>>(&entry.value) {
        Ok(s) => Found::Usable(s.state, s.stream_version),
        Err(e) => Found::Stale(format!("state does not decode: {e}")),
    }
}

/// The stored form of `state` after `stream_version` events.
pub(crate) fn encode<A: Aggregate>(state: &A, stream_version: u64) -> Result<Vec<u8>, Error> {
    #[derive(Serialize)]
    struct Borrowed<'a, S> {
        snapshot_version: u32,
        stream_version: u64,
        state: &'a S,
    }
    serde_json::to_vec(&Borrowed {
        snapshot_version: A::SNAPSHOT_VERSION,
        stream_version,
        state,
    })
    .map_err(|e| Error::Encode {
        what: format!("a snapshot of {}", A::KIND),
        reason: e.to_string(),
    })
}
