//! One operation's spans, linked parent to child across a relay and a remote handler over the
//! real NATS server: the trace context travels in the messages' headers (W3C traceparent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use txbus_core::{Bus, Event, Message, On};
use txbus_nats::{
    ConsumerSpec, JetStreamPublisher, JetStreamSource, NatsReplier, RemoteHandler, StreamSpec,
};
use txbus_relay::{Inbox, Relay, SubjectRoute};
use txbus_sqlite::SqliteStore;

/// A span as the subscriber saw it: its name, its parent span in this process, its fields.
#[derive(Debug, Clone)]
struct Captured {
    id: u64,
    name: String,
    parent: Option<u64>,
    fields: HashMap<String, String>,
}

#[derive(Default)]
struct Capture {
    spans: Mutex<Vec<Captured>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

struct CaptureLayer(Arc<Capture>);

impl<S> Layer<S> for CaptureLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !attrs.metadata().name().starts_with("txbus.") {
            return;
        }
        let parent = if attrs.is_root() {
            None
        } else if let Some(p) = attrs.parent() {
            Some(p.into_u64())
        } else {
            ctx.current_span().id().map(Id::into_u64)
        };
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0.spans.lock().unwrap().push(Captured {
            id: id.into_u64(),
            name: attrs.metadata().name().to_owned(),
            parent,
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut spans = self.0.spans.lock().unwrap();
        if let Some(span) = spans.iter_mut().rev().find(|s| s.id == id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

fn capture() -> Arc<Capture> {
    static CAPTURE: OnceLock<Arc<Capture>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Arc::new(Capture::default());
            let subscriber =
                tracing_subscriber::registry().with(CaptureLayer(Arc::clone(&capture)));
            tracing::subscriber::set_global_default(subscriber).unwrap();
            capture
        })
        .clone()
}

impl Capture {
    fn find(&self, name: &str, pred: impl Fn(&Captured) -> bool) -> Captured {
        let spans = self.spans.lock().unwrap();
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.name == name && pred(s))
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "expected one {name} span, got {found:#?}");
        found.into_iter().next().unwrap()
    }
}

fn field<'a>(span: &'a Captured, name: &str) -> &'a str {
    span.fields
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("span {} has no field {name}: {span:#?}", span.name))
}

/// `child` continues `parent`: same trace, and its parent span id is the parent's span id.
fn assert_child(child: &Captured, parent: &Captured) {
    assert_eq!(
        field(child, "trace_id"),
        field(parent, "trace_id"),
        "{child:#?}\n{parent:#?}"
    );
    assert_eq!(
        field(child, "parent_span_id"),
        field(parent, "span_id"),
        "{} is not a child of {}:\n{child:#?}\n{parent:#?}",
        child.name,
        parent.name
    );
}

