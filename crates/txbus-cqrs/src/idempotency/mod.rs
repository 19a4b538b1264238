//! Idempotency keys: a request sent twice with the same key runs once, and the repeat gets
//! the first response back.
//!
//! The keys live in the bus's key–value space, so they need nothing beyond the store the bus
//! already has, and they work the same on every store. A key goes through two states:
//!
//! 1. **In progress.** The first request claims the key with a compare-and-set on its absence
//!    ([`KvExpect::Absent`]), recording the request's [`Fingerprint`] and how long it holds
//!    the key: the *lock TTL* ([`Options::lock_ttl`]). If the process dies mid-request, the
//!    key becomes claimable again once that time has passed: the next repeat takes the claim
//!    over (a compare-and-set on the claim's version, so only one repeat wins) and runs the
//!    request again.
//! 2. **Done.** When the request finishes, its response replaces the claim (a compare-and-set
//!    on the claim's version, so a request whose claim was taken over cannot overwrite the new
//!    holder: it gets [`Error::LockLost`]) and is kept for the *TTL* ([`Options::ttl`]).
//!
//! A repeat with the same key and the same fingerprint replays the stored response; with
//! another fingerprint it fails with [`Error::Mismatch`] (HTTP 422); while the first request
//! is still running it fails with [`Error::InProgress`] (HTTP 409). The mismatch wins when
//! both hold: reusing a key for another request is a client error whatever the timing.
//!
//! Responses larger than [`Options::max_response_bytes`] are not stored: the key is released
//! instead, so a repeat runs the request again. Use the key for requests whose responses are
//! small (an id, a status), or raise the limit.
//!
//! **Cleanup.** A stored response expires after the TTL; the entry of a claim whose holder
//! died expires after the lock TTL plus the TTL. Expired keys read as absent at once; the rows
//! themselves are deleted by the store's prune ([`txbus_core::Bus::prune`], which the bus also
//! runs on its retention interval), which removes every expired key–value entry. Nothing else
//! needs to run.
//!
//! ```no_run
//! # async fn run(bus: txbus_core::Bus) -> Result<(), txbus_cqrs::idempotency::Error> {
//! use std::time::Duration;
//! use txbus_cqrs::idempotency::{Begin, Fingerprint, Idempotency, Options, StoredResponse};
//!
//! let keys = Idempotency::new(bus, Options::default().ttl(Duration::from_secs(24 * 3600)));
//! let fingerprint = Fingerprint::of_request("POST", "/payments", br#"{"amount":100}"#);
//! match keys.begin("4f1c-key-from-the-client", fingerprint).await? {
//!     Begin::Run(claim) => {
//!         let response = StoredResponse::new(201, r#"{"payment":"p-1"}"#);
//!         claim.complete(&response).await?; // a repeat now gets this response
//!     }
//!     Begin::Replay(stored) => assert_eq!(stored.status, 201),
//! }
//! # Ok(()) }
//! ```

mod error;
mod fingerprint;
mod record;

use std::sync::Arc;
use std::time::{Duration, Instant};

use txbus_core::{Bus, Conflict, KvExpect, KvWrite};

pub use error::Error;
pub use fingerprint::Fingerprint;
pub use record::StoredResponse;

use record::Record;

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// How many times a claim is retried when the key vanishes between a failed claim and the
/// read that follows it (it expired or was released meanwhile).
const CLAIM_ATTEMPTS: usize = 4;

/// Slack between this process's clock and the store's when deciding whether a claim's entry
/// may have expired.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// Settings of an [`Idempotency`] service.
#[derive(Debug, Clone)]
pub struct Options {
    prefix: String,
    ttl: Duration,
    lock_ttl: Duration,
    max_response_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            prefix: "idempotency/".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            lock_ttl: Duration::from_secs(60),
            max_response_bytes: 64 * 1024,
        }
    }
}

impl Options {
    /// How long a finished request's response is kept for replay. Default: 24 hours.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a running request holds its key. A request that runs longer may lose it: a
    /// repeat may then take the key over and run too, and the first one's response is not
    /// stored. Keep it above the slowest request. Default: 60 seconds.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// The largest response body stored, in bytes; a larger one is not stored and its key is
    /// released. Default: 64 KiB.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// The prefix of the keys in the key–value space. Default: `idempotency/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a claim's entry stays in the store: its lock TTL plus the TTL. A claim whose
    /// holder died is taken over once its lock expires; its entry is removed after this.
    fn claim_retention(&self) -> Duration {
        self.lock_ttl.saturating_add(self.ttl)
    }

