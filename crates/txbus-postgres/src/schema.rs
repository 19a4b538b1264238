//! The store's schema: its validated name, the names derived from it, and versioned migrations
//! applied on connect.

use sqlx::{Executor, PgPool};
use txbus_core::store::Error;

use crate::error::db;

/// Delivery statuses as stored.
pub(crate) mod status {
    pub const PENDING: i16 = 0;
    pub const LEASED: i16 = 1;
    pub const SUCCEEDED: i16 = 2;
    pub const REJECTED: i16 = 3;
    pub const DEAD: i16 = 4;
}

/// Operation statuses as stored in `commits.op_status`: the numbering every store shares,
/// as this schema's SMALLINT.
pub(crate) mod op_status {
    use txbus_core::store::op_status as shared;
    #[allow(clippy::cast_possible_truncation)]
    pub const PENDING: i16 = shared::PENDING as i16;
    #[allow(clippy::cast_possible_truncation)]
    pub const SUCCEEDED: i16 = shared::SUCCEEDED as i16;
}

/// PostgreSQL's limit on identifier length (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// A validated schema name and what is derived from it: the quoted name for SQL, the
/// notification channels and the advisory lock keys, so that stores in different schemas of one
/// database never disturb each other.
#[derive(Debug, Clone)]
pub(crate) struct Schema {
    name: String,
    quoted: String,
    /// Channel for "deliveries may be waiting" (and "commits wait to be sealed").
    pub(crate) work_channel: String,
    /// Channel for finished operations; the payload is the operation id.
    pub(crate) finished_channel: String,
    /// Channel for "handler subscriptions changed".
    pub(crate) subscriptions_channel: String,
    /// Serializes migrations of this schema across processes.
    pub(crate) migrate_key: i64,
    /// Held by the one process that seals this schema's chain.
    pub(crate) seal_key: i64,
}

/// What a transaction-scoped advisory lock of the store guards.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Guarded {
    /// Appends to one stream.
    Stream,
    /// Writes of one key.
    Key,
}

/// FNV-1a: stable across processes, platforms and Rust versions, which the lock keys must be.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn key(purpose: &str, name: &str) -> i64 {
    i64::from_ne_bytes(fnv1a(&["txbus:", purpose, ":", name]).to_ne_bytes())
}

impl Schema {
    /// Validates `name`: ASCII letters, digits and underscores, at most 63 bytes, not starting
    /// with a digit. Only such names are ever put into SQL text.
    pub(crate) fn new(name: &str) -> Result<Self, Error> {
        let valid = !name.is_empty()
            && name.len() <= MAX_IDENTIFIER
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(Error::Backend {
                message: format!(
                    "invalid schema name {name:?}: use 1 to 63 ASCII letters, digits or underscores, not starting with a digit"
                ),
                source: None,
            });
        }
        let longest = "_subscriptions".len();
        let base = if name.len() + longest <= MAX_IDENTIFIER {
            name.to_owned()
        } else {
            format!("txbus_{:016x}", fnv1a(&[name]))
        };
        Ok(Self {
            name: name.to_owned(),
            quoted: format!("\"{name}\""),
            work_channel: format!("{base}_work"),
            finished_channel: format!("{base}_finished"),
            subscriptions_channel: format!("{base}_subscriptions"),
            migrate_key: key("migrate", name),
            seal_key: key("seal", name),
        })
    }

    /// The schema name as given.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The advisory lock key that serializes the writers of one stream or one key of this
    /// schema, in every process: a condition checked under it holds until the transaction ends.
    /// Two names that share a key only wait for each other.
    pub(crate) fn lock_key(&self, what: Guarded, name: &str) -> i64 {
        let kind = match what {
            Guarded::Stream => "stream:",
            Guarded::Key => "key:",
        };
        i64::from_ne_bytes(fnv1a(&["txbus:", kind, &self.name, ":", name]).to_ne_bytes())
    }

    /// `template` with every `{s}` replaced by the quoted schema name.
    pub(crate) fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.quoted)
    }
}

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.commits (
    id             BIGSERIAL PRIMARY KEY,
    position       BIGINT UNIQUE,
    op_id          UUID     NOT NULL UNIQUE,
    kind           SMALLINT NOT NULL,
    created_at     BIGINT   NOT NULL,
    message_count  INT      NOT NULL,
    data_hash      BYTEA    NOT NULL,
    chain_hash     BYTEA,
    op_status      SMALLINT NOT NULL,
    op_remaining   INT      NOT NULL,
    op_error       TEXT,
    op_finished_at BIGINT
);
-- What the sealer has still to do.
CREATE INDEX commits_unsealed ON {s}.commits (id) WHERE position IS NULL;
-- Outcomes that retention may remove: without it each pass would walk the whole log.
CREATE INDEX commits_outcomes ON {s}.commits (id, op_finished_at) WHERE op_status IN (1, 2);

