//! Checkpoints of the write-ahead log, off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that commit
//! copies the log into the database file and waits for the file's fsync, so every thousandth
//! page or so one group commit (and every caller in it) pays for a checkpoint. Here the writer's
//! connection never checkpoints; a thread of its own copies what has been committed into the
//! database file, with its own connection, while the writer goes on. Durability is the same:
//! every commit is durable in the log before it is acknowledged, and a checkpoint only moves
//! durable pages.
//!
//! The log stays bounded: the checkpointer runs every [`INTERVAL`], and as soon as the writer
//! says that it committed [`NUDGE_EVERY`] transactions since the last nudge. A passive
//! checkpoint never blocks the writer; when the log has grown past [`MAX_LOG_PAGES`] anyway
//! (a reader holding an old snapshot), a restarting checkpoint waits for it, so that the log
//! file starts over.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use rusqlite::Connection;
use txbus_core::store::Error;

use crate::error::sql;

/// How often the checkpointer runs when nobody nudges it.
const INTERVAL: Duration = Duration::from_millis(200);

/// The writer nudges the checkpointer once per this many committed transactions.
pub(crate) const NUDGE_EVERY: u64 = 64;

/// Past this many pages in the log, a checkpoint waits for readers so that the log restarts.
const MAX_LOG_PAGES: i64 = 100_000;

/// The writer's end: nudges the checkpointer; dropping it stops the checkpointer.
pub(crate) struct Nudge {
    sender: SyncSender<()>,
    since: u64,
}

impl Nudge {
    /// Counts one committed transaction; every [`NUDGE_EVERY`] it wakes the checkpointer (if
    /// it is not awake already).
    pub(crate) fn committed(&mut self) {
        self.since += 1;
        if self.since >= NUDGE_EVERY {
            self.since = 0;
            match self.sender.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

/// Turns automatic checkpoints off on the writer's connection and starts the checkpointer on
/// a connection of its own to `path`.
pub(crate) fn start(
    writer: &Connection,
    path: &Path,
    configure: impl Fn(&Connection) -> Result<(), Error>,
) -> Result<(Nudge, std::thread::JoinHandle<()>), Error> {
    writer
        .pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(sql("turning automatic checkpoints off"))?;
    let conn = Connection::open(path).map_err(sql("opening the checkpoint connection"))?;
    configure(&conn)?;
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    let path: PathBuf = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("txbus-sqlite-checkpoint".into())
        .spawn(move || run(&conn, &path, &receiver))
        .map_err(|e| Error::backend("starting the checkpoint thread", e))?;
    Ok((Nudge { sender, since: 0 }, handle))
}

fn run(conn: &Connection, path: &Path, nudges: &Receiver<()>) {
    // Said once when checkpoints start failing (a full disk) and once when they work again.
    let mut failing = false;
    loop {
        match nudges.recv_timeout(INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        match checkpoint(conn, "PASSIVE") {
            Ok(log) if log > MAX_LOG_PAGES => {
                tracing::info!(pages = log, path = %path.display(),
                    "the write-ahead log is long; restarting it");
                if let Err(e) = checkpoint(conn, "RESTART") {
                    tracing::warn!(error = %e, "restarting the write-ahead log failed; retrying later");
                }
            }
            Ok(_) if failing => {
                failing = false;
                tracing::info!(path = %path.display(), "checkpoints work again");
            }
            Ok(_) => {}
            // A full disk or a busy file: the log keeps the data; the next round tries again.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, path = %path.display(), "a checkpoint failed; retrying");
            }
            Err(_) => {}
        }
    }
}

/// Runs one checkpoint; returns the pages in the log.
fn checkpoint(conn: &Connection, mode: &str) -> Result<i64, Error> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        r.get::<_, i64>(1)
    })
    .map_err(sql("checkpointing the write-ahead log"))
}
