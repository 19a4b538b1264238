//! Dead letters: the list (by handler, paged), one with its payload and last error, and the
//! actions — replay one or many, discard — which need the operator role, a CSRF token, and
//! are written to the audit trail.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};
use serde::Deserialize;
use txbus_core::store::DeadLetterQuery;
use txbus_core::DeadLetter;

use crate::auth::{check_form, Principal};
use crate::error::PageError;
use crate::format;
use crate::layout::{self, badge, can_act, csrf, Section};
use crate::Inner;

const PAGE: usize = 50;

#[derive(Debug, Deserialize, Default)]
pub(crate) struct ListQuery {
    handler: Option<String>,
    after: Option<i64>,
    /// The outcome of the last action, shown once.
    done: Option<String>,
}

pub(crate) async fn list(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    let base = &who.base;
    let handler = q.handler.clone().filter(|h| !h.is_empty());
    let dead = inner
        .bus
        .dead_letters(DeadLetterQuery {
            handler: handler.clone(),
            after_id: q.after,
            limit: PAGE,
        })
        .await?;
    let act = can_act(&who);
    let body = html! {
        @if let Some(done) = &q.done { div.notice.ok #done { (format::clip(done, 200)) } }
        form.toolbar method="get" action={ (base) "/dead-letters" } {
            input type="text" name="handler" placeholder="handler" value=(handler.as_deref().unwrap_or(""));
            button type="submit" { "Filter" }
            @if !act { span.muted { "Read-only: replaying and discarding need the operator role." } }
        }
        form #dead-letters method="post" {
            (csrf(&who))
            @if act {
                div.toolbar {
                    button.primary #replay-selected type="submit" formaction={ (base) "/dead-letters/replay" } { "Replay selected" }
                    button.danger #discard-selected type="submit" formaction={ (base) "/dead-letters/discard" } { "Discard selected" }
                }
            }
            div.panel {
                table {
                    thead { tr {
                        th { @if act { input type="checkbox" data-check-all title="select all"; } }
                        th { "Delivery" } th { "Handler" } th { "Event" } th { "Operation" } th.num { "Attempts" } th { "Last error" } th { "Died (UTC)" }
                    } }
                    tbody {
                        @for d in &dead {
                            tr {
                                td { @if act { input type="checkbox" name="id" value=(d.delivery_id); } }
                                td { a href={ (base) "/dead-letters/" (d.delivery_id) } { (d.delivery_id) } }
                                td { code { (d.handler) } }
                                td { code { (d.message.event_type) } }
                                td { a href={ (base) "/operations/" (d.operation_id) } { code { (format::clip(&d.operation_id.to_string(), 13)) } } }
                                td.num { (d.attempts) }
                                td.error { (format::clip(&d.error, 120)) }
                                td { (format::time(d.failed_at_ms)) }
                            }
                        }
                        @if dead.is_empty() { tr { td colspan="8" .muted { "No dead letters." } } }
                    }
                }
            }
        }
        @if dead.len() == PAGE {
            @if let Some(last) = dead.last() {
                div.pager { a href={ (base) "/dead-letters?after=" (last.delivery_id) @if let Some(h) = &handler { "&handler=" (h) } } { "More →" } }
            }
        }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::DeadLetters,
        "Dead letters",
        body,
    ))
}

pub(crate) fn parse_delivery(text: &str) -> Result<i64, PageError> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            PageError::bad_request(format!(
                "{:?} is not a delivery id (a positive number)",
                format::clip(text, 40)
            ))
        })
}

