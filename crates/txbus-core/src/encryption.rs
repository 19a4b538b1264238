//! Field encryption: fields named in a per-event-type policy are encrypted before the commit is
//! written and decrypted for handlers, so the stored rows (and the log, relays, backups) never
//! hold their plaintext.
//!
//! Each named field (a JSON pointer into the payload) is replaced by a string
//! `txbus:enc:v1:<base64 of nonce ‖ ciphertext>`, sealed with XChaCha20-Poly1305 under the
//! current key, a fresh random 192-bit nonce, and the message id and field pointer as
//! associated data (a ciphertext moved to another message or field does not open). The header
//! `txbus-enc-key` names the key and `txbus-enc-fields` the fields. Rotation: add the new key,
//! make it current, keep the old ones so that older messages still open.
//!
//! ```
//! use txbus_core::encryption::FieldEncryption;
//!
//! let policy = FieldEncryption::new()
//!     .key("2026-01", [7u8; 32]).unwrap()
//!     .encrypt_with("2026-01")
//!     .field("user.created", "/email");
//! # let _ = policy;
//! ```

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::Value;

use crate::message::StoredMessage;

/// The header naming the key a message's fields are encrypted with.
pub const KEY_HEADER: &str = "txbus-enc-key";
/// The header listing the encrypted fields (JSON pointers, comma-separated).
pub const FIELDS_HEADER: &str = "txbus-enc-fields";
const PREFIX: &str = "txbus:enc:v1:";
const NONCE_BYTES: usize = 24;

/// Why a policy is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key id is empty, too long, or has characters other than ASCII letters, digits and
    /// `. _ - :`.
    #[error("encryption key id {0:?} must be 1 to 64 bytes of ASCII letters, digits and . _ - :")]
    BadKeyId(String),
    /// The field is not a JSON pointer (`/a/b`).
    #[error("encrypted field {0:?} of event type {1:?} must be a JSON pointer such as \"/email\"")]
    BadField(String, String),
}

/// Which fields of which event types are encrypted, and the keys. Cheap to share (the bus keeps
/// it in an `Arc`).
#[derive(Clone, Default)]
pub struct FieldEncryption {
    keys: HashMap<String, XChaCha20Poly1305>,
    current: Option<String>,
    fields: HashMap<String, Vec<String>>,
    invalid: Option<Error>,
}

impl fmt::Debug for FieldEncryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&String> = self.keys.keys().collect();
        keys.sort();
        f.debug_struct("FieldEncryption")
            .field("keys", &keys)
            .field("current", &self.current)
            .field("fields", &self.fields)
            .finish()
    }
}

impl FieldEncryption {
    /// No key, no field.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a 256-bit key under `key_id`: it opens the messages sealed with it, and seals new
    /// ones once it is made current with [`encrypt_with`](Self::encrypt_with).
    pub fn key(mut self, key_id: impl Into<String>, key: [u8; 32]) -> Result<Self, Error> {
        let key_id = key_id.into();
        crate::signing::CommitSigner::from_bytes(key_id.as_str(), &[0u8; 32])
            .map_err(|_| Error::BadKeyId(key_id.clone()))?;
        self.keys
            .insert(key_id, XChaCha20Poly1305::new(&key.into()));
        Ok(self)
    }

    /// Seals new messages with `key_id`. A key id that was not added makes every write of a
    /// policed event fail (naming the key) until it is.
    pub fn encrypt_with(mut self, key_id: impl Into<String>) -> Self {
        self.current = Some(key_id.into());
        self
    }

    /// Encrypts the field at `pointer` (a JSON pointer, e.g. `/email` or `/card/number`) of
    /// every event of `event_type`. A payload without that field is written as it is.
    pub fn field(mut self, event_type: impl Into<String>, pointer: impl Into<String>) -> Self {
        let event_type = event_type.into();
        let pointer = pointer.into();
        if !pointer.starts_with('/') || pointer.len() < 2 || pointer.contains(',') {
            self.invalid
                .get_or_insert(Error::BadField(pointer.clone(), event_type.clone()));
        }
        let list = self.fields.entry(event_type).or_default();
        if !list.contains(&pointer) {
            list.push(pointer);
        }
        self
    }

    /// The first problem found while building the policy, if any (checked by the bus builder).
    pub fn problem(&self) -> Option<&Error> {
        self.invalid.as_ref()
    }

