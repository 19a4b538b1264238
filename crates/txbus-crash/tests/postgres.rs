//! Many bus processes on one PostgreSQL database: they share the work as competing
//! consumers, resolve each other's operations, survive a worker killed mid-handler and a
//! restart of PostgreSQL under load. The test process is the origin: it has no handlers, so
//! every outcome it sees was produced by another process and reached it through the store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use txbus::{Bus, Event, OperationId};
use txbus_postgres::PostgresOptions;

const CHILD: &str = env!("CARGO_BIN_EXE_txbus-crash");

fn url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema with the table the workers record into.
async fn schema() -> (String, sqlx::PgPool) {
    let name = format!("p_{:016x}", fastrand::u64(..));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA \"{name}\""))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE TABLE \"{name}\".handled (message_id UUID NOT NULL, worker TEXT NOT NULL, times INT NOT NULL,
         PRIMARY KEY (message_id, worker))"
    ))
    .execute(&pool)
    .await
    .unwrap();
    (name, pool)
}

async fn drop_schema(pool: &sqlx::PgPool, name: &str) {
    sqlx::query(&format!("DROP SCHEMA \"{name}\" CASCADE"))
        .execute(pool)
        .await
        .unwrap();
}

/// Starts a worker and waits until its bus runs.
async fn worker(schema: &str, name: &str, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(CHILD);
    cmd.arg("pg-worker").arg(url()).arg(schema).arg(name);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    assert!(
        matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
        "worker {name} did not start: {ready:?}"
    );
    child
}

async fn origin(schema: &str, poll: Duration) -> Bus {
    let store = PostgresOptions::new(url())
        .schema(schema)
        .connect()
        .await
        .unwrap();
    Bus::builder()
        .store(store)
        .poll_interval(poll)
        .build()
        .await
        .unwrap()
}

