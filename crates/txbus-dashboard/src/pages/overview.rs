//! The overview: every handler's deliveries by state, throughput and failure rate of the last
//! minutes, the oldest pending delivery; live.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use maud::{html, Markup};
use txbus_core::inspect::Overview;

use super::{live as live_stream, Frame};
use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, Section};
use crate::Inner;

/// Minutes of throughput shown.
const MINUTES: usize = 30;

pub(crate) async fn page(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
) -> Result<Markup, PageError> {
    let overview = inner.bus.inspect().overview(MINUTES).await?;
    let body = html! {
        div #overview data-live={ (who.base) "/live/overview" } { (fragment(&who, &overview)) }
    };
    Ok(layout::page(
        &inner,
        &who,
        Section::Overview,
        "Overview",
        body,
    ))
}

pub(crate) async fn live(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
) -> Response {
    let bus = inner.bus.clone();
    live_stream(&inner, move || {
        let bus = bus.clone();
        let who = who.clone();
        async move {
            match bus.inspect().overview(MINUTES).await {
                Ok(o) => Some(Frame {
                    html: fragment(&who, &o),
                    last: false,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "live overview failed");
                    None
                }
            }
        }
    })
}

fn fragment(who: &Principal, o: &Overview) -> Markup {
    let base = &who.base;
    let t = o.totals();
    let recent = &o.minutes[o.minutes.len().saturating_sub(15)..];
    let finished: u64 = recent.iter().map(|m| m.finished()).sum();
    let failed: u64 = recent.iter().map(|m| m.rejected + m.died).sum();
    let rate = if finished == 0 {
        0.0
    } else {
        failed as f64 / finished as f64
    };
    let per_minute = o.minutes.last().map_or(0, |m| m.finished());
    let oldest = t.oldest_pending_age_ms(o.at_ms);
    let peak = o
        .minutes
        .iter()
        .map(|m| m.finished())
        .max()
        .unwrap_or(0)
        .max(1);
    html! {
        div.cards {
            div.card { div.label { "Handlers" } div.value { (o.handlers.len()) } }
            div class={ "card" @if t.pending > 0 { " warn" } } {
                div.label { "Pending" } div.value { (format::count(t.pending)) @if t.open_capped { "+" } }
            }
            div.card { div.label { "Running (leased)" } div.value { (format::count(t.leased)) } }
            div class={ "card" @if t.dead > 0 { " bad" } } {
                div.label { "Dead letters" }
                div.value { a href={ (base) "/dead-letters" } { (format::count(t.dead)) } }
            }
            div.card.ok { div.label { "Succeeded (total)" } div.value { (format::count(t.succeeded)) } }
            div class={ "card" @if rate > 0.0 { " bad" } } {
                div.label { "Failure rate, 15 min" } div.value { (format::percent(rate)) }
            }
            div.card { div.label { "Finished this minute" } div.value { (format::count(per_minute)) } }
            div class={ "card" @if oldest > 60_000 { " warn" } } {
                div.label { "Oldest pending" }
                div.value { @if t.oldest_pending_due_ms.is_some() { (format::duration(oldest)) } @else { span.zero { "—" } } }
            }
        }
        div.panel {
            h2 style="margin-top:0" { "Throughput, last " (o.minutes.len()) " minutes"
                span.legend { i style="background:#69b77b" {} "succeeded" i style="background:#e06666" {} "rejected or dead" } }
            div.chart {
                @for m in &o.minutes {
                    @let ok = m.succeeded * 100 / peak;
                    @let bad = (m.rejected + m.died) * 100 / peak;
                    div.bar title={ (format::minute(m.minute_ms)) ": " (m.succeeded) " succeeded, " (m.rejected) " rejected, " (m.died) " dead, " (m.retried) " retried (" (format::percent(m.failure_rate())) " failed)" } {
                        div.ok style={ "height:" (ok) "px" } {}
                        div.bad style={ "height:" (bad) "px" } {}
                    }
                }
            }
            div.axis {
                span { (o.minutes.first().map(|m| format::minute(m.minute_ms)).unwrap_or_default()) " UTC" }
                span { "peak " (format::count(peak)) " / min" }
                span { (o.minutes.last().map(|m| format::minute(m.minute_ms)).unwrap_or_default()) }
            }
        }
        div.panel {
            h2 style="margin-top:0" { "Handlers" }
            table {
                thead { tr {
                    th { "Handler" } th.num { "Pending" } th.num { "Leased" } th.num { "Succeeded" }
                    th.num { "Retried" } th.num { "Rejected" } th.num { "Dead letters" } th.num { "Oldest pending" }
                } }
                tbody {
                    @for h in &o.handlers {
                        tr {
                            td { code { (h.handler) } }
                            td.num { (num(h.pending)) @if h.open_capped { "+" } }
                            td.num { (num(h.leased)) }
                            td.num { (num(h.succeeded)) }
                            td.num { (num(h.retried)) }
                            td.num { (num(h.rejected)) }
                            td.num {
                                @if h.dead > 0 {
                                    a.error href={ (base) "/dead-letters?handler=" (h.handler) } { (format::count(h.dead)) }
                                } @else { span.zero { "0" } }
                            }
                            td.num {
                                @if h.oldest_pending_due_ms.is_some() { (format::duration(h.oldest_pending_age_ms(o.at_ms))) }
                                @else { span.zero { "—" } }
                            }
                        }
                    }
                    @if o.handlers.is_empty() { tr { td colspan="8" .muted { "No handler has had work yet." } } }
                }
            }
            p.muted { "Log head: position " (o.head) " · updated " (format::time(o.at_ms)) " UTC · succeeded, retried and rejected count since the store was created; dead letters are those held now." }
        }
    }
}

fn num(n: u64) -> Markup {
    if n == 0 {
        html! { span.zero { "0" } }
    } else {
        html! { (format::count(n)) }
    }
}
