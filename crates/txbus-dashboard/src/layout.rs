//! The page shell (header, navigation, who is signed in), the stylesheet and the script, all
//! served by the router: nothing is loaded from elsewhere.

use axum::http::header;
use axum::response::IntoResponse;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::auth::{Principal, Role};
use crate::Inner;

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Overview,
    Operations,
    DeadLetters,
    Sagas,
    Subscriptions,
    Log,
    Audit,
}

const SECTIONS: [(Section, &str, &str); 7] = [
    (Section::Overview, "", "Overview"),
    (Section::Operations, "/operations", "Operations"),
    (Section::DeadLetters, "/dead-letters", "Dead letters"),
    (Section::Sagas, "/sagas", "Sagas"),
    (
        Section::Subscriptions,
        "/subscriptions",
        "Projections & relays",
    ),
    (Section::Log, "/log", "Log"),
    (Section::Audit, "/audit", "Audit"),
];

/// A whole page.
pub(crate) fn page(
    inner: &Inner,
    who: &Principal,
    section: Section,
    title: &str,
    body: Markup,
) -> Markup {
    let base = &who.base;
    let home = if base.is_empty() { "/" } else { base.as_str() };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (inner.title) }
                link rel="stylesheet" href={ (base) "/assets/app.css" };
                script src={ (base) "/assets/app.js" } defer {}
            }
            body {
                header.top {
                    a.brand href=(home) { span.logo { "◆" } " " (inner.title) }
                    nav {
                        @for (s, path, label) in SECTIONS {
                            @if path.is_empty() {
                                a.active[s == section] href=(home) { (label) }
                            } @else {
                                a.active[s == section] href={ (base) (path) } { (label) }
                            }
                        }
                        @if let Some(m) = &inner.metrics_link {
                            a href=(m) { "Metrics ↗" }
                        }
                    }
                    span.who title="signed in" {
                        (who.name) " "
                        span class={ "role " (who.role.as_str()) } { (who.role.as_str()) }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A hidden CSRF field, for every form.
pub(crate) fn csrf(who: &Principal) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// True when `who` may act (replay, discard).
pub(crate) fn can_act(who: &Principal) -> bool {
    who.role == Role::Operator
}

/// A status badge.
pub(crate) fn badge(kind: &str) -> Markup {
    html! { span class={ "badge " (kind) } { (kind.replace('_', " ")) } }
}

pub(crate) async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
}

pub(crate) async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        PreEscaped(JS).into_string(),
    )
}

const JS: &str = r#"// Live regions: an element with data-live="URL" is replaced by each `update` event.
document.querySelectorAll('[data-live]').forEach(function (el) {
  var es = new EventSource(el.dataset.live);
  es.addEventListener('update', function (e) { el.innerHTML = e.data; el.dataset.updated = Date.now(); });
  es.addEventListener('end', function () { es.close(); });
});
// "Select all" boxes.
document.addEventListener('change', function (e) {
  if (e.target.matches('[data-check-all]')) {
    document.querySelectorAll('input[name=id]').forEach(function (c) { c.checked = e.target.checked; });
  }
});
"#;

