//! The errors of the NATS relay, inbox and remote handlers.

/// A NATS operation failed. Relays and inboxes retry with backoff (the client reconnects on
/// its own); the setup functions return it to the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A call to the NATS server failed.
    #[error("{what} failed: {source}; check that the NATS server is reachable and runs with JetStream (-js)")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server refused or did not confirm a publish of a message.
    #[error("JetStream did not confirm message {message_id} on {subject:?}: {source}")]
    Publish {
        /// The txbus message id.
        message_id: String,
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// The consumer's message stream ended (the consumer was deleted, or the connection
    /// closed); the source creates it again on the next call.
    #[error("the message stream of consumer {0:?} ended; it is created again on the next call")]
    StreamEnded(String),
}

impl Error {
    pub(crate) fn nats(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Nats {
            what: what.into(),
            source: Box::new(source),
        }
    }
}