/// (messages handled, duplicates, handled per worker) from the workers' records.
async fn handled(pool: &sqlx::PgPool, schema: &str) -> (usize, i64, HashMap<String, i64>) {
    let rows: Vec<(String, String, i32)> = sqlx::query_as(&format!(
        "SELECT message_id::text, worker, times FROM \"{schema}\".handled"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let mut per_message: HashMap<String, i64> = HashMap::new();
    let mut per_worker: HashMap<String, i64> = HashMap::new();
    for (m, w, t) in rows {
        *per_message.entry(m).or_default() += i64::from(t);
        *per_worker.entry(w).or_default() += i64::from(t);
    }
    let duplicates = per_message.values().map(|t| t - 1).sum();
    (per_message.len(), duplicates, per_worker)
}

/// Commits `n` operations from `tasks` concurrent callers; returns their ids and message ids.
async fn load(bus: &Bus, n: usize, tasks: usize) -> Vec<(OperationId, uuid::Uuid)> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let bus = bus.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..n / tasks {
                let event = Event::new("job", json!({"task": t, "i": i}));
                let message = event.id().0;
                let op = bus.transact([event]).await.unwrap();
                out.push((op.id(), message));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_the_work_and_resolve_each_others_operations() {
    let (schema, pool) = schema().await;
    let workers = [
        worker(&schema, "w1", &[("TXBUS_WORK_MS", "2")]).await,
        worker(&schema, "w2", &[("TXBUS_WORK_MS", "2")]).await,
        worker(&schema, "w3", &[("TXBUS_WORK_MS", "2")]).await,
    ];
    // A poll interval of an hour: outcomes must arrive by notification, not by polling.
    let bus = origin(&schema, Duration::from_secs(3600)).await;
    // The handles themselves resolve: half through their future, half through their stream.
    let mut waits = Vec::new();
    for t in 0..10 {
        let bus = bus.clone();
        waits.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..30 {
                let op = bus
                    .transact([Event::new("job", json!({"task": t, "i": i}))])
                    .await
                    .unwrap();
                let outcome = if i % 2 == 0 {
                    tokio::time::timeout(Duration::from_secs(60), op.outcome())
                        .await
                        .unwrap()
                        .unwrap()
                } else {
                    use futures_util::StreamExt;
                    let updates: Vec<_> = tokio::time::timeout(
                        Duration::from_secs(60),
                        op.updates().collect::<Vec<_>>(),
                    )
                    .await
                    .unwrap();
                    match updates.last() {
                        Some(txbus::Progress::Finished(o)) => o.clone(),
                        other => panic!("the stream must end with the outcome: {other:?}"),
                    }
                };
                assert!(outcome.is_ok(), "{outcome:?}");
                ids.push((op.id(), ()));
            }
            ids
        }));
    }
    let mut ops = Vec::new();
    for w in waits {
        ops.extend(w.await.unwrap());
    }
    // Any process reads any outcome by id.
    let other = origin(&schema, Duration::from_secs(3600)).await;
    for (id, _) in ops.iter().take(20) {
        assert!(other.wait(*id).await.unwrap().is_ok());
    }
    let (messages, duplicates, per_worker) = handled(&pool, &schema).await;
    assert_eq!(messages, ops.len(), "every message handled");
    for w in ["w1", "w2", "w3"] {
        assert!(
            per_worker.get(w).copied().unwrap_or(0) > 0,
            "{w} took no work: {per_worker:?}"
        );
    }
    println!("3 workers: {per_worker:?}, {duplicates} duplicates");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    other.shutdown(Duration::from_secs(5)).await.unwrap();
    for mut w in workers {
        drop(w.stdin.take());
        assert!(w.wait().await.unwrap().success());
    }
    drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_handler_has_its_leases_taken_over() {
    let (schema, pool) = schema().await;
    let env = [("TXBUS_WORK_MS", "50"), ("TXBUS_LEASE_TTL_MS", "1500")];
    let mut victim = worker(&schema, "victim", &env).await;
    let survivor = worker(&schema, "survivor", &env).await;
    let bus = origin(&schema, Duration::from_millis(500)).await;
    let ops = load(&bus, 200, 10).await;
    // Kill the victim while it holds leases (handlers take 50 ms each).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, per_worker) = handled(&pool, &schema).await;
        if per_worker.get("victim").copied().unwrap_or(0) >= 5 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    victim.start_kill().unwrap();
    assert!(!victim.wait().await.unwrap().success());
    for (id, _) in &ops {
        let outcome = tokio::time::timeout(Duration::from_secs(120), bus.wait(*id))
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let (messages, duplicates, per_worker) = handled(&pool, &schema).await;
    assert_eq!(messages, ops.len(), "nothing lost");
    assert!(per_worker["survivor"] > 0);
    let leased: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT COUNT(*) FROM \"{schema}\".deliveries WHERE status IN (0, 1))
              + (SELECT COUNT(*) FROM \"{schema}\".commits WHERE inline_open <> 0)"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leased, 0, "nothing left pending or leased");
    println!("killed a worker: {per_worker:?}, {duplicates} duplicates");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(survivor);
    drop_schema(&pool, &schema).await;
}

/// Restarts the PostgreSQL server: run alone (`-E 'test(/pg_restart/)'`), never beside other
/// tests that use the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_restart_under_load_every_bus_reconnects_and_nothing_is_lost() {
    // The restart closes this pool's connections; the checks below use a new one.
    let (schema, _before_restart) = schema().await;
    let w1 = worker(&schema, "w1", &[("TXBUS_WORK_MS", "1")]).await;
    let w2 = worker(&schema, "w2", &[("TXBUS_WORK_MS", "1")]).await;
    let bus = Arc::new(origin(&schema, Duration::from_millis(500)).await);

    // Commit continuously from 8 tasks, counting what was acknowledged as committed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (bus, stop) = (bus.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut failed = 0u64;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let event = Event::new("job", json!({"task": t, "i": i}));
                let message = event.id().0;
                match bus.transact([event]).await {
                    Ok(op) => committed.push((op.id(), message)),
                    // During the restart commits fail: they wrote nothing, and are not counted.
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (committed, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let status = std::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version.to_str().unwrap(),
            "main",
            "restart",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctlcluster restart failed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut committed = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (c, f) = t.await.unwrap();
        committed.extend(c);
        failed += f;
    }
    for (id, _) in &committed {
        let outcome = tokio::time::timeout(Duration::from_secs(120), bus.wait(*id))
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    // Reconnect the checking pool too: the restart closed its connections.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url())
        .await
        .unwrap();
    let (messages, duplicates, _) = handled(&pool, &schema).await;
    assert_eq!(messages, committed.len(), "every committed message handled");
    println!(
        "pg restart: {} committed, {failed} refused during the restart, {duplicates} duplicates",
        committed.len()
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop((w1, w2));
    drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_s_late_acks_are_discarded_after_its_leases_were_taken_over() {
    let (schema, pool) = schema().await;
    let env = [
        ("TXBUS_WORK_MS", "200"),
        ("TXBUS_LEASE_TTL_MS", "1000"),
        ("RUST_LOG", "txbus_core=warn"),
    ];
    let mut victim = {
        let mut cmd = Command::new(CHILD);
        cmd.arg("pg-worker").arg(url()).arg(&schema).arg("victim");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    let mut ready = BufReader::new(victim.stdout.take().unwrap()).lines();
    assert_eq!(ready.next_line().await.unwrap().as_deref(), Some("ready"));
    let survivor = worker(&schema, "survivor", &env[..2]).await;
    let bus = origin(&schema, Duration::from_millis(500)).await;
    let ops = load(&bus, 100, 10).await;

    // Freeze the victim mid-handler (its handlers take 200 ms), so it holds leases it cannot
    // renew; the survivor takes them over once its heartbeat is older than the ttl.
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled(&pool, &schema)
        .await
        .2
        .get("victim")
        .copied()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the victim took no work");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = victim.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    for (id, _) in &ops {
        let outcome = tokio::time::timeout(Duration::from_secs(120), bus.wait(*id))
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    // Wake it: the attempts it was running finish now, and their acks must count for nothing.
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let mut log = BufReader::new(victim.stderr.take().unwrap()).lines();
    let discarded = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("this attempt's result was discarded") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(
        discarded,
        "the victim's late ack was not reported as discarded"
    );

    // Every operation succeeded exactly once in the store: no delivery left open, none counted twice.
    let open: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT COUNT(*) FROM \"{schema}\".deliveries WHERE status IN (0, 1))
              + (SELECT COUNT(*) FROM \"{schema}\".commits WHERE inline_open <> 0)"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    let remaining: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM \"{schema}\".commits WHERE op_status <> 1 OR op_remaining <> 0"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(remaining, 0, "an operation was counted wrong");
    let (messages, duplicates, per_worker) = handled(&pool, &schema).await;
    assert_eq!(messages, ops.len());
    println!("paused worker: {per_worker:?}, {duplicates} handled twice, late acks discarded");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop((victim, survivor));
    drop_schema(&pool, &schema).await;
}
