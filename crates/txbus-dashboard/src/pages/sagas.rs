//! Sagas: listed by status from the saga status index, and one saga's history.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Extension;
use maud::{html, Markup};
use serde::Deserialize;
use txbus_saga::{SagaId, SagaStatus};

use crate::auth::Principal;
use crate::error::PageError;
use crate::format;
use crate::layout::{self, badge, Section};
use crate::Inner;

#[derive(Debug, Deserialize, Default)]
pub(crate) struct ListQuery {
    status: Option<String>,
    after: Option<String>,
}

pub(crate) async fn list(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    let base = &who.base;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => SagaStatus::Running,
        Some(s) => SagaStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                PageError::bad_request(format!("unknown saga status {:?}", format::clip(s, 40)))
            })?,
    };
    let after = match q.after.as_deref() {
        Some(a) => Some(SagaId::new(a).map_err(|e| PageError::bad_request(e.to_string()))?),
        None => None,
    };
    let sagas = txbus_saga::list(&inner.bus, status, after.as_ref(), 50).await?;
    let body = html! {
        div.toolbar {
            @for s in SagaStatus::ALL {
                a href={ (base) "/sagas?status=" (s.as_str()) } {
                    @if s == status { strong { (badge(s.as_str())) } } @else { (s.as_str().replace('-', " ")) }
                }
            }
        }
        div.panel {
            table {
                thead { tr { th { "Saga" } th { "Type" } th { "Status" } th { "Since (UTC)" } th { "Step" } th { "Error" } } }
                tbody {
                    @for s in &sagas {
                        tr {
                            td { a href={ (base) "/sagas/" (s.id.as_str()) } { code { (s.id.as_str()) } } }
                            td { code { (s.saga_type) } }
                            td { (badge(s.status.as_str())) }
                            td { (format::time(s.since_ms)) }
                            td { (s.step.as_deref().unwrap_or("")) }
                            td.error { (s.error.as_deref().map(|e| format::clip(e, 120)).unwrap_or_default()) }
                        }
                    }
                    @if sagas.is_empty() { tr { td colspan="6" .muted { "No saga is " (status.as_str().replace('-', " ")) "." } } }
                }
            }
            @if sagas.len() == 50 {
                @if let Some(last) = sagas.last() {
                    div.pager { a href={ (base) "/sagas?status=" (status.as_str()) "&after=" (last.id.as_str()) } { "More →" } }
                }
            }
        }
    };
    Ok(layout::page(&inner, &who, Section::Sagas, "Sagas", body))
}

pub(crate) async fn show(
    State(inner): State<Arc<Inner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let id = SagaId::new(&id).map_err(|e| PageError::bad_request(e.to_string()))?;
    let history = txbus_saga::history(&inner.bus, &id).await?;
    let body = html! {
        p { "Saga " code { (id.as_str()) } ", " (history.len()) " change(s)." }
        div.panel {
            table {
                thead { tr { th.num { "Version" } th { "At (UTC)" } th { "Change" } th { "Details" } } }
                tbody {
                    @for h in &history {
                        @let value = serde_json::to_value(&h.event).unwrap_or_default();
                        tr {
                            td.num { (h.version) }
                            td { (format::time(h.at_ms)) }
                            td { code { (value.get("change").and_then(|t| t.as_str()).unwrap_or("change")) } }
                            td { pre { (format::json(&value)) } }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&inner, &who, Section::Sagas, "Saga", body))
}
