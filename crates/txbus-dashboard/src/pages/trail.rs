//! The audit trail page: every action, who did it, and when.

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use maud::{html, Markup};

use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, Section};
use crate::Inner;

pub(crate) async fn page(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
) -> Result<Markup, PageError> {
    let records = crate::audit::recent(&inner.bus, 200).await?;
    let ids = |v: &[i64]| {
        let shown: Vec<String> = v.iter().take(20).map(ToString::to_string).collect();
        let more = v.len().saturating_sub(20);
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    let body = html! {
        p.muted { "The last " (records.len()) " action(s), newest first; the trail keeps at most " (format::count(inner.audit_capacity)) "." }
        div.panel {
            table #audit {
                thead { tr { th.num { "#" } th { "When (UTC)" } th { "Who" } th { "Action" } th { "Asked for" } th { "Applied to" } } }
                tbody {
                    @for r in &records {
                        tr {
                            td.num { (r.seq) }
                            td { (format::time(r.at_ms)) }
                            td { (r.user) }
                            td { code { (r.action) } }
                            td { (ids(&r.requested)) }
                            td { (ids(&r.applied)) }
                        }
                    }
                    @if records.is_empty() { tr { td colspan="6" .muted { "No action yet." } } }
                }
            }
        }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::Audit,
        "Audit trail",
        body,
    ))
}
