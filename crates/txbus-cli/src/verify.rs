//! `txbus verify`: walks the log and checks every commit's data hash, chain hash and — with the
//! public keys of the keys that signed it — every signature, with a progress bar on long walks.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use txbus_core::chain::{self, Broken, VerifyOptions};
use txbus_core::{KeyRing, Store};

use crate::error::Error;
use crate::output::Output;

/// What `verify` checks besides the hashes.
#[derive(Debug, Default)]
pub struct Signatures {
    /// `KEY_ID=HEX` pairs given with `--public-key`.
    pub public_keys: Vec<String>,
    /// A file of such pairs, one per line (`--keys`).
    pub key_file: Option<std::path::PathBuf>,
    /// Every commit must be vouched for by a valid signature (`--require-signatures`).
    pub require: bool,
}

fn hex_key(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// Adds one `KEY_ID=HEX` (or `KEY_ID HEX`) pair to `ring`; `whence` says where it came from.
fn add_key(ring: KeyRing, pair: &str, whence: &str) -> Result<KeyRing, Error> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "{whence}: {why}; write KEY_ID=HEX, the key id the bus signs with and its 32-byte ed25519 public key in hex (64 digits)"
        ))
    };
    let (id, hex) = pair
        .split_once('=')
        .or_else(|| pair.trim().split_once(char::is_whitespace))
        .ok_or_else(|| bad("no key id"))?;
    let (id, hex) = (id.trim(), hex.trim());
    let key =
        hex_key(hex).ok_or_else(|| bad(&format!("the key of {id:?} is not 64 hex digits")))?;
    ring.with_bytes(id, &key)
        .map_err(|e| Error::Usage(format!("{whence}: {e}")))
}

fn read_key_file(mut ring: KeyRing, path: &Path) -> Result<KeyRing, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Usage(format!(
            "--keys {}: cannot read it ({e}); give a file of KEY_ID=HEX lines",
            path.display()
        ))
    })?;
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        ring = add_key(ring, line, &format!("{} line {}", path.display(), n + 1))?;
    }
    Ok(ring)
}

impl Signatures {
    /// The options of the walk: hashes only when no key was given.
    fn options(&self) -> Result<VerifyOptions, Error> {
        let mut ring = KeyRing::new();
        for pair in &self.public_keys {
            ring = add_key(ring, pair, &format!("--public-key {pair:?}"))?;
        }
        if let Some(path) = &self.key_file {
            ring = read_key_file(ring, path)?;
        }
        if ring.is_empty() {
            if self.require {
                return Err(Error::Usage(
                    "--require-signatures needs the public keys to check them with: --public-key KEY_ID=HEX (repeatable) or --keys FILE".into(),
                ));
            }
            return Ok(VerifyOptions::hashes());
        }
        Ok(VerifyOptions::signatures(ring).require_signatures(self.require))
    }
}

fn kind(why: &Broken) -> &'static str {
    match why {
        Broken::DataMismatch => "data_mismatch",
        Broken::ChainMismatch => "chain_mismatch",
        Broken::Gap { .. } => "gap",
        Broken::BadSignature { .. } => "bad_signature",
        Broken::UnknownKey { .. } => "unknown_key",
        Broken::Unsigned => "unsigned",
        _ => "broken",
    }
}

fn key_id(why: &Broken) -> Option<&str> {
    match why {
        Broken::BadSignature { key_id } | Broken::UnknownKey { key_id } => Some(key_id),
        _ => None,
    }
}

/// Walks the log; returns whether it is intact (the exit code says so to scripts).
pub async fn verify(
    store: &dyn Store,
    signatures: &Signatures,
    progress: bool,
    out: Output,
) -> Result<bool, Error> {
    let options = signatures.options()?;
    let checks_signatures = options.keys.is_some();
    let total = store.stats().await?.commits;
    // Drawn on standard error, only when it is a terminal (indicatif hides it otherwise).
    let bar = if progress && !out.json {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "verifying {bar:40} {pos}/{len} commits ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let report = chain::verify_walk(store, &options, |p| {
        if p.verified > bar.length().unwrap_or(0) {
            bar.set_length(p.verified);
        }
        bar.set_position(p.verified);
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    // The broken commit's operation, when the commit is there (not for a gap).
    let operation = match &report.first_broken {
        Some((position, _)) => store
            .read_chain(position.saturating_sub(1), 1)
            .await?
            .into_iter()
            .find(|c| c.position == *position)
            .map(|c| c.operation_id.to_string()),
        None => None,
    };
    let value = json!({
        "intact": report.is_intact(),
        "verified": report.verified,
        "signatures_checked": checks_signatures,
        "signatures": report.signatures,
        "signed_through": report.signed_through,
        "first_broken": report.first_broken.as_ref().map(|(p, why)| json!({
            "position": p,
            "operation_id": operation,
            "kind": kind(why),
            "key_id": key_id(why),
            "reason": why.to_string(),
        })),
    });
    out.emit(&value, || match &report.first_broken {
        None if checks_signatures => format!(
            "intact: {} commits verified, {} signatures valid, signed through position {}",
            report.verified,
            report.signatures,
            report
                .signed_through
                .map_or("- (no commit is signed)".into(), |p| p.to_string()),
        ),
        None => format!(
            "intact: {} commits verified (hashes only; give --public-key KEY_ID=HEX or --keys FILE to check signatures)",
            report.verified
        ),
        Some((position, why)) => format!(
            "BROKEN at position {position}{}: {why} ({} commits before it verified)",
            operation
                .as_ref()
                .map_or(String::new(), |op| format!(" (operation {op})")),
            report.verified
        ),
    });
    Ok(report.is_intact())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pairs_parse_or_say_what_is_wrong() {
        let hex = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let ring = add_key(KeyRing::new(), &format!("ops-1={hex}"), "test").unwrap();
        assert!(!ring.is_empty());
        assert!(add_key(KeyRing::new(), &format!("ops-1 {hex}"), "test").is_ok());
        let short = add_key(KeyRing::new(), "ops-1=abcd", "test").unwrap_err();
        assert!(short.to_string().contains("64 hex digits"), "{short}");
        let no_id = add_key(KeyRing::new(), hex, "test").unwrap_err();
        assert!(no_id.to_string().contains("no key id"), "{no_id}");
        let bad_id = add_key(KeyRing::new(), &format!("a b c={hex}"), "test").unwrap_err();
        assert!(bad_id.to_string().contains("key id"), "{bad_id}");
        let required = Signatures {
            require: true,
            ..Signatures::default()
        };
        assert!(required.options().is_err());
    }
}
