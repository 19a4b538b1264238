//! The OTLP exporter against a real OTLP/HTTP receiver (an HTTP server in this test that
//! decodes the protobuf requests): one operation on a bus over SQLite exports its
//! `txbus.transact`, `txbus.commit` and `txbus.attempt` spans in one trace, linked parent to
//! child, and the trace context its message carries holds the exported ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
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
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use txbus_core::trace::{TraceParent, TRACEPARENT};
use txbus_core::{Bus, Event, Message, On};
use txbus_sqlite::SqliteStore;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: Option<String>,
    name: String,
    trace_id: u128,
    span_id: u64,
    parent_span_id: Option<u64>,
    attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Receiver {
    spans: Mutex<Vec<Received>>,
    requests: Mutex<u32>,
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

/// POST /v1/traces: decodes the protobuf request as an OpenTelemetry collector does and
/// answers with an (empty) protobuf response.
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
            let trace_id = u128::from_be_bytes(span.trace_id.as_slice().try_into().unwrap());
            let span_id = u64::from_be_bytes(span.span_id.as_slice().try_into().unwrap());
            let parent_span_id = (!span.parent_span_id.is_empty())
                .then(|| u64::from_be_bytes(span.parent_span_id.as_slice().try_into().unwrap()));
            spans.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id,
                span_id,
                parent_span_id,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operation_exports_linked_spans_and_its_message_carries_their_ids() {
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(Arc::clone(&receiver));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (layer, guard) = txbus_otel::ExporterBuilder::default()
        .endpoint(format!("http://{addr}/v1/traces"))
        .service_name("otel-test")
        .queue_size(256)
        .install()
        .unwrap();
    tracing_subscriber::registry().with(layer).init();

    // What the handler saw: the attempt's own context and the message's traceparent header.
    let seen = Arc::new(Mutex::new(None::<(Option<TraceParent>, Option<String>)>));
    let seen_by_handler = Arc::clone(&seen);
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .store(SqliteStore::open(dir.path().join("otel.db")).unwrap())
        .handler("otel-handler", On::event("otel.ping"), move |m: Message| {
            let seen = Arc::clone(&seen_by_handler);
            async move {
                let header = m.headers().extra.get(TRACEPARENT).cloned();
                *seen.lock().unwrap() = Some((m.trace_parent(), header));
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();

    let op = bus
        .transact([Event::new("otel.ping", json!({ "n": 1 }))])
        .await
        .unwrap();
    assert!(op.outcome().await.unwrap().is_ok());
    let operation_id = op.id().to_string();
    // Every attempt span is closed once the bus has stopped.
    bus.shutdown(Duration::from_secs(10)).await.unwrap();

    // The batch exporter sends from its own thread: flush until the three spans are in, with
    // a deadline for a stuck run.
    let of_op = |spans: &[Received], name: &str| -> Vec<Received> {
        spans
            .iter()
            .filter(|s| {
                s.name == name
                    && s.attributes.get("operation_id").map(String::as_str)
                        == Some(operation_id.as_str())
            })
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        tokio::task::block_in_place(|| guard.flush()).unwrap();
        let spans = receiver.spans.lock().unwrap().clone();
        let all_in = ["txbus.transact", "txbus.commit", "txbus.attempt"]
            .iter()
            .all(|n| !of_op(&spans, n).is_empty());
        if all_in || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(*receiver.requests.lock().unwrap() >= 1);

    let one = |name: &str| {
        let found = of_op(&spans, name);
        assert_eq!(found.len(), 1, "{name} spans of {operation_id}: {spans:#?}");
        found.into_iter().next().unwrap()
    };
    let transact = one("txbus.transact");
    let commit = one("txbus.commit");
    let attempt = one("txbus.attempt");

    // One trace, linked transact → commit → attempt.
    assert_eq!(transact.parent_span_id, None, "{transact:?}");
    assert_eq!(commit.trace_id, transact.trace_id);
    assert_eq!(attempt.trace_id, transact.trace_id);
    assert_eq!(commit.parent_span_id, Some(transact.span_id));
    assert_eq!(attempt.parent_span_id, Some(commit.span_id));
    assert_ne!(commit.span_id, transact.span_id);
    assert_ne!(attempt.span_id, commit.span_id);
    for span in [&transact, &commit, &attempt] {
        assert_eq!(span.service.as_deref(), Some("otel-test"), "{span:?}");
        // Log lines name the same ids as the exported spans.
        assert_eq!(
            span.attributes.get("trace_id"),
            Some(&format!("{:032x}", span.trace_id)),
            "{span:?}"
        );
        assert_eq!(
            span.attributes.get("span_id"),
            Some(&format!("{:016x}", span.span_id)),
            "{span:?}"
        );
    }
    assert_eq!(
        attempt.attributes.get("handler").map(String::as_str),
        Some("otel-handler")
    );
    assert_eq!(
        attempt.attributes.get("event_type").map(String::as_str),
        Some("otel.ping")
    );
    assert_eq!(
        attempt.attributes.get("outcome").map(String::as_str),
        Some("succeeded"),
        "{attempt:?}"
    );

    // The message carries the commit's context; the handler runs in the attempt's.
    let (attempt_context, header) = seen.lock().unwrap().clone().expect("handler ran");
    let header: TraceParent = header.expect("traceparent header").parse().unwrap();
    assert_eq!(header.trace_id, commit.trace_id);
    assert_eq!(header.span_id, commit.span_id);
    assert_eq!(header.flags & TraceParent::SAMPLED, TraceParent::SAMPLED);
    let attempt_context = attempt_context.expect("the attempt has a trace context");
    assert_eq!(attempt_context.trace_id, attempt.trace_id);
    assert_eq!(attempt_context.span_id, attempt.span_id);

    guard.shutdown().unwrap();
}

#[test]
fn settings_out_of_range_are_refused_with_what_to_change() {
    let Err(err) = txbus_otel::ExporterBuilder::default()
        .queue_size(0)
        .install::<tracing_subscriber::Registry>()
    else {
        panic!("a queue of 0 spans was accepted");
    };
    assert!(err.to_string().contains("queue size"), "{err}");
}
