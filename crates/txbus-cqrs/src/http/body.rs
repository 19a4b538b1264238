//! The response body the layer hands back: a stored or buffered body in one piece, or a body
//! that was partly read (to see whether it fits the limit) and is resumed where it stopped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// A boxed error, as `tower` and `axum` use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response that goes through the layer.
pub type ReplyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body in one piece.
pub(crate) fn full(bytes: Bytes) -> ReplyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Any body, boxed.
pub(crate) fn boxed<B>(body: B) -> ReplyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The frames already read, then an error met while reading or the rest of the body.
pub(crate) struct Resumed {
    read: VecDeque<Frame<Bytes>>,
    error: Option<BoxError>,
    rest: Option<ReplyBody>,
}

impl Resumed {
    /// Frames already read, then the rest of the body.
    pub(crate) fn then_rest(read: Vec<Frame<Bytes>>, rest: ReplyBody) -> ReplyBody {
        Self {
            read: read.into(),
            error: None,
            rest: Some(rest),
        }
        .boxed_unsync()
    }

    /// Frames already read, then the error that stopped the reading.
    pub(crate) fn then_error(read: Vec<Frame<Bytes>>, error: BoxError) -> ReplyBody {
        Self {
            read: read.into(),
            error: Some(error),
            rest: None,
        }
        .boxed_unsync()
    }
}

impl Body for Resumed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.rest.as_ref().map(Body::size_hint).unwrap_or_default();
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint.set_lower(rest.lower().saturating_add(read));
        hint
    }
}