    /// The configured response limit.
    pub fn response_limit(&self) -> usize {
        self.max_response_bytes
    }
}

/// Idempotency keys in a bus's key–value space. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Idempotency {
    bus: Bus,
    options: Arc<Options>,
}

/// What to do with a request, once its key is checked.
#[derive(Debug)]
pub enum Begin {
    /// The key is now held by this request: run it, then [`Claim::complete`] (or
    /// [`Claim::release`] to let a repeat run it again).
    Run(Claim),
    /// The request already ran: answer with its stored response.
    Replay(StoredResponse),
}

/// What [`Claim::complete`] did with the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Stored: repeats replay it until the TTL runs out.
    Stored,
    /// Larger than the limit: not stored, and the key was released.
    TooLarge {
        /// The body's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl Idempotency {
    /// Keys in `bus`'s key–value space.
    pub fn new(bus: Bus, options: Options) -> Self {
        Self {
            bus,
            options: Arc::new(options),
        }
    }

    /// The same service with its keys under `<prefix><scope>/`, apart from other users of
    /// the service (the HTTP layer and the command bus use their own scopes).
    pub fn scoped(&self, scope: &str) -> Self {
        let mut options = (*self.options).clone();
        options.prefix = format!("{}{scope}/", options.prefix);
        Self {
            bus: self.bus.clone(),
            options: Arc::new(options),
        }
    }

    /// The settings.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Checks `key` for a request with this fingerprint: claims it (the request runs), or
    /// finds its stored response (replay). Fails with [`Error::Mismatch`] when the key was
    /// used for another request, [`Error::InProgress`] while it runs.
    pub async fn begin(&self, key: &str, fingerprint: Fingerprint) -> Result<Begin, Error> {
        check_key(key)?;
        let kv_key = format!("{}{key}", self.options.prefix);
        let mut expect = KvExpect::Absent;
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(claim) = self.claim(key, &kv_key, fingerprint, expect).await? {
                return Ok(Begin::Run(claim));
            }
            let Some(entry) = self.bus.kv_get(&kv_key).await.map_err(Error::Store)? else {
                expect = KvExpect::Absent; // expired or released meanwhile: claim it afresh
                continue;
            };
            let record = Record::decode(&entry.value).map_err(|reason| Error::Corrupt {
                key: key.to_owned(),
                reason,
            })?;
            if record.fingerprint() != fingerprint {
                return Err(Error::Mismatch {
                    key: key.to_owned(),
                });
            }
            match record {
                Record::Done { response, .. } => {
                    tracing::debug!(key, status = response.status, "idempotent replay");
                    return Ok(Begin::Replay(response));
                }
                Record::InProgress {
                    locked_until_ms, ..
                } if locked_until_ms > txbus_core::time::now_ms() => {
                    return Err(Error::InProgress {
                        key: key.to_owned(),
                    });
                }
                Record::InProgress { .. } => {
                    // Its holder is presumed dead: take it over, unless someone else does.
                    tracing::info!(key, "taking over an idempotency key whose lock expired");
                    expect = KvExpect::Version(entry.version);
                }
            }
        }
        // The key keeps changing under us: other requests are working on it.
        Err(Error::InProgress {
            key: key.to_owned(),
        })
    }

    /// Writes a claim if the key is as `expect`ed; `None` when it is not.
    async fn claim(
        &self,
        key: &str,
        kv_key: &str,
        fingerprint: Fingerprint,
        expect: KvExpect,
    ) -> Result<Option<Claim>, Error> {
        let now = txbus_core::time::now_ms();
        let record = Record::InProgress {
            fingerprint,
            locked_until_ms: now.saturating_add(txbus_core::time::millis(self.options.lock_ttl)),
        }
        .encode()
        .map_err(|e| corrupt(key, e))?;
        let claimed_at = Instant::now();
        let write = KvWrite::put(kv_key, record)
            .expect(expect)
            .ttl(self.options.claim_retention());
        match self.bus.kv_write(vec![write]).await {
            Ok(versions) => {
                tracing::debug!(key, "idempotency key claimed");
                Ok(Some(Claim {
                    keys: self.clone(),
                    key: key.to_owned(),
                    kv_key: kv_key.to_owned(),
                    fingerprint,
                    version: versions.first().copied().unwrap_or(1),
                    claimed_at,
                    open: true,
                }))
            }
            Err(txbus_core::Error::Conflict(Conflict::Key { .. })) => Ok(None),
            Err(e) => Err(Error::Store(e)),
        }
    }
}

