//! The plans the writer lanes and the sealer keep (see [`Shared::dedicated`]) stay index
//! lookups when they were made on empty tables that then grow: the trap that made the store
//! plan every execution afresh before.
//!
//! [`Shared::dedicated`]: crate::context::Shared::dedicated
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

use crate::schema::{migrate, Schema};

fn url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The plan PostgreSQL keeps for `name` after executing it with `args`.
async fn kept_plan(conn: &mut PgConnection, name: &str, args: &str) -> String {
    let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN (COSTS OFF) EXECUTE {name}{args}"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(l,)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_plans_stay_index_lookups_as_the_tables_grow() {
    let name = format!("t_{:016x}", fastrand::u64(..));
    let schema = Schema::new(&name).unwrap();
    let options: PgConnectOptions = url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .unwrap();
    migrate(&pool, &schema).await.unwrap();
    // A session set up as the lanes' and the sealer's are.
    let mut conn = PgConnection::connect_with(&options.options([
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_seqscan", "off"),
        ("jit", "off"),
    ]))
    .await
    .unwrap();
    let ack_args = "('{1}', '{1}', '{1}', '{1}', '{2}', '{NULL}', '{NULL}', '{NULL}', '{h}', \
                    '{1}', 0, 64, 0, '{0}')";
    conn.execute(
        format!(
            "PREPARE ack(BIGINT[], BIGINT[], BIGINT[], INT[], SMALLINT[], BIGINT[], TEXT[],
                         TEXT[], TEXT[], BIGINT[], BIGINT, INT, BIGINT, BIGINT[]) AS {};
             PREPARE seal_read(BIGINT) AS {};
             EXECUTE ack{ack_args};
             EXECUTE seal_read(1000);",
            schema.sql(crate::complete::ROUND),
            schema.sql(crate::seal::READ_ROUND),
        )
        .as_str(),
    )
    .await
    .unwrap();

    // The tables grow: many commits, many leased deliveries, many seals.
    conn.execute(
        schema
            .sql(
                "INSERT INTO {s}.commits (id, op_id, kind, created_at, message_count, data_hash,
                                          op_status, op_remaining, first_delivery_id,
                                          inline_idx, inline_handler, inline_owner, inline_open)
                 SELECT g, gen_random_uuid(), 1, 0, 1, '\\x00', 0, 1, 64 * g, '{0}', '{h}',
                        gen_random_uuid(), 1
                 FROM generate_series(1, 50000) AS g;
                 INSERT INTO {s}.deliveries (id, commit_id, idx, handler, status, attempts,
                                             fence, owner, next_at, updated_at)
                 SELECT 64 * g + 1, g, 0, 'h', 1, 0, 1, gen_random_uuid(), 0, 0
                 FROM generate_series(1, 50000) AS g;
                 INSERT INTO {s}.commit_seals (commit_id, position, chain_hash)
                 SELECT g, g, '\\x00' FROM generate_series(1, 50000) AS g;
                 UPDATE {s}.chain_head SET position = 50000, seal_xmax = 2^60;",
            )
            .as_str(),
    )
    .await
    .unwrap();

    // The plans made on the empty tables, then those made again once the server knows how
    // large the tables are (statistics invalidate kept plans).
    for when in ["made on empty tables", "made again with statistics"] {
        let ack = kept_plan(&mut conn, "ack", ack_args).await;
        assert!(ack.contains("deliveries_pkey"), "{when}:\n{ack}");
        assert!(ack.contains("commits_pkey"), "{when}:\n{ack}");
        for scan in [
            "Seq Scan on deliveries",
            "Seq Scan on commits",
            "deliveries_leased",
            "deliveries_open",
        ] {
            assert!(!ack.contains(scan), "{when}: {scan} in\n{ack}");
        }
        let read = kept_plan(&mut conn, "seal_read", "(1000)").await;
        assert!(read.contains("commits_xid"), "{when}:\n{read}");
        assert!(read.contains("commit_seals_pkey"), "{when}:\n{read}");
        assert!(!read.contains("Seq Scan on commits"), "{when}:\n{read}");
        assert!(!read.contains("commits_pkey"), "{when}:\n{read}");
        conn.execute(
            schema
                .sql("ANALYZE {s}.commits, {s}.deliveries, {s}.commit_seals")
                .as_str(),
        )
        .await
        .unwrap();
    }

    conn.close().await.unwrap();
    pool.execute(format!("DROP SCHEMA \"{name}\" CASCADE").as_str())
        .await
        .unwrap();
    pool.close().await;
}