CREATE TABLE {s}.messages (
    commit_id  BIGINT NOT NULL,
    idx        INT    NOT NULL,
    id         UUID   NOT NULL,
    event_type TEXT   NOT NULL,
    module     TEXT,
    payload    TEXT   NOT NULL,
    headers    TEXT   NOT NULL,
    PRIMARY KEY (commit_id, idx)
);

CREATE TABLE {s}.deliveries (
    id         BIGSERIAL PRIMARY KEY,
    commit_id  BIGINT   NOT NULL,
    idx        INT      NOT NULL,
    handler    TEXT     NOT NULL,
    status     SMALLINT NOT NULL,
    attempts   INT      NOT NULL,
    fence      BIGINT   NOT NULL,
    owner      UUID,
    next_at    BIGINT   NOT NULL,
    last_error TEXT,
    updated_at BIGINT   NOT NULL
);
CREATE INDEX deliveries_pending ON {s}.deliveries (next_at, id) WHERE status = 0;
CREATE INDEX deliveries_leased ON {s}.deliveries (owner) WHERE status = 1;
CREATE INDEX deliveries_finished ON {s}.deliveries (status, updated_at) WHERE status >= 2;

CREATE TABLE {s}.owners (
    owner        UUID   PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
);

-- Handlers of every process, so that a commit made anywhere creates deliveries for all of them.
CREATE TABLE {s}.subscriptions (
    name       TEXT   PRIMARY KEY,
    filter     TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE {s}.chain_head (
    singleton  BOOL   PRIMARY KEY DEFAULT true CHECK (singleton),
    position   BIGINT NOT NULL,
    chain_hash BYTEA  NOT NULL
);
INSERT INTO {s}.chain_head (singleton, position, chain_hash)
VALUES (true, 0, decode(repeat('00', 32), 'hex'));
"#,
    // Times the lease of a delivery was taken from a bus that stopped without releasing it.
    r#"
ALTER TABLE {s}.deliveries ADD COLUMN interruptions INT NOT NULL DEFAULT 0;
"#,
    // Streams (which message of which commit is each version of a stream) and the key-value
    // space. Writers check their conditions under advisory locks; the primary keys are the last
    // word: a version or a key is taken once, whatever process writes it.
    r#"
CREATE TABLE {s}.streams (
    stream    TEXT   NOT NULL,
    version   BIGINT NOT NULL,
    commit_id BIGINT NOT NULL,
    idx       INT    NOT NULL,
    PRIMARY KEY (stream, version)
);

-- Keys compare byte by byte, so that scans list them in the order every store uses.
CREATE TABLE {s}.kv (
    key        TEXT COLLATE "C" PRIMARY KEY,
    value      BYTEA  NOT NULL,
    version    BIGINT NOT NULL,
    expires_at BIGINT
);
-- What pruning removes, without walking every key.
CREATE INDEX kv_expiry ON {s}.kv (expires_at) WHERE expires_at IS NOT NULL;
"#,
    // Per-handler counters, per-minute buckets, and the indexes of open deliveries and of an
    // operation's deliveries (inspection).
    crate::inspect::MIGRATION,
    // The key-value writes of each commit, kept with it in the log (its data hash covers them),
    // by key then commit so that a key's past values are found by key; and the signatures of
    // the chain, one per sealing round when the sealer signs.
    r#"
CREATE TABLE {s}.commit_kv (
    key            TEXT COLLATE "C" NOT NULL,
    commit_id      BIGINT   NOT NULL,
    idx            INT      NOT NULL,
    op             SMALLINT NOT NULL,
    value          BYTEA,
    ttl_ms         BIGINT,
    expires_at     BIGINT,
    expect         SMALLINT NOT NULL,
    expect_version BIGINT,
    PRIMARY KEY (key, commit_id)
);
CREATE INDEX commit_kv_commit ON {s}.commit_kv (commit_id, idx);

CREATE TABLE {s}.commit_signatures (
    position  BIGINT PRIMARY KEY,
    key_id    TEXT   NOT NULL,
    signature BYTEA  NOT NULL
);
"#,
    crate::seal::MIGRATION,
    crate::inline::MIGRATION,
];