const CSS: &str = r#"
:root { --bg:#f5f6f8; --card:#fff; --ink:#1d2433; --muted:#6b7385; --line:#e3e6ec; --accent:#3b5bdb;
  --ok:#2b8a3e; --okbg:#e6f4ea; --bad:#c92a2a; --badbg:#fdecec; --warn:#b35c00; --warnbg:#fff4e0; --info:#1c6fb8; --infobg:#e7f1fb; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; background: var(--bg); color: var(--ink); }
header.top { display:flex; align-items:center; gap:24px; padding:0 24px; height:52px; background:#1d2433; color:#fff; }
header.top a { color:#c9d1e3; text-decoration:none; }
.brand { font-weight:700; font-size:16px; color:#fff !important; }
.logo { color:#7c9cff; }
nav { display:flex; gap:4px; flex:1; flex-wrap:wrap; }
nav a { padding:6px 10px; border-radius:6px; }
nav a:hover { background:#2c3550; color:#fff; }
nav a.active { background:#3b4a75; color:#fff; }
.who { color:#c9d1e3; white-space:nowrap; }
.role { font-size:11px; padding:2px 6px; border-radius:4px; background:#2c3550; text-transform:uppercase; letter-spacing:.04em; }
.role.operator { background:#3b5bdb; color:#fff; }
main { padding:20px 24px 48px; max-width:1400px; }
h1 { font-size:20px; margin:4px 0 16px; }
h2 { font-size:15px; margin:24px 0 8px; color:#343b4d; }
a { color: var(--accent); }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap:12px; margin-bottom:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:24px; font-weight:600; margin-top:2px; }
.card.bad .value { color:var(--bad); } .card.ok .value { color:var(--ok); } .card.warn .value { color:var(--warn); }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px; margin-bottom:16px; overflow-x:auto; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom:none; }
tbody tr:hover { background:#fafbfd; }
.badge { display:inline-block; font-size:12px; padding:1px 8px; border-radius:10px; background:#eef0f4; color:#4a5163; white-space:nowrap; }
.badge.succeeded, .badge.completed, .badge.intact { background:var(--okbg); color:var(--ok); }
.badge.failed, .badge.dead, .badge.rejected, .badge.broken, .badge.needs_attention { background:var(--badbg); color:var(--bad); }
.badge.pending, .badge.compensating, .badge.running { background:var(--warnbg); color:var(--warn); }
.badge.leased, .badge.transact, .badge.publish, .badge.system, .badge.batch { background:var(--infobg); color:var(--info); }
.muted { color:var(--muted); }
.zero { color:#b8bdc9; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
pre { background:#f7f8fa; border:1px solid var(--line); border-radius:8px; padding:10px; overflow:auto; max-height:420px; margin:6px 0; }
.error { color:var(--bad); }
form.inline { display:inline; }
.toolbar { display:flex; gap:10px; align-items:center; flex-wrap:wrap; margin-bottom:12px; }
input[type=text], select, input[type=number] { padding:6px 8px; border:1px solid #cdd2dc; border-radius:6px; background:#fff; font:inherit; }
button { padding:6px 12px; border:1px solid #cdd2dc; border-radius:6px; background:#fff; font:inherit; cursor:pointer; }
button.primary { background:var(--accent); border-color:var(--accent); color:#fff; }
button.danger { background:#fff; border-color:#e3a1a1; color:var(--bad); }
button:hover { filter:brightness(0.96); }
.chart { display:flex; align-items:flex-end; gap:3px; height:120px; padding-top:8px; }
.chart .bar { flex:1; display:flex; flex-direction:column-reverse; min-width:6px; }
.chart .ok { background:#69b77b; } .chart .bad { background:#e06666; }
.chart .bar:hover { outline:1px solid #99a; }
.axis { display:flex; justify-content:space-between; color:var(--muted); font-size:11px; margin-top:4px; }
.legend { font-size:12px; color:var(--muted); } .legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin:0 4px 0 10px; vertical-align:-1px; }
.event { border:1px solid var(--line); border-radius:10px; padding:10px 14px; margin:10px 0; background:#fff; }
.event h3 { margin:0 0 6px; font-size:14px; }
.grid2 { display:grid; grid-template-columns: 1fr 1fr; gap:12px; }
dl.kv { display:grid; grid-template-columns: max-content 1fr; gap:4px 16px; margin:0; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; word-break:break-all; }
.pager { margin-top:10px; display:flex; gap:12px; }
.notice { padding:10px 14px; border-radius:8px; background:var(--infobg); color:var(--info); margin-bottom:12px; }
.notice.bad { background:var(--badbg); color:var(--bad); } .notice.ok { background:var(--okbg); color:var(--ok); }
"#;
