//! `transact` across services: the answer a receiving service sends back to the origin, and
//! how the origin reads it.

use std::future::Future;

use serde::{Deserialize, Serialize};
use txbus_core::{Failure, FailureKind, HandlerError, HandlerResult, MessageId, OperationId};

/// What became of a message that an origin sent with a reply address (see
/// [`crate::wire::REPLY_TO`]): the receiving service committed it as a `transact` and this is
/// its outcome. A repeat of a message already received is answered with the stored outcome
/// of the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteReply {
    /// The message the reply is about.
    pub message_id: MessageId,
    /// The operation it became in the receiving service, when it was committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<OperationId>,
    /// The outcome.
    #[serde(flatten)]
    pub result: RemoteResult,
}

/// The outcome carried by a [`RemoteReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RemoteResult {
    /// Every handler of the receiving service succeeded.
    Succeeded,
    /// A handler of the receiving service failed for good.
    Failed {
        /// Which handler, why, after how many attempts.
        failure: Failure,
    },
    /// The receiving service could not commit the message at all (it does not decode, or the
    /// bus refuses it: a schema violation, a payload too large). Sending it again would not
    /// change that.
    Refused {
        /// Why.
        reason: String,
    },
    /// The receiving service no longer knows the outcome (removed by its retention).
    Unknown {
        /// Why.
        reason: String,
    },
}

impl RemoteReply {
    /// The origin handler's result for this reply: `Ok` when the remote handlers succeeded;
    /// a rejection, carrying the remote handler's name and reason, when they failed for good
    /// or the message was refused (repeating would not change it); a transient error, retried
    /// by the origin, when the outcome is unknown.
    pub fn into_handler_result(self, service: &str) -> HandlerResult {
        match self.result {
            RemoteResult::Succeeded => Ok(()),
            RemoteResult::Failed { failure } => {
                let how = match failure.kind {
                    FailureKind::Rejected => "rejected",
                    FailureKind::RetriesExhausted => "ran out of retries",
                    FailureKind::TimedOut => "timed out",
                    FailureKind::Panicked => "panicked",
                    FailureKind::Interrupted => "was interrupted too often",
                };
                Err(HandlerError::reject(format!(
                    "remote handler {:?} in {service} {how} after {} attempt(s): {}",
                    failure.handler, failure.attempts, failure.reason
                )))
            }
            RemoteResult::Refused { reason } => Err(HandlerError::reject(format!(
                "{service} refused the message: {reason}"
            ))),
            RemoteResult::Unknown { reason } => Err(HandlerError::transient(format!(
                "{service} does not know the outcome: {reason}"
            ))),
        }
    }
}

/// Sends a [`RemoteReply`] to the address an origin gave. Implemented once per broker.
pub trait Replier: Send + Sync + 'static {
    /// What a failure looks like.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `reply` to `to` (the message's [`crate::InboundMessage::reply_to`]). Best effort:
    /// an origin that misses a reply asks again, and gets the stored outcome.
    fn reply(
        &self,
        to: &str,
        reply: &RemoteReply,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The [`Replier`] of an inbox that answers nobody: messages are committed as `publish`
/// (nobody waits), even when they ask for a reply.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReplies;

/// The error of [`NoReplies`]; never produced.
#[derive(Debug, thiserror::Error)]
#[error("this inbox sends no replies")]
#[non_exhaustive]
pub struct NoRepliesError;

impl Replier for NoReplies {
    type Error = NoRepliesError;

    async fn reply(&self, _to: &str, _reply: &RemoteReply) -> Result<(), Self::Error> {
        Err(NoRepliesError)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_round_trip_and_map_to_handler_results() {
        let failure = Failure {
            event_index: 0,
            event_type: "invoice.requested".into(),
            handler: "charger".into(),
            kind: FailureKind::Rejected,
            reason: "card declined".into(),
            attempts: 1,
        };
        let reply = RemoteReply {
            message_id: MessageId::new(),
            operation_id: Some(OperationId::new()),
            result: RemoteResult::Failed { failure },
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(json.contains("\"status\":\"failed\""), "{json}");
        let back: RemoteReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
        match back.into_handler_result("billing") {
            Err(HandlerError::Reject(r)) => {
                assert!(r.contains("card declined") && r.contains("charger"), "{r}")
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let ok = RemoteReply {
            message_id: MessageId::new(),
            operation_id: None,
            result: RemoteResult::Succeeded,
        };
        assert!(ok.into_handler_result("billing").is_ok());
        let unknown = RemoteReply {
            message_id: MessageId::new(),
            operation_id: None,
            result: RemoteResult::Unknown {
                reason: "pruned".into(),
            },
        };
        assert!(matches!(
            unknown.into_handler_result("billing"),
            Err(HandlerError::Transient(_))
        ));
    }
}
