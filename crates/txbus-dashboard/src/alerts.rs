//! Alerts: thresholds on what the store shows — dead letters appear, a projection or relay
//! lags more than N commits, a pending delivery waits longer than T — raise a `txbus.alert`
//! event on the bus, which any handler can route anywhere (mail, chat, a pager).
//!
//! An alert is raised once per condition until it clears: the condition's mark
//! (`alert/active/<condition>`) is written in the same commit as the event, only if absent,
//! so however many processes check, and across restarts, one event says it began. When the
//! condition no longer holds, one `cleared` event is committed with the mark's removal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use txbus_core::{Bus, Commit, Conflict, Error, Event, KvExpect, KvWrite};

/// The event type of alerts.
pub const ALERT_EVENT: &str = "txbus.alert";
const MARK_PREFIX: &str = "alert/active/";

/// What an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertCondition {
    /// A handler has dead letters.
    DeadLetters {
        /// The handler.
        handler: String,
    },
    /// A projection or relay is further behind the head of the log than allowed.
    Lag {
        /// `projection` or `relay`.
        runner: String,
        /// Its name.
        name: String,
    },
    /// A handler's oldest pending delivery has waited longer than allowed.
    PendingTooLong {
        /// The handler.
        handler: String,
    },
}

impl AlertCondition {
    /// A stable key naming the condition.
    pub fn key(&self) -> String {
        match self {
            Self::DeadLetters { handler } => format!("dead-letters/{handler}"),
            Self::Lag { runner, name } => format!("lag/{runner}/{name}"),
            Self::PendingTooLong { handler } => format!("pending-too-long/{handler}"),
        }
    }
}

/// The payload of a `txbus.alert` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// What it is about.
    pub condition: AlertCondition,
    /// `raised` when the condition began, `cleared` when it ended.
    pub state: String,
    /// The measured value (dead letters, commits of lag, ms waited).
    pub value: u64,
    /// The threshold it was compared with.
    pub threshold: u64,
    /// Said plainly.
    pub message: String,
    /// When it was checked, ms since the epoch.
    pub at_ms: i64,
}

/// Configures [`Alerts`].
#[derive(Debug, Clone)]
pub struct AlertsBuilder {
    bus: Bus,
    dead_letters: bool,
    max_lag: Option<u64>,
    max_pending: Option<Duration>,
    interval: Duration,
}

impl AlertsBuilder {
    /// Alert when a handler has dead letters.
    pub fn on_dead_letters(mut self) -> Self {
        self.dead_letters = true;
        self
    }

    /// Alert when a projection or relay is more than `commits` behind the head of the log.
    pub fn on_lag_above(mut self, commits: u64) -> Self {
        self.max_lag = Some(commits);
        self
    }

    /// Alert when a handler's oldest pending delivery has waited longer than `age`.
    pub fn on_pending_older_than(mut self, age: Duration) -> Self {
        self.max_pending = Some(age);
        self
    }

    /// How often conditions are checked by [`start`](Self::start) (default 10 s).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = every.max(Duration::from_millis(100));
        self
    }

    /// The configured checks, to run with [`Alerts::check`].
    pub fn build(self) -> Alerts {
        Alerts {
            inner: Arc::new(self),
        }
    }

    /// Checks every interval in a background task, until the handle is dropped or stopped.
    pub fn start(self) -> AlertsHandle {
        let alerts = self.build();
        let every = alerts.inner.interval;
        let a = alerts.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = a.check().await {
                    tracing::warn!(error = %e, "checking alert conditions failed");
                }
                tokio::time::sleep(every).await;
            }
        });
        AlertsHandle { alerts, task }
    }
}

/// Alert checks over one bus's store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    inner: Arc<AlertsBuilder>,
}

/// Alerts checking in the background; stops when dropped.
#[derive(Debug)]
pub struct AlertsHandle {
    alerts: Alerts,
    task: JoinHandle<()>,
}

impl AlertsHandle {
    /// The checks, to run one now.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }
}

impl Drop for AlertsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one check did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Conditions that began, an event committed for each.
    pub raised: Vec<AlertCondition>,
    /// Conditions that ended, an event committed for each.
    pub cleared: Vec<AlertCondition>,
}

impl Alerts {
    /// Configures alerts on `bus`'s store.
    pub fn builder(bus: Bus) -> AlertsBuilder {
        AlertsBuilder {
            bus,
            dead_letters: false,
            max_lag: None,
            max_pending: None,
            interval: Duration::from_secs(10),
        }
    }

    fn watches(&self, condition: &AlertCondition) -> bool {
        match condition {
            AlertCondition::DeadLetters { .. } => self.inner.dead_letters,
            AlertCondition::Lag { .. } => self.inner.max_lag.is_some(),
            AlertCondition::PendingTooLong { .. } => self.inner.max_pending.is_some(),
        }
    }

