//! `txbus ops list|show`: operations, newest first, and where one stands.

use serde_json::{json, Value};
use txbus_core::{CommitRecord, OperationId, OperationState, Store};

use crate::error::Error;
use crate::output::{clip, time, Output};

fn state_json(state: Option<&OperationState>) -> Value {
    match state {
        None => json!({"status": "unknown"}),
        Some(OperationState::Pending { remaining, .. }) => {
            json!({"status": "pending", "remaining": remaining})
        }
        Some(OperationState::Finished(o)) => json!({
            "status": if o.is_ok() { "succeeded" } else { "failed" },
            "finished_at_ms": o.finished_at_ms,
            "error": o.error,
        }),
    }
}

fn state_text(state: Option<&OperationState>) -> String {
    match state {
        None => "unknown (pruned by retention)".into(),
        Some(OperationState::Pending { remaining, .. }) => {
            format!("pending ({remaining} deliveries left)")
        }
        Some(OperationState::Finished(o)) => match &o.error {
            None => "succeeded".into(),
            Some(f) => format!("failed: {f}"),
        },
    }
}

/// The last `limit` commits of the log, newest first.
pub async fn last_commits(store: &dyn Store, limit: usize) -> Result<Vec<CommitRecord>, Error> {
    let head = store.stats().await?.commits;
    let after = head.saturating_sub(limit as u64);
    let mut commits = store.read_log(after, limit.max(1)).await?;
    commits.reverse();
    Ok(commits)
}

/// Lists the newest operations with their status.
pub async fn list(store: &dyn Store, limit: usize, out: Output) -> Result<(), Error> {
    let commits = last_commits(store, limit).await?;
    let mut rows = Vec::with_capacity(commits.len());
    for c in &commits {
        let state = store.operation(c.operation_id).await?;
        rows.push((c, state));
    }
    let value = Value::Array(
        rows.iter()
            .map(|(c, state)| {
                let mut v = json!({
                    "operation_id": c.operation_id.to_string(),
                    "position": c.position,
                    "kind": c.kind.name(),
                    "created_at_ms": c.created_at_ms,
                    "events": c.messages.iter().map(|m| m.event_type.clone()).collect::<Vec<_>>(),
                });
                if let (Some(obj), Value::Object(s)) =
                    (v.as_object_mut(), state_json(state.as_ref()))
                {
                    obj.extend(s);
                }
                v
            })
            .collect(),
    );
    out.emit(&value, || {
        let mut text = format!(
            "{:<36}  {:>8}  {:<8}  {:<23}  {:<30}  {}\n",
            "OPERATION", "POSITION", "KIND", "CREATED (UTC)", "EVENTS", "STATUS"
        );
        for (c, state) in &rows {
            let events: Vec<_> = c.messages.iter().map(|m| m.event_type.as_str()).collect();
            text.push_str(&format!(
                "{:<36}  {:>8}  {:<8}  {:<23}  {:<30}  {}\n",
                c.operation_id.to_string(),
                c.position,
                c.kind.name(),
                time(c.created_at_ms),
                clip(&events.join(","), 30),
                clip(&state_text(state.as_ref()), 60)
            ));
        }
        if rows.is_empty() {
            text.push_str("(no operations)\n");
        }
        text
    });
    Ok(())
}

/// Shows where one operation stands.
pub async fn show(store: &dyn Store, id: &str, out: Output) -> Result<(), Error> {
    let id: OperationId = id
        .parse()
        .map_err(|e| Error::Usage(format!("operation id {id:?} is not a UUID: {e}")))?;
    let Some(state) = store.operation(id).await? else {
        return Err(Error::NotFound(format!(
            "operation {id} is unknown here (never committed to this store, or its outcome was pruned by retention)"
        )));
    };
    let detail = match store.inspect() {
        Some(i) => i.operation_detail(id).await?,
        None => None,
    };
    let mut value = state_json(Some(&state));
    if let Some(obj) = value.as_object_mut() {
        obj.insert("operation_id".into(), json!(id.to_string()));
        if let Some(d) = &detail {
            obj.insert(
                "detail".into(),
                serde_json::to_value(d).unwrap_or(Value::Null),
            );
        }
    }
    out.emit(&value, || {
        let mut text = format!("operation  {id}\nstatus     {}\n", state_text(Some(&state)));
        if let OperationState::Finished(o) = &state {
            text.push_str(&format!("finished   {}\n", time(o.finished_at_ms)));
            if let Some(f) = &o.error {
                text.push_str(&format!(
                    "failed     event {} ({}), handler {:?}, {:?} after {} attempt(s): {}\n",
                    f.event_index, f.event_type, f.handler, f.kind, f.attempts, f.reason
                ));
            }
        }
        // The operation as a tree: its events, each handler's delivery.
        if let Some(d) = &detail {
            for e in &d.events {
                text.push_str(&format!(
                    "event {}    {} (message {})\n",
                    e.index, e.message.event_type, e.message.id
                ));
                for dl in &e.deliveries {
                    text.push_str(&format!(
                        "  └ {:<24} {:<9} attempts {}{}\n",
                        dl.handler,
                        dl.status.as_str(),
                        dl.attempts,
                        dl.last_error
                            .as_deref()
                            .map(|e| format!("  last error: {}", clip(e, 80)))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        text
    });
    Ok(())
}
