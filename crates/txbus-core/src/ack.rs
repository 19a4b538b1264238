//! Acknowledging a delivery in the commit its handler makes.
//!
//! A handler whose work *is* a commit — a saga step recording its completion, a command saving
//! its aggregate, a projection moving its checkpoint — can carry the acknowledgement of its own
//! delivery in that commit ([`crate::Commit::acknowledging`]). The store applies it in the same
//! transaction, so the step costs one durable write instead of two (its commit, then its ack),
//! and the commit is fenced: if the attempt's lease was taken over meanwhile, the commit fails
//! with [`crate::Conflict::Lease`] and writes nothing, so a superseded attempt cannot commit its
//! effects. The engine sees that the delivery was acknowledged and does not record it again.

use std::sync::{Arc, OnceLock};

use crate::message::OperationId;
use crate::store::{Completion, CompletionEffect, DeliveryResult, OwnerId};

/// The acknowledgement one attempt can hand to a commit: what the store needs to record its
/// success, and where the engine learns that it was recorded.
#[derive(Debug)]
pub(crate) struct AckSlot {
    /// The bus whose lease the attempt runs under: only its commits may carry the ack.
    pub(crate) owner: OwnerId,
    pub(crate) delivery_id: i64,
    pub(crate) fence: i64,
    pub(crate) commit_id: u64,
    pub(crate) operation_id: OperationId,
    pub(crate) event_index: u32,
    pub(crate) handler: Arc<str>,
    /// This attempt's number.
    pub(crate) attempt: u32,
    /// Set once a commit carrying the ack is durable: what recording it did.
    recorded: OnceLock<CompletionEffect>,
}

impl AckSlot {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        owner: OwnerId,
        delivery_id: i64,
        fence: i64,
        commit_id: u64,
        operation_id: OperationId,
        event_index: u32,
        handler: Arc<str>,
        attempt: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            owner,
            delivery_id,
            fence,
            commit_id,
            operation_id,
            event_index,
            handler,
            attempt,
            recorded: OnceLock::new(),
        })
    }

    /// The success to record, as the store takes it.
    pub(crate) fn completion(&self) -> Completion {
        Completion {
            delivery_id: self.delivery_id,
            fence: self.fence,
            commit_id: self.commit_id,
            attempts: self.attempt,
            handler: Arc::clone(&self.handler),
            result: DeliveryResult::Succeeded,
        }
    }

    /// Marks the ack as recorded by a durable commit. False when it was recorded already.
    pub(crate) fn record(&self, effect: CompletionEffect) -> bool {
        self.recorded.set(effect).is_ok()
    }

    /// What recording the ack did, once a commit carrying it is durable.
    pub(crate) fn recorded(&self) -> Option<&CompletionEffect> {
        self.recorded.get()
    }
}
