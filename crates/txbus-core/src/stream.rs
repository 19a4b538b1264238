//! Streams: ordered sequences of messages in the log (one per aggregate, saga, …), appended
//! with an expected version that the store checks inside the commit.

use crate::message::StoredMessage;

/// What a writer expects a stream's version to be when it appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// No expectation: append at the end, whatever it is.
    Any,
    /// The stream must not exist yet (no event in it).
    NoStream,
    /// The stream's last event must have exactly this version (events are numbered from 1).
    Exact(u64),
}

impl ExpectedVersion {
    /// True when a stream at `current` (0 = no stream) satisfies this expectation.
    pub fn admits(self, current: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::Exact(v) => current == v,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Messages of one commit that go to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAppend {
    /// The stream id.
    pub stream: String,
    /// The condition the store checks before writing anything.
    pub expected: ExpectedVersion,
    /// Indexes (in the commit) of the messages appended to the stream, in stream order.
    pub message_indexes: Vec<u32>,
}

/// Which way to read a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From `from` upwards (oldest first).
    Forward,
    /// From `from` downwards (newest first); `u64::MAX` starts at the last event.
    Backward,
}

/// One event of a stream, as read back.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The stream id.
    pub stream: String,
    /// Its version in the stream (from 1).
    pub version: u64,
    /// The commit it belongs to (see [`crate::store::AppendReceipt::commit_id`]).
    pub commit_id: u64,
    /// The message.
    pub message: StoredMessage,
}

/// The limit on a stream id's length, in bytes.
pub const MAX_STREAM_ID_BYTES: usize = 200;
