//! Conflicts: a condition of a commit or a key–value write did not hold, so nothing was written.

use crate::kv::KvExpect;
use crate::stream::ExpectedVersion;

/// A condition that did not hold. Match on it to reload and retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Conflict {
    /// A stream was not at the expected version.
    #[error(
        "stream {stream:?} is at version {actual}, expected {expected}; reload it and try again"
    )]
    Stream {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// Where the stream is (0 = no stream).
        actual: u64,
    },
    /// A key did not hold the expected version.
    #[error("key {key:?} holds {}, expected {expected}; read it again and retry", actual.map_or("no entry".to_owned(), |v| format!("version {v}")))]
    Key {
        /// The key.
        key: String,
        /// What the writer expected.
        expected: KvExpect,
        /// Its version (`None` = absent).
        actual: Option<u64>,
    },
    /// The commit acknowledged a delivery (see [`crate::Commit::acknowledging`]) whose lease
    /// this attempt no longer holds: another worker took it over, or it was acknowledged
    /// already. Nothing of the commit was written, so a superseded attempt cannot commit its
    /// effects; the delivery runs where it is leased now.
    #[error("delivery {delivery_id} is no longer leased to this attempt (taken over, or acknowledged already); nothing was written, and the delivery runs where it is leased now")]
    Lease {
        /// The delivery.
        delivery_id: i64,
    },
}
