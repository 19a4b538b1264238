//! Sagas on the PostgreSQL store, with two buses on one database (as two processes would be):
//! steps and timers taken by either, and no change applied twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{quick, HANG};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use txbus_core::{Bus, HandlerError};
use txbus_postgres::PostgresOptions;
use txbus_saga::{Saga, SagaEvent, SagaRuntime, SagaStatus, Sagas, Step, StepContext};

fn url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh schema, dropped at the end of the test.
struct Schema(String);

impl Schema {
    fn new() -> Self {
        Self(format!("saga_{:016x}", fastrand::u64(..)))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url()).await.unwrap();
                conn.execute(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE").as_str())
                    .await
                    .unwrap();
            });
        })
        .join();
    }
}

/// The same sagas, counted: `pay` fails when the input says so, `confirm` waits for an
/// event that never comes when the input says so.
fn sagas(runs: &Arc<AtomicU32>, compensations: &Arc<AtomicU32>) -> Sagas {
    let (r1, r2, c1) = (
        Arc::clone(runs),
        Arc::clone(runs),
        Arc::clone(compensations),
    );
    let saga = Saga::builder("pg-order")
        .step(
            Step::action("reserve", move |_ctx: StepContext| {
                let r = Arc::clone(&r1);
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(json!({"reservation": "r-1"}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let c = Arc::clone(&c1);
                async move {
                    let out: serde_json::Value = ctx.output()?;
                    assert_eq!(out["reservation"], "r-1");
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .backoff(quick()),
        )
        .step(
            Step::action("pay", move |ctx: StepContext| {
                let r = Arc::clone(&r2);
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let input: serde_json::Value = ctx.input()?;
                    if input["declined"] == true {
                        return Err(HandlerError::reject("card declined"));
                    }
                    Ok(json!({"payment": "p-1"}))
                }
            })
            .backoff(quick()),
        )
        .step(Step::wait_for(
            "confirm",
            "pg.confirmed",
            Duration::from_millis(400),
        ))
        .build()
        .unwrap();
    Sagas::builder()
        .saga(saga)
        .timer_poll(Duration::from_millis(20))
        .build()
        .unwrap()
}

async fn node(schema: &str, sagas: &Sagas) -> (Bus, SagaRuntime) {
    let store = PostgresOptions::new(url())
        .schema(schema)
        .max_connections(4)
        .writer_lanes(2)
        .connect()
        .await
        .unwrap();
    let bus = sagas
        .install(
            Bus::builder()
                .store(store)
                .poll_interval(Duration::from_millis(50)),
        )
        .build()
        .await
        .unwrap();
    let runtime = sagas.attach(bus.clone());
    (bus, runtime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_buses_on_one_database_drive_sagas_and_fire_timers_once() {
    let schema = Schema::new();
    let (runs, compensations) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (a_sagas, b_sagas) = (sagas(&runs, &compensations), sagas(&runs, &compensations));
    let (bus_a, a) = node(&schema.0, &a_sagas).await;
    let (bus_b, b) = node(&schema.0, &b_sagas).await;

    // A confirmed saga, started on A, confirmed through B.
    let ok = a.start("pg-order", json!({})).await.unwrap();
    tokio::time::timeout(HANG, async {
        loop {
            let s = b.get(&ok).await.unwrap().unwrap();
            if s.steps[2].status == txbus_saga::StepStatus::Running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    bus_b
        .publish(txbus_core::Event::new("pg.confirmed", json!({})).correlation_id(ok.as_str()))
        .await
        .unwrap();
    let state = tokio::time::timeout(HANG, b.wait(&ok))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, SagaStatus::Completed);

    // A saga whose confirmation never comes: both timer loops see the timeout; it fails once.
    let timed_out = b.start("pg-order", json!({})).await.unwrap();
    let state = tokio::time::timeout(HANG, a.wait(&timed_out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, SagaStatus::Failed);
    let history = a.history(&timed_out).await.unwrap();
    let failures = history
        .iter()
        .filter(|h| matches!(h.event, SagaEvent::StepFailed { .. }))
        .count();
    assert_eq!(failures, 1, "the timeout fired once");

    // A declined payment compensates the reservation.
    let declined = a
        .start("pg-order", json!({"declined": true}))
        .await
        .unwrap();
    let state = tokio::time::timeout(HANG, a.wait(&declined))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, SagaStatus::Failed);
    assert!(state.failure.unwrap().contains("card declined"));

    // Every step completed once per saga in its stream, though two buses served them.
    for (id, paid) in [(&ok, 1), (&timed_out, 1), (&declined, 0)] {
        let history = b.history(id).await.unwrap();
        let completed = |step: &str| {
            history
                .iter()
                .filter(
                    |h| matches!(&h.event, SagaEvent::StepCompleted { name, .. } if name == step),
                )
                .count()
        };
        assert_eq!(completed("reserve"), 1, "{id}");
        assert_eq!(completed("pay"), paid, "{id}");
    }
    assert_eq!(
        compensations.load(Ordering::SeqCst),
        2,
        "timed out and declined"
    );
    assert_eq!(a.list(SagaStatus::Failed, None, 10).await.unwrap().len(), 2);
    assert_eq!(
        b.list(SagaStatus::Completed, None, 10).await.unwrap().len(),
        1
    );

    bus_a.shutdown(Duration::from_secs(5)).await.unwrap();
    bus_b.shutdown(Duration::from_secs(5)).await.unwrap();
}
