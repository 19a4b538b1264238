//! The storage limit of SQLite: the message rows of txbus written with plain rusqlite, with
//! the same pragmas (WAL, `synchronous = FULL`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::Line;
use crate::scenarios::{workdir, BoxError};
use crate::Args;

fn raw_conn(dir: &tempfile::TempDir) -> Result<rusqlite::Connection, BoxError> {
    let conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE messages (
             position INTEGER NOT NULL, idx INTEGER NOT NULL, id BLOB NOT NULL,
             event_type TEXT NOT NULL, module TEXT, payload TEXT NOT NULL, headers TEXT NOT NULL,
             PRIMARY KEY (position, idx)) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

fn insert_row(stmt: &mut rusqlite::CachedStatement<'_>, position: i64) -> Result<(), BoxError> {
    let id = uuid::Uuid::now_v7();
    let payload = json!({"caller": 1, "n": position}).to_string();
    stmt.execute(rusqlite::params![
        position,
        0,
        id.as_bytes(),
        "bench.event",
        None::<String>,
        payload,
        "{}"
    ])?;
    Ok(())
}

/// The storage limit: the message row shape written with plain rusqlite, same pragmas.
pub fn raw_sqlite(args: &Args) -> Result<Vec<Line>, BoxError> {
    let dir = workdir(args)?;
    let mut conn = raw_conn(&dir)?;
    let sql = "INSERT INTO messages (position, idx, id, event_type, module, payload, headers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
    let mut position = 0i64;
    // One row per commit.
    let secs = args.secs.min(Duration::from_secs(3));
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed() < secs {
        let t = Instant::now();
        let tx = conn.transaction()?;
        position += 1;
        insert_row(&mut tx.prepare_cached(sql)?, position)?;
        tx.commit()?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let commit = Line::new("raw-sqlite-commit", lat.len() as u64, start.elapsed(), lat);
    // 1000 rows per commit.
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut rows = 0u64;
    while start.elapsed() < secs {
        let t = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(sql)?;
            for _ in 0..1000 {
                position += 1;
                insert_row(&mut stmt, position)?;
            }
        }
        tx.commit()?;
        rows += 1000;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let batch =
        Line::new("raw-sqlite-batch", rows, start.elapsed(), lat).with("rows_per_commit", 1000.0);
    Ok(vec![commit, batch])
}