pub(crate) async fn show(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let id = parse_delivery(&id)?;
    let d: DeadLetter = inner.bus.inspect().dead_letter(id).await?;
    let base = &who.base;
    let body = html! {
        div.grid2 {
            div.panel {
                h2 style="margin-top:0" { "Delivery " (d.delivery_id) " " (badge("dead")) }
                dl.kv {
                    dt { "handler" } dd { code { (d.handler) } }
                    dt { "event" } dd { (d.message_index) ": " code { (d.message.event_type) } }
                    dt { "operation" } dd { a href={ (base) "/operations/" (d.operation_id) } { code { (d.operation_id) } } }
                    dt { "attempts" } dd { (d.attempts) }
                    dt { "died" } dd { (format::time(d.failed_at_ms)) " UTC" }
                    dt { "last error" } dd.error #last-error { (d.error) }
                }
                @if can_act(&who) {
                    div.toolbar style="margin-top:12px" {
                        form.inline method="post" action={ (base) "/dead-letters/replay" } {
                            (csrf(&who)) input type="hidden" name="id" value=(d.delivery_id);
                            button.primary #replay type="submit" { "Replay" }
                        }
                        form.inline method="post" action={ (base) "/dead-letters/discard" } {
                            (csrf(&who)) input type="hidden" name="id" value=(d.delivery_id);
                            button.danger #discard type="submit" { "Discard" }
                        }
                    }
                } @else {
                    p.muted { "Read-only: replaying and discarding need the operator role." }
                }
            }
            div.panel {
                h2 style="margin-top:0" { "Payload" }
                pre #payload { (format::json(&d.message.payload)) }
                h2 { "Headers" }
                pre { (serde_json::to_string_pretty(&d.message.headers).unwrap_or_default()) }
            }
        }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::DeadLetters,
        "Dead letter",
        body,
    ))
}

/// The ids and the CSRF token of an action form (`id` may repeat).
fn read_form(fields: &[(String, String)]) -> Result<(Vec<i64>, Option<&str>), PageError> {
    let mut ids = Vec::new();
    let mut token = None;
    for (k, v) in fields {
        match k.as_str() {
            "id" => ids.push(parse_delivery(v)?),
            "csrf" => token = Some(v.as_str()),
            _ => {}
        }
    }
    if ids.len() > txbus_core::inspect::MAX_BATCH_ACTION {
        return Err(PageError::bad_request(format!(
            "{} dead letters at once exceed the limit of {}",
            ids.len(),
            txbus_core::inspect::MAX_BATCH_ACTION
        )));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok((ids, token))
}

#[derive(Clone, Copy)]
enum Action {
    Replay,
    Discard,
}

async fn act(
    inner: Arc<Inner>,
    who: Principal,
    headers: HeaderMap,
    fields: Vec<(String, String)>,
    action: Action,
) -> Result<Response, PageError> {
    let (ids, token) = read_form(&fields)?;
    check_form(&who, &headers, token)?;
    if !can_act(&who) {
        tracing::warn!(user = %who.name, "a read-only user tried to act on dead letters");
        return Err(PageError::forbidden(format!(
            "{} is a viewer: replaying and discarding need the operator role",
            who.name
        )));
    }
    if ids.is_empty() {
        return Err(PageError::bad_request(
            "no dead letter selected: tick at least one",
        ));
    }
    let inspect = inner.bus.inspect();
    let (name, applied) = match action {
        Action::Replay => ("replay", inspect.replay(&ids).await?),
        Action::Discard => ("discard", inspect.discard(&ids).await?),
    };
    let rec = crate::audit::record(
        &inner.bus,
        inner.audit_capacity,
        &who.name,
        name,
        &ids,
        &applied,
    )
    .await?;
    tracing::info!(user = %who.name, action = name, requested = ids.len(), applied = applied.len(), seq = rec.seq, "dashboard action");
    let verb = match action {
        Action::Replay => "replayed",
        Action::Discard => "discarded",
    };
    let note = format!(
        "{} of {} dead letter(s) {verb}; recorded as audit entry {}",
        applied.len(),
        ids.len(),
        rec.seq
    );
    let mut url = format!("{}/dead-letters?done=", who.base);
    for b in note.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => url.push(char::from(b)),
            _ => url.push_str(&format!("%{b:02X}")),
        }
    }
    Ok(Redirect::to(&url).into_response())
}

pub(crate) async fn replay(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Result<Response, PageError> {
    act(inner, who, headers, fields, Action::Replay).await
}

pub(crate) async fn discard(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Result<Response, PageError> {
    act(inner, who, headers, fields, Action::Discard).await
}
