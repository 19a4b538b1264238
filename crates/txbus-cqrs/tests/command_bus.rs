//! The command bus: routing, unknown and duplicate handlers, middleware order, validation, a
//! tracing span per command, and idempotent commands on a real SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{within, TestBus};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;
use txbus_cqrs::command::{
    BoxFuture, Command, CommandBus, Dispatch, Envelope, Error, Idempotent, Middleware, Next, Reply,
    Tracing, Validation,
};
use txbus_cqrs::idempotency::{self, Idempotency, Options};

#[derive(Debug, Serialize)]
struct Deposit {
    account: String,
    cents: u64,
}

impl Command for Deposit {
    type Output = Receipt;
    const NAME: &'static str = "account.deposit";

    fn validate(&self) -> Result<(), String> {
        if self.cents == 0 {
            return Err("a deposit must be at least one cent".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    account: String,
    run: u64,
}

#[derive(Debug, Serialize)]
struct Close {
    account: String,
}

impl Command for Close {
    type Output = bool;
    const NAME: &'static str = "account.close";
}

#[derive(Debug, Serialize)]
struct Unrouted;

impl Command for Unrouted {
    type Output = ();
    const NAME: &'static str = "nobody.handles-this";
}

/// A deposit handler that counts its runs: it rejects accounts named "frozen", fails
/// transiently for "flaky" the first time, and waits at `gate` when one is set.
#[derive(Default)]
struct Deposits {
    runs: AtomicU64,
    flaked: AtomicBool,
    gate: Mutex<Option<(Arc<Barrier>, Arc<Barrier>)>>,
}

impl Deposits {
    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    async fn handle(&self, d: Deposit) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = self.gate.lock().unwrap().clone();
        if let Some((entered, release)) = gate {
            entered.wait().await;
            release.wait().await;
        }
        match d.account.as_str() {
            "frozen" => Err(Error::rejected_as("frozen", "the account is frozen")),
            "flaky" if !self.flaked.swap(true, Ordering::SeqCst) => {
                Err(Error::failed("the ledger is unreachable"))
            }
            _ => Ok(Receipt {
                account: d.account,
                run,
            }),
        }
    }
}

fn bus_with(deposits: &Arc<Deposits>, builder: txbus_cqrs::command::Builder) -> CommandBus {
    let d = deposits.clone();
    builder
        .handler(move |c: Deposit| {
            let d = d.clone();
            async move { d.handle(c).await }
        })
        .handler(|c: Close| async move { Ok(c.account != "none") })
        .build()
        .unwrap()
}

#[tokio::test]
async fn each_command_reaches_the_handler_of_its_type() {
    let deposits = Arc::new(Deposits::default());
    let bus = bus_with(&deposits, CommandBus::builder());
    let receipt = bus
        .send(Deposit {
            account: "a".into(),
            cents: 5,
        })
        .await
        .unwrap();
    assert_eq!(
        receipt,
        Receipt {
            account: "a".into(),
            run: 1
        }
    );
    assert!(bus
        .send(Close {
            account: "a".into()
        })
        .await
        .unwrap());
    assert!(!bus
        .send(Close {
            account: "none".into()
        })
        .await
        .unwrap());
    assert_eq!(deposits.runs(), 1);
    assert!(bus.handles::<Deposit>() && bus.handles::<Close>() && !bus.handles::<Unrouted>());
}

#[tokio::test]
async fn an_unknown_command_is_a_clear_error() {
    let bus = bus_with(&Arc::default(), CommandBus::builder());
    let err = bus.send(Unrouted).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoHandler {
                name: "nobody.handles-this"
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("no handler for command \"nobody.handles-this\""),
        "{err}"
    );
}

#[tokio::test]
async fn two_handlers_for_one_command_type_fail_the_build() {
    let err = CommandBus::builder()
        .handler(|_: Close| async { Ok(true) })
        .handler(|_: Close| async { Ok(false) })
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DuplicateHandler {
                name: "account.close"
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn validation_stops_an_invalid_command_before_its_handler() {
    let deposits = Arc::new(Deposits::default());
    let bus = bus_with(&deposits, CommandBus::builder().middleware(Validation));
    let err = bus
        .send(Deposit {
            account: "a".into(),
            cents: 0,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { name: "account.deposit", reason } if reason.contains("at least one cent")),
        "{err}"
    );
    assert_eq!(deposits.runs(), 0);
}

/// Records its name on the way in and out.
struct Trail(&'static str, Arc<Mutex<Vec<String>>>);

impl Middleware for Trail {
    fn call<'a>(
        &'a self,
        command: Dispatch,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Reply, Error>> {
        Box::pin(async move {
            self.1
                .lock()
                .unwrap()
                .push(format!("{} in {}", self.0, command.name()));
            let reply = next.run(command).await;
            self.1.lock().unwrap().push(format!("{} out", self.0));
            reply
        })
    }
}

#[tokio::test]
async fn middleware_runs_in_the_order_it_was_added() {
    let trail = Arc::new(Mutex::new(Vec::new()));
    let bus = bus_with(
        &Arc::default(),
        CommandBus::builder()
            .middleware(Trail("outer", trail.clone()))
            .middleware(Trail("inner", trail.clone())),
    );
    bus.send(Close {
        account: "a".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        *trail.lock().unwrap(),
        [
            "outer in account.close",
            "inner in account.close",
            "inner out",
            "outer out"
        ]
    );
}

mod spans {
    //! A subscriber layer that records every span's name and fields.
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::Layer;

    /// A span's name and its fields.
    pub type Span = (String, Vec<(String, String)>);

    #[derive(Clone, Default)]
    pub struct Recorder(pub Arc<Mutex<Vec<Span>>>);

    struct Fields(Vec<(String, String)>);

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
            let mut fields = Fields(Vec::new());
            attrs.record(&mut fields);
            self.0
                .lock()
                .unwrap()
                .push((attrs.metadata().name().to_owned(), fields.0));
        }
    }
}

#[tokio::test]
async fn tracing_opens_a_span_per_command_with_its_type_and_id() {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;

    let recorder = spans::Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let bus = bus_with(&Arc::default(), CommandBus::builder().middleware(Tracing));
    let envelope = Envelope::new(Close {
        account: "a".into(),
    });
    let id = envelope.id();
    async {
        bus.send(envelope).await.unwrap();
        bus.send(Deposit {
            account: "b".into(),
            cents: 1,
        })
        .await
        .unwrap();
    }
    .with_subscriber(subscriber)
    .await;

    let spans = recorder.0.lock().unwrap().clone();
    let commands: Vec<_> = spans.iter().filter(|(name, _)| name == "command").collect();
    assert_eq!(commands.len(), 2, "{spans:?}");
    let field = |i: usize, name: &str| {
        commands[i]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field(0, "command").as_deref(), Some("account.close"));
    assert_eq!(field(0, "command_id"), Some(id.to_string()));
    assert_eq!(field(1, "command").as_deref(), Some("account.deposit"));
    assert_ne!(field(1, "command_id"), field(0, "command_id"));
}

async fn idempotent_bus(t: &TestBus, deposits: &Arc<Deposits>) -> CommandBus {
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    bus_with(
        deposits,
        CommandBus::builder()
            .middleware(Tracing)
            .middleware(Validation)
            .middleware(Idempotent::new(keys)),
    )
}

fn deposit(account: &str, cents: u64, key: &str) -> Envelope<Deposit> {
    Envelope::new(Deposit {
        account: account.into(),
        cents,
    })
    .idempotency_key(key)
}

#[tokio::test]
async fn a_command_with_an_idempotency_key_runs_once() {
    let t = TestBus::new().await;
    let deposits = Arc::new(Deposits::default());
    let bus = idempotent_bus(&t, &deposits).await;
    let first = bus.send(deposit("a", 5, "dep-1")).await.unwrap();
    let again = bus.send(deposit("a", 5, "dep-1")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(deposits.runs(), 1, "the repeat returned the stored output");
    // Another key runs; a command without a key always runs.
    assert_eq!(bus.send(deposit("a", 5, "dep-2")).await.unwrap().run, 2);
    bus.send(Deposit {
        account: "a".into(),
        cents: 5,
    })
    .await
    .unwrap();
    bus.send(Deposit {
        account: "a".into(),
        cents: 5,
    })
    .await
    .unwrap();
    assert_eq!(deposits.runs(), 4);
    t.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_reused_for_another_command_is_refused() {
    let t = TestBus::new().await;
    let deposits = Arc::new(Deposits::default());
    let bus = idempotent_bus(&t, &deposits).await;
    bus.send(deposit("a", 5, "k")).await.unwrap();
    let err = bus.send(deposit("a", 6, "k")).await.unwrap_err();
    assert!(
        matches!(err, Error::Idempotency(idempotency::Error::Mismatch { .. })),
        "{err}"
    );
    assert_eq!(deposits.runs(), 1);
    t.stop().await;
}

#[tokio::test]
async fn a_rejection_is_replayed_but_a_failure_lets_the_repeat_run() {
    let t = TestBus::new().await;
    let deposits = Arc::new(Deposits::default());
    let bus = idempotent_bus(&t, &deposits).await;
    for _ in 0..2 {
        let err = bus.send(deposit("frozen", 5, "f")).await.unwrap_err();
        assert!(
            matches!(&err, Error::Rejected { code, reason } if code == "frozen" && reason == "the account is frozen"),
            "{err}"
        );
    }
    assert_eq!(deposits.runs(), 1, "the rejection was replayed");

    let err = bus.send(deposit("flaky", 5, "g")).await.unwrap_err();
    assert!(matches!(err, Error::Failed(_)), "{err}");
    let ok = bus.send(deposit("flaky", 5, "g")).await.unwrap();
    assert_eq!(ok.run, 3, "a failure is not stored: the repeat ran");
    assert_eq!(bus.send(deposit("flaky", 5, "g")).await.unwrap(), ok);
    assert_eq!(deposits.runs(), 3);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_while_the_first_runs_is_refused_as_in_progress() {
    let t = TestBus::new().await;
    let deposits = Arc::new(Deposits::default());
    let bus = idempotent_bus(&t, &deposits).await;
    let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    *deposits.gate.lock().unwrap() = Some((entered.clone(), release.clone()));
    let first = tokio::spawn({
        let bus = bus.clone();
        async move { bus.send(deposit("a", 5, "k")).await }
    });
    within(entered.wait()).await;
    let err = bus.send(deposit("a", 5, "k")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Idempotency(idempotency::Error::InProgress { .. })
        ),
        "{err}"
    );
    *deposits.gate.lock().unwrap() = None;
    within(release.wait()).await;
    let first = within(first).await.unwrap().unwrap();
    assert_eq!(bus.send(deposit("a", 5, "k")).await.unwrap(), first);
    assert_eq!(deposits.runs(), 1);
    t.stop().await;
}

#[tokio::test]
async fn an_invalid_command_does_not_claim_its_key() {
    let t = TestBus::new().await;
    let deposits = Arc::new(Deposits::default());
    let bus = idempotent_bus(&t, &deposits).await;
    assert!(matches!(
        bus.send(deposit("a", 0, "v")).await.unwrap_err(),
        Error::Invalid { .. }
    ));
    assert!(t
        .bus
        .kv_scan("idempotency/", None, 10)
        .await
        .unwrap()
        .is_empty());
    t.stop().await;
}
