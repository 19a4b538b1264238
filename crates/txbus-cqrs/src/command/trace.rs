//! Tracing middleware: a span per command.

use tracing::Instrument;

use super::dispatch::{Dispatch, Reply};
use super::middleware::{BoxFuture, Middleware, Next};
use super::Error;

/// Runs each command inside a `command` span with its name (`command`), its id
/// (`command_id`) and its idempotency key when it has one; logs failures at `warn` and
/// successes at `debug`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracing;

impl Middleware for Tracing {
    fn call<'a>(
        &'a self,
        command: Dispatch,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Reply, Error>> {
        let span = tracing::info_span!(
            "command",
            command = command.name(),
            command_id = %command.id(),
            idempotency_key = command.idempotency_key(),
        );
        Box::pin(
            async move {
                let result = next.run(command).await;
                match &result {
                    Ok(reply) => tracing::debug!(replay = reply.is_replay(), "command handled"),
                    Err(error) => tracing::warn!(%error, "command failed"),
                }
                result
            }
            .instrument(span),
        )
    }
}
