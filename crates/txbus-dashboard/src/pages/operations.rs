//! Operations: search by id, status and time; one operation as a tree of its commit, events,
//! deliveries and compensations; live while it runs.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use maud::{html, Markup};
use serde::Deserialize;
use txbus_core::inspect::{hash_hex, OperationDetail, OperationQuery, OperationStatus};
use txbus_core::OperationId;
use txbus_saga::compensating::{compensations_of, CompensationView};

use super::{live as live_stream, Frame};
use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, badge, Section};
use crate::Inner;

/// The query of the search page: `?id=` leads to that operation's page; otherwise `status`
/// and a time window (`since` minutes back, or `from_ms`/`to_ms`) filter the list. A value
/// that does not parse is answered 400 naming its parameter.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct Search {
    /// An operation id: the search goes to its page.
    id: Option<String>,
    /// `pending`, `succeeded`, `failed` or `pruned`.
    status: Option<String>,
    /// Only the last this many minutes.
    since: Option<String>,
    /// Only operations committed at or after this time, ms since the epoch (wins over `since`).
    from_ms: Option<i64>,
    /// Only operations committed before this time, ms since the epoch.
    to_ms: Option<i64>,
    /// The next page: commits with an id below this one.
    before: Option<u64>,
}

pub(crate) fn parse_id(text: &str) -> Result<OperationId, PageError> {
    text.trim().parse::<OperationId>().map_err(|_| {
        PageError::bad_request(format!(
            "{:?} is not an operation id (a UUID like 01a200b8-fcf8-7760-a1d8-ad67d6ae4f43)",
            format::clip(text, 80)
        ))
    })
}

pub(crate) async fn search(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<Search>,
) -> Result<Response, PageError> {
    let base = &who.base;
    if let Some(id) = q.id.as_deref().filter(|s| !s.trim().is_empty()) {
        let id = parse_id(id)?;
        return Ok(Redirect::to(&format!("{base}/operations/{id}")).into_response());
    }
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(OperationStatus::parse(s).ok_or_else(|| {
            PageError::bad_request(format!(
                "unknown status {:?}: use pending, succeeded, failed or pruned",
                format::clip(s, 40)
            ))
        })?),
        None => None,
    };
    let since: Option<i64> = match q.since.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<i64>().ok().filter(|m| *m > 0).ok_or_else(|| {
            PageError::bad_request(format!(
                "since={:?} is not a number of minutes",
                format::clip(s, 40)
            ))
        })?),
        None => None,
    };
    let from_ms = q
        .from_ms
        .or_else(|| since.map(|m| txbus_core::time::now_ms() - m.saturating_mul(60_000)));
    let query = OperationQuery {
        status,
        from_ms,
        to_ms: q.to_ms,
        before: q.before,
        limit: 50,
    };
    let page = inner.bus.inspect().operations(&query).await?;
    let selected = |s: &str| q.status.as_deref() == Some(s);
    let since_selected = |m: &str| q.since.as_deref() == Some(m);
    let mut next = format!("{base}/operations?");
    if let Some(s) = &q.status {
        next.push_str(&format!("status={s}&"));
    }
    if let Some(f) = from_ms {
        next.push_str(&format!("from_ms={f}&"));
    }
    if let Some(t) = q.to_ms {
        next.push_str(&format!("to_ms={t}&"));
    }
    let body = html! {
        form.toolbar method="get" action={ (base) "/operations" } {
            input type="text" name="id" placeholder="operation id" size="40";
            select name="status" {
                option value="" { "any status" }
                @for s in ["pending", "succeeded", "failed", "pruned"] {
                    option value=(s) selected[selected(s)] { (s) }
                }
            }
            select name="since" {
                option value="" { "any time" }
                @for (m, label) in [("15", "last 15 minutes"), ("60", "last hour"), ("1440", "last day"), ("10080", "last week")] {
                    option value=(m) selected[since_selected(m)] { (label) }
                }
            }
            button.primary type="submit" { "Search" }
        }
        div.panel {
            table {
                thead { tr { th { "Operation" } th { "Status" } th { "Kind" } th { "First event" } th.num { "Events" } th { "Committed (UTC)" } th { "Took" } th { "Failure" } } }
                tbody {
                    @for o in &page.operations {
                        tr {
                            td { a href={ (base) "/operations/" (o.operation_id) } { code { (o.operation_id) } } }
                            td { (badge(o.status.as_str())) }
                            td { (badge(kind(o.kind))) }
                            td { code { (o.first_event_type.as_deref().unwrap_or("")) } }
                            td.num { (o.message_count) }
                            td { (format::time(o.created_at_ms)) }
                            td { @if let Some(f) = o.finished_at_ms { (format::duration(f - o.created_at_ms)) } @else { span.muted { (o.remaining) " left" } } }
                            td.error { @if let Some(f) = &o.failure { code { (f.handler) } ": " (format::clip(&f.reason, 80)) } }
                        }
                    }
                    @if page.operations.is_empty() { tr { td colspan="8" .muted { "No operation matches in this window." } } }
                }
            }
            @if let Some(b) = page.next_before {
                div.pager { a href={ (next) "before=" (b) } { "Older →" } span.muted { "(each page looks at up to 10 000 commits)" } }
            }
        }
    };
    Ok(layout::page(&inner, &who, Section::Operations, "Operations", body).into_response())
}

