//! Signatures over the chain: ed25519, a key id stored with each signature, and a ring of
//! public keys by id so that commits signed with a retired key still verify.
//!
//! A signature signs a commit's **chain hash** (with its position and the key id). The chain
//! hash covers that commit's data and, through its parent, every commit before it, so one
//! signature vouches for the whole log up to its commit: editing, removing or reordering any
//! earlier commit — even re-computing every hash after it — no longer matches a signed chain
//! hash, and only the key's holder can make a new signature. Stores therefore sign the last
//! commit of each group commit (the SQLite writer) or sealing round (the PostgreSQL sealer),
//! inside the same transaction: every commit is covered by a signature at or after it from the
//! moment it is durable, and signing costs one ed25519 signature per transaction, not per
//! commit.
//!
//! ```
//! use txbus_core::signing::{CommitSigner, KeyRing};
//!
//! let signer = CommitSigner::from_bytes("ops-2026", &[7u8; 32]).unwrap();
//! let ring = KeyRing::new().with(signer.key_id(), signer.verifying_key());
//! let sig = signer.sign(42, &[1u8; 32]);
//! assert!(ring.check(42, &[1u8; 32], &sig).is_ok());
//! assert!(ring.check(43, &[1u8; 32], &sig).is_err());
//! ```

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::{Signer as _, Verifier as _};

use crate::chain::Hash;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// The longest key id, in bytes.
pub const MAX_KEY_ID_BYTES: usize = 64;

/// A signature stored with a commit.
#[derive(Clone, PartialEq, Eq)]
pub struct CommitSignature {
    /// Which key signed (look it up in a [`KeyRing`]).
    pub key_id: String,
    /// The ed25519 signature.
    pub signature: [u8; 64],
}

impl fmt::Debug for CommitSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitSignature")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a key or a signature is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key id is empty, too long, or has characters other than ASCII letters, digits and
    /// `. _ - :`.
    #[error("key id {0:?} must be 1 to 64 bytes of ASCII letters, digits and . _ - :")]
    BadKeyId(String),
    /// The bytes are not an ed25519 public key.
    #[error("key {0:?}: not an ed25519 public key")]
    BadPublicKey(String),
    /// The signature names a key the ring does not hold.
    #[error("signed with key {0:?}, which the key ring does not hold; add its public key")]
    UnknownKey(String),
    /// The signature does not match the chain hash it should sign.
    #[error("the signature by key {0:?} does not match the commit's chain hash")]
    Mismatch(String),
}

fn check_key_id(key_id: &str) -> Result<(), Error> {
    let ok = !key_id.is_empty()
        && key_id.len() <= MAX_KEY_ID_BYTES
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadKeyId(key_id.to_owned()))
    }
}

/// What is signed: a domain tag, the key id, the position and the chain hash.
fn message(key_id: &str, position: u64, chain: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(24 + key_id.len() + 8 + 32);
    m.extend_from_slice(b"txbus-signature-v1");
    m.extend_from_slice(&(key_id.len() as u64).to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m.extend_from_slice(&position.to_be_bytes());
    m.extend_from_slice(chain);
    m
}

/// The key a bus signs with, and its id.
pub struct CommitSigner {
    key_id: String,
    key: SigningKey,
}

impl fmt::Debug for CommitSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl CommitSigner {
    /// A signer with `key` under `key_id`.
    pub fn new(key_id: impl Into<String>, key: SigningKey) -> Result<Self, Error> {
        let key_id = key_id.into();
        check_key_id(&key_id)?;
        Ok(Self { key_id, key })
    }

    /// A signer from a 32-byte ed25519 secret key.
    pub fn from_bytes(key_id: impl Into<String>, secret: &[u8; 32]) -> Result<Self, Error> {
        Self::new(key_id, SigningKey::from_bytes(secret))
    }

    /// The key id stored with each signature.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key, for the [`KeyRing`] of whoever verifies.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs the chain hash of the commit at `position`.
    pub fn sign(&self, position: u64, chain: &Hash) -> CommitSignature {
        let sig = self.key.sign(&message(&self.key_id, position, chain));
        CommitSignature {
            key_id: self.key_id.clone(),
            signature: sig.to_bytes(),
        }
    }
}

/// Public keys by id: every key that ever signed the log, so that old commits verify after a
/// rotation (sign with the new key, keep the old public key in the ring).
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: HashMap<String, VerifyingKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing").field("keys", &ids).finish()
    }
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the public key of `key_id`.
    pub fn with(mut self, key_id: impl Into<String>, key: VerifyingKey) -> Self {
        self.keys.insert(key_id.into(), key);
        self
    }

    /// Adds a public key from its 32 bytes; an error names the key when the bytes are not one.
    pub fn with_bytes(self, key_id: impl Into<String>, key: &[u8; 32]) -> Result<Self, Error> {
        let key_id = key_id.into();
        check_key_id(&key_id)?;
        let key = VerifyingKey::from_bytes(key).map_err(|_| Error::BadPublicKey(key_id.clone()))?;
        Ok(self.with(key_id, key))
    }

    /// True when the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `signature` against the chain hash of the commit at `position`.
    pub fn check(
        &self,
        position: u64,
        chain: &Hash,
        signature: &CommitSignature,
    ) -> Result<(), Error> {
        let key = self
            .keys
            .get(&signature.key_id)
            .ok_or_else(|| Error::UnknownKey(signature.key_id.clone()))?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.signature);
        key.verify(&message(&signature.key_id, position, chain), &sig)
            .map_err(|_| Error::Mismatch(signature.key_id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_key_still_verifies_what_it_signed() {
        let old = CommitSigner::from_bytes("k1", &[1u8; 32]).unwrap();
        let new = CommitSigner::from_bytes("k2", &[2u8; 32]).unwrap();
        let ring = KeyRing::new()
            .with("k1", old.verifying_key())
            .with("k2", new.verifying_key());
        let a = old.sign(1, &[9u8; 32]);
        let b = new.sign(2, &[8u8; 32]);
        ring.check(1, &[9u8; 32], &a).unwrap();
        ring.check(2, &[8u8; 32], &b).unwrap();
        // A signature under the wrong id, or over other content, fails.
        let forged = CommitSignature {
            key_id: "k2".into(),
            ..a.clone()
        };
        assert_eq!(
            ring.check(1, &[9u8; 32], &forged),
            Err(Error::Mismatch("k2".into()))
        );
        assert_eq!(
            KeyRing::new().check(1, &[9u8; 32], &a),
            Err(Error::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn key_ids_are_checked() {
        assert!(CommitSigner::from_bytes("", &[1u8; 32]).is_err());
        assert!(CommitSigner::from_bytes("a b", &[1u8; 32]).is_err());
        assert!(CommitSigner::from_bytes("a".repeat(65), &[1u8; 32]).is_err());
        assert!(CommitSigner::from_bytes("ops-2026:1", &[1u8; 32]).is_ok());
    }
}
