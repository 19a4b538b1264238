//! `txbus batches` and `txbus batches show NAME [--follow]`: bulk jobs ([`txbus_core::batch`])
//! and how far each has come, from the checkpoints they commit with every chunk.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use txbus_core::batch::{self, BatchProgress};
use txbus_core::Store;

use crate::error::Error;
use crate::output::{clip, time, Output};

/// How often `--follow` reads the checkpoint again.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Most batches listed per page read.
const PAGE: usize = 256;

/// `done` of `total` as a percentage, when the runner gave a total.
fn percent(p: &BatchProgress) -> Option<f64> {
    match p.total {
        Some(0) => Some(100.0),
        Some(total) => Some((p.done as f64 * 100.0 / total as f64).min(100.0)),
        None => None,
    }
}

fn state(p: &BatchProgress) -> &'static str {
    if p.finished {
        "finished"
    } else {
        "unfinished"
    }
}

fn to_json(p: &BatchProgress) -> Value {
    json!({
        "name": p.name,
        "done": p.done,
        "total": p.total,
        "chunks": p.chunks,
        "finished": p.finished,
        "percent": percent(p),
        "updated_at_ms": p.updated_at_ms,
    })
}

/// Lists up to `limit` batches after `after`, by name.
pub async fn list(
    store: &dyn Store,
    after: Option<String>,
    limit: usize,
    out: Output,
) -> Result<(), Error> {
    let mut batches: Vec<BatchProgress> = Vec::new();
    let mut cursor = after;
    while batches.len() < limit {
        let want = (limit - batches.len()).min(PAGE);
        let page = batch::list_in(store, cursor.as_deref(), want).await?;
        let Some(last) = page.last().map(|p| p.name.clone()) else {
            break;
        };
        let short = page.len() < want;
        batches.extend(page);
        cursor = Some(last);
        if short {
            break;
        }
    }
    let value = Value::Array(batches.iter().map(to_json).collect());
    out.emit(&value, || {
        let mut text = format!(
            "{:<32}  {:>12}  {:>12}  {:>7}  {:>8}  {:<10}  {}\n",
            "BATCH", "DONE", "TOTAL", "%", "CHUNKS", "STATE", "UPDATED (UTC)"
        );
        for p in &batches {
            text.push_str(&format!(
                "{:<32}  {:>12}  {:>12}  {:>7}  {:>8}  {:<10}  {}\n",
                clip(&p.name, 32),
                p.done,
                p.total.map_or("?".into(), |t| t.to_string()),
                percent(p).map_or("?".into(), |x| format!("{x:.1}")),
                p.chunks,
                state(p),
                time(p.updated_at_ms),
            ));
        }
        if batches.is_empty() {
            text.push_str("(no batches)\n");
        }
        text
    });
    Ok(())
}

fn describe(p: &BatchProgress) -> String {
    let total = p.total.map_or("?".into(), |t| t.to_string());
    let pct = percent(p).map_or(String::new(), |x| format!(" ({x:.1} %)"));
    format!(
        "batch     {}\nstate     {}\ndone      {} of {total}{pct}\nchunks    {}\nupdated   {} UTC\n",
        p.name,
        state(p),
        p.done,
        p.chunks,
        time(p.updated_at_ms)
    )
}

async fn read(store: &dyn Store, name: &str) -> Result<Option<BatchProgress>, Error> {
    Ok(batch::progress_in(store, name).await?)
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "no batch {name:?} here: none of its runs committed a chunk yet (`txbus batches` lists them)"
    ))
}

/// Shows one batch; with `follow`, keeps reading its checkpoint — a progress bar on standard
/// error, or one JSON line per change with `--json` — until it is finished or interrupted.
pub async fn show(store: &dyn Store, name: &str, follow: bool, out: Output) -> Result<(), Error> {
    let Some(mut current) = read(store, name).await? else {
        return Err(not_found(name));
    };
    if !follow || current.finished {
        out.emit(&to_json(&current), || describe(&current));
        return Ok(());
    }
    // Drawn on standard error, only when it is a terminal (indicatif hides it otherwise).
    let bar = if out.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(current.total, ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_owned());
    bar.set_position(current.done);
    if out.json {
        out.emit(&to_json(&current), String::new);
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        let Some(next) = read(store, name).await? else {
            bar.abandon();
            return Err(Error::NotFound(format!(
                "batch {name:?}: its checkpoint was removed while following it"
            )));
        };
        if next == current {
            continue;
        }
        current = next;
        if let Some(total) = current.total {
            bar.set_length(total);
        }
        bar.set_position(current.done);
        if out.json {
            out.emit(&to_json(&current), String::new);
        }
        if current.finished {
            break;
        }
    }
    bar.finish_and_clear();
    // With `--json` every state was printed as it came; the text ends with where it stands.
    if !out.json {
        out.emit(&to_json(&current), || describe(&current));
    }
    Ok(())
}