    /// The event types with encrypted fields, sorted.
    pub fn event_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.fields.keys().cloned().collect();
        types.sort();
        types
    }

    /// True when events of `event_type` have fields to encrypt.
    pub fn covers(&self, event_type: &str) -> bool {
        self.fields.contains_key(event_type)
    }

    /// Encrypts the policed fields of `m` in place (payload, its stored text and the headers).
    /// The error says what is missing; nothing is written then.
    pub fn seal(&self, m: &mut StoredMessage) -> Result<(), String> {
        let Some(fields) = self.fields.get(&m.event_type) else {
            return Ok(());
        };
        let key_id = self.current.as_deref().ok_or_else(|| {
            format!(
                "fields {} must be encrypted, and no encryption key is current (FieldEncryption::encrypt_with)",
                fields.join(", ")
            )
        })?;
        let cipher = self.keys.get(key_id).ok_or_else(|| {
            format!("fields {} must be encrypted with key {key_id:?}, which is not configured (FieldEncryption::key)", fields.join(", "))
        })?;
        let mut sealed = Vec::new();
        for pointer in fields {
            let aad = associated(m, pointer);
            let Some(slot) = m.payload.pointer_mut(pointer) else {
                continue;
            };
            let plain = serde_json::to_vec(slot)
                .map_err(|e| format!("field {pointer} does not serialize: {e}"))?;
            let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
            let ct = cipher
                .encrypt(
                    &nonce,
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .map_err(|_| format!("field {pointer} could not be encrypted"))?;
            let mut blob = nonce.to_vec();
            blob.extend_from_slice(&ct);
            *slot = Value::String(format!(
                "{PREFIX}{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(blob)
            ));
            sealed.push(pointer.as_str());
        }
        if sealed.is_empty() {
            return Ok(());
        }
        m.headers.extra.insert(KEY_HEADER.into(), key_id.into());
        m.headers
            .extra
            .insert(FIELDS_HEADER.into(), sealed.join(","));
        m.payload_json = serde_json::to_string(&m.payload)
            .map_err(|e| format!("the encrypted payload does not serialize: {e}"))?;
        m.headers_json = serde_json::to_string(&m.headers)
            .map_err(|e| format!("the headers do not serialize: {e}"))?;
        Ok(())
    }

    /// The message with its encrypted fields decrypted; `None` when it has none. The error
    /// names the message, the field or the missing key.
    pub fn open(&self, m: &StoredMessage) -> Result<Option<StoredMessage>, String> {
        let (Some(key_id), Some(fields)) = (
            m.headers.extra.get(KEY_HEADER),
            m.headers.extra.get(FIELDS_HEADER),
        ) else {
            return Ok(None);
        };
        let cipher = self.keys.get(key_id).ok_or_else(|| {
            format!(
                "message {}: its fields are encrypted with key {key_id:?}, which is not configured; add it with FieldEncryption::key",
                m.id
            )
        })?;
        let mut out = m.clone();
        for pointer in fields.split(',') {
            let bad = |why: &str| format!("message {}: encrypted field {pointer}: {why}", m.id);
            let Some(slot) = out.payload.pointer_mut(pointer) else {
                return Err(bad("missing"));
            };
            let text = slot
                .as_str()
                .and_then(|s| s.strip_prefix(PREFIX))
                .ok_or_else(|| bad("not an encrypted value"))?;
            let blob = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(text)
                .map_err(|_| bad("not base64"))?;
            if blob.len() < NONCE_BYTES {
                return Err(bad("too short"));
            }
            let (nonce, ct) = blob.split_at(NONCE_BYTES);
            let aad = associated(m, pointer);
            let plain = cipher
                .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
                .map_err(|_| {
                    bad("does not decrypt with its key (altered, or moved from another message)")
                })?;
            *slot = serde_json::from_slice(&plain).map_err(|_| bad("not JSON once decrypted"))?;
        }
        out.payload_json = serde_json::to_string(&out.payload).map_err(|e| {
            format!(
                "message {}: the decrypted payload does not serialize: {e}",
                m.id
            )
        })?;
        Ok(Some(out))
    }
}

/// What binds a ciphertext to its place: the message id and the field.
fn associated(m: &StoredMessage, pointer: &str) -> Vec<u8> {
    let mut aad = m.id.0.as_bytes().to_vec();
    aad.extend_from_slice(pointer.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(payload: Value) -> StoredMessage {
        StoredMessage {
            id: crate::MessageId::new(),
            event_type: "user.created".into(),
            module: None,
            payload_json: payload.to_string(),
            payload,
            headers: Default::default(),
            headers_json: "{}".into(),
        }
    }

    #[test]
    fn sealed_fields_open_with_their_key_after_a_rotation() {
        let old = FieldEncryption::new()
            .key("k1", [1u8; 32])
            .unwrap()
            .encrypt_with("k1")
            .field("user.created", "/email")
            .field("user.created", "/card/number");
        let mut m =
            message(json!({"email": "ada@example.com", "card": {"number": "4111"}, "n": 1}));
        old.seal(&mut m).unwrap();
        assert!(
            !m.payload_json.contains("ada@example.com"),
            "{}",
            m.payload_json
        );
        assert!(!m.payload_json.contains("4111"));
        assert_eq!(m.payload["n"], 1);
        assert_eq!(m.headers.extra[KEY_HEADER], "k1");
        // Rotated: k2 seals, k1 still opens what it sealed.
        let new = old.clone().key("k2", [2u8; 32]).unwrap().encrypt_with("k2");
        let opened = new.open(&m).unwrap().unwrap();
        assert_eq!(opened.payload["email"], "ada@example.com");
        assert_eq!(opened.payload["card"]["number"], "4111");
        let mut m2 = message(json!({"email": "b@example.com"}));
        new.seal(&mut m2).unwrap();
        assert_eq!(m2.headers.extra[KEY_HEADER], "k2");
        // Without the key: a clear error naming it.
        let err = FieldEncryption::new().open(&m).unwrap_err();
        assert!(err.contains("\"k1\""), "{err}");
        // A ciphertext moved to another message does not open.
        let mut moved = message(json!({}));
        moved.payload = m.payload.clone();
        moved.headers = m.headers.clone();
        assert!(new.open(&moved).unwrap_err().contains("does not decrypt"));
    }

    #[test]
    fn a_missing_current_key_is_an_error() {
        let policy = FieldEncryption::new()
            .encrypt_with("nope")
            .field("user.created", "/email");
        let err = policy
            .seal(&mut message(json!({"email": "x"})))
            .unwrap_err();
        assert!(err.contains("\"nope\"") && err.contains("/email"), "{err}");
        assert!(FieldEncryption::new()
            .field("a", "email")
            .problem()
            .is_some());
    }
}
