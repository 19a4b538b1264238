//! The fingerprint of a request: what a repeat with the same idempotency key must match.

use sha2::{Digest, Sha256};

/// A SHA-256 hash of what a request asked for. Two requests under one idempotency key must
/// have the same fingerprint; otherwise the second is refused as a misuse of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Hashes parts, each prefixed with its length, so that no two different lists of parts
    /// hash alike (`["ab", "c"]` differs from `["a", "bc"]`).
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Self(hasher.finalize().into())
    }

    /// The fingerprint of an HTTP request: its method, its path with the query string, and
    /// its body.
    pub fn of_request(method: &str, path_and_query: &str, body: &[u8]) -> Self {
        Self::of_parts([
            b"http".as_slice(),
            method.as_bytes(),
            path_and_query.as_bytes(),
            body,
        ])
    }

    /// The fingerprint of a serialized command: its name and its serialized form.
    pub fn of_command(name: &str, serialized: &[u8]) -> Self {
        Self::of_parts([b"command".as_slice(), name.as_bytes(), serialized])
    }

    /// The fingerprint as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses 64 hex digits written by [`to_hex`](Self::to_hex).
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        let a = Fingerprint::of_parts([b"ab".as_slice(), b"c"]);
        let b = Fingerprint::of_parts([b"a".as_slice(), b"bc"]);
        assert_ne!(a, b);
    }

    #[test]
    fn request_fingerprint_covers_method_path_and_body() {
        let base = Fingerprint::of_request("POST", "/orders", b"{}");
        assert_eq!(base, Fingerprint::of_request("POST", "/orders", b"{}"));
        assert_ne!(base, Fingerprint::of_request("PATCH", "/orders", b"{}"));
        assert_ne!(base, Fingerprint::of_request("POST", "/orders?x=1", b"{}"));
        assert_ne!(base, Fingerprint::of_request("POST", "/orders", b"{ }"));
    }

    #[test]
    fn hex_round_trips() {
        let f = Fingerprint::of_command("order.create", b"{\"id\":1}");
        assert_eq!(f.to_hex().len(), 64);
        assert_eq!(Fingerprint::from_hex(&f.to_hex()), Some(f));
        assert_eq!(Fingerprint::from_hex("zz"), None);
        assert_eq!(Fingerprint::from_hex(&"g".repeat(64)), None);
    }
}
