//! The Tx/Commit model against the database rows themselves: a chain rewritten by hand after
//! an edit is caught by the sealer's signature, and encrypted fields never reach a row in
//! plaintext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use serde_json::json;
use txbus_core::chain::{self, Broken, VerifyOptions};
use txbus_core::store::LogMessage;
use txbus_core::{Bus, CommitSigner, Event, FieldEncryption, KeyRing, Message, On};

use common::{open, raw, wait_sealed, TestSchema};

fn signer() -> CommitSigner {
    CommitSigner::from_bytes("ops-pg", &[4u8; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_rewritten_after_an_edit_is_caught_by_the_sealers_signature() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let bus = Bus::builder()
        .store(open(&s).await)
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
    let log = wait_sealed(bus.store().as_ref(), 10).await;
    assert!(
        log.last().unwrap().signature.is_some(),
        "each sealing round signs its last"
    );
    let report = bus.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.signed_through, Some(10));

    // Edit commit 6's payload and re-hash the chain from there, as someone with write access
    // to the database but without the key could.
    let mut conn = raw().await;
    let id6: i64 = sqlx::query_scalar(&format!(
        "SELECT commit_id FROM \"{s}\".commit_seals WHERE position = 6"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE \"{s}\".messages SET payload = '{{\"n\":999}}' WHERE commit_id = $1"
    ))
    .bind(id6)
    .execute(&mut conn)
    .await
    .unwrap();
    let edited = bus.read_log(0, 100).await.unwrap();
    let mut parent = edited[4].chain_hash;
    for c in edited.iter().filter(|c| c.position >= 6) {
        let data = chain::data_hash(
            &c.operation_id.0,
            c.kind,
            c.created_at_ms,
            c.messages.iter().map(LogMessage::from),
            &c.kv,
        );
        let link = chain::chain_hash(&data, &parent);
        sqlx::query(&format!(
            "WITH s AS (UPDATE \"{s}\".commit_seals SET chain_hash = $2 WHERE position = $3
                        RETURNING commit_id)
             UPDATE \"{s}\".commits SET data_hash = $1 WHERE id = (SELECT commit_id FROM s)"
        ))
        .bind(&data[..])
        .bind(&link[..])
        .bind(i64::try_from(c.position).unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
        parent = link;
    }
    assert!(
        chain::verify(bus.store().as_ref())
            .await
            .unwrap()
            .is_intact(),
        "the hashes alone check out again"
    );
    let ring = KeyRing::new().with("ops-pg", signer().verifying_key());
    let report = bus
        .verify_with(&VerifyOptions::signatures(ring))
        .await
        .unwrap();
    let (at, broken) = report
        .first_broken
        .clone()
        .expect("the rewrite must be caught");
    assert!(at >= 6, "{report:?}");
    assert_eq!(
        broken,
        Broken::BadSignature {
            key_id: "ops-pg".into()
        }
    );
    assert!(report.signed_through.unwrap_or(0) < 6);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_fields_never_reach_a_row_in_plaintext() {
    let schema = TestSchema::new();
    let s = schema.name.clone();
    let policy = FieldEncryption::new()
        .key("pii-1", [8u8; 32])
        .unwrap()
        .encrypt_with("pii-1")
        .field("user.created", "/email");
    let bus = Bus::builder()
        .store(open(&s).await)
        .field_encryption(policy)
        .handler("h", On::event("user.created"), |m: Message| async move {
            assert_eq!(m.payload()["email"], "plaintext-hopper@example.com");
            Ok(())
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new(
            "user.created",
            json!({"email": "plaintext-hopper@example.com", "city": "visible-city"}),
        )])
        .await
        .unwrap();
    assert!(
        op.outcome().await.unwrap().is_ok(),
        "the handler saw the plaintext"
    );
    let mut conn = raw().await;
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT payload, headers FROM \"{s}\".messages WHERE event_type = 'user.created'"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (payload, headers) = &rows[0];
    assert!(payload.contains("visible-city"), "{payload}");
    assert!(!payload.contains("plaintext-hopper"), "{payload}");
    assert!(payload.contains("txbus:enc:v1:"), "{payload}");
    assert!(headers.contains("pii-1"), "{headers}");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
