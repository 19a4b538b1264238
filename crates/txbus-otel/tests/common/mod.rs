//! What the exporter's tests share: a real OTLP/HTTP receiver (an HTTP server that decodes the
//! protobuf requests as an OpenTelemetry collector does), the exporter installed against it,
//! and the spans it received.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A bound only a stuck run reaches; never a measurement.
pub const HANG: Duration = Duration::from_secs(60);

/// One span as the receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: Option<String>,
    pub name: String,
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub attributes: HashMap<String, String>,
}

impl Received {
    /// The value of a string (or integer, or boolean) attribute.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The spans received so far, and how many export requests brought them.
#[derive(Default)]
pub struct Receiver {
    pub spans: Mutex<Vec<Received>>,
    pub requests: Mutex<u32>,
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

fn id<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("an id of {} bytes, not {N}", bytes.len()))
}

/// POST /v1/traces: decodes the protobuf request and answers with an (empty) protobuf
/// response.
async fn export(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<([(header::HeaderName, &'static str); 1], Vec<u8>), (StatusCode, String)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type:?}"),
        ));
    }
    let request = ExportTraceServiceRequest::decode(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut spans = receiver.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| text(&r.attributes).remove("service.name"));
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: u128::from_be_bytes(id(&span.trace_id)),
                span_id: u64::from_be_bytes(id(&span.span_id)),
                parent_span_id: (!span.parent_span_id.is_empty())
                    .then(|| u64::from_be_bytes(id(&span.parent_span_id))),
                attributes: text(&span.attributes),
            });
        }
    }
    *receiver.requests.lock().unwrap() += 1;
    Ok((
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    ))
}

/// Starts a receiver on a free loopback port.
pub async fn receiver() -> (SocketAddr, Arc<Receiver>) {
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(Arc::clone(&receiver));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, receiver)
}

/// Installs the exporter against the receiver at `addr` and the process's subscriber with
/// its layer (once per process: each test file is its own).
pub fn install(addr: SocketAddr, service: &str) -> txbus_otel::Guard {
    let (layer, guard) = txbus_otel::ExporterBuilder::default()
        .endpoint(format!("http://{addr}/v1/traces"))
        .service_name(service)
        .queue_size(1024)
        .install()
        .unwrap();
    tracing_subscriber::registry().with(layer).init();
    guard
}

/// Flushes the exporter until `done` holds for the spans received (a deadline only a stuck
/// run reaches); returns them.
pub async fn flush_until(
    guard: &txbus_otel::Guard,
    receiver: &Receiver,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = Instant::now() + HANG;
    loop {
        tokio::task::block_in_place(|| guard.flush()).unwrap();
        let spans = receiver.spans.lock().unwrap().clone();
        if done(&spans) || Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The only span matching `pick`, or a failure listing them all.
pub fn only<'a>(
    spans: &'a [Received],
    what: &str,
    pick: impl Fn(&Received) -> bool,
) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?} among {spans:#?}");
    found[0]
}