/// The newest schema version this build knows.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to date in one transaction. The advisory lock makes processes that
/// start together apply each migration once, one after the other.
pub(crate) async fn migrate(pool: &PgPool, schema: &Schema) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(db("starting the migration"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(schema.migrate_key)
        .execute(&mut *tx)
        .await
        .map_err(db("locking the schema for migration"))?;
    let create = schema.sql(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.txbus_migrations (
             version    INT         PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );",
    );
    // Unprepared (simple protocol), so that one string may hold several statements.
    (&mut *tx)
        .execute(create.as_str())
        .await
        .map_err(db("creating the schema"))?;
    let found: i64 = sqlx::query_scalar(
        &schema.sql("SELECT COALESCE(MAX(version), 0)::BIGINT FROM {s}.txbus_migrations"),
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db("reading the schema version"))?;
    if found > VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: VERSION,
        });
    }
    for (i, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let migration = schema.sql(migration);
        (&mut *tx)
            .execute(migration.as_str())
            .await
            .map_err(db("applying a migration"))?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        sqlx::query(
            &schema
                .sql("INSERT INTO {s}.txbus_migrations (version, applied_at) VALUES ($1, now())"),
        )
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the schema version"))?;
        tracing::info!(schema = schema.name(), version, "applied store migration");
    }
    tx.commit().await.map_err(db("committing the migration"))
}

#[cfg(test)]
mod tests {
    use super::Schema;

    #[test]
    fn only_plain_identifiers_are_accepted() {
        assert!(Schema::new("txbus").is_ok());
        assert!(Schema::new("_t1").is_ok());
        assert!(Schema::new(&"a".repeat(63)).is_ok());
        for bad in ["", "1abc", "a-b", "a\"b", "a b", "é", &"a".repeat(64)] {
            assert!(Schema::new(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn derived_names_fit_and_keys_differ() {
        let s = Schema::new("txbus").expect("a valid name");
        assert_eq!(s.work_channel, "txbus_work");
        assert_eq!(
            s.sql("SELECT 1 FROM {s}.commits"),
            "SELECT 1 FROM \"txbus\".commits"
        );
        assert_ne!(s.migrate_key, s.seal_key);
        let other = Schema::new("txbus2").expect("a valid name");
        assert_ne!(s.seal_key, other.seal_key);
        let long = Schema::new(&"a".repeat(63)).expect("a valid name");
        assert!(long.subscriptions_channel.len() <= 63);
        assert_ne!(long.work_channel, long.finished_channel);
    }

    #[test]
    fn lock_keys_differ_by_schema_kind_and_name() {
        use super::Guarded;
        let a = Schema::new("a").expect("a valid name");
        let b = Schema::new("b").expect("a valid name");
        let k = a.lock_key(Guarded::Stream, "order-1");
        assert_eq!(k, a.lock_key(Guarded::Stream, "order-1"));
        assert_ne!(k, b.lock_key(Guarded::Stream, "order-1"));
        assert_ne!(k, a.lock_key(Guarded::Key, "order-1"));
        assert_ne!(k, a.lock_key(Guarded::Stream, "order-2"));
    }
}
