//! Idempotency keys on a real SQLite store: claim, replay, mismatch, in progress, release,
//! expiry and pruning, the response limit, a claim lost to its lock TTL, and a key held by a
//! process killed with SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{within, TestBus};
use txbus_cqrs::idempotency::{
    Begin, Completion, Error, Fingerprint, Idempotency, Options, StoredResponse,
};

fn fingerprint(body: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", body.as_bytes())
}

fn claim(begin: Begin) -> txbus_cqrs::idempotency::Claim {
    match begin {
        Begin::Run(claim) => claim,
        Begin::Replay(r) => panic!("expected to run, got a replay of {r:?}"),
    }
}

fn replayed(begin: Begin) -> StoredResponse {
    match begin {
        Begin::Replay(r) => r,
        Begin::Run(c) => panic!("expected a replay, got a claim of {:?}", c.key()),
    }
}

#[tokio::test]
async fn first_request_runs_and_a_repeat_replays_its_response() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    let first = claim(keys.begin("k1", fingerprint("a")).await.unwrap());
    let response =
        StoredResponse::new(201, &b"{\"id\":7}"[..]).header("content-type", "application/json");
    assert_eq!(first.complete(&response).await.unwrap(), Completion::Stored);

    let again = replayed(keys.begin("k1", fingerprint("a")).await.unwrap());
    assert_eq!(again, response);
    // Another key is independent.
    drop(claim(keys.begin("k2", fingerprint("a")).await.unwrap()));
    t.stop().await;
}

#[tokio::test]
async fn same_key_with_another_payload_is_a_mismatch_running_or_done() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    let running = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    let err = keys.begin("k", fingerprint("b")).await.unwrap_err();
    assert!(
        matches!(err, Error::Mismatch { ref key } if key == "k"),
        "{err}"
    );
    running
        .complete(&StoredResponse::new(200, "ok"))
        .await
        .unwrap();
    let err = keys.begin("k", fingerprint("b")).await.unwrap_err();
    assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    t.stop().await;
}