    /// The conditions that hold now, with their value and threshold.
    async fn holding(&self) -> Result<BTreeMap<String, (AlertCondition, u64, u64, String)>, Error> {
        let cfg = &self.inner;
        let mut out = BTreeMap::new();
        let now = txbus_core::time::now_ms();
        if cfg.dead_letters || cfg.max_pending.is_some() {
            for h in cfg.bus.inspect().handler_counts().await? {
                if cfg.dead_letters && h.dead > 0 {
                    let c = AlertCondition::DeadLetters {
                        handler: h.handler.clone(),
                    };
                    let msg = format!("handler {:?} has {} dead letter(s)", h.handler, h.dead);
                    out.insert(c.key(), (c, h.dead, 0, msg));
                }
                if let Some(max) = cfg.max_pending {
                    let age = u64::try_from(h.oldest_pending_age_ms(now)).unwrap_or(0);
                    let limit = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
                    if h.oldest_pending_due_ms.is_some() && age > limit {
                        let c = AlertCondition::PendingTooLong {
                            handler: h.handler.clone(),
                        };
                        let msg = format!(
                            "handler {:?}: a pending delivery has waited {age} ms (limit {limit} ms)",
                            h.handler
                        );
                        out.insert(c.key(), (c, age, limit, msg));
                    }
                }
            }
        }
        if let Some(max) = cfg.max_lag {
            let head = cfg.bus.inspect().head().await?;
            for r in crate::pages::runners::runners(&cfg.bus, head).await? {
                if r.lag > max {
                    let c = AlertCondition::Lag {
                        runner: r.kind.to_owned(),
                        name: r.name.clone(),
                    };
                    let msg = format!(
                        "{} {:?} is {} commits behind the log (limit {max})",
                        r.kind, r.name, r.lag
                    );
                    out.insert(c.key(), (c, r.lag, max, msg));
                }
            }
        }
        Ok(out)
    }

    /// Checks every condition once: raises those that began, clears those that ended.
    pub async fn check(&self) -> Result<CheckReport, Error> {
        let bus = &self.inner.bus;
        let holding = self.holding().await?;
        let marks = bus.kv_scan(MARK_PREFIX, None, 1000).await?;
        let mut report = CheckReport::default();
        let now = txbus_core::time::now_ms();
        for (key, (condition, value, threshold, message)) in &holding {
            if marks
                .iter()
                .any(|m| m.key.strip_prefix(MARK_PREFIX) == Some(key))
            {
                continue;
            }
            let alert = Alert {
                condition: condition.clone(),
                state: "raised".into(),
                value: *value,
                threshold: *threshold,
                message: message.clone(),
                at_ms: now,
            };
            let mark = KvWrite::put(format!("{MARK_PREFIX}{key}"), encode(&alert)?)
                .expect(KvExpect::Absent);
            match bus
                .commit_unwatched(Commit::new().event(event(&alert)?).kv(mark))
                .await
            {
                Ok(_) => {
                    tracing::warn!(condition = %key, %message, "alert raised");
                    report.raised.push(condition.clone());
                }
                // Raised already, by another process.
                Err(Error::Conflict(Conflict::Key { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        for mark in &marks {
            let Some(key) = mark.key.strip_prefix(MARK_PREFIX) else {
                continue;
            };
            if holding.contains_key(key) {
                continue;
            }
            let Ok(raised) = serde_json::from_slice::<Alert>(&mark.value) else {
                bus.kv_write(vec![KvWrite::delete(mark.key.clone())])
                    .await?;
                continue;
            };
            // Only conditions this checker looks at can be seen to end here.
            if !self.watches(&raised.condition) {
                continue;
            }
            let alert = Alert {
                state: "cleared".into(),
                value: 0,
                message: format!("cleared: {}", raised.message),
                at_ms: now,
                ..raised
            };
            let remove = KvWrite::delete(mark.key.clone()).expect(KvExpect::Version(mark.version));
            match bus
                .commit_unwatched(Commit::new().event(event(&alert)?).kv(remove))
                .await
            {
                Ok(_) => {
                    tracing::info!(condition = %key, "alert cleared");
                    report.cleared.push(alert.condition);
                }
                Err(Error::Conflict(Conflict::Key { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

fn encode(alert: &Alert) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(alert)
        .map_err(|e| Error::Config(format!("an alert does not serialize: {e}")))
}

fn event(alert: &Alert) -> Result<Event, Error> {
    let payload = serde_json::to_value(alert)
        .map_err(|e| Error::Config(format!("an alert does not serialize: {e}")))?;
    Ok(Event::new(ALERT_EVENT, payload).module("txbus"))
}
