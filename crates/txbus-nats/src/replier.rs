//! Replies of remote `transact`s, sent with core NATS.

use txbus_relay::{RemoteReply, Replier};

use crate::error::Error;

/// Sends [`RemoteReply`]s as core NATS messages to the origin's reply subject. Best effort,
/// by design: an origin that misses a reply asks again and gets the stored outcome.
#[derive(Debug, Clone)]
pub struct NatsReplier {
    client: async_nats::Client,
}

impl NatsReplier {
    /// A replier on `client`.
    pub fn new(client: async_nats::Client) -> Self {
        Self { client }
    }
}

impl Replier for NatsReplier {
    type Error = Error;

    async fn reply(&self, to: &str, reply: &RemoteReply) -> Result<(), Error> {
        let body = serde_json::to_vec(reply).map_err(|e| Error::nats("encoding a reply", e))?;
        self.client
            .publish(to.to_owned(), body.into())
            .await
            .map_err(|e| Error::nats(format!("sending a reply to {to}"), e))
    }
}