#[tokio::test]
async fn a_repeat_while_the_first_runs_is_in_progress() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    let running = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    let err = keys.begin("k", fingerprint("a")).await.unwrap_err();
    assert!(
        matches!(err, Error::InProgress { ref key } if key == "k"),
        "{err}"
    );
    running
        .complete(&StoredResponse::new(200, "ok"))
        .await
        .unwrap();
    assert_eq!(
        replayed(keys.begin("k", fingerprint("a")).await.unwrap()).body,
        "ok"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_released_or_dropped_claim_lets_a_repeat_run() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    let first = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    first.release().await.unwrap();
    let second = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    drop(second); // a cancelled request: released in the background
    within(async {
        loop {
            match keys.begin("k", fingerprint("a")).await {
                Ok(begin) => break claim(begin),
                Err(Error::InProgress { .. }) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .complete(&StoredResponse::new(200, "third"))
    .await
    .unwrap();
    t.stop().await;
}

#[tokio::test]
async fn invalid_keys_are_refused() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    for bad in ["", "line\nbreak", &"x".repeat(256)] {
        let err = keys.begin(bad, fingerprint("a")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad:?}: {err}");
    }
    t.stop().await;
}

#[tokio::test]
async fn a_response_above_the_limit_is_not_stored_and_the_key_is_released() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default().max_response_bytes(8));
    let first = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    let completion = first
        .complete(&StoredResponse::new(200, "123456789"))
        .await
        .unwrap();
    assert_eq!(completion, Completion::TooLarge { bytes: 9, limit: 8 });
    // Nothing stored: the repeat runs again, and a response within the limit is kept.
    let second = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    assert_eq!(
        second
            .complete(&StoredResponse::new(200, "12345678"))
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        replayed(keys.begin("k", fingerprint("a")).await.unwrap()).body,
        "12345678"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_stored_response_expires_after_its_ttl_and_prune_removes_it() {
    let t = TestBus::new().await;
    let ttl = Duration::from_millis(300);
    let keys = Idempotency::new(
        t.bus.clone(),
        Options::default().ttl(ttl).prefix("idem-ttl/"),
    );
    claim(keys.begin("k", fingerprint("a")).await.unwrap())
        .complete(&StoredResponse::new(200, "one"))
        .await
        .unwrap();
    assert_eq!(t.bus.kv_scan("idem-ttl/", None, 10).await.unwrap().len(), 1);
    // The entry was written before `complete` returned, so it has expired once the TTL has
    // passed from here.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let again = claim(keys.begin("k", fingerprint("b")).await.unwrap());
    again.release().await.unwrap();
    // Expired rows stay until the store prunes them; release deleted ours, so write another.
    claim(keys.begin("k2", fingerprint("a")).await.unwrap())
        .complete(&StoredResponse::new(200, "two"))
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let report = t.bus.prune().await.unwrap();
    assert!(report.expired_keys >= 1, "{report:?}");
    assert!(t
        .bus
        .kv_scan("idem-ttl/", None, 10)
        .await
        .unwrap()
        .is_empty());
    t.stop().await;
}

#[tokio::test]
async fn a_claim_that_outlives_its_lock_ttl_is_taken_over_and_cannot_overwrite() {
    let t = TestBus::new().await;
    let lock_ttl = Duration::from_millis(200);
    let keys = Idempotency::new(t.bus.clone(), Options::default().lock_ttl(lock_ttl));
    let slow = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    tokio::time::sleep(lock_ttl + Duration::from_millis(50)).await;
    let retry = claim(keys.begin("k", fingerprint("a")).await.unwrap());
    let err = slow
        .complete(&StoredResponse::new(200, "slow"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    retry
        .complete(&StoredResponse::new(200, "retry"))
        .await
        .unwrap();
    assert_eq!(
        replayed(keys.begin("k", fingerprint("a")).await.unwrap()).body,
        "retry"
    );
    t.stop().await;
}

#[tokio::test]
async fn scopes_keep_keys_apart() {
    let t = TestBus::new().await;
    let keys = Idempotency::new(t.bus.clone(), Options::default());
    let a = claim(keys.scoped("a").begin("k", fingerprint("x")).await.unwrap());
    let b = claim(keys.scoped("b").begin("k", fingerprint("y")).await.unwrap());
    a.release().await.unwrap();
    b.release().await.unwrap();
    t.stop().await;
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CHILD_DIR: &str = "TXBUS_CQRS_CHILD_DIR";
const CHILD_LOCK_TTL: Duration = Duration::from_secs(3);

/// In the child: claim a key, say so, and hang until killed. In the parent: kill the child
/// with SIGKILL while it holds the key; the key stays in progress until its lock TTL runs
/// out, then a repeat runs.
#[tokio::test]
async fn a_key_held_by_a_killed_process_is_claimable_after_the_lock_ttl() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let bus = common::open(std::path::Path::new(&dir)).await;
        let keys = Idempotency::new(bus, Options::default().lock_ttl(CHILD_LOCK_TTL));
        // The time before the claim: the claim expires no earlier than this plus its TTL.
        let before = txbus_core::time::now_ms();
        let held = claim(keys.begin("crash", fingerprint("a")).await.unwrap());
        println!("claimed {before}");
        std::future::pending::<()>().await;
        drop(held);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_key_held_by_a_killed_process_is_claimable_after_the_lock_ttl",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    // The test harness prints the test's name on the same line, before our output.
    let claimed_at: i64 = within(tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split("claimed ")
                    .nth(1)
                    .map(|ms| ms.trim().parse().unwrap())
            })
            .expect("the child claims the key")
    }))
    .await
    .unwrap();
    child.0.kill().unwrap(); // SIGKILL
    assert!(!child.0.wait().unwrap().success());

    let bus = common::open(dir.path()).await;
    let keys = Idempotency::new(bus.clone(), Options::default().lock_ttl(CHILD_LOCK_TTL));
    let lock_expiry = claimed_at + CHILD_LOCK_TTL.as_millis() as i64;
    // Well before the lock TTL, the dead process's claim holds.
    if txbus_core::time::now_ms() + 500 < lock_expiry {
        let err = keys.begin("crash", fingerprint("a")).await.unwrap_err();
        assert!(matches!(err, Error::InProgress { .. }), "{err}");
    }
    let resumed = within(async {
        loop {
            match keys.begin("crash", fingerprint("a")).await {
                Ok(begin) => break claim(begin),
                Err(Error::InProgress { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(
        txbus_core::time::now_ms() >= lock_expiry,
        "the key was claimed again before the dead process's lock expired"
    );
    resumed
        .complete(&StoredResponse::new(200, "done"))
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
