//! Steps that wait for events, their timeouts, and the saga deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{quick, Env, Journal};
use serde_json::{json, Value};
use tokio::sync::Notify;
use txbus_core::Event;
use txbus_saga::{
    CompensationStatus, Pending, Saga, SagaEvent, SagaStatus, Sagas, StartOptions, Step,
    StepContext, StepStatus,
};

fn undoable(journal: &Journal, name: &'static str) -> Step {
    let (j, c) = (journal.clone(), journal.clone());
    Step::action(name, move |_ctx: StepContext| {
        let j = j.clone();
        async move {
            j.push(format!("do {name}"));
            Ok(json!(name))
        }
    })
    .compensate(move |_ctx: StepContext| {
        let c = c.clone();
        async move {
            c.push(format!("undo {name}"));
            Ok(())
        }
    })
    .backoff(quick())
    .compensation_backoff(quick())
}

fn payment_saga(journal: &Journal, wait: Duration) -> Sagas {
    let saga = Saga::builder("checkout")
        .step(undoable(journal, "reserve"))
        .step(Step::wait_for("paid", "payment.confirmed", wait))
        .step(undoable(journal, "ship"))
        .build()
        .unwrap();
    Sagas::builder()
        .saga(saga)
        .timer_poll(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// Waits until the saga waits for its step `index`.
async fn until_waiting(env: &Env, id: &txbus_saga::SagaId, index: usize) {
    tokio::time::timeout(common::HANG, async {
        loop {
            let state = env.runtime.get(id).await.unwrap().unwrap();
            if matches!(state.pending, Some(Pending::Step { index: i, .. }) if i == index) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the saga reached the waiting step");
}

/// A bound on waiting for handlers that take milliseconds; never a measurement.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_completes_when_its_event_is_published_with_the_saga_id() {
    let journal = Journal::default();
    let sagas = payment_saga(&journal, Duration::from_secs(60));
    let env = Env::new(&sagas).await;
    let id = env.runtime.start("checkout", json!({})).await.unwrap();
    until_waiting(&env, &id, 1).await;

    // Anyone publishes it, through the bus; the saga-id header names the saga.
    env.bus
        .publish(
            Event::new("payment.confirmed", json!({"amount": 12}))
                .header(txbus_saga::SAGA_ID_HEADER, id.as_str()),
        )
        .await
        .unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.outputs()["paid"]["payload"], json!({"amount": 12}));
    assert_eq!(
        state.outputs()["paid"]["event_type"],
        json!("payment.confirmed")
    );
    assert_eq!(journal.entries(), vec!["do reserve", "do ship"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_completes_by_correlation_id_and_ignores_other_sagas_events() {
    let journal = Journal::default();
    let sagas = payment_saga(&journal, Duration::from_secs(60));
    let env = Env::new(&sagas).await;
    let id = env
        .runtime
        .start_with(
            "checkout",
            json!({}),
            StartOptions::default().correlation_id("order-17"),
        )
        .await
        .unwrap();
    until_waiting(&env, &id, 1).await;

    // Another order's confirmation, and one without any correlation, change nothing: once
    // every handler of both has run, the saga still waits.
    let other = env
        .bus
        .publish(Event::new("payment.confirmed", json!({"order": 18})).correlation_id("order-18"))
        .await
        .unwrap();
    let uncorrelated = env
        .bus
        .publish(Event::new("payment.confirmed", json!({})))
        .await
        .unwrap();
    for op in [other, uncorrelated] {
        tokio::time::timeout(HANG_GUARD, env.bus.wait(op))
            .await
            .unwrap()
            .unwrap();
    }
    let state = env.runtime.get(&id).await.unwrap().unwrap();
    assert!(matches!(
        state.pending,
        Some(Pending::Step { index: 1, .. })
    ));

    // A second saga of the same type cannot take the same correlation id while this one runs.
    assert!(matches!(
        env.runtime
            .start_with(
                "checkout",
                json!({}),
                StartOptions::default().correlation_id("order-17")
            )
            .await,
        Err(txbus_saga::Error::CorrelationInUse { .. })
    ));

    env.bus
        .publish(Event::new("payment.confirmed", json!({"order": 17})).correlation_id("order-17"))
        .await
        .unwrap();
    let state = env.wait(&id).await;
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.outputs()["paid"]["payload"], json!({"order": 17}));
    // Once it finished, the correlation id is free again.
    env.runtime
        .start_with(
            "checkout",
            json!({}),
            StartOptions::default().correlation_id("order-17"),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_arrives_before_its_step_is_kept_until_the_saga_gets_there() {
    let journal = Journal::default();
    let gate = Arc::new(Notify::new());
    let g = Arc::clone(&gate);
    let saga = Saga::builder("early")
        .step(Step::action("slow", move |_ctx: StepContext| {
            let g = Arc::clone(&g);
            async move {
                g.notified().await;
                Ok(json!("done"))
            }
        }))
        .step(Step::wait_for(
            "paid",
            "payment.confirmed",
            Duration::from_secs(60),
        ))
        .step(undoable(&journal, "ship"))
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;
    let id = env.runtime.start("early", json!({})).await.unwrap();
    until_waiting(&env, &id, 0).await;

    env.bus
        .publish(
            Event::new("payment.confirmed", json!({"early": true})).correlation_id(id.as_str()),
        )
        .await
        .unwrap();
    tokio::time::timeout(common::HANG, async {
        loop {
            let state = env.runtime.get(&id).await.unwrap().unwrap();
            if state.steps[1].early_event.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    gate.notify_one();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.outputs()["paid"]["payload"], json!({"early": true}));
    let history = env.runtime.history(&id).await.unwrap();
    assert!(history
        .iter()
        .any(|h| matches!(h.event, SagaEvent::EventArrived { step: 1, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_whose_event_does_not_come_fails_and_compensates() {
    let journal = Journal::default();
    let sagas = payment_saga(&journal, Duration::from_millis(300));
    let env = Env::new(&sagas).await;
    let id = env.runtime.start("checkout", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(state.steps[1].status, StepStatus::Failed);
    assert!(state.steps[1].errors[0].error.contains("payment.confirmed"));
    assert_eq!(journal.entries(), vec!["do reserve", "undo reserve"]);

    // A confirmation that comes too late changes nothing, once its handlers have run.
    let late = env
        .bus
        .publish(Event::new("payment.confirmed", json!({})).correlation_id(id.as_str()))
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, env.bus.wait(late))
        .await
        .unwrap()
        .unwrap();
    let after = env.runtime.get(&id).await.unwrap().unwrap();
    assert_eq!(after.version, state.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_deadline_fails_a_waiting_step_and_compensates() {
    let journal = Journal::default();
    let saga = Saga::builder("deadline")
        .step(undoable(&journal, "reserve"))
        .step(undoable(&journal, "charge"))
        .step(Step::wait_for(
            "paid",
            "payment.confirmed",
            Duration::from_secs(3600),
        ))
        // Long enough for the first two steps to complete before it, even on a busy machine.
        .deadline(Duration::from_millis(1500))
        .build()
        .unwrap();
    let sagas = Sagas::builder()
        .saga(saga)
        .timer_poll(Duration::from_millis(50))
        .build()
        .unwrap();
    let env = Env::new(&sagas).await;
    let id = env.runtime.start("deadline", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert!(state.deadline_exceeded);
    assert_eq!(
        journal.entries(),
        vec!["do reserve", "do charge", "undo charge", "undo reserve"]
    );
    let history = env.runtime.history(&id).await.unwrap();
    assert!(history
        .iter()
        .any(|h| matches!(h.event, SagaEvent::DeadlineExceeded { .. })));
    // No timer is left behind.
    assert!(env
        .bus
        .kv_scan("saga/timer/", None, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_running_at_the_deadline_finishes_and_is_compensated_with_the_rest() {
    let journal = Journal::default();
    let gate = Arc::new(Notify::new());
    let (g, j, c) = (Arc::clone(&gate), journal.clone(), journal.clone());
    let saga = Saga::builder("late")
        .step(undoable(&journal, "reserve"))
        .step(
            Step::action("charge", move |_ctx: StepContext| {
                let (g, j) = (Arc::clone(&g), j.clone());
                async move {
                    g.notified().await;
                    j.push("do charge");
                    Ok(json!({"payment_id": "p-late"}))
                }
            })
            .compensate(move |ctx: StepContext| {
                let c = c.clone();
                async move {
                    let out: Value = ctx.output()?;
                    c.push(format!("refund {}", out["payment_id"]));
                    Ok(())
                }
            }),
        )
        .step(undoable(&journal, "ship"))
        // Long enough for the first step to complete before it, even on a busy machine.
        .deadline(Duration::from_millis(1500))
        .build()
        .unwrap();
    let sagas = Sagas::builder()
        .saga(saga)
        .timer_poll(Duration::from_millis(50))
        .build()
        .unwrap();
    let env = Env::new(&sagas).await;
    let id = env.runtime.start("late", json!({})).await.unwrap();

    // The deadline passes while "charge" runs: recorded, but the action is not cut off.
    tokio::time::timeout(common::HANG, async {
        loop {
            if env
                .runtime
                .get(&id)
                .await
                .unwrap()
                .unwrap()
                .deadline_exceeded
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    gate.notify_one();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(state.steps[1].status, StepStatus::Completed);
    assert_eq!(state.steps[1].compensation, CompensationStatus::Compensated);
    assert_eq!(
        state.steps[2].status,
        StepStatus::NotStarted,
        "no step starts after the deadline"
    );
    assert_eq!(
        journal.entries(),
        vec![
            "do reserve",
            "do charge",
            "refund \"p-late\"",
            "undo reserve"
        ]
    );
}
