//! Idempotency middleware: a command carrying an idempotency key runs once.

use super::dispatch::{Dispatch, Reply};
use super::middleware::{BoxFuture, Middleware, Next};
use super::Error;
use crate::idempotency::{Begin, Claim, Fingerprint, Idempotency, StoredResponse};

/// The stored status of a command that produced its output.
const OUTPUT: u16 = 200;
/// The stored status of a command its handler rejected.
const REJECTED: u16 = 422;

/// Runs a command that carries an idempotency key ([`super::Envelope::idempotency_key`]) at
/// most once per key: a repeat returns the first run's output (read back from its stored
/// JSON) or its rejection. The key must not be reused for another command (name and
/// serialized form are fingerprinted): that fails with
/// [`crate::idempotency::Error::Mismatch`]; a repeat while the first still runs fails with
/// [`crate::idempotency::Error::InProgress`]. Other failures ([`Error::Failed`], …) are not
/// stored: the key is released and a repeat runs again. Commands without a key pass through.
///
/// The keys are kept under the `command` scope of the idempotency service.
#[derive(Debug, Clone)]
pub struct Idempotent {
    keys: Idempotency,
}

impl Idempotent {
    /// The middleware over `keys`.
    pub fn new(keys: Idempotency) -> Self {
        Self {
            keys: keys.scoped("command"),
        }
    }
}

impl Middleware for Idempotent {
    fn call<'a>(
        &'a self,
        command: Dispatch,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Reply, Error>> {
        Box::pin(async move {
            let Some(key) = command.idempotency_key().map(str::to_owned) else {
                return next.run(command).await;
            };
            let fingerprint = Fingerprint::of_command(command.name(), &command.to_json()?);
            let claim = match self.keys.begin(&key, fingerprint).await? {
                Begin::Run(claim) => claim,
                Begin::Replay(stored) => return replay(stored),
            };
            let result = next.run(command).await;
            match &result {
                Ok(reply) => match reply.to_json() {
                    Ok(json) => complete(claim, StoredResponse::new(OUTPUT, json)).await,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "command output not serializable; not stored");
                        release(claim).await;
                    }
                },
                Err(Error::Rejected { code, reason }) => {
                    let stored = Rejection {
                        code: code.clone(),
                        reason: reason.clone(),
                    };
                    match serde_json::to_vec(&stored) {
                        Ok(json) => complete(claim, StoredResponse::new(REJECTED, json)).await,
                        Err(_) => release(claim).await,
                    }
                }
                Err(_) => release(claim).await,
            }
            result
        })
    }
}

/// A stored rejection.
#[derive(serde::Serialize, serde::Deserialize)]
struct Rejection {
    code: String,
    reason: String,
}

fn replay(stored: StoredResponse) -> Result<Reply, Error> {
    match stored.status {
        OUTPUT => Ok(Reply::stored(stored.body.to_vec())),
        _ => {
            let rejection: Rejection =
                serde_json::from_slice(&stored.body).unwrap_or_else(|_| Rejection {
                    code: "rejected".to_owned(),
                    reason: String::from_utf8_lossy(&stored.body).into_owned(),
                });
            Err(Error::Rejected {
                code: rejection.code,
                reason: rejection.reason,
            })
        }
    }
}

async fn complete(claim: Claim, response: StoredResponse) {
    let key = claim.key().to_owned();
    if let Err(e) = claim.complete(&response).await {
        tracing::warn!(key, error = %e, "command result not stored for replay");
    }
}

async fn release(claim: Claim) {
    let key = claim.key().to_owned();
    if let Err(e) = claim.release().await {
        tracing::warn!(key, error = %e, "could not release an idempotency key; it frees itself when its lock expires");
    }
}
