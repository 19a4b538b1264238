//! Losing connections: the writer lanes, the sealer and the listener reconnect by themselves,
//! and nothing committed is lost or sealed twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use txbus_core::chain;
use txbus_core::store::{
    Completion, CompletionEffect, DeliveryResult, Error, Notification, Notifications, Store,
};
use txbus_core::OperationId;

use common::{commit, options_named, terminate, wait_sealed, TestSchema};

const HANG: Duration = Duration::from_secs(30);

/// Waits for `wanted` on `notes`, skipping others.
async fn expect_notification(notes: &mut Notifications, wanted: &Notification) {
    tokio::time::timeout(HANG, async {
        while let Some(n) = notes.next().await {
            if &n == wanted {
                return;
            }
        }
        panic!("the notification stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted:?} within {HANG:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_sealer_and_listener_survive_the_loss_of_every_connection() {
    let schema = TestSchema::new();
    let app = schema.name.clone();
    let store = options_named(&schema.name, &app).connect().await.unwrap();
    let mut notes = store.notifications().unwrap();
    let owner = uuid::Uuid::now_v7();
    store.heartbeat(owner).await.unwrap();
    for n in 1..=5 {
        store.append(commit(n, None)).await.unwrap();
    }
    wait_sealed(&store, 5).await;

    let ended = terminate(&app).await;
    assert!(
        ended >= 3,
        "lanes, sealer and listener were connected; ended {ended}"
    );

    // Writes go on: a lane whose connection is gone runs its batch again on a new one.
    for n in 6..=10 {
        store.append(commit(n, None)).await.unwrap();
    }
    store.heartbeat(owner).await.unwrap();
    // The sealer reconnects and seals what came after.
    let log = wait_sealed(&store, 10).await;
    assert_eq!(log.len(), 10);
    assert!(chain::verify(&store).await.unwrap().is_intact());

    // Claims and reads use the pool, which replaces dead connections.
    let claimed = store
        .claim(owner, &["h".to_owned()], 100, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    // The listener reconnected: an operation finished now is announced.
    let last = &claimed[9];
    let effects = store
        .complete(vec![Completion {
            delivery_id: last.id,
            fence: last.fence,
            commit_id: last.commit_id,
            attempts: 1,
            handler: last.handler.as_str().into(),
            result: DeliveryResult::Succeeded,
        }])
        .await
        .unwrap();
    assert!(matches!(
        effects.as_slice(),
        [CompletionEffect::Applied(Some(_))]
    ));
    expect_notification(&mut notes, &Notification::Finished(last.operation_id)).await;

    // And once more, with work in flight in between.
    terminate(&app).await;
    store.append(commit(11, None)).await.unwrap();
    expect_notification(&mut notes, &Notification::Work).await;
    wait_sealed(&store, 11).await;
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_lost_under_load_lose_nothing_committed() {
    const TASKS: usize = 4;
    const EACH: usize = 60;
    let schema = TestSchema::new();
    let app = schema.name.clone();
    let store = Arc::new(options_named(&schema.name, &app).connect().await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut failed = 0usize;
            for n in 0..EACH {
                let c = commit((t * EACH + n) as u64, None);
                let op = c.operation_id;
                match store.append(c).await {
                    Ok(_) => ok.push(op),
                    // Cut off during COMMIT: told that the result is unknown.
                    Err(Error::Backend { .. }) => failed += 1,
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            (ok, failed)
        }));
    }
    // Sessions end again and again while the appends run.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        terminate(&app).await;
    }
    let mut committed: HashSet<OperationId> = HashSet::new();
    let mut failed = 0;
    for t in tasks {
        let (ok, f) = t.await.unwrap();
        committed.extend(ok);
        failed += f;
    }
    // An append whose COMMIT was cut off may or may not have been written; every one that
    // returned Ok was, and every written commit is sealed exactly once.
    let total = usize::try_from(store.stats().await.unwrap().commits).unwrap();
    assert!(total >= committed.len());
    assert!(total <= committed.len() + failed);
    let log = wait_sealed(store.as_ref(), total).await;
    assert_eq!(log.len(), total);
    let positions: Vec<u64> = log.iter().map(|c| c.position).collect();
    assert_eq!(positions, (1..=total as u64).collect::<Vec<_>>());
    let sealed: HashSet<OperationId> = log.iter().map(|c| c.operation_id).collect();
    assert_eq!(sealed.len(), total);
    assert!(committed.is_subset(&sealed));
    let report = chain::verify(store.as_ref()).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_seals_while_one_is_cut_off() {
    let schema = TestSchema::new();
    let (app_a, app_b) = (format!("{}_a", schema.name), format!("{}_b", schema.name));
    let a = options_named(&schema.name, &app_a).connect().await.unwrap();
    let b = options_named(&schema.name, &app_b).connect().await.unwrap();
    for n in 1..=4 {
        a.append(commit(n, None)).await.unwrap();
        b.append(commit(n, None)).await.unwrap();
    }
    wait_sealed(&b, 8).await;
    // Whichever sealer was active, cutting A off leaves the chain moving.
    terminate(&app_a).await;
    for n in 5..=8 {
        b.append(commit(n, None)).await.unwrap();
        a.append(commit(n, None)).await.unwrap();
    }
    let log = wait_sealed(&a, 16).await;
    assert_eq!(log.len(), 16);
    assert!(chain::verify(&a).await.unwrap().is_intact());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A TCP forwarder to the server that can go down and come back on the same port: a server
/// restart (or a network outage) seen from the store, without disturbing other tests.
struct Proxy {
    port: u16,
    tasks: tokio::task::JoinSet<()>,
}

impl Proxy {
    async fn start(port: u16) -> Self {
        let target: sqlx::postgres::PgConnectOptions = common::url().parse().unwrap();
        let upstream = format!("{}:{}", target.get_host(), target.get_port());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = tokio::task::JoinSet::new();
        let conns = Arc::new(tokio::sync::Mutex::new(tokio::task::JoinSet::new()));
        let held = Arc::clone(&conns);
        tasks.spawn(async move {
            // Dropping the connection tasks (when this task is aborted) cuts every session.
            let _held = held;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                conns.lock().await.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, tasks }
    }

    /// Refuses new connections and cuts the open ones.
    async fn stop(mut self) -> u16 {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_comes_back_after_the_server_was_unreachable() {
    let schema = TestSchema::new();
    let proxy = Proxy::start(0).await;
    let target: sqlx::postgres::PgConnectOptions = common::url().parse().unwrap();
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}",
        target.get_username(),
        proxy.port,
        target.get_database().unwrap_or("test")
    );
    let store = txbus_postgres::PostgresOptions::new(url)
        .schema(&schema.name)
        .max_connections(4)
        .writer_lanes(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let mut notes = store.notifications().unwrap();
    for n in 1..=5 {
        store.append(commit(n, None)).await.unwrap();
    }
    wait_sealed(&store, 5).await;

    // The server goes away: calls fail, nothing hangs.
    let port = proxy.stop().await;
    let down = tokio::time::timeout(HANG, store.append(commit(6, None)))
        .await
        .unwrap();
    assert!(matches!(down, Err(Error::Backend { .. })), "{down:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // It comes back: appends, sealing, claims and notifications work again by themselves.
    let _proxy = Proxy::start(port).await;
    let deadline = tokio::time::Instant::now() + HANG;
    let mut appended = 5;
    while appended < 10 {
        match store.append(commit(appended as u64 + 1, None)).await {
            Ok(_) => appended += 1,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "still failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let log = wait_sealed(&store, 10).await;
    assert_eq!(log.len(), 10);
    assert!(chain::verify(&store).await.unwrap().is_intact());
    expect_notification(&mut notes, &Notification::Work).await;
    let owner = uuid::Uuid::now_v7();
    let claimed = store
        .claim(owner, &["h".to_owned()], 100, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    let c = &claimed[0];
    store
        .complete(vec![Completion {
            delivery_id: c.id,
            fence: c.fence,
            commit_id: c.commit_id,
            attempts: 1,
            handler: c.handler.as_str().into(),
            result: DeliveryResult::Succeeded,
        }])
        .await
        .unwrap();
    expect_notification(&mut notes, &Notification::Finished(c.operation_id)).await;
    store.close().await.unwrap();
}
