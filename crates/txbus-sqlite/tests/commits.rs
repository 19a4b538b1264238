//! The Tx/Commit model against the database file itself: a chain rewritten by hand after an
//! edit is caught by the signatures, key writes are covered by the data hash, and encrypted
//! fields never reach the file in plaintext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use txbus_core::chain::{self, Broken, VerifyOptions};
use txbus_core::store::{LogMessage, Store};
use txbus_core::{
    Bus, Commit, CommitSigner, Event, FieldEncryption, KeyRing, KvWrite, Message, On,
};
use txbus_sqlite::SqliteStore;

fn signer() -> CommitSigner {
    CommitSigner::from_bytes("ops-1", &[3u8; 32]).unwrap()
}

/// What someone with write access to the file but without the key can do: recompute every data
/// and chain hash from `from` on, so that the hash chain alone checks out again.
async fn rehash_chain_from(path: &Path, from: u64) {
    let store = SqliteStore::open(path).unwrap();
    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_log(after, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        log.extend(page);
    }
    store.close().await.unwrap();
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut parent = if from == 1 {
        chain::GENESIS
    } else {
        log[usize::try_from(from).unwrap() - 2].chain_hash
    };
    for c in log.iter().filter(|c| c.position >= from) {
        let data = chain::data_hash(
            &c.operation_id.0,
            c.kind,
            c.created_at_ms,
            c.messages.iter().map(LogMessage::from),
            &c.kv,
        );
        let link = chain::chain_hash(&data, &parent);
        conn.execute(
            "UPDATE commits SET data_hash = ?1, chain_hash = ?2 WHERE position = ?3",
            rusqlite::params![&data[..], &link[..], i64::try_from(c.position).unwrap()],
        )
        .unwrap();
        parent = link;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_rewritten_after_an_edit_is_caught_by_the_signature_that_covers_the_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let public = signer().verifying_key();
    {
        let bus = Bus::builder()
            .store(SqliteStore::open(&path).unwrap())
            .signing_key(signer())
            .system_commits(false)
            .build()
            .await
            .unwrap();
        for n in 1..=10 {
            bus.transact([Event::new("a.b", json!({"n": n}))])
                .await
                .unwrap();
        }
        let report = bus.verify().await.unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.signed_through, Some(10));
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    // Edit commit 6 and re-hash the chain from there: the hashes alone verify again…
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n = conn
            .execute(
                "UPDATE messages SET payload = '{\"n\":999}' WHERE position = 6",
                [],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    rehash_chain_from(&path, 6).await;
    let store = SqliteStore::open(&path).unwrap();
    assert!(chain::verify(&store).await.unwrap().is_intact());
    // …but the signature over commit 6's chain hash does not, and it is named.
    let ring = KeyRing::new().with("ops-1", public);
    let report = chain::verify_with(&store, &VerifyOptions::signatures(ring.clone()))
        .await
        .unwrap();
    assert_eq!(
        report.first_broken,
        Some((
            6,
            Broken::BadSignature {
                key_id: "ops-1".into()
            }
        ))
    );
    assert_eq!(
        report.signed_through,
        Some(5),
        "commits 1 to 5 are still vouched for"
    );
    store.close().await.unwrap();

    // Removing the signatures from the edit on leaves those commits unvouched for.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute("DELETE FROM commit_signatures WHERE position >= 6", [])
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let report = chain::verify_with(
        &store,
        &VerifyOptions::signatures(ring).require_signatures(true),
    )
    .await
    .unwrap();
    assert_eq!(report.first_broken, Some((6, Broken::Unsigned)));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signature_per_group_commit_vouches_for_every_commit_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .signing_key(signer())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    // Many callers at once share group commits.
    let mut calls = Vec::new();
    for n in 0..200 {
        let bus = bus.clone();
        calls.push(tokio::spawn(async move {
            bus.transact([Event::new("a.b", json!({"n": n}))])
                .await
                .unwrap();
        }));
    }
    for c in calls {
        c.await.unwrap();
    }
    let log = bus.read_log(0, 1000).await.unwrap();
    assert_eq!(log.len(), 200);
    let signed = log.iter().filter(|c| c.signature.is_some()).count();
    assert!((1..=200).contains(&signed));
    assert!(log.last().unwrap().signature.is_some());
    let report = bus.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.signatures, signed as u64);
    assert_eq!(report.signed_through, Some(200));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_key_writes_are_covered_by_its_data_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let bus = Bus::builder()
            .store(SqliteStore::open(&path).unwrap())
            .system_commits(false)
            .build()
            .await
            .unwrap();
        bus.commit(
            Commit::new()
                .event(Event::new("a.b", json!({})))
                .kv(KvWrite::put("balance/7", b"100".to_vec())),
        )
        .await
        .unwrap();
        bus.transact([Event::new("a.b", json!({}))]).await.unwrap();
        assert!(bus.verify().await.unwrap().is_intact());
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n = conn
            .execute(
                "UPDATE commit_kv SET value = x'393939' WHERE position = 1",
                [],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let store = SqliteStore::open(&path).unwrap();
    let report = chain::verify(&store).await.unwrap();
    assert_eq!(report.first_broken, Some((1, Broken::DataMismatch)));
    store.close().await.unwrap();
}

/// Every byte of the database and its write-ahead log.
fn file_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_fields_never_reach_the_database_file_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let policy = FieldEncryption::new()
        .key("pii-1", [9u8; 32])
        .unwrap()
        .encrypt_with("pii-1")
        .field("user.created", "/email")
        .field("user.created", "/card/number");
    let bus = Bus::builder()
        .store(SqliteStore::open(&path).unwrap())
        .field_encryption(policy)
        .handler("h", On::event("user.created"), |m: Message| async move {
            assert_eq!(m.payload()["email"], "plaintext-grace@example.com");
            assert_eq!(m.payload()["card"]["number"], "4111-1111-1111-1111");
            Ok(())
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new(
            "user.created",
            json!({
                "email": "plaintext-grace@example.com",
                "card": {"number": "4111-1111-1111-1111"},
                "city": "visible-city-marker"
            }),
        )])
        .await
        .unwrap();
    assert!(
        op.outcome().await.unwrap().is_ok(),
        "the handler saw the plaintext"
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    let bytes = file_bytes(dir.path());
    // The search works: a field outside the policy is there as written.
    assert!(contains(&bytes, "visible-city-marker"));
    assert!(!contains(&bytes, "plaintext-grace"));
    assert!(!contains(&bytes, "4111-1111-1111-1111"));
    assert!(contains(&bytes, "txbus:enc:v1:"));
}
