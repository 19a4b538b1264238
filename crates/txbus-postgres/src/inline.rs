//! Deliveries kept on their commit's row: a delivery that succeeds on its first attempt costs
//! no row of its own.
//!
//! A delivery created leased to the committing bus ([`NewDelivery::leased`] with
//! [`NewCommit::lease_to`]) among the first [`MAX_INLINE`] of its commit is *inline*: the
//! commit row lists the inline entries (`inline_idx`, `inline_handler`: message index and
//! handler by offset `k` in the commit's deliveries), its owner (`inline_owner`) and two bit
//! sets, `inline_open` (leased, fence 1, no attempt recorded) and `inline_done` (succeeded on
//! that first attempt, counted as succeeded deliveries until retention clears the bit). Its id
//! is `first_delivery_id + k`, like any delivery of the commit: ids are still allocated for
//! every delivery (see [`crate::append`]).
//!
//! An acknowledgement `Succeeded` under fence 1 of an open inline delivery flips its bits and
//! counts down its operation in the one update of the commit row the acknowledgement makes
//! anyway. Anything else about an open inline delivery first *materializes* it: its row is
//! inserted with its id (leased under fence 1 to its owner, no attempts, no interruptions) and
//! its open bit cleared, in one statement; from there the row logic of every other delivery
//! applies, unchanged: a retry or a failure (see [`crate::complete`], which inserts the row in
//! the state the attempt leaves it), a release by its owner, the takeover of a stopped
//! owner's lease (see [`crate::claim`]). The partial index `commits_inline_open` finds open
//! inline deliveries by owner.
//!
//! [`NewDelivery::leased`]: txbus_core::store::NewDelivery::leased
//! [`NewCommit::lease_to`]: txbus_core::store::NewCommit::lease_to

use sqlx::PgConnection;
use txbus_core::store::{Error, OwnerId};

use crate::error::db;
use crate::pg_uuid::PgUuid;
use crate::row::unsigned;
use crate::schema::Schema;

/// Deliveries of a commit that may be kept on its row: the bits of a `BIGINT` but its sign.
pub(crate) const MAX_INLINE: usize = 63;

/// The schema this module reads and writes (a migration of `schema.rs`). Commits written
/// before have no inline deliveries: theirs all have rows, and keep them. Delivery ids are
/// allocated in blocks of 64 from here on, starting past every id given so far.
pub(crate) const MIGRATION: &str = r#"
ALTER TABLE {s}.commits ADD COLUMN first_delivery_id BIGINT,
                        ADD COLUMN inline_idx        INT[],
                        ADD COLUMN inline_handler    TEXT[],
                        ADD COLUMN inline_owner      UUID,
                        ADD COLUMN inline_open       BIGINT NOT NULL DEFAULT 0,
                        ADD COLUMN inline_done       BIGINT NOT NULL DEFAULT 0,
                        ADD COLUMN inline_done_at    BIGINT;
-- Open inline deliveries by owner (releases, takeovers, leased counts).
CREATE INDEX commits_inline_open ON {s}.commits (inline_owner) WHERE inline_open <> 0;
-- Succeeded inline deliveries by id (retention, counts).
CREATE INDEX commits_inline_done ON {s}.commits (first_delivery_id) WHERE inline_done <> 0;

ALTER SEQUENCE {s}.deliveries_id_seq INCREMENT BY 64;
SELECT setval('{s}.deliveries_id_seq',
              (GREATEST((SELECT max(id) FROM {s}.deliveries),
                        (SELECT last_value FROM {s}.deliveries_id_seq)) / 64 + 1) * 64);
"#;

/// Materializes every open inline delivery of an owner as a pending row (its release), in the
/// caller's transaction; returns how many. Their scheduled time is their commit's.
const RELEASE: &str = "
WITH lk AS (
         SELECT c.id, c.first_delivery_id, c.inline_open, c.inline_idx, c.inline_handler,
                c.created_at
         FROM {s}.commits c WHERE c.inline_owner = $1 AND c.inline_open <> 0
         ORDER BY c.id FOR UPDATE),
     u AS (
         UPDATE {s}.commits c SET inline_open = 0 FROM lk WHERE c.id = lk.id),
     ins AS (
         INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts, fence, owner,
                                     next_at, updated_at, interruptions)
         SELECT lk.first_delivery_id + k - 1, lk.id, lk.inline_idx[k], lk.inline_handler[k], 0, 0,
                1, NULL, lk.created_at, $2, 0
         FROM lk, generate_subscripts(lk.inline_idx, 1) AS k
         WHERE lk.inline_open & (1::BIGINT << (k - 1)::INT) <> 0
         RETURNING 1)
SELECT count(*)::BIGINT FROM ins";

/// Materializes up to `$4` commits' open inline deliveries for handlers `$3` whose owner is
/// not `$1` and has not sent a heartbeat since `$2 - $5`, as rows leased to that owner under
/// fence 1, so that the takeover of rows finds them (see [`crate::claim`]). Rows another
/// transaction holds are left for a later scan.
pub(crate) const ABANDONED: &str = "
WITH alive AS (
         SELECT owner FROM {s}.owners WHERE heartbeat_at >= $2 - $5),
     lk AS (
         SELECT c.id, c.first_delivery_id, c.inline_idx, c.inline_handler, c.inline_owner,
                c.created_at,
                (SELECT COALESCE(bit_or(1::BIGINT << (k - 1)::INT), 0)
                 FROM generate_subscripts(c.inline_handler, 1) AS k
                 WHERE c.inline_handler[k] = ANY ($3)
                   AND c.inline_open & (1::BIGINT << (k - 1)::INT) <> 0) AS take
         FROM {s}.commits c
         WHERE c.inline_open <> 0 AND c.inline_owner <> $1
           AND c.inline_owner NOT IN (SELECT owner FROM alive) AND c.created_at <= $2
         ORDER BY c.id LIMIT $4
         FOR UPDATE SKIP LOCKED),
     u AS (
         UPDATE {s}.commits c SET inline_open = c.inline_open & ~lk.take
         FROM lk WHERE c.id = lk.id AND lk.take <> 0),
     ins AS (
         INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts, fence, owner,
                                     next_at, updated_at, interruptions)
         SELECT lk.first_delivery_id + k - 1, lk.id, lk.inline_idx[k], lk.inline_handler[k], 1, 0,
                1, lk.inline_owner, lk.created_at, $2, 0
         FROM lk, generate_subscripts(lk.inline_idx, 1) AS k
         WHERE lk.take & (1::BIGINT << (k - 1)::INT) <> 0
         RETURNING 1)
SELECT count(*)::BIGINT FROM ins";

/// Releases `owner`'s open inline deliveries to pending rows; returns how many.
pub(crate) async fn release(
    conn: &mut PgConnection,
    schema: &Schema,
    owner: OwnerId,
    now: i64,
) -> Result<u64, Error> {
    let n: i64 = sqlx::query_scalar(&schema.sql(RELEASE))
        .bind(PgUuid(owner))
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("releasing inline deliveries"))?;
    Ok(unsigned(n))
}

/// Counts of inline deliveries in `SELECT` form: open (leased) and done (succeeded) ones over
/// the whole store, for the stats.
pub(crate) const COUNTS: &str = "
SELECT (SELECT COALESCE(sum(bit_count(inline_open::BIT(64))), 0)::BIGINT
        FROM {s}.commits WHERE inline_open <> 0),
       (SELECT COALESCE(sum(bit_count(inline_done::BIT(64))), 0)::BIGINT
        FROM {s}.commits WHERE inline_done <> 0)";
