//! Projections and relays: their checkpoints in the key–value space
//! (`projection/<name>/checkpoint`, `relay/<name>/checkpoint`), the lag behind the head of the
//! log, and the last error their runners recorded (`<kind>/<name>/error`).

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use maud::{html, Markup};
use txbus_core::inspect::{runner_error_key, RunnerError};
use txbus_core::Bus;

use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, Section};
use crate::Inner;

/// One ordered subscription as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Runner {
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    pub(crate) checkpoint: u64,
    pub(crate) lag: u64,
    pub(crate) error: Option<RunnerError>,
}

/// Checkpoints are listed up to this many of each kind.
const MAX_RUNNERS: usize = 1000;

fn position(kind: &str, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if kind == "projection" {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .get("position")?
            .as_u64()
    } else {
        text.parse().ok()
    }
}

/// Every projection and relay with a checkpoint, their lag at `head`, and their last error.
pub(crate) async fn runners(bus: &Bus, head: u64) -> Result<Vec<Runner>, txbus_core::Error> {
    let mut out = Vec::new();
    for kind in ["projection", "relay"] {
        let prefix = format!("{kind}/");
        let mut after: Option<String> = None;
        let mut seen = 0;
        while seen < MAX_RUNNERS {
            let page = bus.kv_scan(&prefix, after.as_deref(), 200).await?;
            let Some(last) = page.last().map(|e| e.key.clone()) else {
                break;
            };
            seen += page.len();
            for e in &page {
                let Some(name) = e
                    .key
                    .strip_prefix(&prefix)
                    .and_then(|r| r.strip_suffix("/checkpoint"))
                else {
                    continue;
                };
                let Some(checkpoint) = position(kind, &e.value) else {
                    tracing::warn!(key = %e.key, "unreadable checkpoint skipped");
                    continue;
                };
                let error = match bus.kv_get(&runner_error_key(kind, name)).await? {
                    Some(v) => serde_json::from_slice::<RunnerError>(&v.value).ok(),
                    None => None,
                };
                out.push(Runner {
                    kind,
                    name: name.to_owned(),
                    checkpoint,
                    lag: head.saturating_sub(checkpoint),
                    error,
                });
            }
            after = Some(last);
        }
    }
    Ok(out)
}

pub(crate) async fn page(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
) -> Result<Markup, PageError> {
    let head = inner.bus.inspect().head().await?;
    let runners = runners(&inner.bus, head).await?;
    let body = html! {
        p.muted { "Head of the log: position " (head) "." }
        div.panel {
            table {
                thead { tr { th { "Kind" } th { "Name" } th.num { "Checkpoint" } th.num { "Lag (commits)" } th { "Last error" } } }
                tbody {
                    @for r in &runners {
                        tr {
                            td { (r.kind) }
                            td { code { (r.name) } }
                            td.num { (r.checkpoint) }
                            td.num { @if r.lag > 0 { strong { (format::count(r.lag)) } } @else { span.zero { "0" } } }
                            td.error { @if let Some(e) = &r.error { (format::clip(&e.error, 160)) span.muted { " · " (format::time(e.at_ms)) " UTC" } } }
                        }
                    }
                    @if runners.is_empty() { tr { td colspan="5" .muted { "No projection or relay has a checkpoint in this store." } } }
                }
            }
        }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::Subscriptions,
        "Projections & relays",
        body,
    ))
}