/// A key held by a running request. Finish it with [`complete`](Self::complete) or
/// [`release`](Self::release); dropped unfinished (the request was cancelled), it is released
/// in the background, best effort — failing that, it frees itself when the lock TTL runs out.
#[derive(Debug)]
#[must_use = "a claim holds its key until completed, released or expired"]
pub struct Claim {
    keys: Idempotency,
    key: String,
    kv_key: String,
    fingerprint: Fingerprint,
    version: u64,
    claimed_at: Instant,
    open: bool,
}

impl Claim {
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stores the request's response for replay, for the TTL. A response whose body exceeds
    /// the limit is not stored and the key is released ([`Completion::TooLarge`]). Fails with
    /// [`Error::LockLost`] when the claim expired and another request took the key.
    pub async fn complete(mut self, response: &StoredResponse) -> Result<Completion, Error> {
        let limit = self.keys.options.max_response_bytes;
        if response.body.len() > limit {
            let bytes = response.body.len();
            tracing::debug!(key = self.key, bytes, limit, "response too large to keep");
            self.release_now().await?;
            return Ok(Completion::TooLarge { bytes, limit });
        }
        self.open = false;
        if !self.may_write() {
            return Err(Error::LockLost {
                key: self.key.clone(),
            });
        }
        let record = Record::Done {
            fingerprint: self.fingerprint,
            response: response.clone(),
        }
        .encode()
        .map_err(|e| corrupt(&self.key, e))?;
        let write = KvWrite::put(self.kv_key.clone(), record)
            .expect(KvExpect::Version(self.version))
            .ttl(self.keys.options.ttl);
        match self.keys.bus.kv_write(vec![write]).await {
            Ok(_) => Ok(Completion::Stored),
            Err(txbus_core::Error::Conflict(Conflict::Key { .. })) => Err(Error::LockLost {
                key: self.key.clone(),
            }),
            Err(e) => Err(Error::Store(e)),
        }
    }

    /// Gives the key up without storing anything: a repeat runs the request again. Use it
    /// when the request failed in a way worth retrying.
    pub async fn release(mut self) -> Result<(), Error> {
        self.release_now().await
    }

    async fn release_now(&mut self) -> Result<(), Error> {
        self.open = false;
        if !self.may_write() {
            return Ok(()); // the claim is gone by now; someone else may hold the key
        }
        release(&self.keys.bus, &self.kv_key, self.version).await
    }

    /// True while the claim's entry cannot have expired from the store. Versions start again
    /// at 1 after an expiry, so past that point a write conditioned on our version could hit
    /// another request's fresh claim.
    fn may_write(&self) -> bool {
        let retention = self.keys.options.claim_retention();
        let margin = CLOCK_MARGIN.min(retention / 2);
        self.claimed_at.elapsed() < retention.saturating_sub(margin)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.open || !self.may_write() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: the lock TTL frees the key
        };
        let (bus, kv_key, version) = (self.keys.bus.clone(), self.kv_key.clone(), self.version);
        runtime.spawn(async move {
            if let Err(e) = release(&bus, &kv_key, version).await {
                tracing::warn!(key = kv_key, error = %e, "could not release an abandoned idempotency key; it frees itself when its lock expires");
            }
        });
    }
}

/// Deletes the claim if it is still the one at `version`; a key already taken over is left to
/// its new holder.
async fn release(bus: &Bus, kv_key: &str, version: u64) -> Result<(), Error> {
    let write = KvWrite::delete(kv_key).expect(KvExpect::Version(version));
    match bus.kv_write(vec![write]).await {
        Ok(_) | Err(txbus_core::Error::Conflict(Conflict::Key { .. })) => Ok(()),
        Err(e) => Err(Error::Store(e)),
    }
}

fn corrupt(key: &str, e: serde_json::Error) -> Error {
    Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

/// Checks a key: 1 to [`MAX_KEY_BYTES`] bytes of printable ASCII.
pub fn check_key(key: &str) -> Result<(), Error> {
    let reason = if key.is_empty() {
        "it is empty".to_owned()
    } else if key.len() > MAX_KEY_BYTES {
        format!(
            "it is {} bytes long; the limit is {MAX_KEY_BYTES}",
            key.len()
        )
    } else if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        "it holds characters other than printable ASCII".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("a-b_c 1").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(check_key("tab\there").is_err());
        assert!(check_key("é").is_err());
    }
}
