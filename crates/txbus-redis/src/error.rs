//! What can go wrong talking to Redis.

/// A Redis publisher, source or acker failure. The relay and the inbox retry after a backoff;
/// these say what failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis client failed: connecting, or a command the server refused.
    #[error("Redis {action} failed: {source}; the connection is made again on the next call")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The client error.
        #[source]
        source: redis::RedisError,
    },
    /// The server answered with something this client does not expect.
    #[error("unexpected Redis reply to {action}: {reply}")]
    Reply {
        /// What was being done.
        action: &'static str,
        /// The reply, as debug text.
        reply: String,
    },
}

impl Error {
    pub(crate) fn redis(action: &'static str) -> impl FnOnce(redis::RedisError) -> Self {
        move |source| Self::Redis { action, source }
    }

    pub(crate) fn reply(action: &'static str, reply: &redis::Value) -> Self {
        let mut text = format!("{reply:?}");
        text.truncate(300);
        Self::Reply {
            action,
            reply: text,
        }
    }
}
