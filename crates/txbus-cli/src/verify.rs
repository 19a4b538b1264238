//! `txbus verify`: walks the hash chain, with a progress bar on long walks.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use txbus_core::chain::{self, Broken};
use txbus_core::Store;

use crate::error::Error;
use crate::output::Output;

/// Walks the log; returns whether it is intact (the exit code says so to scripts).
pub async fn verify(store: &dyn Store, progress: bool, out: Output) -> Result<bool, Error> {
    let total = store.stats().await?.commits;
    // Drawn on standard error, only when it is a terminal (indicatif hides it otherwise).
    let bar = if progress && !out.json {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "verifying {bar:40} {pos}/{len} commits ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let report = chain::verify_with_progress(store, |p| {
        if p.verified > bar.length().unwrap_or(0) {
            bar.set_length(p.verified);
        }
        bar.set_position(p.verified);
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    let broken = report.first_broken.as_ref().map(|(position, why)| {
        let kind = match why {
            Broken::DataMismatch => "data_mismatch",
            Broken::ChainMismatch => "chain_mismatch",
            Broken::Gap { .. } => "gap",
            Broken::BadSignature { .. } => "bad_signature",
            Broken::UnknownKey { .. } => "unknown_key",
            Broken::Unsigned => "unsigned",
            _ => "broken",
        };
        let text = why.to_string();
        (*position, kind, text)
    });
    let value = json!({
        "intact": report.is_intact(),
        "verified": report.verified,
        "first_broken": broken.as_ref().map(|(p, kind, text)| json!({"position": p, "kind": kind, "reason": text})),
    });
    out.emit(&value, || match &broken {
        None => format!("intact: {} commits verified", report.verified),
        Some((position, _, text)) => format!(
            "BROKEN at position {position}: {text} ({} commits before it verified)",
            report.verified
        ),
    });
    Ok(report.is_intact())
}
