//! The hash chain over commits: a data hash per commit and a chain hash linking it to its parent.
//!
//! `data = SHA-256(canonical content)`, `chain = SHA-256(data ‖ parent chain)`; the first commit's
//! parent chain is 32 zero bytes. Any edited, removed or reordered commit changes a hash from that
//! point on, and [`verify`] reports the first commit that does not match.

use sha2::{Digest, Sha256};

use crate::store::{CommitKind, CommitRecord, LogMessage, Store};

/// A 32-byte SHA-256 digest.
pub type Hash = [u8; 32];

/// The parent chain hash of the first commit.
pub const GENESIS: Hash = [0u8; 32];

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The data hash of a commit: its operation id, kind, time and every message, field by field,
/// each length-prefixed so that no two different contents hash alike.
pub fn data_hash<'a>(
    operation_id: &uuid::Uuid,
    kind: CommitKind,
    created_at_ms: i64,
    messages: impl IntoIterator<Item = LogMessage<'a>>,
) -> Hash {
    let mut h = Sha256::new();
    h.update(b"txbus-commit-v1");
    field(&mut h, operation_id.as_bytes());
    field(&mut h, &[kind as u8]);
    field(&mut h, &created_at_ms.to_be_bytes());
    for m in messages {
        field(&mut h, m.id.as_bytes());
        field(&mut h, m.event_type.as_bytes());
        match m.module {
            Some(module) => {
                h.update([1u8]);
                field(&mut h, module.as_bytes());
            }
            None => h.update([0u8]),
        }
        field(&mut h, m.payload_json.as_bytes());
        field(&mut h, m.headers_json.as_bytes());
    }
    h.finalize().into()
}

/// The chain hash: data hash linked to the parent's chain hash.
pub fn chain_hash(data: &Hash, parent_chain: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(data);
    h.update(parent_chain);
    h.finalize().into()
}

/// Where verification stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The stored data hash does not match the commit's content: the commit was edited.
    DataMismatch,
    /// The stored chain hash does not match: a commit before it was removed, reordered or re-hashed.
    ChainMismatch,
    /// Positions are not consecutive: commits are missing.
    Gap {
        /// The position expected next.
        expected: u64,
    },
}

/// The result of walking the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Commits that verified.
    pub verified: u64,
    /// The first commit that did not, and why; `None` when the whole log is intact.
    pub first_broken: Option<(u64, Broken)>,
}

impl VerifyReport {
    /// True when every commit verified.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// Checks one commit against its parent's chain hash.
pub fn check(record: &CommitRecord, parent_chain: &Hash) -> Option<Broken> {
    let data = data_hash(
        &record.operation_id.0,
        record.kind,
        record.created_at_ms,
        record.messages.iter().map(LogMessage::from),
    );
    if data != record.data_hash {
        return Some(Broken::DataMismatch);
    }
    if chain_hash(&data, parent_chain) != record.chain_hash {
        return Some(Broken::ChainMismatch);
    }
    None
}

/// How far a walk of the log has come, reported after each page it checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyProgress {
    /// Commits verified so far.
    pub verified: u64,
    /// The position of the last commit verified (0 before the first).
    pub position: u64,
}

/// How many commits [`verify`] reads per page, and so how often it reports progress.
pub const VERIFY_PAGE: usize = 512;

/// Walks the whole log in pages and reports the first commit that does not verify.
pub async fn verify(store: &dyn Store) -> Result<VerifyReport, crate::store::Error> {
    verify_with_progress(store, |_| {}).await
}

/// Walks the whole log like [`verify`], calling `progress` after every page of
/// [`VERIFY_PAGE`] commits, so that a long walk can show how far it is (a progress bar, a log
/// line). The callback runs between reads: keep it cheap.
pub async fn verify_with_progress<F>(
    store: &dyn Store,
    mut progress: F,
) -> Result<VerifyReport, crate::store::Error>
where
    F: FnMut(VerifyProgress) + Send,
{
    let mut parent = GENESIS;
    let mut expected = 1u64;
    let mut verified = 0u64;
    loop {
        let page = store.read_log(expected - 1, VERIFY_PAGE).await?;
        if page.is_empty() {
            return Ok(VerifyReport {
                verified,
                first_broken: None,
            });
        }
        for record in page {
            if record.position != expected {
                return Ok(VerifyReport {
                    verified,
                    first_broken: Some((expected, Broken::Gap { expected })),
                });
            }
            if let Some(broken) = check(&record, &parent) {
                return Ok(VerifyReport {
                    verified,
                    first_broken: Some((record.position, broken)),
                });
            }
            parent = record.chain_hash;
            verified += 1;
            expected += 1;
        }
        progress(VerifyProgress {
            verified,
            position: expected - 1,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(payload: &'a str) -> LogMessage<'a> {
        LogMessage {
            id: uuid::Uuid::nil(),
            event_type: "a",
            module: None,
            payload_json: payload,
            headers_json: "{}",
        }
    }

    #[test]
    fn any_change_changes_the_hash() {
        let op = uuid::Uuid::nil();
        let a = data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":1}")]);
        assert_eq!(
            a,
            data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":1}")])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":2}")])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Publish, 1, [msg("{\"x\":1}")])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Transact, 2, [msg("{\"x\":1}")])
        );
        let mut with_module = msg("{\"x\":1}");
        with_module.module = Some("");
        assert_ne!(a, data_hash(&op, CommitKind::Transact, 1, [with_module]));
        assert_ne!(chain_hash(&a, &GENESIS), chain_hash(&a, &a));
    }
}
