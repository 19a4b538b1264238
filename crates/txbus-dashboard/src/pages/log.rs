//! The log: commits by position, and `verify` with its result.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Extension;
use maud::{html, Markup};
use serde::Deserialize;
use txbus_core::inspect::hash_hex;
use txbus_core::Broken;

use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, badge, Section};
use crate::Inner;

const PAGE: u64 = 50;

#[derive(Debug, Deserialize, Default)]
pub(crate) struct LogQuery {
    /// Show commits after this position.
    after: Option<u64>,
    /// Show the page holding this position.
    around: Option<u64>,
}

pub(crate) async fn page(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<LogQuery>,
) -> Result<Markup, PageError> {
    let base = &who.base;
    let head = inner.bus.inspect().head().await?;
    let after = match (q.after, q.around) {
        (Some(a), _) => a.min(head),
        (None, Some(p)) => p.saturating_sub(PAGE / 2).min(head),
        (None, None) => head.saturating_sub(PAGE),
    };
    let commits = inner
        .bus
        .read_log(after, usize::try_from(PAGE).unwrap_or(50))
        .await?;
    let body = html! {
        div.toolbar {
            a href={ (base) "/log?after=" (after.saturating_sub(PAGE)) } { "← Older" }
            span.muted { "positions " (after + 1) "–" (after + commits.len() as u64) " of " (head) }
            @if after + PAGE < head { a href={ (base) "/log?after=" (after + PAGE) } { "Newer →" } }
            a href={ (base) "/log" } { "Latest" }
            a #verify href={ (base) "/log/verify" } { button.primary type="button" { "Verify the chain" } }
        }
        div.panel {
            table {
                thead { tr { th.num { "Position" } th { "Committed (UTC)" } th { "Kind" } th { "Operation" } th { "Events" } th { "Data hash" } th { "Chain hash" } } }
                tbody {
                    @for c in commits.iter().rev() {
                        tr {
                            td.num { (c.position) }
                            td { (format::time(c.created_at_ms)) }
                            td { (badge(super::operations::kind(c.kind))) }
                            td { a href={ (base) "/operations/" (c.operation_id) } { code { (format::clip(&c.operation_id.to_string(), 13)) } } }
                            td { @for (i, m) in c.messages.iter().enumerate() { @if i > 0 { ", " } code { (m.event_type) } } }
                            td { code title=(hash_hex(&c.data_hash)) { (format::clip(&hash_hex(&c.data_hash), 12)) } }
                            td { code title=(hash_hex(&c.chain_hash)) { (format::clip(&hash_hex(&c.chain_hash), 12)) } }
                        }
                    }
                    @if commits.is_empty() { tr { td colspan="7" .muted { "The log is empty." } } }
                }
            }
        }
    };
    Ok(layout::page(&inner, &who, Section::Log, "Log", body))
}

pub(crate) async fn verify(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
) -> Result<Markup, PageError> {
    let Ok(_one) = inner.verifying.try_lock() else {
        let body =
            html! { div.notice { "A verification is running already; try again when it ends." } };
        return Ok(layout::page(&inner, &who, Section::Log, "Verify", body));
    };
    let started = txbus_core::time::now_ms();
    let report = inner.bus.verify().await?;
    let took = txbus_core::time::now_ms() - started;
    let base = &who.base;
    let body = html! {
        @match &report.first_broken {
            None => div.notice.ok #verify-result {
                (badge("intact")) " Every commit verified: " (format::count(report.verified)) " commits, data and chain hashes intact (" (format::duration(took)) ")."
            },
            Some((position, why)) => div.notice.bad #verify-result {
                (badge("broken")) " The chain breaks at position " a href={ (base) "/log?around=" (position) } { (position) } ": "
                (match why {
                    Broken::DataMismatch => "its content does not match its data hash (the commit was edited)".to_owned(),
                    Broken::ChainMismatch => "its chain hash does not follow from its parent (a commit before it was removed, reordered or re-hashed)".to_owned(),
                    Broken::Gap { expected } => format!("positions jump: {expected} was expected (commits are missing)"),
                    #[allow(unreachable_patterns)]
                    other => format!("{other:?}"),
                })
                ". " (format::count(report.verified)) " commit(s) before it verified."
            },
        }
        p { a href={ (base) "/log" } { "← Back to the log" } }
    };
    Ok(layout::page(&inner, &who, Section::Log, "Verify", body))
}
