//! The store's key–value space: small values with compare-and-set and expiry, for snapshots,
//! checkpoints, idempotency keys, dedupe marks and indexes.

use std::time::Duration;

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Its version: 1 when created, one more on every write. A key that was deleted (or
    /// expired) starts again at 1.
    pub version: u64,
    /// When it expires, ms since the epoch; expired entries read as absent.
    pub expires_at_ms: Option<i64>,
}

/// The condition a write needs to hold, checked by the store inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvExpect {
    /// Write whatever is there.
    Any,
    /// Only if the key is absent (or expired).
    Absent,
    /// Only if the key holds exactly this version.
    Version(u64),
}

impl KvExpect {
    /// True when a key at `current` (`None` = absent) satisfies this condition.
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::Absent => current.is_none(),
            Self::Version(v) => current == Some(v),
        }
    }
}

impl std::fmt::Display for KvExpect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("anything"),
            Self::Absent => f.write_str("no entry"),
            Self::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// What a write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Sets the value; with a time to live, the entry expires that long after this write.
    Put {
        /// The value.
        value: Vec<u8>,
        /// Expire after this long; `None` keeps it until deleted.
        ttl: Option<Duration>,
    },
    /// Removes the entry.
    Delete,
}

/// One key–value write. Writes handed to the store together apply atomically: all or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    /// The key (at most [`MAX_KEY_BYTES`]).
    pub key: String,
    /// What to do.
    pub op: KvOp,
    /// The condition.
    pub expect: KvExpect,
}

impl KvWrite {
    /// Sets `key` to `value`, whatever was there.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: KvOp::Put {
                value: value.into(),
                ttl: None,
            },
            expect: KvExpect::Any,
        }
    }

    /// Removes `key`, whatever was there.
    pub fn delete(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: KvOp::Delete,
            expect: KvExpect::Any,
        }
    }

    /// Applies only under this condition.
    pub fn expect(mut self, expect: KvExpect) -> Self {
        self.expect = expect;
        self
    }

    /// Expires this long after the write (puts only).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        if let KvOp::Put { ttl: t, .. } = &mut self.op {
            *t = Some(ttl);
        }
        self
    }
}

/// The limit on a key's length, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// The limit on a value's length, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// Checks a batch of writes against the limits; the error names the write and the reason.
pub fn check_writes(writes: &[KvWrite]) -> Result<(), String> {
    for (i, w) in writes.iter().enumerate() {
        if w.key.is_empty() {
            return Err(format!("key-value write {i}: the key is empty"));
        }
        if w.key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "key-value write {i} ({:?}…): the key is {} bytes; the limit is {MAX_KEY_BYTES}",
                w.key.chars().take(40).collect::<String>(),
                w.key.len()
            ));
        }
        if let KvOp::Put { value, .. } = &w.op {
            if value.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "key-value write {i} ({:?}): the value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                    w.key,
                    value.len()
                ));
            }
        }
        if writes[..i].iter().any(|o| o.key == w.key) {
            return Err(format!(
                "key-value write {i} ({:?}): the key is written twice in one batch",
                w.key
            ));
        }
    }
    Ok(())
}

/// The time an entry written now with `ttl` expires, ms since the epoch.
pub fn expiry(now_ms: i64, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| now_ms.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)))
}
