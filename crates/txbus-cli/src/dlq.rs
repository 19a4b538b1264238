//! `txbus dlq list|show|replay`: the dead-letter set.

use serde_json::{json, Value};
use txbus_core::{DeadLetter, DeadLetterQuery, Store};

use crate::error::Error;
use crate::output::{clip, time, Output};

fn letter_json(d: &DeadLetter, full: bool) -> Value {
    let mut v = json!({
        "delivery_id": d.delivery_id,
        "operation_id": d.operation_id.to_string(),
        "handler": d.handler,
        "event_type": d.message.event_type,
        "message_id": d.message.id.to_string(),
        "attempts": d.attempts,
        "error": d.error,
        "failed_at_ms": d.failed_at_ms,
    });
    if full {
        if let Some(obj) = v.as_object_mut() {
            obj.insert("module".into(), json!(d.message.module));
            obj.insert("payload".into(), d.message.payload.clone());
            obj.insert(
                "headers".into(),
                serde_json::to_value(&d.message.headers).unwrap_or(Value::Null),
            );
            obj.insert("commit_id".into(), json!(d.commit_id));
            obj.insert("message_index".into(), json!(d.message_index));
        }
    }
    v
}

/// Lists dead letters, oldest first.
pub async fn list(
    store: &dyn Store,
    handler: Option<String>,
    after: Option<i64>,
    limit: usize,
    out: Output,
) -> Result<(), Error> {
    let letters = store
        .dead_letters(DeadLetterQuery {
            handler,
            after_id: after,
            limit,
        })
        .await?;
    let value = Value::Array(letters.iter().map(|d| letter_json(d, false)).collect());
    out.emit(&value, || {
        let mut text = format!(
            "{:>10}  {:<20}  {:<24}  {:>8}  {:<23}  {}\n",
            "DELIVERY", "HANDLER", "EVENT", "ATTEMPTS", "FAILED (UTC)", "LAST ERROR"
        );
        for d in &letters {
            text.push_str(&format!(
                "{:>10}  {:<20}  {:<24}  {:>8}  {:<23}  {}\n",
                d.delivery_id,
                clip(&d.handler, 20),
                clip(&d.message.event_type, 24),
                d.attempts,
                time(d.failed_at_ms),
                clip(&d.error, 60)
            ));
        }
        if letters.is_empty() {
            text.push_str("(no dead letters)\n");
        }
        text
    });
    Ok(())
}

/// Finds one dead letter by delivery id.
pub async fn find(store: &dyn Store, id: i64) -> Result<DeadLetter, Error> {
    let found = store
        .dead_letters(DeadLetterQuery {
            handler: None,
            after_id: Some(id - 1),
            limit: 1,
        })
        .await?;
    found
        .into_iter()
        .find(|d| d.delivery_id == id)
        .ok_or_else(|| Error::NotFound(format!(
            "delivery {id} is not a dead letter (unknown, replayed, discarded or pruned); `txbus dlq list` shows them"
        )))
}

/// Shows one dead letter with its message.
pub async fn show(store: &dyn Store, id: i64, out: Output) -> Result<(), Error> {
    let d = find(store, id).await?;
    out.emit(&letter_json(&d, true), || {
        format!(
            "delivery   {}\noperation  {}\nhandler    {}\nevent      {} (message {}{})\nattempts   {}\nfailed     {}\nerror      {}\nheaders    {}\npayload    {}",
            d.delivery_id,
            d.operation_id,
            d.handler,
            d.message.event_type,
            d.message.id,
            d.message.module.as_deref().map(|m| format!(", module {m}")).unwrap_or_default(),
            d.attempts,
            time(d.failed_at_ms),
            d.error,
            d.message.headers_json,
            serde_json::to_string_pretty(&d.message.payload).unwrap_or_default()
        )
    });
    Ok(())
}

/// Puts dead letters back to pending, from attempt 1.
pub async fn replay(store: &dyn Store, ids: &[i64], out: Output) -> Result<(), Error> {
    let (replayed, missing) = match store.inspect() {
        // Through the store's inspection, which keeps its counters right.
        Some(i) => {
            let done = i.replay_dead_letters(ids).await?;
            let missing = ids
                .iter()
                .copied()
                .filter(|id| !done.contains(id))
                .collect();
            (done, missing)
        }
        None => {
            let (mut done, mut missing) = (Vec::new(), Vec::new());
            for &id in ids {
                if store.replay(id).await? {
                    done.push(id);
                } else {
                    missing.push(id);
                }
            }
            (done, missing)
        }
    };
    report(
        "replayed",
        "pending again, from attempt 1",
        &replayed,
        &missing,
        ids.len(),
        out,
    )
}

/// Removes dead letters for good (they stay in the log; their deliveries are gone).
pub async fn discard(store: &dyn Store, ids: &[i64], out: Output) -> Result<(), Error> {
    let Some(inspect) = store.inspect() else {
        return Err(Error::Usage(
            "this store cannot discard dead letters".into(),
        ));
    };
    let done = inspect.discard_dead_letters(ids).await?;
    let missing: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !done.contains(id))
        .collect();
    report(
        "discarded",
        "removed from the dead-letter set",
        &done,
        &missing,
        ids.len(),
        out,
    )
}

fn report(
    verb: &str,
    what: &str,
    done: &[i64],
    missing: &[i64],
    asked: usize,
    out: Output,
) -> Result<(), Error> {
    let (replayed, missing) = (done, missing);
    let value = json!({verb: replayed, "not_dead_letters": missing});
    out.emit(&value, || {
        let mut text = String::new();
        for id in replayed {
            text.push_str(&format!("{verb} delivery {id}: {what}\n"));
        }
        for id in missing {
            text.push_str(&format!(
                "delivery {id} is not a dead letter; nothing done\n"
            ));
        }
        text
    });
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NotFound(format!(
            "{} of {asked} deliveries were not dead letters",
            missing.len()
        )))
    }
}
