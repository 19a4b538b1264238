//! The saga keys of the store's key–value space: the status index, timers, and correlation
//! ids. Each is written in the same commit as the state change it reflects.

use crate::id::SagaId;
use crate::state::SagaStatus;

const TIMER_PREFIX: &str = "saga/timer/";

/// `saga/status/<status>/`: the sagas in one status, by id.
pub(crate) fn status_prefix(status: SagaStatus) -> String {
    format!("saga/status/{}/", status.as_str())
}

/// `saga/status/<status>/<id>`.
pub(crate) fn status_key(status: SagaStatus, id: &SagaId) -> String {
    format!("{}{id}", status_prefix(status))
}

/// `saga/correlation/<type>/<correlation id>` → the saga id.
pub(crate) fn correlation_key(saga_type: &str, correlation_id: &str) -> String {
    format!("saga/correlation/{saga_type}/{correlation_id}")
}

/// The prefix of every timer.
pub(crate) fn timer_prefix() -> &'static str {
    TIMER_PREFIX
}

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// The saga's deadline.
    Deadline,
    /// A waiting step's timeout.
    Wait(usize),
}

/// `saga/timer/<due ms, 13 digits>/<id>/<what>`: key order is due order.
pub(crate) fn timer_key(due_ms: i64, id: &SagaId, kind: TimerKind) -> String {
    let due = u64::try_from(due_ms.max(0)).unwrap_or(0);
    match kind {
        TimerKind::Deadline => format!("{TIMER_PREFIX}{due:013}/{id}/deadline"),
        TimerKind::Wait(step) => format!("{TIMER_PREFIX}{due:013}/{id}/step-{step}"),
    }
}

/// Reads a timer key back; `None` for a key this version does not write.
pub(crate) fn parse_timer(key: &str) -> Option<(i64, SagaId, TimerKind)> {
    let rest = key.strip_prefix(TIMER_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let due: i64 = parts.next()?.parse().ok()?;
    let id = SagaId::new(parts.next()?).ok()?;
    let kind = match parts.next()? {
        "deadline" => TimerKind::Deadline,
        other => TimerKind::Wait(other.strip_prefix("step-")?.parse().ok()?),
    };
    Some((due, id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_sort_by_due_time_and_parse_back() {
        let id = SagaId::new("a-1").unwrap();
        let early = timer_key(999, &id, TimerKind::Wait(3));
        let late = timer_key(1_700_000_000_000, &id, TimerKind::Deadline);
        assert!(early < late);
        assert_eq!(
            parse_timer(&early),
            Some((999, id.clone(), TimerKind::Wait(3)))
        );
        assert_eq!(
            parse_timer(&late),
            Some((1_700_000_000_000, id, TimerKind::Deadline))
        );
        assert_eq!(parse_timer("saga/timer/x/y/z"), None);
    }
}