/// How a commit came about, as shown.
pub(crate) fn kind(k: txbus_core::store::CommitKind) -> &'static str {
    use txbus_core::store::CommitKind;
    match k {
        CommitKind::Transact => "transact",
        CommitKind::Publish => "publish",
        CommitKind::System => "system",
        CommitKind::Batch => "batch",
    }
}

pub(crate) async fn show(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let id = parse_id(&id)?;
    let detail = inner
        .bus
        .inspect()
        .operation(id)
        .await?
        .ok_or_else(|| PageError::not_found(format!("no operation {id} in this store")))?;
    let compensations = compensations_of(&inner.bus, id).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading compensations failed");
        None
    });
    let live = detail.summary.status == OperationStatus::Pending;
    let body = html! {
        @if live {
            div #tree data-live={ (who.base) "/live/operations/" (id) } { (tree(&who, &detail, compensations.as_ref())) }
        } @else {
            div #tree { (tree(&who, &detail, compensations.as_ref())) }
        }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::Operations,
        "Operation",
        body,
    ))
}

pub(crate) async fn live(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = parse_id(&id)?;
    let bus = inner.bus.clone();
    Ok(live_stream(&inner, move || {
        let bus = bus.clone();
        let who = who.clone();
        async move {
            let detail = bus.inspect().operation(id).await.ok()??;
            let compensations = compensations_of(&bus, id).await.ok().flatten();
            // Finished with every delivery done: one last frame.
            let settled = detail.summary.status != OperationStatus::Pending
                && detail.events.iter().all(|e| {
                    e.deliveries.iter().all(|d| {
                        !matches!(
                            d.status,
                            txbus_core::inspect::DeliveryStatus::Pending
                                | txbus_core::inspect::DeliveryStatus::Leased
                        )
                    })
                });
            Some(Frame {
                html: tree(&who, &detail, compensations.as_ref()),
                last: settled,
            })
        }
    }))
}

