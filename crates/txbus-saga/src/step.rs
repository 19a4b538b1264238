//! Steps: what a saga does, one after the other, and how each is undone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use txbus_core::{Backoff, HandlerError};

use crate::context::StepContext;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A step's action, type-erased: the JSON output it produced.
pub(crate) type ActionFn =
    Arc<dyn Fn(StepContext) -> BoxFuture<Result<Value, HandlerError>> + Send + Sync>;

/// A compensation, type-erased.
pub(crate) type CompensationFn =
    Arc<dyn Fn(StepContext) -> BoxFuture<Result<(), HandlerError>> + Send + Sync>;

/// How attempts of a step (or of its compensation) run: the timeout of one attempt, the
/// retries after the first, and the delay between them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Longest one attempt may run; past it the attempt counts as failed (and is retried).
    pub timeout: Duration,
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// Delay before each retry.
    pub backoff: Backoff,
}

impl Retry {
    /// Steps by default: 30 s per attempt, 3 retries, exponential backoff from 200 ms
    /// (capped at 30 s).
    pub fn step_default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_retries: 3,
            backoff: Backoff::exponential(Duration::from_millis(200)).max(Duration::from_secs(30)),
        }
    }

    /// Compensations by default: 30 s per attempt, 5 retries, exponential backoff from
    /// 500 ms (capped at 60 s). A compensation that still fails puts its saga in *needs
    /// attention*.
    pub fn compensation_default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_retries: 5,
            backoff: Backoff::exponential(Duration::from_millis(500)).max(Duration::from_secs(60)),
        }
    }
}

#[derive(Clone)]
pub(crate) enum StepKind {
    /// Runs an action, as a durable delivery with retries.
    Action(ActionFn),
    /// Completes when a matching event arrives; fails when none arrives in time.
    Wait {
        event_type: String,
        timeout: Duration,
    },
}

/// One step of a saga: an action (or a wait for an event) and, optionally, the compensation
/// that undoes it.
///
/// ```
/// use std::time::Duration;
/// use serde_json::json;
/// use txbus_saga::{Step, StepContext};
///
/// let charge = Step::action("charge-payment", |ctx: StepContext| async move {
///     let order: serde_json::Value = ctx.input()?;
///     // call the payment service with ctx.idempotency_key() …
///     Ok(json!({"payment_id": format!("pay-{}", order["order_id"])}))
/// })
/// .compensate(|ctx: StepContext| async move {
///     let payment: serde_json::Value = ctx.output()?;   // what the action produced
///     // refund payment["payment_id"] …
///     Ok(())
/// })
/// .retries(5)
/// .timeout(Duration::from_secs(5));
///
/// let confirmed = Step::wait_for("payment-confirmed", "payment.confirmed", Duration::from_secs(60));
/// # let _ = (charge, confirmed);
/// ```
#[derive(Clone)]
pub struct Step {
    pub(crate) name: String,
    pub(crate) kind: StepKind,
    pub(crate) retry: Retry,
    pub(crate) compensation: Option<CompensationFn>,
    pub(crate) compensation_retry: Retry,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            StepKind::Action(_) => "action".to_owned(),
            StepKind::Wait { event_type, .. } => format!("wait for {event_type}"),
        };
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("retry", &self.retry)
            .field("compensation", &self.compensation.is_some())
            .finish()
    }
}

impl Step {
    /// A step that runs `action`. Its output (any `Serialize` value) is recorded with the
    /// step's completion, for later steps ([`StepContext::output_of`]) and for its
    /// compensation ([`StepContext::output`]). Return [`HandlerError::reject`] to fail the
    /// step at once; any other error is retried with backoff until the retries run out.
    pub fn action<F, Fut, T>(name: impl Into<String>, action: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: Serialize,
    {
        let action = Arc::new(action);
        let erased: ActionFn = Arc::new(move |ctx| {
            let action = Arc::clone(&action);
            Box::pin(async move {
                let out = action(ctx).await?;
                serde_json::to_value(out).map_err(|e| {
                    HandlerError::reject(format!("the step's output is not JSON: {e}"))
                })
            })
        });
        Self {
            name: name.into(),
            kind: StepKind::Action(erased),
            retry: Retry::step_default(),
            compensation: None,
            compensation_retry: Retry::compensation_default(),
        }
    }

    /// A step that completes when an event of `event_type` for this saga arrives (published
    /// by anyone, through the bus): its output is the event (`{"message_id", "event_type",
    /// "payload"}`). The event belongs to the saga when its `saga-id` header names it or its
    /// correlation id is the saga's. An event that arrives before the saga reaches the step
    /// is kept and completes the step when it does. When none arrives within `timeout` of
    /// the step starting, the step fails and the saga compensates.
    pub fn wait_for(
        name: impl Into<String>,
        event_type: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            kind: StepKind::Wait {
                event_type: event_type.into(),
                timeout,
            },
            retry: Retry::step_default(),
            compensation: None,
            compensation_retry: Retry::compensation_default(),
        }
    }

    /// Sets the compensation: what undoes this step once it has completed, should a later
    /// step fail (or the saga's deadline pass). Compensations run in reverse order of the
    /// steps, with retries; they must be idempotent.
    pub fn compensate<F, Fut>(mut self, compensation: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let compensation = Arc::new(compensation);
        self.compensation = Some(Arc::new(move |ctx| {
            let compensation = Arc::clone(&compensation);
            Box::pin(async move { compensation(ctx).await })
        }));
        self
    }

    /// Longest one attempt of the action may run (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.retry.timeout = timeout;
        self
    }

    /// Retries of the action after its first attempt (default 3).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retry.max_retries = retries;
        self
    }

    /// Delay between attempts of the action.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.retry.backoff = backoff;
        self
    }

    /// Longest one attempt of the compensation may run (default 30 s).
    pub fn compensation_timeout(mut self, timeout: Duration) -> Self {
        self.compensation_retry.timeout = timeout;
        self
    }

    /// Retries of the compensation after its first attempt (default 5).
    pub fn compensation_retries(mut self, retries: u32) -> Self {
        self.compensation_retry.max_retries = retries;
        self
    }

    /// Delay between attempts of the compensation.
    pub fn compensation_backoff(mut self, backoff: Backoff) -> Self {
        self.compensation_retry.backoff = backoff;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the step waits for an event rather than running an action.
    pub fn is_wait(&self) -> bool {
        matches!(self.kind, StepKind::Wait { .. })
    }

    /// True when the step has a compensation.
    pub fn has_compensation(&self) -> bool {
        self.compensation.is_some()
    }
}
