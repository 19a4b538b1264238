//! `txbus status`: what the store holds.

use serde_json::json;
use txbus_core::Store;

use crate::error::Error;
use crate::output::Output;

/// Prints the store's counts.
pub async fn status(store: &dyn Store, out: Output) -> Result<(), Error> {
    let s = store.stats().await?;
    let d = s.deliveries;
    let value = json!({
        "commits": s.commits,
        "messages": s.messages,
        "pending_operations": s.pending_operations,
        "deliveries": {
            "pending": d.pending, "leased": d.leased, "succeeded": d.succeeded,
            "rejected": d.rejected, "dead": d.dead,
        },
    });
    out.emit(&value, || {
        format!(
            "commits             {}\nmessages            {}\noperations pending  {}\ndeliveries          pending {}  leased {}  succeeded {}  rejected {}  dead {}",
            s.commits, s.messages, s.pending_operations, d.pending, d.leased, d.succeeded, d.rejected, d.dead
        )
    });
    Ok(())
}
