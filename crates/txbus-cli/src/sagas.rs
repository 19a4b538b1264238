//! `txbus sagas [--status S]` and `txbus sagas show ID`: sagas by status, from the saga
//! runtime's status index, and one saga's history, from its stream.

use serde_json::{json, Value};
use txbus_core::{Direction, Store};
use txbus_saga::{SagaId, SagaStatus, SagaSummary};

use crate::error::Error;
use crate::output::{clip, time, Output};

/// Parses a status name as the saga runtime writes it.
pub fn parse_status(name: &str) -> Result<SagaStatus, Error> {
    SagaStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<_> = SagaStatus::ALL.iter().map(|s| s.as_str()).collect();
            Error::Usage(format!(
                "unknown saga status {name:?}; one of {}",
                names.join(", ")
            ))
        })
}

/// Lists sagas in `statuses`, at most `limit` of each.
pub async fn list(
    store: &dyn Store,
    statuses: &[SagaStatus],
    limit: usize,
    out: Output,
) -> Result<(), Error> {
    let mut sagas = Vec::new();
    for status in statuses {
        // The runtime's status index: `saga/status/<status>/<id>` → a summary.
        let prefix = format!("saga/status/{}/", status.as_str());
        for entry in store.kv_scan(&prefix, None, limit.min(1000)).await? {
            match serde_json::from_slice::<SagaSummary>(&entry.value) {
                Ok(s) => sagas.push(s),
                Err(e) => {
                    return Err(Error::Store(txbus_core::store::Error::Corrupt(format!(
                        "saga index entry {}: {e}",
                        entry.key
                    ))))
                }
            }
        }
    }
    let value = serde_json::to_value(&sagas).unwrap_or(Value::Null);
    out.emit(&value, || {
        let mut text = format!(
            "{:<38}  {:<20}  {:<15}  {:<23}  {}\n",
            "SAGA", "TYPE", "STATUS", "SINCE (UTC)", "STEP / ERROR"
        );
        for s in &sagas {
            let detail = match (&s.step, &s.error) {
                (Some(step), Some(e)) => format!("{step}: {e}"),
                (Some(step), None) => step.clone(),
                (None, Some(e)) => e.clone(),
                (None, None) => String::new(),
            };
            text.push_str(&format!(
                "{:<38}  {:<20}  {:<15}  {:<23}  {}\n",
                s.id.as_str(),
                clip(&s.saga_type, 20),
                s.status.as_str(),
                time(s.since_ms),
                clip(&detail, 60)
            ));
        }
        if sagas.is_empty() {
            text.push_str("(no sagas)\n");
        }
        text
    });
    Ok(())
}

/// Shows a saga's history: every change of its stream, in order.
pub async fn show(store: &dyn Store, id: &str, out: Output) -> Result<(), Error> {
    let id = SagaId::new(id).map_err(|e| Error::Usage(e.to_string()))?;
    let stream = id.stream();
    let mut changes = Vec::new();
    let mut from = 1;
    loop {
        let page = store
            .read_stream(&stream, from, Direction::Forward, 256)
            .await?;
        let n = page.len();
        for e in page {
            from = e.version + 1;
            changes.push(json!({
                "version": e.version,
                "event_type": e.message.event_type,
                "at_ms": e.message.payload.get("at_ms"),
                "change": e.message.payload.get("event").cloned().unwrap_or(e.message.payload.clone()),
            }));
        }
        if n < 256 || changes.len() >= 10_000 {
            break;
        }
    }
    if changes.is_empty() {
        return Err(Error::NotFound(format!(
            "saga {} has no history here",
            id.as_str()
        )));
    }
    out.emit(&json!({"saga": id.as_str(), "history": changes}), || {
        let mut text = format!("saga {}\n", id.as_str());
        for c in &changes {
            let at = c["at_ms"].as_i64().map(time).unwrap_or_default();
            text.push_str(&format!(
                "{:>5}  {:<23}  {}\n",
                c["version"],
                at,
                clip(&c["change"].to_string(), 120)
            ));
        }
        text
    });
    Ok(())
}
