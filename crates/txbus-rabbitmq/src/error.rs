//! What can go wrong talking to RabbitMQ.

/// A RabbitMQ publisher, source or acker failure. The relay and the inbox retry after a
/// backoff; these say what failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The AMQP client failed: connecting, declaring, publishing, consuming or acking.
    #[error("RabbitMQ {action} failed: {source}; the connection is made again on the next call")]
    Amqp {
        /// What was being done.
        action: &'static str,
        /// The client error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a message (a negative publisher confirm: a queue over its length
    /// limit with `reject-publish`, a disk alarm, …).
    #[error("RabbitMQ refused message {message_id} (negative publisher confirm); it is sent again after a backoff")]
    Nacked {
        /// The refused message.
        message_id: String,
    },
    /// A mandatory message could not be routed to any queue.
    #[error("RabbitMQ returned message {message_id} as unroutable (routing key {routing_key:?}): bind a queue to the exchange for it, or publish without `mandatory`")]
    Unroutable {
        /// The message.
        message_id: String,
        /// Its routing key.
        routing_key: String,
    },
    /// A name is longer than AMQP allows (255 bytes).
    #[error("{what} {value:?} is longer than AMQP's 255 bytes")]
    TooLong {
        /// What the name is for.
        what: &'static str,
        /// The name.
        value: String,
    },
    /// The consumer was cancelled by the broker (its queue was deleted, or the node is
    /// stopping).
    #[error(
        "the RabbitMQ consumer on queue {queue:?} was cancelled; consuming again on the next call"
    )]
    Cancelled {
        /// The queue.
        queue: String,
    },
}

impl Error {
    pub(crate) fn amqp(action: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Amqp { action, source }
    }
}

/// An AMQP short string (exchange, queue, routing key, header name), checked for length.
pub(crate) fn short(what: &'static str, value: &str) -> Result<lapin::types::ShortString, Error> {
    lapin::types::ShortString::try_new(value).map_err(|_| Error::TooLong {
        what,
        value: value.to_owned(),
    })
}
