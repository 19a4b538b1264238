//! The service the layer wraps around an HTTP service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_service::Service;

use super::body::{boxed, full, BoxError, ReplyBody, Resumed};
use super::layer::{Shared, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use super::problem;
use crate::idempotency::{Begin, Claim, Completion, Error, Fingerprint, StoredResponse};

/// The idempotency middleware around `S`; made by [`super::IdempotencyLayer`].
#[derive(Debug, Clone)]
pub struct IdempotencyService<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

/// The future of [`IdempotencyService`].
pub type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<Response<ReplyBody>, E>> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ReplyBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready runs this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(inner, self.shared.clone(), request))
    }
}

async fn run<S, ReqBody, ResBody>(
    mut inner: S,
    shared: Arc<Shared>,
    request: Request<ReqBody>,
) -> Result<Response<ReplyBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !shared.methods.contains(request.method()) {
        return Ok(inner.call(request).await?.map(boxed));
    }
    let key = match request.headers().get(IDEMPOTENCY_KEY) {
        None if shared.required => {
            return Ok(problem::missing_key(request.method()));
        }
        None => return Ok(inner.call(request).await?.map(boxed)),
        Some(value) => match value.to_str() {
            Ok(key) => key.to_owned(),
            Err(_) => {
                return Ok(problem::from_error(&Error::InvalidKey {
                    reason: "it holds characters other than printable ASCII".to_owned(),
                }))
            }
        },
    };

    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, shared.max_request_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Ok(problem::too_large(shared.max_request_bytes));
        }
        Err(e) => return Ok(problem::unreadable_body(&*e)),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fingerprint = Fingerprint::of_request(parts.method.as_str(), path, &body);

    let claim = match shared.keys.begin(&key, fingerprint).await {
        Ok(Begin::Run(claim)) => claim,
        Ok(Begin::Replay(stored)) => return Ok(replay(stored)),
        Err(e) => return Ok(problem::from_error(&e)),
    };
    let response = match inner
        .call(Request::from_parts(parts, ReqBody::from(body)))
        .await
    {
        Ok(response) => response,
        Err(e) => {
            release(claim).await;
            return Err(e);
        }
    };
    Ok(keep(claim, response, &shared).await)
}

/// Stores the response for replay when it may be stored and fits the limit, and hands it on.
async fn keep<B>(claim: Claim, response: Response<B>, shared: &Shared) -> Response<ReplyBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let limit = shared.keys.options().response_limit();
    if status.is_server_error() && !shared.store_server_errors {
        release(claim).await;
        return response.map(boxed);
    }
    let (parts, body) = response.into_parts();
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit as u64 {
        tracing::debug!(
            key = claim.key(),
            limit,
            "response too large to keep for replay"
        );
        release(claim).await;
        return Response::from_parts(parts, boxed(body));
    }
    // Read up to the limit; past it (or on trailers, which are not kept), stop and hand the
    // client what was read followed by the rest.
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    let mut size = 0usize;
    loop {
        let next = body
            .frame()
            .await
            .map(|frame| frame.map_err(Into::<BoxError>::into));
        match next {
            None => break,
            Some(Ok(frame)) => {
                let keepable = frame.data_ref().map(Bytes::len);
                frames.push(frame);
                match keepable {
                    Some(len) => size = size.saturating_add(len),
                    None => size = usize::MAX,
                }
                if size > limit {
                    tracing::debug!(key = claim.key(), limit, "response not kept for replay");
                    release(claim).await;
                    return Response::from_parts(parts, Resumed::then_rest(frames, boxed(body)));
                }
            }
            Some(Err(error)) => {
                release(claim).await;
                return Response::from_parts(parts, Resumed::then_error(frames, error));
            }
        }
    }
    let mut bytes = BytesMut::with_capacity(size);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    let bytes = bytes.freeze();
    let stored = StoredResponse {
        status: status.as_u16(),
        headers: kept_headers(&parts.headers, &shared.keep_headers),
        body: bytes.clone(),
    };
    match claim.complete(&stored).await {
        Ok(Completion::Stored | Completion::TooLarge { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "response not kept for replay"),
    }
    Response::from_parts(parts, full(bytes))
}

fn kept_headers(headers: &HeaderMap, keep: &[http::HeaderName]) -> Vec<(String, String)> {
    keep.iter()
        .flat_map(|name| {
            headers.get_all(name).iter().filter_map(move |value| {
                value
                    .to_str()
                    .ok()
                    .map(|v| (name.as_str().to_owned(), v.to_owned()))
            })
        })
        .collect()
}

/// The stored response, marked as a replay.
fn replay(stored: StoredResponse) -> Response<ReplyBody> {
    let mut response = Response::new(full(stored.body));
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

async fn release(claim: Claim) {
    let key = claim.key().to_owned();
    if let Err(e) = claim.release().await {
        tracing::warn!(key, error = %e, "could not release an idempotency key; it frees itself when its lock expires");
    }
}