fn recorder(
    tx: mpsc::UnboundedSender<String>,
) -> impl Fn(Message) -> std::future::Ready<txbus_core::HandlerResult> + Clone + Send + Sync + 'static
{
    move |m: Message| {
        let _ = tx.send(m.id().to_string());
        std::future::ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operation_is_one_trace_across_a_relay_and_a_remote_handler() {
    let capture = capture();
    let (client, js) = connect().await;
    let prefix = unique("trace");
    let remote_stream = unique("TRACE_REMOTE_");
    let relay_stream = unique("TRACE_RELAY_");
    StreamSpec::new(&remote_stream, [format!("{prefix}.remote.>")])
        .ensure(&js)
        .await
        .unwrap();
    StreamSpec::new(&relay_stream, [format!("{prefix}.relay.>")])
        .ensure(&js)
        .await
        .unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let store = |i: usize| SqliteStore::open(dirs[i].path().join("bus.db")).unwrap();

    // The remote service: an inbox answering over NATS, and its handler.
    let (charged_tx, mut charged) = mpsc::unbounded_channel();
    let remote = Bus::builder()
        .store(store(1))
        .handler(
            "trace-charger",
            On::in_module("billing"),
            recorder(charged_tx),
        )
        .build()
        .await
        .unwrap();
    let remote_inbox = Inbox::builder(
        remote.clone(),
        "trace-billing-in",
        JetStreamSource::new(
            js.clone(),
            ConsumerSpec::new(&remote_stream, "trace-billing-in"),
        )
        .await
        .unwrap(),
    )
    .replies(NatsReplier::new(client.clone()))
    .start()
    .unwrap();

    // The receiver of the relayed audit events.
    let (audited_tx, mut audited) = mpsc::unbounded_channel();
    let receiver = Bus::builder()
        .store(store(2))
        .handler(
            "trace-audit-writer",
            On::in_module("audit"),
            recorder(audited_tx),
        )
        .build()
        .await
        .unwrap();
    let receiver_inbox = Inbox::builder(
        receiver.clone(),
        "trace-audit-in",
        JetStreamSource::new(
            js.clone(),
            ConsumerSpec::new(&relay_stream, "trace-audit-in"),
        )
        .await
        .unwrap(),
    )
    .start()
    .unwrap();

    // The origin: a local handler, a remote one, and a relay of the audit module.
    let (local_tx, mut local) = mpsc::unbounded_channel();
    let origin = Bus::builder()
        .store(store(0))
        .handler("trace-local", On::in_module("billing"), recorder(local_tx))
        .handler(
            "trace-billing",
            On::in_module("billing"),
            RemoteHandler::new(client.clone(), "billing")
                .route(SubjectRoute::new(format!("{prefix}.remote")))
                .reply_prefix(format!("{prefix}.reply")),
        )
        .build()
        .await
        .unwrap();
    let relay = Relay::builder(
        origin.clone(),
        "trace-audit-out",
        JetStreamPublisher::new(js.clone()),
    )
    .filter(On::in_module("audit"))
    .route(SubjectRoute::new(format!("{prefix}.relay")))
    .start()
    .await
    .unwrap();

    let op = origin
        .transact([
            Event::new("invoice.charge", json!({"amount": 7})).module("billing"),
            Event::new("invoice.charged", json!({"amount": 7})).module("audit"),
        ])
        .await
        .unwrap();
    let op_id = op.id().to_string();
    let outcome = tokio::time::timeout(Duration::from_secs(60), op.outcome())
        .await
        .expect("the operation finished")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let wait = Duration::from_secs(60);
    tokio::time::timeout(wait, local.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(wait, charged.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(wait, audited.recv())
        .await
        .unwrap()
        .unwrap();
    relay.drained().await.unwrap();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    remote_inbox.shutdown(Duration::from_secs(5)).await.unwrap();
    receiver_inbox
        .shutdown(Duration::from_secs(5))
        .await
        .unwrap();
    for bus in [&origin, &remote, &receiver] {
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    let on_op = |id: String| move |s: &Captured| s.fields.get("operation_id") == Some(&id);
    let handler = |h: &'static str| {
        move |s: &Captured| s.fields.get("handler").map(String::as_str) == Some(h)
    };

    // In the origin: transact → commit → each attempt.
    let transact = capture.find("txbus.transact", on_op(op_id.clone()));
    assert_eq!(transact.fields.get("parent_span_id"), None, "{transact:#?}");
    assert_eq!(field(&transact, "kind"), "transact");
    let commit = capture.find("txbus.commit", on_op(op_id.clone()));
    assert_eq!(commit.parent, Some(transact.id));
    assert_child(&commit, &transact);
    let local_attempt = capture.find("txbus.attempt", handler("trace-local"));
    assert_child(&local_attempt, &commit);
    assert_eq!(field(&local_attempt, "operation_id"), op_id);
    assert_eq!(field(&local_attempt, "event_type"), "invoice.charge");
    assert_eq!(field(&local_attempt, "outcome"), "succeeded");
    let remote_attempt = capture.find("txbus.attempt", handler("trace-billing"));
    assert_child(&remote_attempt, &commit);
    assert_eq!(field(&remote_attempt, "outcome"), "succeeded");

    // Over NATS to the remote service: its inbox continues the remote handler's attempt, and
    // its own transact, commit and attempt follow.
    let inbox = capture.find("txbus.inbox", |s| {
        s.fields.get("inbox").map(String::as_str) == Some("trace-billing-in")
    });
    assert_child(&inbox, &remote_attempt);
    let remote_transact = capture.find("txbus.transact", |s| s.parent == Some(inbox.id));
    assert_child(&remote_transact, &inbox);
    let remote_op = field(&remote_transact, "operation_id").to_owned();
    let remote_commit = capture.find("txbus.commit", on_op(remote_op.clone()));
    assert_child(&remote_commit, &remote_transact);
    let charger = capture.find("txbus.attempt", handler("trace-charger"));
    assert_child(&charger, &remote_commit);
    assert_eq!(field(&charger, "operation_id"), remote_op);
    assert_eq!(field(&charger, "outcome"), "succeeded");

    // Through the relay to the receiver: relay → inbox → transact → commit → attempt.
    let relayed = capture.find("txbus.relay", |s| {
        s.fields.get("relay").map(String::as_str) == Some("trace-audit-out")
    });
    assert_child(&relayed, &commit);
    assert_eq!(field(&relayed, "event_type"), "invoice.charged");
    let audit_inbox = capture.find("txbus.inbox", |s| {
        s.fields.get("inbox").map(String::as_str) == Some("trace-audit-in")
    });
    assert_child(&audit_inbox, &relayed);
    let receiver_transact = capture.find("txbus.transact", |s| s.parent == Some(audit_inbox.id));
    assert_child(&receiver_transact, &audit_inbox);
    assert_eq!(field(&receiver_transact, "kind"), "publish");
    let receiver_commit = capture.find(
        "txbus.commit",
        on_op(field(&receiver_transact, "operation_id").to_owned()),
    );
    assert_child(&receiver_commit, &receiver_transact);
    let writer = capture.find("txbus.attempt", handler("trace-audit-writer"));
    assert_child(&writer, &receiver_commit);

    // One trace from end to end.
    let trace_id = field(&transact, "trace_id");
    assert_eq!(trace_id.len(), 32);
    for span in [&charger, &writer] {
        assert_eq!(field(span, "trace_id"), trace_id);
    }
}
