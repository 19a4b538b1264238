//! `txbus log tail [-n N] [--follow]`: the newest commits of the log, then new ones as they
//! are sealed.

use std::time::Duration;

use serde_json::{json, Value};
use txbus_core::{CommitRecord, Store};

use crate::error::Error;
use crate::ops::last_commits;
use crate::output::{clip, time, Output};

/// How often `--follow` looks for new commits.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn print(c: &CommitRecord, out: Output) {
    let value = json!({
        "position": c.position,
        "kind": c.kind.name(),
        "operation_id": c.operation_id.to_string(),
        "created_at_ms": c.created_at_ms,
        "chain_hash": hex(&c.chain_hash),
        "events": c.messages.iter().map(|m| json!({
            "message_id": m.id.to_string(),
            "event_type": m.event_type,
            "module": m.module,
            "stream": m.headers.stream,
        })).collect::<Vec<Value>>(),
    });
    out.emit(&value, || {
        let events: Vec<_> = c
            .messages
            .iter()
            .map(|m| match &m.module {
                Some(module) => format!("{module}/{}", m.event_type),
                None => m.event_type.clone(),
            })
            .collect();
        format!(
            "{:>8}  {}  {:<8}  {}  {}  {}",
            c.position,
            time(c.created_at_ms),
            c.kind.name(),
            c.operation_id,
            &hex(&c.chain_hash)[..12],
            clip(&events.join(" "), 80)
        )
    });
}

/// Prints the last `count` commits, oldest first; with `follow`, keeps printing new ones
/// until interrupted.
pub async fn tail(store: &dyn Store, count: usize, follow: bool, out: Output) -> Result<(), Error> {
    let mut last = 0;
    if count > 0 {
        let mut commits = last_commits(store, count).await?;
        commits.reverse();
        for c in &commits {
            print(c, out);
            last = c.position;
        }
    }
    if count == 0 || last == 0 {
        last = store.stats().await?.commits.max(last);
    }
    if !follow {
        return Ok(());
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let page = store.read_log(last, 512).await?;
        for c in &page {
            print(c, out);
            last = c.position;
        }
        if page.len() < 512 {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }
}
