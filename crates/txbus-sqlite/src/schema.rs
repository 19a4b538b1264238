//! The store's schema: versioned migrations, applied on open.

use rusqlite::Connection;
use txbus_core::store::Error;

use crate::error::sql;

/// Delivery statuses as stored.
pub(crate) mod status {
    pub const PENDING: i64 = 0;
    pub const LEASED: i64 = 1;
    pub const SUCCEEDED: i64 = 2;
    pub const REJECTED: i64 = 3;
    pub const DEAD: i64 = 4;
}

/// Operation statuses as stored in `commits.op_status`: the numbering every store shares.
pub(crate) use txbus_core::store::op_status;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE commits (
    position       INTEGER PRIMARY KEY,
    op_id          BLOB    NOT NULL,
    kind           INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    message_count  INTEGER NOT NULL,
    data_hash      BLOB    NOT NULL,
    chain_hash     BLOB    NOT NULL,
    op_status      INTEGER NOT NULL,
    op_remaining   INTEGER NOT NULL,
    op_error       TEXT,
    op_finished_at INTEGER
);
CREATE UNIQUE INDEX commits_op_id ON commits (op_id);

CREATE TABLE messages (
    position   INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    id         BLOB    NOT NULL,
    event_type TEXT    NOT NULL,
    module     TEXT,
    payload    TEXT    NOT NULL,
    headers    TEXT    NOT NULL,
    PRIMARY KEY (position, idx)
) WITHOUT ROWID;

CREATE TABLE deliveries (
    id         INTEGER PRIMARY KEY,
    position   INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    handler    TEXT    NOT NULL,
    status     INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    fence      INTEGER NOT NULL,
    owner      BLOB,
    next_at    INTEGER NOT NULL,
    last_error TEXT,
    updated_at INTEGER NOT NULL
);
CREATE INDEX deliveries_pending ON deliveries (next_at, id) WHERE status = 0;
-- Only failures (rare) are indexed; succeeded deliveries and outcomes are pruned by ranges
-- of ids and positions, so that an acknowledgement writes no index.
CREATE INDEX deliveries_failed ON deliveries (status, updated_at) WHERE status >= 3;

CREATE TABLE owners (
    owner        BLOB PRIMARY KEY,
    heartbeat_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // Times the lease of a delivery was taken from a bus that stopped without releasing it.
    r#"
ALTER TABLE deliveries ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
"#,
    // Streams (event sourcing, sagas) index messages of the log by version; the key-value
    // space holds snapshots, checkpoints, dedupe marks and indexes.
    r#"
CREATE TABLE streams (
    stream   TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    idx      INTEGER NOT NULL,
    PRIMARY KEY (stream, version)
) WITHOUT ROWID;

CREATE TABLE kv (
    key        TEXT    PRIMARY KEY,
    value      BLOB    NOT NULL,
    version    INTEGER NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID;
CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
"#,
    // Per-handler counters, per-minute buckets and the index of open deliveries (inspection).
    crate::inspect::MIGRATION,
    // The key-value writes of each commit, kept with it in the log (its data hash covers them),
    // by key then position so that a key's value at any position is one seek; and the
    // signatures of the chain, one per group commit when the bus signs.
    r#"
CREATE TABLE commit_kv (
    key            TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    idx            INTEGER NOT NULL,
    op             INTEGER NOT NULL,
    value          BLOB,
    ttl_ms         INTEGER,
    expires_at     INTEGER,
    expect         INTEGER NOT NULL,
    expect_version INTEGER,
    PRIMARY KEY (key, position)
) WITHOUT ROWID;
CREATE INDEX commit_kv_position ON commit_kv (position, idx);

CREATE TABLE commit_signatures (
    position  INTEGER PRIMARY KEY,
    key_id    TEXT    NOT NULL,
    signature BLOB    NOT NULL
);
"#,
    // Deliveries kept on their commit's row (see `inline`): the commit's deliveries take
    // consecutive ids from `first_delivery`; those leased to the committing bus are listed in
    // `inline`, open or succeeded by their bits, and get a row only when they need one. Commits
    // written before keep their rows; their id ranges are filled in from them.
    r#"
ALTER TABLE commits ADD COLUMN first_delivery INTEGER;
ALTER TABLE commits ADD COLUMN delivery_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commits ADD COLUMN inline TEXT;
ALTER TABLE commits ADD COLUMN inline_open INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commits ADD COLUMN inline_done INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commits ADD COLUMN inline_owner BLOB;
CREATE INDEX commits_inline_open ON commits (position) WHERE inline_open != 0;
UPDATE commits SET first_delivery = d.first, delivery_count = d.last - d.first + 1
FROM (SELECT position, MIN(id) AS first, MAX(id) AS last FROM deliveries GROUP BY position) AS d
WHERE commits.position = d.position;
"#,
];

/// The newest schema version this build knows.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to date in one transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: VERSION,
        });
    }
    if found == VERSION {
        return Ok(());
    }
    let tx = conn.transaction().map_err(sql("starting the migration"))?;
    for (i, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.execute_batch(migration)
            .map_err(sql("applying a migration"))?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    tx.pragma_update(None, "user_version", VERSION)
        .map_err(sql("recording the schema version"))?;
    tx.commit().map_err(sql("committing the migration"))
}
