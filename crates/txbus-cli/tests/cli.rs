//! The real `txbus` binary against real stores: an embedded store held by a running bus, and
//! PostgreSQL; with real sagas on both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use txbus_core::{Backoff, Batch, Bus, Event, HandlerError, KvWrite, Message, On, Store};
use txbus_saga::{Saga, SagaStatus, Sagas, Step, StepContext};

const BIN: &str = env!("CARGO_BIN_EXE_txbus");

fn txbus(store: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("TXBUS_STORE")
        .output()
        .expect("run txbus")
}

/// Runs a command that must succeed with `--json`; returns each line of its output as JSON.
fn json_lines(store: &str, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = txbus(store, &all);
    assert!(
        out.status.success(),
        "txbus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn one(store: &str, args: &[&str]) -> Value {
    let mut lines = json_lines(store, args);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines.pop().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A bus with a handler that succeeds and one that always fails (dead letters after one
/// retry), loaded with `ok` good operations and `bad` failing ones.
async fn loaded_bus(store: impl Store, ok: usize, bad: usize) -> (Bus, Vec<String>) {
    let bus = Bus::builder()
        .store(store)
        .max_retries(1)
        .backoff(Backoff::fixed(Duration::from_millis(5)))
        .handler("cli-ok", On::event("cli.ok"), |_m: Message| async {
            Ok(())
        })
        .handler("cli-failing", On::event("cli.bad"), |_m: Message| async {
            Err(HandlerError::transient("the printer is on fire"))
        })
        .build()
        .await
        .unwrap();
    let mut failed = Vec::new();
    for i in 0..ok {
        let op = bus
            .transact([Event::new("cli.ok", json!({"i": i})).module("cli")])
            .await
            .unwrap();
        assert!(op.outcome().await.unwrap().is_ok());
    }
    for i in 0..bad {
        let op = bus
            .transact([Event::new("cli.bad", json!({"i": i}))])
            .await
            .unwrap();
        failed.push(op.id().to_string());
        assert!(!op.outcome().await.unwrap().is_ok());
    }
    bus.kv_write(vec![
        KvWrite::put(txbus_relay_key("to-nats"), b"3".to_vec()),
        KvWrite::put(
            "projection/balances/checkpoint",
            br#"{"position":4}"#.to_vec(),
        ),
    ])
    .await
    .unwrap();
    (bus, failed)
}

fn txbus_relay_key(name: &str) -> String {
    format!("relay/{name}/checkpoint")
}

/// Checks every reading command on a store with the bus start (a system commit), then 5 good
/// and 2 failed operations.
fn check_reads(store: &str, failed: &[String]) {
    let status = one(store, &["status"]);
    assert_eq!(status["commits"], 8, "{status}");
    let handlers = status["handlers"].as_array().unwrap();
    let failing = handlers
        .iter()
        .find(|h| h["handler"] == "cli-failing")
        .unwrap();
    assert_eq!(failing["dead"], 2, "{status}");
    assert_eq!(failing["retried"], 2, "{status}");
    let ok = handlers.iter().find(|h| h["handler"] == "cli-ok").unwrap();
    assert_eq!(ok["succeeded"], 5, "{status}");
    assert_eq!(status["deliveries"]["dead"], 2, "{status}");
    assert_eq!(status["deliveries"]["succeeded"], 5, "{status}");
    assert_eq!(status["pending_operations"], 0, "{status}");

    let ops = one(store, &["ops", "list", "-n", "3"]);
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), 3);
    assert_eq!(
        ops[0]["operation_id"],
        failed[1].as_str(),
        "newest first: {ops:?}"
    );
    assert_eq!(ops[0]["status"], "failed");
    assert_eq!(ops[2]["status"], "succeeded");
    assert_eq!(ops[2]["events"], json!(["cli.ok"]));

    let shown = one(store, &["ops", "show", &failed[0]]);
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["error"]["handler"], "cli-failing");
    assert_eq!(shown["error"]["kind"], "retries_exhausted", "{shown}");
    let delivery = &shown["detail"]["events"][0]["deliveries"][0];
    assert_eq!(delivery["handler"], "cli-failing", "{shown}");
    assert_eq!(delivery["status"], "dead", "{shown}");
    let text = txbus(store, &["ops", "show", &failed[0]]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("the printer is on fire"), "{text}");
    assert!(text.contains("└ cli-failing"), "{text}");

    let dead = one(store, &["dlq", "list"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["handler"], "cli-failing");
    assert_eq!(dead[0]["attempts"], 2);
    let id = dead[0]["delivery_id"].as_i64().unwrap().to_string();
    let letter = one(store, &["dlq", "show", &id]);
    assert_eq!(letter["payload"], json!({"i": 0}));
    assert_eq!(letter["error"], "the printer is on fire");
    let only = one(store, &["dlq", "list", "--handler", "cli-ok"]);
    assert_eq!(only, json!([]));

    let log = json_lines(store, &["log", "tail", "-n", "3"]);
    let positions: Vec<_> = log
        .iter()
        .map(|c| c["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, vec![6, 7, 8]);
    assert_eq!(log[0]["kind"], "transact");
    assert_eq!(log[0]["events"][0]["module"], "cli");

    // The bus's start is a system commit, shown as such.
    let whole = json_lines(store, &["log", "tail", "-n", "8"]);
    assert_eq!(whole[0]["position"], 1);
    assert_eq!(whole[0]["kind"], "system", "{}", whole[0]);
    assert_eq!(whole[0]["events"][0]["event_type"], "txbus.started");
    assert_eq!(whole[0]["events"][0]["module"], "txbus");
    assert!(whole[1..].iter().all(|c| c["kind"] == "transact"));
    let text = String::from_utf8(txbus(store, &["log", "tail", "-n", "8"]).stdout).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.contains(" system ") && first.contains("txbus/txbus.started"),
        "{text}"
    );

    let verify = one(store, &["verify"]);
    assert_eq!(
        verify,
        json!({
            "intact": true,
            "verified": 8,
            "signatures_checked": false,
            "signatures": 0,
            "signed_through": null,
            "first_broken": null
        })
    );

    assert_eq!(
        one(store, &["relays"]),
        json!([{"name": "to-nats", "checkpoint": 3, "lag": 5}])
    );
    assert_eq!(
        one(store, &["projections"]),
        json!([{"name": "balances", "checkpoint": 4, "lag": 4}])
    );
    assert_eq!(one(store, &["sagas"]), json!([]));

    let missing = txbus(
        store,
        &["ops", "show", "01a200b8-fcf8-7760-a1d8-ad67d6ae4f43"],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("unknown here"),
        "{}",
        stderr(&missing)
    );
    let bad_id = txbus(store, &["ops", "show", "nope"]);
    assert!(
        stderr(&bad_id).contains("is not a UUID"),
        "{}",
        stderr(&bad_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_held_by_a_running_bus() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.db");
    let store = format!("sqlite:{}", path.display());
    let (bus, failed) = loaded_bus(txbus_sqlite::SqliteStore::open(&path).unwrap(), 5, 2).await;

    // Reading works while the bus holds the file.
    tokio::task::spawn_blocking({
        let (store, failed) = (store.clone(), failed.clone());
        move || check_reads(&store, &failed)
    })
    .await
    .unwrap();

    // Human text, too.
    let out = txbus(&store, &["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("commits             8"), "{text}");

    // Writing is refused, with what to do.
    let dead = one(&store, &["dlq", "list"]);
    let id = dead[0]["delivery_id"].as_i64().unwrap().to_string();
    let refused = txbus(&store, &["dlq", "replay", &id]);
    assert_eq!(refused.status.code(), Some(2));
    let why = stderr(&refused);
    assert!(
        why.contains("held by a running process") && why.contains("stop that process"),
        "{why}"
    );

    // `log tail --follow` prints commits made after it started.
    assert_eq!(json_lines(&store, &["log", "tail", "-n", "1"]).len(), 1);
    let mut follower = tokio::process::Command::new(BIN)
        .args([
            "--store", &store, "log", "tail", "-n", "1", "--follow", "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    async fn next_line(
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    ) -> String {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("a line from the follower")
            .unwrap()
            .expect("the follower is still running")
    }
    // It prints the last commit first: then it is following.
    let first = next_line(&mut lines).await;
    assert!(first.contains("\"position\":8"), "{first}");
    let mut ids = Vec::new();
    for i in 0..2 {
        let op = bus
            .transact([Event::new("cli.ok", json!({"late": i}))])
            .await
            .unwrap();
        ids.push(op.id().to_string());
    }
    for id in &ids {
        let line = next_line(&mut lines).await;
        let commit: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(commit["operation_id"], id.as_str(), "{line}");
    }
    follower.kill().await.unwrap();

    // Once the bus is gone, replay works; the dead letter is pending again.
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    // Its shutdown is the last commit: a system commit too.
    let stopped = one(&store, &["log", "tail", "-n", "1"]);
    assert_eq!(stopped["kind"], "system", "{stopped}");
    assert_eq!(stopped["events"][0]["event_type"], "txbus.stopped");
    let replayed = one(&store, &["dlq", "replay", &id]);
    assert_eq!(replayed["replayed"], json!([id.parse::<i64>().unwrap()]));
    let status = one(&store, &["status"]);
    assert_eq!(status["deliveries"]["dead"], 1, "{status}");
    assert_eq!(status["deliveries"]["pending"], 1, "{status}");
    // Discarding needs the store too: refused while a bus holds it, shown above for replay.
    let other = one(&store, &["dlq", "list"])[0]["delivery_id"]
        .as_i64()
        .unwrap();
    let discarded = one(&store, &["dlq", "discard", &other.to_string()]);
    assert_eq!(discarded["discarded"], json!([other]));
    assert_eq!(one(&store, &["dlq", "list"]), json!([]));
    let again = txbus(&store, &["dlq", "replay", &id]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stdout).contains("is not a dead letter"));

    // An edited commit: verify says where, and exits 1.
    {
        let conn = rusqlite_open(&path);
        conn.execute(
            "UPDATE messages SET payload = '{\"i\":99}' WHERE position = 4",
            [],
        )
        .unwrap();
    }
    let broken = txbus(&store, &["verify"]);
    assert_eq!(broken.status.code(), Some(1));
    let text = String::from_utf8(broken.stdout).unwrap();
    assert!(
        text.contains("BROKEN at position 4") && text.contains("edited"),
        "{text}"
    );
}

/// Sagas of type `fulfilment`: `reserve` (undone by a release), then `charge`, which rejects a
/// declined card.
fn fulfilment() -> Sagas {
    let saga = Saga::builder("fulfilment")
        .step(
            Step::action("reserve", |ctx: StepContext| async move {
                Ok(json!({"reservation": format!("r-{}", ctx.saga_id())}))
            })
            .compensate(|_ctx: StepContext| async { Ok(()) }),
        )
        .step(Step::action("charge", |ctx: StepContext| async move {
            if ctx.input_json()["card"] == "declined" {
                return Err(HandlerError::reject("card declined by the issuer"));
            }
            Ok(json!({"payment": "p-1"}))
        }))
        .build()
        .unwrap();
    Sagas::builder().saga(saga).build().unwrap()
}

/// A bus running the `fulfilment` sagas on `store`, with one saga completed and one failed
/// (its reservation compensated); returns their ids.
async fn saga_bus(store: impl Store) -> (Bus, String, String) {
    let sagas = fulfilment();
    let bus = sagas
        .install(
            Bus::builder()
                .store(store)
                .backoff(Backoff::fixed(Duration::from_millis(5))),
        )
        .build()
        .await
        .unwrap();
    let runtime = sagas.attach(bus.clone());
    let mut ids = Vec::new();
    for (card, status) in [
        ("visa", SagaStatus::Completed),
        ("declined", SagaStatus::Failed),
    ] {
        let id = runtime
            .start("fulfilment", json!({ "card": card }))
            .await
            .unwrap();
        let state = tokio::time::timeout(Duration::from_secs(60), runtime.wait(&id))
            .await
            .expect("the saga settles")
            .unwrap();
        assert_eq!(state.status, status);
        ids.push(id.as_str().to_owned());
    }
    let failed = ids.pop().unwrap();
    (bus, ids.pop().unwrap(), failed)
}

/// The kinds of change of a saga's history as `sagas show --json` prints it.
fn changes(history: &Value) -> Vec<String> {
    history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["change"]["change"].as_str().unwrap().to_owned())
        .collect()
}

/// `sagas`, `sagas --status S` and `sagas show ID` on a store holding the sagas of
/// [`saga_bus`]; `first` comes before the command (such as `--schema S`).
fn check_sagas(store: &str, first: &[&str], completed: &str, failed: &str) {
    let args = |rest: &[&str]| -> Vec<String> {
        first.iter().chain(rest).map(|s| (*s).to_owned()).collect()
    };
    let run = |rest: &[&str]| {
        let a = args(rest);
        one(store, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let raw = |rest: &[&str]| {
        let a = args(rest);
        txbus(store, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let done = run(&["sagas", "--status", "completed"]);
    assert_eq!(done.as_array().unwrap().len(), 1, "{done}");
    assert_eq!(done[0]["id"], completed, "{done}");
    assert_eq!(done[0]["saga_type"], "fulfilment");
    assert_eq!(done[0]["status"], "completed");
    let gone = run(&["sagas", "--status", "failed"]);
    assert_eq!(gone.as_array().unwrap().len(), 1, "{gone}");
    assert_eq!(gone[0]["id"], failed, "{gone}");
    assert_eq!(gone[0]["status"], "failed");
    assert_eq!(gone[0]["step"], "charge", "{gone}");
    assert!(
        gone[0]["error"]
            .as_str()
            .unwrap()
            .contains("card declined by the issuer"),
        "{gone}"
    );
    assert_eq!(run(&["sagas", "--status", "running"]), json!([]));
    let all = run(&["sagas"]);
    let mut listed: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut want = vec![completed, failed];
    want.sort_unstable();
    assert_eq!(listed, want, "{all}");
    let text = String::from_utf8(raw(&["sagas", "--status", "failed"]).stdout).unwrap();
    assert!(
        text.contains(failed)
            && text.contains("fulfilment")
            && text.contains("charge: step \"charge\" failed: card declined by the issuer"),
        "{text}"
    );
    let unknown = raw(&["sagas", "--status", "lost"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("unknown saga status \"lost\""),
        "{}",
        stderr(&unknown)
    );

    let history = run(&["sagas", "show", failed]);
    assert_eq!(history["saga"], failed);
    assert_eq!(
        changes(&history),
        [
            "started",
            "step-requested",
            "step-completed",
            "step-requested",
            "step-failed",
            "compensating",
            "compensated",
            "failed"
        ],
        "{history}"
    );
    let versions: Vec<u64> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    assert_eq!(
        history["history"][0]["change"]["input"],
        json!({"card": "declined"})
    );
    assert_eq!(
        changes(&run(&["sagas", "show", completed])),
        [
            "started",
            "step-requested",
            "step-completed",
            "step-requested",
            "step-completed",
            "completed"
        ]
    );
    let text = String::from_utf8(raw(&["sagas", "show", failed]).stdout).unwrap();
    assert!(text.starts_with(&format!("saga {failed}\n")), "{text}");
    assert!(text.contains("card declined by the issuer"), "{text}");
    let missing = raw(&["sagas", "show", "no-such-saga"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("has no history here"),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sagas_by_status_and_their_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sagas.db");
    let store = format!("sqlite:{}", path.display());
    let (bus, completed, failed) = saga_bus(txbus_sqlite::SqliteStore::open(&path).unwrap()).await;
    // Read beside the running bus, as an operator would.
    tokio::task::spawn_blocking(move || check_sagas(&store, &[], &completed, &failed))
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `txbus verify` with `args` and `--json`; returns its exit code and report.
fn verify_json(store: &str, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = txbus(store, &all);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?} / {}", out.stdout, stderr(&out)));
    (out.status.code(), report)
}

/// Rewrites the payload of the commit at `position` and recomputes every data and chain hash
/// from there on, as someone who can write the file but does not hold the signing key would:
/// the hashes verify again, the signatures cannot.
async fn rewrite_history(path: &Path, position: u64, payload: &str) {
    let reader = txbus_sqlite::SqliteStore::open_read_only(path).unwrap();
    let mut commits = reader.read_chain(0, 10_000).await.unwrap();
    reader.close().await.unwrap();
    let conn = rusqlite_open(path);
    let mut parent = txbus_core::chain::GENESIS;
    for c in &mut commits {
        if c.position == position {
            c.messages[0].payload_json = payload.to_owned();
            conn.execute(
                "UPDATE messages SET payload = ?1 WHERE position = ?2 AND idx = 0",
                rusqlite::params![payload, position as i64],
            )
            .unwrap();
        }
        if c.position >= position {
            let data = txbus_core::chain::data_hash(
                &c.operation_id.0,
                c.kind,
                c.created_at_ms,
                c.messages.iter().map(txbus_core::store::LogMessage::from),
                &c.kv,
            );
            let chain = txbus_core::chain::chain_hash(&data, &parent);
            conn.execute(
                "UPDATE commits SET data_hash = ?1, chain_hash = ?2 WHERE position = ?3",
                rusqlite::params![data.to_vec(), chain.to_vec(), c.position as i64],
            )
            .unwrap();
            c.chain_hash = chain;
        }
        parent = c.chain_hash;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_signatures_with_the_public_keys_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signed.db");
    let store = format!("sqlite:{}", path.display());
    let signer = txbus_core::CommitSigner::from_bytes("ops-1", &[7u8; 32]).unwrap();
    let public = hex(signer.verifying_key().as_bytes());
    let other = txbus_core::CommitSigner::from_bytes("ops-1", &[8u8; 32]).unwrap();
    let wrong = hex(other.verifying_key().as_bytes());
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(&path).unwrap())
        .signing_key(signer)
        .build()
        .await
        .unwrap();
    for i in 0..5 {
        bus.transact([Event::new("cli.signed", json!({"i": i}))])
            .await
            .unwrap();
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    // Start, five transacts, shutdown.
    let head = 7;

    let result = tokio::task::spawn_blocking({
        let (store, path, dir) = (store.clone(), path.clone(), dir.path().to_owned());
        move || {
            let key = format!("ops-1={public}");
            let (code, report) = verify_json(&store, &["--public-key", &key]);
            assert_eq!(code, Some(0), "{report}");
            assert_eq!(report["intact"], true);
            assert_eq!(report["verified"], head);
            assert_eq!(report["signatures_checked"], true);
            assert_eq!(report["signed_through"], head, "{report}");
            assert!(report["signatures"].as_u64().unwrap() >= 1, "{report}");

            // A key file, with a retired key and a comment, and signatures required.
            let file = dir.join("keys.txt");
            std::fs::write(
                &file,
                format!("# keys that ever signed this log\nops-0 = {wrong}\nops-1={public}  # current\n"),
            )
            .unwrap();
            let (code, report) = verify_json(
                &store,
                &["--keys", file.to_str().unwrap(), "--require-signatures"],
            );
            assert_eq!(code, Some(0), "{report}");
            assert_eq!(report["signed_through"], head);
            let text = txbus(&store, &["verify", "--public-key", &key]);
            let text = String::from_utf8(text.stdout).unwrap();
            assert!(
                text.contains("7 commits verified") && text.contains("signed through position 7"),
                "{text}"
            );

            // The wrong public key under the signing key's id: the first signed commit fails.
            let (code, report) =
                verify_json(&store, &["--public-key", &format!("ops-1={wrong}")]);
            assert_eq!(code, Some(1), "{report}");
            let broken = &report["first_broken"];
            assert_eq!(broken["kind"], "bad_signature", "{report}");
            assert_eq!(broken["key_id"], "ops-1");
            assert_eq!(broken["position"], 1, "{report}");
            assert!(broken["operation_id"].is_string(), "{report}");
            assert!(
                broken["reason"].as_str().unwrap().contains("does not verify"),
                "{report}"
            );
            // Only other keys: the signing key is unknown, and named.
            let (code, report) =
                verify_json(&store, &["--public-key", &format!("ops-9={public}")]);
            assert_eq!(code, Some(1), "{report}");
            assert_eq!(report["first_broken"]["kind"], "unknown_key", "{report}");
            assert_eq!(report["first_broken"]["key_id"], "ops-1");
            // Requiring signatures without keys is a usage error.
            let out = txbus(&store, &["verify", "--require-signatures"]);
            assert_eq!(out.status.code(), Some(2));
            assert!(stderr(&out).contains("--public-key"), "{}", stderr(&out));
            let out = txbus(&store, &["verify", "--public-key", "ops-1=abc"]);
            assert_eq!(out.status.code(), Some(2));
            assert!(stderr(&out).contains("64 hex digits"), "{}", stderr(&out));
            (store, path, key)
        }
    })
    .await;
    let (store, path, key) = result.unwrap();

    // History rewritten at commit 3 with every hash recomputed: hashes alone see nothing, the
    // signature of commit 3 no longer matches.
    rewrite_history(&path, 3, r#"{"i":1000}"#).await;
    let (store2, key2) = (store.clone(), key.clone());
    tokio::task::spawn_blocking(move || {
        let (code, report) = verify_json(&store2, &[]);
        assert_eq!(code, Some(0), "hashes alone are fooled: {report}");
        let (code, report) = verify_json(&store2, &["--public-key", &key2]);
        assert_eq!(code, Some(1), "{report}");
        let broken = &report["first_broken"];
        assert_eq!(broken["position"], 3, "{report}");
        assert_eq!(broken["kind"], "bad_signature");
        assert_eq!(report["verified"], 2);
        assert_eq!(report["signed_through"], 2, "{report}");
        let out = txbus(&store2, &["verify", "--public-key", &key2]);
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("BROKEN at position 3 (operation ")
                && text.contains("signature by key \"ops-1\" does not verify"),
            "{text}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_list_show_and_follow_their_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.db");
    let store = format!("sqlite:{}", path.display());
    let bus = Bus::builder()
        .store(txbus_sqlite::SqliteStore::open(&path).unwrap())
        .build()
        .await
        .unwrap();
    let row = |n: u64| Event::new("row.imported", json!({"row": n}));
    // A finished batch.
    Batch::new(bus.clone(), "import-a")
        .chunk_size(10)
        .total(50)
        .run(move |from| (from..50).map(row))
        .await
        .unwrap();
    // One that stops at a bad row: three chunks are in, the fourth failed.
    let failed = Batch::new(bus.clone(), "import-b")
        .chunk_size(10)
        .total(100)
        .run(move |from| {
            (from..100).map(move |n| {
                if n == 35 {
                    Event::new("", json!({"row": n}))
                } else {
                    row(n)
                }
            })
        })
        .await;
    assert!(failed.is_err());

    let checks = tokio::task::spawn_blocking({
        let store = store.clone();
        move || {
            let list = one(&store, &["batches"]);
            let list = list.as_array().unwrap();
            assert_eq!(list.len(), 2, "{list:?}");
            assert_eq!(list[0]["name"], "import-a");
            assert_eq!(list[0]["done"], 50);
            assert_eq!(list[0]["finished"], true);
            assert_eq!(list[0]["percent"], 100.0);
            assert_eq!(list[1]["name"], "import-b");
            assert_eq!(list[1]["done"], 30);
            assert_eq!(list[1]["total"], 100);
            assert_eq!(list[1]["chunks"], 3);
            assert_eq!(list[1]["finished"], false);
            assert_eq!(list[1]["percent"], 30.0);
            let paged = one(&store, &["batches", "--after", "import-a"]);
            assert_eq!(paged.as_array().unwrap().len(), 1);
            assert_eq!(paged[0]["name"], "import-b");
            let shown = one(&store, &["batches", "show", "import-b"]);
            assert_eq!(
                (shown["done"].as_u64(), shown["finished"].as_bool()),
                (Some(30), Some(false))
            );
            let text = String::from_utf8(txbus(&store, &["batches"]).stdout).unwrap();
            let b = text.lines().find(|l| l.starts_with("import-b")).unwrap();
            assert!(b.contains("30.0") && b.contains("unfinished"), "{text}");
            let text =
                String::from_utf8(txbus(&store, &["batches", "show", "import-a"]).stdout).unwrap();
            assert!(
                text.contains("done      50 of 50 (100.0 %)") && text.contains("finished"),
                "{text}"
            );
            let missing = txbus(&store, &["batches", "show", "import-z"]);
            assert_eq!(missing.status.code(), Some(2));
            assert!(
                stderr(&missing).contains("no batch \"import-z\""),
                "{}",
                stderr(&missing)
            );
            // Following a finished batch prints it once and ends.
            let done = json_lines(&store, &["batches", "show", "import-a", "--follow"]);
            assert_eq!(done.len(), 1);
        }
    })
    .await;
    checks.unwrap();

    // Following the unfinished one while it resumes: where it stands, then each change, until
    // it is finished.
    let mut follower = tokio::process::Command::new(BIN)
        .args([
            "--store", &store, "batches", "show", "import-b", "--follow", "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("a line from the follower")
        .unwrap()
        .unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (first["done"].as_u64(), first["finished"].as_bool()),
        (Some(30), Some(false))
    );
    let resumed = Batch::new(bus.clone(), "import-b")
        .chunk_size(10)
        .total(100)
        .run(move |from| (from..100).map(row))
        .await
        .unwrap();
    assert_eq!(resumed.done, 100);
    let mut seen = vec![first];
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the follower ends once the batch is finished")
        .unwrap()
    {
        seen.push(serde_json::from_str(&line).unwrap());
    }
    let status = tokio::time::timeout(Duration::from_secs(60), follower.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let last = seen.last().unwrap();
    assert_eq!(last["done"], 100, "{seen:?}");
    assert_eq!(last["finished"], true);
    assert!(
        seen.windows(2)
            .all(|w| w[0]["done"].as_u64() <= w[1]["done"].as_u64()),
        "{seen:?}"
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn rusqlite_open(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

#[test]
fn a_missing_or_wrong_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.db");
    let out = txbus(&format!("sqlite:{}", missing.display()), &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no store file at"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists(), "a read must not create a store");
    let out = txbus(
        &format!("sqlite:{}", missing.display()),
        &["dlq", "replay", "1"],
    );
    assert!(stderr(&out).contains("no store file"), "{}", stderr(&out));
    assert!(!missing.exists(), "a write must not create a store either");

    let not_a_store = dir.path().join("notes.txt");
    std::fs::write(&not_a_store, "hello, this is not SQLite").unwrap();
    let out = txbus(not_a_store.to_str().unwrap(), &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a txbus store"),
        "{}",
        stderr(&out)
    );

    let out = txbus("mysql://x/y", &["status"]);
    assert!(
        stderr(&out).contains("unknown kind of store"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .arg("status")
        .env_remove("TXBUS_STORE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no store given"), "{}", stderr(&out));

    let url = pg_url();
    let out = txbus(&url, &["--schema", "no_such_txbus_schema", "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no txbus store in schema"),
        "{}",
        stderr(&out)
    );
    let out = txbus("postgres://postgres@127.0.0.1:1/test", &["status"]);
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
}

fn pg_url() -> String {
    std::env::var("TXBUS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    let schema = format!("cli_{:016x}", fastrand_u64());
    let url = pg_url();
    let pg = txbus_postgres::PostgresOptions::new(url.clone())
        .schema(schema.clone())
        .connect()
        .await
        .unwrap();
    let (bus, failed) = loaded_bus(pg, 5, 2).await;
    // The log is sealed shortly after the commits: wait until all seven are readable.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while bus.read_log(0, 100).await.unwrap().len() < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log was not sealed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = url.clone();
    let result = tokio::task::spawn_blocking({
        let (schema, failed) = (schema.clone(), failed.clone());
        move || {
            let with_schema = |args: &[&str]| {
                let mut all = vec!["--schema", schema.as_str()];
                all.extend_from_slice(args);
                all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            };
            // Every reading command, with the schema given on each.
            let run = |args: &[&str]| {
                let a = with_schema(args);
                one(&store, &a.iter().map(String::as_str).collect::<Vec<_>>())
            };
            assert_eq!(run(&["status"])["commits"], 8);
            assert_eq!(run(&["verify"])["intact"], true);
            let dead = run(&["dlq", "list"]);
            assert_eq!(dead.as_array().unwrap().len(), 2);
            let ops = run(&["ops", "list", "-n", "7"]);
            assert_eq!(ops[0]["operation_id"], failed[1].as_str());
            assert_eq!(
                run(&["ops", "show", &failed[0]])["error"]["handler"],
                "cli-failing"
            );
            assert_eq!(
                run(&["relays"]),
                json!([{"name": "to-nats", "checkpoint": 3, "lag": 5}])
            );
            assert_eq!(
                run(&["projections"]),
                json!([{"name": "balances", "checkpoint": 4, "lag": 4}])
            );
            assert_eq!(run(&["sagas"]), json!([]), "no saga ran on this bus");
            let a = with_schema(&["log", "tail", "-n", "3"]);
            let log = json_lines(&store, &a.iter().map(String::as_str).collect::<Vec<_>>());
            let positions: Vec<_> = log
                .iter()
                .map(|c| c["position"].as_u64().unwrap())
                .collect();
            assert_eq!(positions, vec![6, 7, 8], "{log:?}");
            assert_eq!(log[0]["kind"], "transact");
            assert_eq!(log[0]["events"][0]["module"], "cli", "{log:?}");
            assert_eq!(log[2]["operation_id"], failed[1].as_str(), "{log:?}");
            assert_eq!(log[2]["events"][0]["event_type"], "cli.bad", "{log:?}");

            let id = dead[0]["delivery_id"].as_i64().unwrap();
            let letter = run(&["dlq", "show", &id.to_string()]);
            assert_eq!(letter["payload"], json!({"i": 0}), "{letter}");
            assert_eq!(letter["error"], "the printer is on fire", "{letter}");
            assert_eq!(letter["handler"], "cli-failing", "{letter}");
            // Discarding works beside the running bus on PostgreSQL.
            let other = dead[1]["delivery_id"].as_i64().unwrap();
            let discarded = run(&["dlq", "discard", &other.to_string()]);
            assert_eq!(discarded["discarded"], json!([other]));
            let left = run(&["dlq", "list"]);
            assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
            assert_eq!(left[0]["delivery_id"], id, "{left}");
            let again = txbus(
                &store,
                &with_schema(&["dlq", "discard", &other.to_string()])
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            );
            assert_eq!(again.status.code(), Some(2));
            // Replaying too.
            let replayed = run(&["dlq", "replay", &id.to_string()]);
            assert_eq!(replayed["replayed"], json!([id]));
        }
    })
    .await;
    // The replayed delivery runs again (and dies again, after its attempts).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    if result.is_ok() {
        loop {
            let letters = bus
                .dead_letters(txbus_core::DeadLetterQuery {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
            if letters.len() == 1
                && letters
                    .iter()
                    .any(|d| d.attempts == 2 && d.failed_at_ms > 0)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the replayed delivery did not run"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_schema(&url, &schema).await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sagas_by_status_and_their_history() {
    let schema = format!("cli_{:016x}", fastrand_u64());
    let url = pg_url();
    let pg = txbus_postgres::PostgresOptions::new(url.clone())
        .schema(schema.clone())
        .connect()
        .await
        .unwrap();
    let (bus, completed, failed) = saga_bus(pg).await;
    // Stream reads see what the sealer has ordered: wait until the failed saga's last change
    // is readable.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let id = txbus_saga::SagaId::new(failed.clone()).unwrap();
    while !txbus_saga::history(&bus, &id)
        .await
        .unwrap()
        .last()
        .is_some_and(|h| matches!(h.event, txbus_saga::SagaEvent::Failed { .. }))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the saga's history was not sealed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = tokio::task::spawn_blocking({
        let (url, schema) = (url.clone(), schema.clone());
        move || check_sagas(&url, &["--schema", &schema], &completed, &failed)
    })
    .await;
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_schema(&url, &schema).await;
    result.unwrap();
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

async fn drop_schema(url: &str, schema: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await
        .unwrap();
}
