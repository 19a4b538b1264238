//! The hash chain over commits: a data hash per commit and a chain hash linking it to its parent.
//!
//! `data = SHA-256(canonical content)`, `chain = SHA-256(data ‖ parent chain)`; the first commit's
//! parent chain is 32 zero bytes. Any edited, removed or reordered commit changes a hash from that
//! point on, and [`verify`] reports the first commit that does not match. When commits are
//! signed ([`crate::signing`]), [`verify_with`] checks the signatures too, with a ring of public
//! keys.

use sha2::{Digest, Sha256};

use crate::kv::{KvExpect, KvOp, KvWrite};
use crate::signing::KeyRing;
use crate::store::{CommitKind, CommitRecord, LogMessage, Store};

/// A 32-byte SHA-256 digest.
pub type Hash = [u8; 32];

/// The parent chain hash of the first commit.
pub const GENESIS: Hash = [0u8; 32];

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The data hash of a commit: its operation id, kind, time, every message and every key–value
/// write, field by field, each length-prefixed so that no two different contents hash alike.
/// A commit without key–value writes hashes as it did before the log kept them, so that
/// commits written then still verify.
pub fn data_hash<'a>(
    operation_id: &uuid::Uuid,
    kind: CommitKind,
    created_at_ms: i64,
    messages: impl IntoIterator<Item = LogMessage<'a>>,
    kv: &[KvWrite],
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
    if !kv.is_empty() {
        // A tag no message field can produce at this point: messages start with a 16-byte id.
        field(&mut h, b"txbus-kv-v1");
        field(&mut h, &(kv.len() as u64).to_be_bytes());
        for w in kv {
            field(&mut h, w.key.as_bytes());
            match &w.op {
                KvOp::Put { value, ttl } => {
                    h.update([1u8]);
                    field(&mut h, value);
                    match ttl {
                        Some(ttl) => {
                            h.update([1u8]);
                            field(&mut h, &ttl.as_millis().to_be_bytes());
                        }
                        None => h.update([0u8]),
                    }
                }
                KvOp::Delete => h.update([2u8]),
            }
            match w.expect {
                KvExpect::Any => h.update([0u8]),
                KvExpect::Absent => h.update([1u8]),
                KvExpect::Version(v) => {
                    h.update([2u8]);
                    field(&mut h, &v.to_be_bytes());
                }
            }
        }
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
#[non_exhaustive]
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
    /// The commit's signature does not verify: the chain up to it was rewritten (hashes
    /// re-computed after an edit, a removal or a reordering at or before this commit), or the
    /// signature itself was altered.
    BadSignature {
        /// The key the signature names.
        key_id: String,
    },
    /// The commit is signed with a key the key ring does not hold: add the key's public half
    /// (a rotated key stays in the ring for the commits it signed).
    UnknownKey {
        /// The key the signature names.
        key_id: String,
    },
    /// Signatures were required, and no signature at or after this commit vouches for it: the
    /// log's end is unsigned (signatures removed, or commits appended by a bus without the key).
    Unsigned,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DataMismatch => f.write_str("its content does not match its data hash: it was edited"),
            Self::ChainMismatch => f.write_str(
                "its chain hash does not match: a commit before it was removed, reordered or re-hashed",
            ),
            Self::Gap { expected } => write!(f, "commit {expected} is missing"),
            Self::BadSignature { key_id } => write!(
                f,
                "its signature by key {key_id:?} does not verify: the chain up to it was rewritten"
            ),
            Self::UnknownKey { key_id } => write!(
                f,
                "it is signed with key {key_id:?}, which the key ring does not hold"
            ),
            Self::Unsigned => f.write_str("no signature at or after it vouches for it"),
        }
    }
}

/// The result of walking the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Commits that verified.
    pub verified: u64,
    /// The first commit that did not, and why; `None` when the whole log is intact.
    pub first_broken: Option<(u64, Broken)>,
    /// Signatures checked and found valid (0 when no key ring was given).
    pub signatures: u64,
    /// The last position vouched for by a valid signature: it and every commit before it are
    /// authenticated. `None` when no signature was checked.
    pub signed_through: Option<u64>,
}

impl VerifyReport {
    /// True when every commit verified.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// How [`verify_with`] treats signatures.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The public keys to check signatures with; `None`: signatures are not checked.
    pub keys: Option<KeyRing>,
    /// Every commit must be vouched for by a valid signature at or after it (the log's end must
    /// be signed); otherwise the first commit after the last signature is [`Broken::Unsigned`].
    pub require_signatures: bool,
}

