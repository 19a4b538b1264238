//! The targets. Each takes any bytes; a panic (or a failed property) is a finding.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use arbitrary::Unstructured;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tower_layer::Layer;
use tower_service::Service;
use txbus_core::chain::{self, GENESIS};
use txbus_core::store::{CommitKind, LogMessage};
use txbus_core::{
    Bus, Commit, Event, ExpectedVersion, Headers, KvWrite, MessageId, OperationId, SchemaRegistry,
    StoredMessage,
};
use txbus_cqrs::http::IdempotencyLayer;
use txbus_cqrs::idempotency::{Idempotency, Options};
use txbus_relay::{wire, OutboundMessage};

use crate::input;

/// What the targets share: a runtime and a bus on a scratch SQLite store, built once.
struct Env {
    rt: tokio::runtime::Runtime,
    bus: Bus,
    calls: Arc<AtomicU64>,
    http: txbus_cqrs::http::IdempotencyService<Echo>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let scratch = std::path::Path::new("/dev/shm");
        let dir = if scratch.is_dir() {
            tempfile::tempdir_in(scratch)
        } else {
            tempfile::tempdir()
        };
        let dir = match dir {
            Ok(d) => d,
            Err(e) => panic!("a scratch directory for the fuzz store: {e}"),
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("a runtime: {e}"),
        };
        let schemas = SchemaRegistry::new()
            .register(
                "s.obj",
                json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}),
            )
            .and_then(|r| r.register("s.str", json!({"type": "string", "maxLength": 8})));
        let schemas = match schemas {
            Ok(s) => s,
            Err(e) => panic!("the fuzz schemas: {e}"),
        };
        let path = dir.path().join("fuzz.db");
        let bus = rt.block_on(async {
            let store = txbus_sqlite::SqliteStore::options(&path)
                .durability(txbus_sqlite::Durability::Relaxed)
                .open();
            let store = match store {
                Ok(s) => s,
                Err(e) => panic!("the fuzz store: {e}"),
            };
            match Bus::builder()
                .store(store)
                .schemas(schemas)
                .handler("h", txbus_core::On::event("user.created"), |_m: txbus_core::Message| async { Ok(()) })
                .build()
                .await
            {
                Ok(b) => b,
                Err(e) => panic!("the fuzz bus: {e}"),
            }
        });
        let calls = Arc::new(AtomicU64::new(0));
        let http = IdempotencyLayer::new(Idempotency::new(bus.clone(), Options::default()))
            .max_request_bytes(4096)
            .layer(Echo {
                calls: calls.clone(),
            });
        Env {
            rt,
            bus,
            calls,
            http,
            _dir: dir,
        }
    })
}

/// Checks that a message the bus accepted reads back from its stored text as it was.
fn reads_back(m: &StoredMessage) {
    let back = StoredMessage::from_stored(
        m.id,
        m.event_type.clone(),
        m.module.clone(),
        m.payload_json.clone(),
        m.headers_json.clone(),
    );
    match back {
        Ok(back) => {
            assert_eq!(back.headers, m.headers, "headers read back differently");
            if !input::has_float(&m.payload) {
                assert_eq!(back.payload, m.payload, "the payload read back differently");
            }
        }
        Err(e) => panic!("an accepted message does not read back: {e}"),
    }
}

