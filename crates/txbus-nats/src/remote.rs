//! `transact` across services, origin side: a handler that runs the handlers of another
//! service, reached through JetStream, and succeeds or fails as they do.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use futures_util::StreamExt;
use txbus_core::{Handler, HandlerError, HandlerResult, Message};
use txbus_relay::{wire, OutboundMessage, RemoteReply, Route, SubjectRoute};

use crate::publisher::nats_headers;

/// A txbus [`Handler`] that stands, in the origin service, for the handlers of another
/// service (another process with its own store). Register it for the events that service
/// handles; a `transact` on the origin then completes only when the remote handlers did.
///
/// Each attempt subscribes to the reply subject `<reply prefix>.<message id>`, publishes the
/// message to JetStream (subject from its [`Route`], default `txbus.remote.<module>.<event
/// type>`) with the txbus headers and the reply subject, and waits for the remote
/// [`RemoteReply`]. The remote service runs an [`txbus_relay::Inbox`] with
/// [`crate::NatsReplier`]: it commits the message as a `transact` under its original id
/// (once, however often it arrives), awaits its outcome and replies. Then:
///
/// * the remote handlers succeeded → this handler succeeds;
/// * a remote handler failed for good (rejected, out of retries, …) → this handler
///   *rejects*, with the remote handler's name and reason, failing the origin's operation;
/// * no reply within the reply timeout (either side crashed, the broker was away) → a
///   transient error: the origin's normal retries send the message again, and the remote
///   inbox, which already has it, answers with the stored outcome of the first.
///
/// The origin handler's timeout must be longer than the reply timeout (default 8 s, under
/// the default handler timeout of 10 s).
///
/// ```no_run
/// # async fn example(store: impl txbus_core::Store) -> Result<(), Box<dyn std::error::Error>> {
/// use txbus_core::{Bus, On};
/// use txbus_nats::RemoteHandler;
///
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let bus = Bus::builder()
///     .store(store)
///     .handler("billing", On::in_module("billing"), RemoteHandler::new(client, "billing"))
///     .build()
///     .await?;
/// # let _ = bus; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RemoteHandler {
    client: async_nats::Client,
    js: jetstream::Context,
    service: String,
    route: Arc<dyn Route>,
    reply_prefix: String,
    reply_timeout: Duration,
    /// Makes each process's publishes distinct for the broker's deduplication, so that an
    /// attempt after a restart reaches the remote inbox even within the duplicate window.
    instance: String,
}

impl std::fmt::Debug for RemoteHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHandler")
            .field("service", &self.service)
            .field("reply_prefix", &self.reply_prefix)
            .field("reply_timeout", &self.reply_timeout)
            .finish_non_exhaustive()
    }
}

impl RemoteHandler {
    /// A handler that forwards to the service named `service` (used in failure reasons),
    /// through JetStream on `client`.
    pub fn new(client: async_nats::Client, service: impl Into<String>) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            service: service.into(),
            route: Arc::new(SubjectRoute::new("txbus.remote")),
            reply_prefix: "txbus.reply".into(),
            reply_timeout: Duration::from_secs(8),
            instance: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    /// Where requests go (default `txbus.remote.<module>.<event type>`). A JetStream stream
    /// must take these subjects, and the remote inbox's consumer read them.
    pub fn route(mut self, route: impl Route) -> Self {
        self.route = Arc::new(route);
        self
    }

    /// The prefix of reply subjects (default `txbus.reply`); replies go to
    /// `<prefix>.<message id>`.
    pub fn reply_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.reply_prefix = prefix.into();
        self
    }

    /// How long one attempt waits for the reply (default 8 s) before failing transiently.
    pub fn reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }
}

impl Handler for RemoteHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let inner = self;
        let id = message.id();
        let reply_to = format!("{}.{}", inner.reply_prefix, id);
        // Subscribed before the publish on the same connection: the reply cannot come first.
        let mut replies = inner
            .client
            .subscribe(reply_to.clone())
            .await
            .map_err(|e| HandlerError::transient(format!("subscribing to {reply_to}: {e}")))?;
        let destination = inner.route.destination(message.stored());
        let context = message.context();
        let mut outbound = OutboundMessage::from_stored(
            message.stored().clone(),
            message.operation_id(),
            context.commit_id,
            context.index,
            destination.clone(),
        );
        // The remote side continues the trace under this attempt's span.
        if let Some(context) = message.trace_parent() {
            context.write_to(&mut outbound.headers);
        }
        let mut headers = nats_headers(&outbound);
        headers.insert(wire::REPLY_TO, reply_to.as_str());
        let publish = Publish::build()
            .payload(outbound.payload.clone())
            .headers(headers)
            .message_id(format!("{id}:{}:{}", inner.instance, message.attempt()));
        let ack = inner
            .js
            .send_publish(destination.clone(), publish)
            .await
            .map_err(|e| HandlerError::transient(format!("publishing to {destination}: {e}")))?;
        ack.await.map_err(|e| {
            HandlerError::transient(format!("JetStream did not confirm {destination}: {e}"))
        })?;
        let wait = async {
            while let Some(reply) = replies.next().await {
                match serde_json::from_slice::<RemoteReply>(&reply.payload) {
                    Ok(r) if r.message_id == id => return Some(r),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(subject = %reply_to, error = %e, "ignoring a reply that does not decode")
                    }
                }
            }
            None
        };
        match tokio::time::timeout(inner.reply_timeout, wait).await {
            Ok(Some(reply)) => reply.into_handler_result(&inner.service),
            Ok(None) => Err(HandlerError::transient(format!(
                "the reply subscription {reply_to} closed before {} answered",
                inner.service
            ))),
            Err(_) => Err(HandlerError::transient(format!(
                "{} did not answer within {:?}; the message is sent again on the next attempt",
                inner.service, inner.reply_timeout
            ))),
        }
    }
}