impl VerifyOptions {
    /// Hashes only.
    pub fn hashes() -> Self {
        Self::default()
    }

    /// Hashes and signatures, with these public keys.
    pub fn signatures(keys: KeyRing) -> Self {
        Self {
            keys: Some(keys),
            require_signatures: false,
        }
    }

    /// Requires the end of the log to be signed (see [`VerifyOptions::require_signatures`]).
    pub fn require_signatures(mut self, require: bool) -> Self {
        self.require_signatures = require;
        self
    }
}

/// Checks one commit against its parent's chain hash.
pub fn check(record: &CommitRecord, parent_chain: &Hash) -> Option<Broken> {
    let data = data_hash(
        &record.operation_id.0,
        record.kind,
        record.created_at_ms,
        record.messages.iter().map(LogMessage::from),
        &record.kv,
    );
    if data != record.data_hash {
        return Some(Broken::DataMismatch);
    }
    if chain_hash(&data, parent_chain) != record.chain_hash {
        return Some(Broken::ChainMismatch);
    }
    None
}

/// Checks a commit's signature (if it has one) against `keys`.
pub fn check_signature(record: &CommitRecord, keys: &KeyRing) -> Option<Broken> {
    let sig = record.signature.as_ref()?;
    match keys.check(record.position, &record.chain_hash, sig) {
        Ok(()) => None,
        Err(crate::signing::Error::UnknownKey(key_id)) => Some(Broken::UnknownKey { key_id }),
        Err(_) => Some(Broken::BadSignature {
            key_id: sig.key_id.clone(),
        }),
    }
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
pub const VERIFY_PAGE: usize = 2048;

/// Walks the whole log in pages and reports the first commit whose hashes do not verify.
pub async fn verify(store: &dyn Store) -> Result<VerifyReport, crate::store::Error> {
    verify_walk(store, &VerifyOptions::hashes(), |_| {}).await
}

/// Walks the whole log like [`verify`], calling `progress` after every page of
/// [`VERIFY_PAGE`] commits, so that a long walk can show how far it is (a progress bar, a log
/// line). The callback runs between reads: keep it cheap.
pub async fn verify_with_progress<F>(
    store: &dyn Store,
    progress: F,
) -> Result<VerifyReport, crate::store::Error>
where
    F: FnMut(VerifyProgress) + Send,
{
    verify_walk(store, &VerifyOptions::hashes(), progress).await
}

/// Walks the whole log and reports the first commit that does not verify: its data hash, its
/// chain hash and, with a key ring, its signature.
pub async fn verify_with(
    store: &dyn Store,
    options: &VerifyOptions,
) -> Result<VerifyReport, crate::store::Error> {
    verify_walk(store, options, |_| {}).await
}

/// The one walk behind every `verify`: hashes, signatures as `options` say, and `progress`
/// after every page of [`VERIFY_PAGE`] commits. The next page is read while this one is
/// checked, and a page's signatures are checked on a blocking thread beside its hashes.
pub async fn verify_walk<F>(
    store: &dyn Store,
    options: &VerifyOptions,
    mut progress: F,
) -> Result<VerifyReport, crate::store::Error>
where
    F: FnMut(VerifyProgress) + Send,
{
    let mut parent = GENESIS;
    let mut expected = 1u64;
    let mut report = VerifyReport {
        verified: 0,
        first_broken: None,
        signatures: 0,
        signed_through: None,
    };
    let mut page = store.read_chain(0, VERIFY_PAGE).await?;
    loop {
        let Some(last) = page.last().map(|c| c.position) else {
            if options.require_signatures && options.keys.is_some() {
                let covered = report.signed_through.unwrap_or(0);
                if covered < expected - 1 {
                    report.first_broken = Some((covered + 1, Broken::Unsigned));
                }
            }
            return Ok(report);
        };
        // Start reading the next page now: the store works on it while this one is checked.
        let mut next = store.read_chain(last, VERIFY_PAGE);
        let started = std::future::Future::poll(
            next.as_mut(),
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        );
        let signatures = options
            .keys
            .as_ref()
            .map(|keys| check_signatures(&page, keys));
        // Hashes, in order: where the first one breaks.
        let mut hash_broken = None;
        for record in &page {
            if record.position != expected {
                hash_broken = Some((expected, Broken::Gap { expected }));
                break;
            }
            if let Some(broken) = check(record, &parent) {
                hash_broken = Some((record.position, broken));
                break;
            }
            parent = record.chain_hash;
            expected += 1;
        }
        let sig_broken = match signatures {
            Some(task) => task.await?,
            None => None,
        };
        let first_broken = match (hash_broken, sig_broken) {
            (Some(h), Some(s)) => Some(if s.0 < h.0 { s } else { h }),
            (h, s) => h.or(s),
        };
        let limit = first_broken.as_ref().map_or(u64::MAX, |b| b.0);
        for record in page.iter().take_while(|r| r.position < limit) {
            if options.keys.is_some() && record.signature.is_some() {
                report.signatures += 1;
                report.signed_through = Some(record.position);
            }
            report.verified += 1;
        }
        if first_broken.is_some() {
            report.first_broken = first_broken;
            return Ok(report);
        }
        progress(VerifyProgress {
            verified: report.verified,
            position: expected - 1,
        });
        page = match started {
            std::task::Poll::Ready(result) => result?,
            std::task::Poll::Pending => next.await?,
        };
    }
}

/// Checks a page's signatures, on a blocking thread when there is a runtime to run one: the
/// first commit whose signature fails, if any.
fn check_signatures(
    page: &[CommitRecord],
    keys: &KeyRing,
) -> impl std::future::Future<Output = Result<Option<(u64, Broken)>, crate::store::Error>> {
    let signed: Vec<(u64, Hash, crate::signing::CommitSignature)> = page
        .iter()
        .filter_map(|r| r.signature.clone().map(|s| (r.position, r.chain_hash, s)))
        .collect();
    let keys = keys.clone();
    let check = move || {
        signed.into_iter().find_map(|(position, chain, sig)| {
            match keys.check(position, &chain, &sig) {
                Ok(()) => None,
                Err(crate::signing::Error::UnknownKey(key_id)) => {
                    Some((position, Broken::UnknownKey { key_id }))
                }
                Err(_) => Some((
                    position,
                    Broken::BadSignature {
                        key_id: sig.key_id.clone(),
                    },
                )),
            }
        })
    };
    let task = match tokio::runtime::Handle::try_current() {
        Ok(rt) => Ok(rt.spawn_blocking(check)),
        Err(_) => Err(check()),
    };
    async move {
        match task {
            Ok(task) => task.await.map_err(|e| crate::store::Error::Backend {
                message: "the signature check failed to run".into(),
                source: Some(Box::new(e)),
            }),
            Err(done) => Ok(done),
        }
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
        let a = data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":1}")], &[]);
        assert_eq!(
            a,
            data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":1}")], &[])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Transact, 1, [msg("{\"x\":2}")], &[])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Publish, 1, [msg("{\"x\":1}")], &[])
        );
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Transact, 2, [msg("{\"x\":1}")], &[])
        );
        let mut with_module = msg("{\"x\":1}");
        with_module.module = Some("");
        assert_ne!(
            a,
            data_hash(&op, CommitKind::Transact, 1, [with_module], &[])
        );
        assert_ne!(chain_hash(&a, &GENESIS), chain_hash(&a, &a));
        // Key-value writes count when there are any; none hashes as before.
        let put = KvWrite::put("k", b"v".to_vec());
        let with_kv = data_hash(
            &op,
            CommitKind::Transact,
            1,
            [msg("{\"x\":1}")],
            std::slice::from_ref(&put),
        );
        assert_ne!(a, with_kv);
        let other_value = KvWrite::put("k", b"w".to_vec());
        assert_ne!(
            with_kv,
            data_hash(
                &op,
                CommitKind::Transact,
                1,
                [msg("{\"x\":1}")],
                &[other_value]
            )
        );
        let conditioned = put.clone().expect(KvExpect::Absent);
        assert_ne!(
            with_kv,
            data_hash(
                &op,
                CommitKind::Transact,
                1,
                [msg("{\"x\":1}")],
                &[conditioned]
            )
        );
        let expiring = put.ttl(std::time::Duration::from_secs(1));
        assert_ne!(
            with_kv,
            data_hash(
                &op,
                CommitKind::Transact,
                1,
                [msg("{\"x\":1}")],
                &[expiring]
            )
        );
    }
}
