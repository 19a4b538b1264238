//! The pages, one file each, and what they share: the live (server-sent events) stream.

pub(crate) mod dead_letters;
pub(crate) mod log;
pub(crate) mod operations;
pub(crate) mod overview;
pub(crate) mod runners;
pub(crate) mod sagas;
pub(crate) mod trail;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use maud::Markup;

use crate::Inner;

/// What one refresh of a live region gives: the new content, and whether it is final.
pub(crate) struct Frame {
    pub(crate) html: Markup,
    pub(crate) last: bool,
}

/// A stream of `update` events rendered by `render` every refresh interval, ending with an
/// `end` event after a final frame. At most `max_live_connections` are open at once; beyond
/// that the answer is 503.
pub(crate) fn live<F, Fut>(inner: &Arc<Inner>, render: F) -> Response
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Option<Frame>> + Send,
{
    let Ok(permit) = Arc::clone(&inner.live).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live connections; reload later",
        )
            .into_response();
    };
    let every = inner.refresh;
    let events = stream::unfold(
        (render, permit, true, false),
        move |(render, permit, first, done)| async move {
            if done {
                return None;
            }
            if !first {
                tokio::time::sleep(every).await;
            }
            let (event, done) = match render().await {
                Some(frame) => (
                    Event::default()
                        .event("update")
                        .data(frame.html.into_string()),
                    frame.last,
                ),
                None => (Event::default().event("end").data(""), true),
            };
            let out: Result<Event, Infallible> = Ok(event);
            Some((out, (render, permit, false, done)))
        },
    );
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
