//! `txbus status`: what the store holds.

use serde_json::json;
use txbus_core::Store;

use crate::error::Error;
use crate::output::Output;

/// Prints the store's counts.
pub async fn status(store: &dyn Store, out: Output) -> Result<(), Error> {
    let s = store.stats().await?;
    let d = s.deliveries;
    // Per handler, from the store's counters, when it keeps them.
    let handlers = match store.inspect() {
        Some(i) => i.handler_counts().await?,
        None => Vec::new(),
    };
    let now = txbus_core::time::now_ms();
    let value = json!({
        "handlers": handlers,
        "commits": s.commits,
        "messages": s.messages,
        "pending_operations": s.pending_operations,
        "deliveries": {
            "pending": d.pending, "leased": d.leased, "succeeded": d.succeeded,
            "rejected": d.rejected, "dead": d.dead,
        },
    });
    out.emit(&value, || {
        let mut text = format!(
            "commits             {}\nmessages            {}\noperations pending  {}\ndeliveries          pending {}  leased {}  succeeded {}  rejected {}  dead {}\n",
            s.commits, s.messages, s.pending_operations, d.pending, d.leased, d.succeeded, d.rejected, d.dead
        );
        if !handlers.is_empty() {
            text.push_str(&format!(
                "\n{:<24}  {:>8}  {:>7}  {:>10}  {:>8}  {:>8}  {:>6}  {}\n",
                "HANDLER", "PENDING", "LEASED", "SUCCEEDED", "RETRIED", "REJECTED", "DEAD", "OLDEST PENDING"
            ));
            for h in &handlers {
                let age = h.oldest_pending_age_ms(now);
                text.push_str(&format!(
                    "{:<24}  {:>8}  {:>7}  {:>10}  {:>8}  {:>8}  {:>6}  {}\n",
                    crate::output::clip(&h.handler, 24),
                    h.pending,
                    h.leased,
                    h.succeeded,
                    h.retried,
                    h.rejected,
                    h.dead,
                    if h.oldest_pending_due_ms.is_some() { format!("{:.1} s", age as f64 / 1000.0) } else { "-".into() }
                ));
            }
        }
        text
    });
    Ok(())
}
