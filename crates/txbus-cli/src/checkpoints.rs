//! `txbus projections` and `txbus relays`: ordered subscriptions, their checkpoints and lag.

use serde_json::{json, Value};
use txbus_core::Store;

use crate::error::Error;
use crate::output::Output;

/// Most checkpoints listed.
const MAX_LISTED: usize = 1000;

/// Which kind of ordered subscription.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Event-sourcing projections (`projection/<name>/checkpoint`, JSON `{"position": n}`).
    Projections,
    /// Outbox relays (`relay/<name>/checkpoint`, the position as text).
    Relays,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Projections => "projection/",
            Self::Relays => "relay/",
        }
    }

    fn position(self, value: &[u8]) -> Option<u64> {
        match self {
            Self::Projections => serde_json::from_slice::<Value>(value)
                .ok()?
                .get("position")?
                .as_u64(),
            Self::Relays => std::str::from_utf8(value).ok()?.trim().parse().ok(),
        }
    }
}

/// Lists each checkpoint with how far it is behind the log.
pub async fn list(store: &dyn Store, kind: Kind, out: Output) -> Result<(), Error> {
    let head = store.stats().await?.commits;
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    while rows.len() < MAX_LISTED {
        let page = store.kv_scan(kind.prefix(), after.as_deref(), 256).await?;
        let Some(last) = page.last().map(|e| e.key.clone()) else {
            break;
        };
        for entry in page {
            let Some(name) = entry
                .key
                .strip_prefix(kind.prefix())
                .and_then(|k| k.strip_suffix("/checkpoint"))
            else {
                continue;
            };
            let position = kind.position(&entry.value);
            rows.push((name.to_owned(), position));
        }
        after = Some(last);
    }
    let value = Value::Array(
        rows.iter()
            .map(|(name, position)| {
                json!({
                    "name": name,
                    "checkpoint": position,
                    "lag": position.map(|p| head.saturating_sub(p)),
                })
            })
            .collect(),
    );
    out.emit(&value, || {
        let mut text = format!("{:<32}  {:>10}  {:>10}\n", "NAME", "CHECKPOINT", "LAG");
        for (name, position) in &rows {
            text.push_str(&format!(
                "{:<32}  {:>10}  {:>10}\n",
                name,
                position.map_or("unreadable".into(), |p| p.to_string()),
                position.map_or("?".into(), |p| head.saturating_sub(p).to_string()),
            ));
        }
        if rows.is_empty() {
            text.push_str("(none)\n");
        }
        text
    });
    Ok(())
}
