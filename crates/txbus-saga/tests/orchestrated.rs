//! Orchestrated sagas on the embedded store: steps in order, outputs kept for later steps and
//! compensations, retries, compensation in reverse order, needs-attention and its retry,
//! listing by status and history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{quick, Env, Journal};
use serde_json::{json, Value};
use txbus_core::HandlerError;
use txbus_saga::{
    CompensationStatus, Saga, SagaEvent, SagaStatus, Sagas, Step, StepContext, StepStatus,
};

fn journaled(journal: &Journal, name: &'static str, output: Value) -> Step {
    let (j, c) = (journal.clone(), journal.clone());
    Step::action(name, move |_ctx: StepContext| {
        let (j, output) = (j.clone(), output.clone());
        async move {
            j.push(format!("do {name}"));
            Ok(output)
        }
    })
    .compensate(move |ctx: StepContext| {
        let c = c.clone();
        async move {
            c.push(format!(
                "undo {name} {}",
                ctx.output_json().cloned().unwrap_or(Value::Null)
            ));
            Ok(())
        }
    })
    .backoff(quick())
    .compensation_backoff(quick())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_in_order_and_their_outputs_reach_later_steps() {
    let journal = Journal::default();
    let j = journal.clone();
    let saga = Saga::builder("order")
        .step(journaled(
            &journal,
            "reserve",
            json!({"reservation": "r-1"}),
        ))
        .step(Step::action("charge", move |ctx: StepContext| {
            let j = j.clone();
            async move {
                let reserved: Value = ctx.output_of("reserve")?;
                let input: Value = ctx.input()?;
                j.push(format!(
                    "charge {} for {}",
                    input["amount"], reserved["reservation"]
                ));
                Ok(json!({"payment_id": "p-1"}))
            }
        }))
        .step(journaled(&journal, "ship", json!({"shipment": "s-1"})))
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;

    let id = env
        .runtime
        .start("order", json!({"amount": 30}))
        .await
        .unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(
        journal.entries(),
        vec!["do reserve", "charge 30 for \"r-1\"", "do ship"]
    );
    assert_eq!(state.outputs()["charge"], json!({"payment_id": "p-1"}));
    assert!(state
        .steps
        .iter()
        .all(|s| s.status == StepStatus::Completed));

    let history = env.runtime.history(&id).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|h| kind(&h.event)).collect();
    assert_eq!(
        kinds,
        vec![
            "started",
            "step-requested",
            "step-completed",
            "step-requested",
            "step-completed",
            "step-requested",
            "step-completed",
            "completed"
        ]
    );
    // Versions count from 1, and each completion names the request it answers.
    assert_eq!(
        history.iter().map(|h| h.version).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(
        history[2].causation_id,
        Some(history[1].message_id.to_string())
    );

    let completed = env
        .runtime
        .list(SagaStatus::Completed, None, 10)
        .await
        .unwrap();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].id, id);
    assert!(env
        .runtime
        .list(SagaStatus::Running, None, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_compensates_completed_steps_in_reverse_order() {
    let journal = Journal::default();
    let saga = Saga::builder("order")
        .step(journaled(&journal, "create-order", json!({"order": 1})))
        .step(journaled(
            &journal,
            "reserve",
            json!({"reservation": "r-9"}),
        ))
        .step(
            Step::action("charge", |_ctx: StepContext| async {
                Err::<Value, _>(HandlerError::reject("card declined"))
            })
            .compensate(|_ctx: StepContext| async {
                panic!("a failed step is not compensated");
            }),
        )
        .step(journaled(&journal, "ship", json!(null)))
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;

    let id = env.runtime.start("order", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(
        journal.entries(),
        vec![
            "do create-order",
            "do reserve",
            // Reverse order, each with what its step produced.
            "undo reserve {\"reservation\":\"r-9\"}",
            "undo create-order {\"order\":1}",
        ]
    );
    assert_eq!(state.steps[2].status, StepStatus::Failed);
    assert_eq!(state.steps[2].attempts, 1, "a rejection is not retried");
    assert_eq!(state.steps[3].status, StepStatus::NotStarted);
    assert_eq!(state.steps[1].compensation, CompensationStatus::Compensated);
    assert_eq!(state.steps[0].compensation, CompensationStatus::Compensated);
    assert!(state.failure.as_deref().unwrap().contains("card declined"));

    let failed = env
        .runtime
        .list(SagaStatus::Failed, None, 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].step.as_deref(), Some("charge"));
    assert!(failed[0]
        .error
        .as_deref()
        .unwrap()
        .contains("card declined"));

    let kinds: Vec<&str> = env
        .runtime
        .history(&id)
        .await
        .unwrap()
        .iter()
        .map(|h| kind(&h.event))
        .collect();
    assert_eq!(
        &kinds[5..],
        &[
            "step-requested",
            "step-failed",
            "compensating",
            "compensated",
            "compensating",
            "compensated",
            "failed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_every_attempt_is_in_the_history() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let saga = Saga::builder("flaky")
        .step(
            Step::action("call", move |ctx: StepContext| {
                let c = Arc::clone(&c);
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(ctx.attempt(), n, "the attempt number counts attempts");
                    match n {
                        1 => Err(HandlerError::transient("connection refused")),
                        2 => {
                            // Longer than the step's timeout: counts as a failed attempt.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            Ok(json!("late"))
                        }
                        3 => panic!("boom"),
                        _ => Ok(json!("ok")),
                    }
                }
            })
            .retries(3)
            .timeout(Duration::from_millis(200))
            .backoff(quick()),
        )
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;

    let id = env.runtime.start("flaky", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(state.steps[0].attempts, 4);
    let errors: Vec<&str> = state.steps[0]
        .errors
        .iter()
        .map(|e| e.error.as_str())
        .collect();
    assert_eq!(errors.len(), 3);
    assert_eq!(errors[0], "connection refused");
    assert!(errors[1].contains("timed out"), "{errors:?}");
    assert!(errors[2].contains("panicked: boom"), "{errors:?}");
    assert_eq!(state.outputs()["call"], json!("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_running_out_fails_the_step_and_compensates() {
    let journal = Journal::default();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let saga = Saga::builder("exhaust")
        .step(journaled(&journal, "first", json!(1)))
        .step(
            Step::action("always-down", move |_ctx: StepContext| {
                let c = Arc::clone(&c);
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err::<Value, _>(HandlerError::transient("service unavailable"))
                }
            })
            .retries(2)
            .backoff(quick()),
        )
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;

    let id = env.runtime.start("exhaust", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one attempt and two retries"
    );
    assert_eq!(state.steps[1].attempts, 3);
    assert_eq!(journal.entries(), vec!["do first", "undo first 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_needs_attention_until_retried() {
    let journal = Journal::default();
    let refund_works = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU32::new(0));
    let (works, tries, j) = (
        Arc::clone(&refund_works),
        Arc::clone(&attempts),
        journal.clone(),
    );
    let saga = Saga::builder("refund")
        .step(journaled(&journal, "reserve", json!("r")))
        .step(
            Step::action("charge", |_ctx: StepContext| async {
                Ok(json!({"payment_id": "p-7"}))
            })
            .compensate(move |ctx: StepContext| {
                let (works, tries, j) = (Arc::clone(&works), Arc::clone(&tries), j.clone());
                async move {
                    tries.fetch_add(1, Ordering::SeqCst);
                    if !works.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient("payment service down"));
                    }
                    let payment: Value = ctx.output()?;
                    j.push(format!("refund {}", payment["payment_id"]));
                    Ok(())
                }
            })
            .compensation_retries(2)
            .compensation_backoff(quick()),
        )
        .step(Step::action("ship", |_ctx: StepContext| async {
            Err::<Value, _>(HandlerError::reject("no courier"))
        }))
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;

    let id = env.runtime.start("refund", json!({})).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::NeedsAttention);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(state.steps[1].compensation, CompensationStatus::Failed);
    assert_eq!(
        state.steps[0].compensation,
        CompensationStatus::NotRequested,
        "stopped, not skipped"
    );
    assert_eq!(journal.entries(), vec!["do reserve"]);

    let listed = env
        .runtime
        .list(SagaStatus::NeedsAttention, None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].step.as_deref(), Some("charge"));
    assert_eq!(listed[0].error.as_deref(), Some("payment service down"));

    // Nothing more happens by itself; an operator fixes the cause and retries.
    refund_works.store(true, Ordering::SeqCst);
    env.runtime.retry_compensation(&id).await.unwrap();
    let state = env.wait(&id).await;

    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(
        journal.entries(),
        vec!["do reserve", "refund \"p-7\"", "undo reserve \"r\""]
    );
    assert!(env
        .runtime
        .list(SagaStatus::NeedsAttention, None, 10)
        .await
        .unwrap()
        .is_empty());
    let history = env.runtime.history(&id).await.unwrap();
    assert!(history
        .iter()
        .any(|h| matches!(h.event, SagaEvent::NeedsAttention { .. })));
    assert!(history
        .iter()
        .any(|h| matches!(h.event, SagaEvent::CompensationRetried { .. })));

    // A saga that does not need attention refuses.
    assert!(matches!(
        env.runtime.retry_compensation(&id).await,
        Err(txbus_saga::Error::WrongStatus { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_id_starts_once_and_unknown_types_are_refused() {
    let saga = Saga::builder("once")
        .step(Step::action("a", |_ctx: StepContext| async {
            Ok(json!(null))
        }))
        .build()
        .unwrap();
    let sagas = Sagas::builder().saga(saga).build().unwrap();
    let env = Env::new(&sagas).await;
    let id = txbus_saga::SagaId::new("order-42").unwrap();
    let options = txbus_saga::StartOptions::default().id(id.clone());

    env.runtime
        .start_with("once", json!({}), options.clone())
        .await
        .unwrap();
    assert!(matches!(
        env.runtime.start_with("once", json!({}), options).await,
        Err(txbus_saga::Error::AlreadyStarted(_))
    ));
    assert!(matches!(
        env.runtime.start("nope", json!({})).await,
        Err(txbus_saga::Error::UnknownSagaType(_))
    ));
    assert_eq!(env.wait(&id).await.status, SagaStatus::Completed);
    assert!(env
        .runtime
        .get(&txbus_saga::SagaId::new("missing").unwrap())
        .await
        .unwrap()
        .is_none());
}

fn kind(event: &SagaEvent) -> &'static str {
    match event {
        SagaEvent::Started { .. } => "started",
        SagaEvent::StepRequested { .. } => "step-requested",
        SagaEvent::StepAttemptFailed { .. } => "step-attempt-failed",
        SagaEvent::EventArrived { .. } => "event-arrived",
        SagaEvent::StepCompleted { .. } => "step-completed",
        SagaEvent::StepFailed { .. } => "step-failed",
        SagaEvent::DeadlineExceeded { .. } => "deadline-exceeded",
        SagaEvent::Compensating { .. } => "compensating",
        SagaEvent::CompensationAttemptFailed { .. } => "compensation-attempt-failed",
        SagaEvent::Compensated { .. } => "compensated",
        SagaEvent::CompensationFailed { .. } => "compensation-failed",
        SagaEvent::NeedsAttention { .. } => "needs-attention",
        SagaEvent::CompensationRetried { .. } => "compensation-retried",
        SagaEvent::Completed => "completed",
        SagaEvent::Failed { .. } => "failed",
        _ => "other",
    }
}