/// Events, streams and key–value writes handed to the bus: validated (limits, names, schemas,
/// nesting) without writing, through [`Bus::prepare`]. What is accepted must read back as it
/// was; what is refused must say why.
pub fn event(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(commit) = commit_of(&mut u) else {
        return;
    };
    match env().bus.prepare(commit) {
        Ok(prepared) => {
            for m in &prepared.messages {
                reads_back(m);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn commit_of(u: &mut Unstructured<'_>) -> arbitrary::Result<Commit> {
    let mut commit = Commit::new();
    let n = u.int_in_range(0..=4)?;
    for _ in 0..n {
        let mut event = Event::new(input::name(u)?, input::payload(u)?);
        if u.arbitrary()? {
            event = event.module(input::name(u)?);
        }
        if u.arbitrary()? {
            event = event.correlation_id(u.arbitrary::<String>()?);
        }
        for _ in 0..u.int_in_range(0..=2)? {
            event = event.header(input::name(u)?, u.arbitrary::<String>()?);
        }
        if u.ratio(1, 4)? {
            let expected = match u.int_in_range(0..=2)? {
                0 => ExpectedVersion::Any,
                1 => ExpectedVersion::NoStream,
                _ => ExpectedVersion::Exact(u.arbitrary()?),
            };
            commit = commit.stream(input::name(u)?, expected, [event]);
        } else {
            commit = commit.event(event);
        }
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let value: Vec<u8> = u.arbitrary()?;
        commit = commit.kv(KvWrite::put(input::name(u)?, value));
    }
    Ok(commit)
}

/// Schema documents and payloads: a schema either registers or is refused with a reason, and
/// a registered one checks any payload without panicking.
pub fn schema(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(doc) = input::payload(&mut u) else {
        return;
    };
    let Ok(payload) = input::payload(&mut u) else {
        return;
    };
    match SchemaRegistry::new().register("t", doc) {
        Ok(registry) => {
            let _ = registry.check("t", &payload);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Stored columns read back: any text parses into a message or an error naming what does
/// not parse; the hash check over any stored content fails unless the hashes match it.
pub fn stored(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((id, event_type, module, payload, headers)) = (|| {
        Ok::<_, arbitrary::Error>((
            MessageId(uuid::Uuid::from_bytes(u.arbitrary()?)),
            input::name(&mut u)?,
            if u.arbitrary()? {
                Some(input::name(&mut u)?)
            } else {
                None
            },
            u.arbitrary::<String>()?,
            u.arbitrary::<String>()?,
        ))
    })() else {
        return;
    };
    if let Ok(m) = StoredMessage::from_stored(
        id,
        event_type.clone(),
        module.clone(),
        payload.clone(),
        headers.clone(),
    ) {
        assert_eq!(m.payload_json, payload);
    }
    let m = StoredMessage::from_stored_lossy(id, event_type, module, payload, headers);
    let op = uuid::Uuid::from_bytes([7; 16]);
    let kind = CommitKind::from_u8(u.arbitrary().unwrap_or(1)).unwrap_or(CommitKind::Transact);
    let created: i64 = u.arbitrary().unwrap_or(0);
    let data_hash = chain::data_hash(&op, kind, created, [LogMessage::from(&m)], &[]);
    let again = chain::data_hash(&op, kind, created, [LogMessage::from(&m)], &[]);
    assert_eq!(data_hash, again, "the data hash is not deterministic");
    let chain_hash = chain::chain_hash(&data_hash, &GENESIS);
    assert_ne!(chain_hash, chain::chain_hash(&data_hash, &chain_hash));
}

/// The relay's wire format: any headers and payload decode to a message or a named error;
/// an accepted message goes through the bus's validation; and any outbound message encodes
/// (as NATS headers too) and decodes back to itself.
pub fn wire(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if let Ok(headers) = wire_headers(&mut u) {
        let payload: &[u8] = u.arbitrary().unwrap_or_default();
        let get = |name: &str| headers.get(name).cloned();
        if let Ok(message) = wire::decode(get, payload) {
            let _ = env().bus.prepare(Commit::new().event(message.to_event()));
        }
    }
    let Ok(out) = outbound(&mut u) else {
        return;
    };
    let sent = wire::headers(&out);
    // What each broker's publisher sends: built without panicking, whatever the headers hold.
    let _ = txbus_nats::nats_headers(&out);
    let _ = txbus_rabbitmq::message_properties(&out);
    let _ = txbus_redis::entry_fields(&out);
    let back = wire::decode(
        |name| {
            sent.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        },
        &out.payload,
    );
    match back {
        Ok(back) => {
            assert_eq!(back.id, out.id);
            assert_eq!(back.event_type, out.event_type);
            assert_eq!(back.module, out.module);
            assert_eq!(back.origin_position, Some(out.position));
            assert_eq!(back.origin_operation, Some(out.operation_id));
            let expected = if out.headers.is_empty() {
                // Only the plain copies travel then: there are none.
                Headers::default()
            } else {
                out.headers.clone()
            };
            assert_eq!(back.headers, expected);
        }
        Err(e) => panic!("an outbound message does not decode back: {e}"),
    }
}

/// Header maps that often hold the txbus headers, with valid or broken values.
fn wire_headers(u: &mut Unstructured<'_>) -> arbitrary::Result<BTreeMap<String, String>> {
    let names = [
        wire::MESSAGE_ID,
        wire::EVENT_TYPE,
        wire::MODULE,
        wire::OPERATION_ID,
        wire::POSITION,
        wire::CORRELATION_ID,
        wire::CAUSATION_ID,
        wire::HEADERS,
        wire::REPLY_TO,
    ];
    let mut map = BTreeMap::new();
    for name in names {
        if u.ratio(1, 5)? {
            continue;
        }
        let value = match (name, u.int_in_range(0..=2)?) {
            (wire::MESSAGE_ID | wire::OPERATION_ID, 0 | 1) => {
                uuid::Uuid::from_bytes(u.arbitrary()?).to_string()
            }
            (wire::POSITION, 0 | 1) => u.arbitrary::<u64>()?.to_string(),
            (wire::HEADERS, 0 | 1) => input::json(u, 3)?.to_string(),
            (_, 0 | 1) => input::name(u)?,
            _ => u.arbitrary()?,
        };
        map.insert(name.to_owned(), value);
    }
    Ok(map)
}

fn outbound(u: &mut Unstructured<'_>) -> arbitrary::Result<OutboundMessage> {
    let mut headers = Headers {
        correlation_id: u.arbitrary()?,
        causation_id: u.arbitrary()?,
        stream: u.arbitrary()?,
        ..Headers::default()
    };
    for _ in 0..u.int_in_range(0..=2)? {
        headers.extra.insert(u.arbitrary()?, u.arbitrary()?);
    }
    // Event types and modules reach a relay only after validation: the ASCII name set.
    let valid_name = |s: String| -> String {
        let cleaned: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
            .collect();
        if cleaned.is_empty() {
            "e".to_owned()
        } else {
            cleaned
        }
    };
    Ok(OutboundMessage {
        id: MessageId(uuid::Uuid::from_bytes(u.arbitrary()?)),
        operation_id: OperationId(uuid::Uuid::from_bytes(u.arbitrary()?)),
        position: u.arbitrary()?,
        index: u.arbitrary()?,
        event_type: valid_name(u.arbitrary()?),
        module: if u.arbitrary()? {
            Some(valid_name(u.arbitrary()?))
        } else {
            None
        },
        headers,
        payload: Bytes::from(input::json(u, 4)?.to_string()),
        destination: "d".to_owned(),
    })
}

/// A JetStream message with any headers a sender may set.
pub fn nats(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(headers) = wire_headers(&mut u) else {
        return;
    };
    let mut map = txbus_nats::async_nats::HeaderMap::new();
    for (name, value) in &headers {
        // What the client itself accepts as a header: anything else never reaches us.
        let (Ok(name), Ok(value)) = (
            txbus_nats::async_nats::HeaderName::from_str(name),
            txbus_nats::async_nats::HeaderValue::from_str(value),
        ) else {
            continue;
        };
        map.insert(name, value);
    }
    let payload: &[u8] = u.arbitrary().unwrap_or_default();
    let with = txbus_nats::decode_message(Some(&map), payload);
    let without = txbus_nats::decode_message(None, payload);
    assert!(without.is_err(), "a message without headers cannot decode");
    if let Ok(m) = with {
        let _ = env().bus.prepare(Commit::new().event(m.to_event()));
    }
}

/// An AMQP delivery with headers of every AMQP type.
pub fn rabbitmq(data: &[u8]) {
    use txbus_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let mut u = Unstructured::new(data);
    let Ok(headers) = wire_headers(&mut u) else {
        return;
    };
    let mut table = FieldTable::default();
    // A short string holds at most 255 bytes on the wire: longer ones never arrive.
    for (name, value) in headers.into_iter().filter(|(n, _)| n.len() <= 255) {
        let v = match u.int_in_range(0..=5).unwrap_or(0) {
            0..=2 => AMQPValue::LongString(LongString::from(value.into_bytes())),
            3 if value.len() <= 255 => AMQPValue::ShortString(ShortString::from(value)),
            3 => AMQPValue::LongString(LongString::from(value.into_bytes())),
            4 => AMQPValue::LongLongInt(u.arbitrary().unwrap_or(0)),
            _ => AMQPValue::Boolean(u.arbitrary().unwrap_or(false)),
        };
        table.insert(ShortString::from(name), v);
    }
    let count = match u.int_in_range(0..=4).unwrap_or(0) {
        0 => AMQPValue::LongLongInt(u.arbitrary().unwrap_or(0)),
        1 => AMQPValue::LongInt(u.arbitrary().unwrap_or(0)),
        2 => AMQPValue::LongUInt(u.arbitrary().unwrap_or(0)),
        3 => AMQPValue::ShortInt(u.arbitrary().unwrap_or(0)),
        _ => AMQPValue::Void,
    };
    table.insert(ShortString::from("x-delivery-count"), count);
    let body: &[u8] = u.arbitrary().unwrap_or_default();
    let redelivered: bool = u.arbitrary().unwrap_or(false);
    let _ = txbus_rabbitmq::delivery_count(Some(&table), redelivered);
    let _ = txbus_rabbitmq::delivery_count(None, redelivered);
    if let Ok(m) = txbus_rabbitmq::decode_delivery(Some(&table), body) {
        let _ = env().bus.prepare(Commit::new().event(m.to_event()));
    }
}

/// A Redis reply in any shape where a stream entry is expected.
pub fn redis(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(value) = redis_value(&mut u, 4) else {
        return;
    };
    if let Some((_, Some(Ok(m)))) = txbus_redis::decode_entry(&value) {
        let _ = env().bus.prepare(Commit::new().event(m.to_event()));
    }
}

fn redis_value(
    u: &mut Unstructured<'_>,
    depth: usize,
) -> arbitrary::Result<txbus_redis::redis::Value> {
    use txbus_redis::redis::Value as V;
    let top = if depth == 0 { 4 } else { 7 };
    Ok(match u.int_in_range(0..=top)? {
        0 => V::Nil,
        1 => V::Int(u.arbitrary()?),
        2 => V::BulkString(u.arbitrary()?),
        3 => V::SimpleString(input::name(u)?),
        4 => {
            // A field name of the wire format, or the payload field.
            let names = [
                wire::MESSAGE_ID,
                wire::EVENT_TYPE,
                wire::HEADERS,
                txbus_redis::PAYLOAD_FIELD,
            ];
            V::BulkString(u.choose(&names)?.as_bytes().to_vec())
        }
        5 | 6 => {
            let n = u.int_in_range(0..=12)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(redis_value(u, depth - 1)?);
            }
            V::Array(items)
        }
        _ => {
            let n = u.int_in_range(0..=6)?;
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push((redis_value(u, depth - 1)?, redis_value(u, depth - 1)?));
            }
            V::Map(pairs)
        }
    })
}

/// The inner service behind the idempotency layer: answers with a status chosen by the
/// body's first byte and echoes the body; counts its calls.
#[derive(Clone)]
pub struct Echo {
    calls: Arc<AtomicU64>,
}

impl Service<Request<Full<Bytes>>> for Echo {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let uri = request.uri().to_string();
        let status = match request.method().as_str().len() % 4 {
            0 => StatusCode::CREATED,
            1 => StatusCode::OK,
            2 => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = Response::new(Full::new(Bytes::from(uri)));
        *response.status_mut() = status;
        std::future::ready(Ok(response))
    }
}

/// Any HTTP request through the idempotency layer, sent twice with the same key: the layer
/// answers its own refusals with a 4xx (never a 5xx), and a request that ran and was kept is
/// replayed the second time, status and body unchanged, without running again.
pub fn idempotency_http(data: &[u8]) {
    static EXEC: AtomicU64 = AtomicU64::new(0);
    let mut u = Unstructured::new(data);
    let env = env();
    let method = match u.int_in_range(0..=5).unwrap_or(0) {
        0 | 1 => Method::POST,
        2 => Method::PATCH,
        3 => Method::GET,
        4 => Method::PUT,
        _ => {
            let raw: &[u8] = u.arbitrary().unwrap_or_default();
            Method::from_bytes(raw).unwrap_or(Method::POST)
        }
    };
    let path: String = u.arbitrary().unwrap_or_default();
    let uri =
        http::Uri::from_str(&format!("/{path}")).unwrap_or_else(|_| http::Uri::from_static("/x"));
    // A key of its own per run (a unique prefix), with fuzzed bytes after it, or none.
    let key = if u.ratio(7, 8).unwrap_or(true) {
        let tail: &[u8] = u.arbitrary().unwrap_or_default();
        let mut key = format!("k{}-", EXEC.fetch_add(1, Ordering::Relaxed)).into_bytes();
        key.extend_from_slice(tail);
        Some(key)
    } else {
        None
    };
    let body: Vec<u8> = u.arbitrary().unwrap_or_default();
    let body = if u.ratio(1, 16).unwrap_or(false) {
        vec![b'b'; 5000]
    } else {
        body
    };
    let request = || {
        let mut r = Request::new(Full::new(Bytes::from(body.clone())));
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri.clone();
        if let Some(key) = &key {
            if let Ok(v) = HeaderValue::from_bytes(key) {
                r.headers_mut().insert("idempotency-key", v);
            }
        }
        r
    };
    let send = |r: Request<Full<Bytes>>| {
        let mut service = env.http.clone();
        env.rt.block_on(async move {
            let response = match service.call(r).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = response.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => panic!("the response body failed: {e}"),
            };
            (parts, body)
        })
    };
    let calls = env.calls.load(Ordering::SeqCst);
    let (first, first_body) = send(request());
    let ran_first = env.calls.load(Ordering::SeqCst) > calls;
    if !ran_first {
        assert!(
            first.status.is_client_error(),
            "the layer refused with {}",
            first.status
        );
    }
    let calls = env.calls.load(Ordering::SeqCst);
    let (second, second_body) = send(request());
    let ran_second = env.calls.load(Ordering::SeqCst) > calls;
    let covered = matches!(method, Method::POST | Method::PATCH);
    let keyed = covered && ran_first && request().headers().contains_key("idempotency-key");
    if keyed && !first.status.is_server_error() {
        assert!(!ran_second, "a kept response was not replayed");
        assert_eq!(second.status, first.status);
        assert_eq!(second_body, first_body);
        assert_eq!(
            second
                .headers
                .get("idempotent-replayed")
                .map(HeaderValue::as_bytes),
            Some(&b"true"[..])
        );
    }
    if !ran_second {
        assert!(!second.status.is_server_error(), "{}", second.status);
    }
}