fn tree(who: &Principal, d: &OperationDetail, comp: Option<&CompensationView>) -> Markup {
    let base = &who.base;
    let s = &d.summary;
    html! {
        div.grid2 {
            div.panel {
                h2 style="margin-top:0" { "Operation " (badge(s.status.as_str())) }
                dl.kv {
                    dt { "id" } dd { code { (s.operation_id) } }
                    dt { "kind" } dd { (badge(kind(s.kind))) }
                    dt { "committed" } dd { (format::time(s.created_at_ms)) " UTC" }
                    dt { "finished" } dd { @if let Some(f) = s.finished_at_ms { (format::time(f)) " UTC · took " (format::duration(f - s.created_at_ms)) } @else { span.muted { (s.remaining) " deliveries left" } } }
                    @if let Some(f) = &s.failure {
                        dt { "failure" } dd.error { "event " (f.event_index) " (" code { (f.event_type) } "), handler " code { (f.handler) } ", " (format!("{:?}", f.kind)) " after " (f.attempts) " attempt(s): " (f.reason) }
                    }
                }
            }
            div.panel {
                h2 style="margin-top:0" { "Commit" }
                dl.kv {
                    dt { "position" } dd { @if let Some(p) = s.position { a href={ (base) "/log?around=" (p) } { (p) } } @else { span.muted { "not sealed yet" } } }
                    dt { "commit id" } dd { (s.commit_id) }
                    dt { "data hash" } dd { code { (hash_hex(&d.data_hash)) } }
                    dt { "chain hash" } dd { @if let Some(c) = &d.chain_hash { code { (hash_hex(c)) } } @else { span.muted { "not sealed yet" } } }
                }
            }
        }
        @for e in &d.events {
            div.event {
                h3 { "Event " (e.index) ": " code { (e.message.event_type) }
                    @if let Some(m) = &e.message.module { " " span.muted { "module " (m) } } }
                div.grid2 {
                    div {
                        div.muted { "payload" }
                        pre { (format::json(&e.message.payload)) }
                    }
                    div {
                        div.muted { "headers · message id " code { (e.message.id.0) } }
                        pre { (serde_json::to_string_pretty(&e.message.headers).unwrap_or_default()) }
                    }
                }
                table {
                    thead { tr { th { "Handler" } th { "Delivery" } th { "Status" } th.num { "Attempts" } th.num { "Interruptions" } th { "Last error" } th { "Last change (UTC)" } th { "After commit" } } }
                    tbody {
                        @for dl in &e.deliveries {
                            tr {
                                td { code { (dl.handler) } }
                                td { @if dl.status == txbus_core::inspect::DeliveryStatus::Dead { a href={ (base) "/dead-letters/" (dl.delivery_id) } { (dl.delivery_id) } } @else { (dl.delivery_id) } }
                                td { (badge(dl.status.as_str())) }
                                td.num { (dl.attempts) }
                                td.num { (dl.interruptions) }
                                td.error { (dl.last_error.as_deref().map(|e| format::clip(e, 160)).unwrap_or_default()) }
                                td { (format::time(dl.updated_at_ms)) }
                                td { (format::duration(dl.updated_at_ms - s.created_at_ms)) }
                            }
                        }
                        @if e.deliveries.is_empty() { tr { td colspan="8" .muted { "No delivery in the store (no subscriber, or succeeded beyond retention)." } } }
                    }
                }
            }
        }
        @if let Some(c) = comp {
            div.panel {
                h2 style="margin-top:0" { "Compensations" }
                @if let Some(run) = &c.run {
                    p { "Run " @if run.finished { (badge("completed")) } @else { (badge("running")) } }
                    table {
                        thead { tr { th { "Handler" } th { "Event" } th { "Data" } th { "State" } } }
                        tbody {
                            @for r in &run.records {
                                @let done = run.compensated.iter().any(|x| x.handler == r.handler && x.event_index == r.event_index);
                                tr {
                                    td { code { (r.handler) } }
                                    td { (r.event_index) " " code { (r.event_type) } }
                                    td { code { (r.data) } }
                                    td { @if done { (badge("compensated")) } @else { (badge("pending")) } }
                                }
                            }
                        }
                    }
                    @if let Some(f) = &run.failed { p.error { "compensation by " code { (f.handler) } " failed after " (f.attempts) " attempt(s): " (f.error) } }
                }
                @if !c.registered.is_empty() {
                    p.muted { (c.registered.len()) " success(es) registered to be undone if the operation fails:" }
                    ul { @for r in &c.registered { li { code { (r.handler) } " on event " (r.event_index) " " code { (r.data) } } } }
                }
            }
        }
    }
}
