//! Conformance cases for the Tx/Commit model: signatures, commits read back with their
//! checksums and key writes, versions, system commits, sessions, batches, field encryption.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::json;

use super::{builder, within, Harness};
use crate::algebra;
use crate::chain::{self, Broken, VerifyOptions};
use crate::signing::{CommitSigner, KeyRing};
use crate::store::{CommitKind, CommitRecord, LogMessage, Store};
use crate::version::Change;
use crate::{
    Batch, Commit, Error, Event, ExpectedVersion, FieldEncryption, KvExpect, KvWrite, Message, On,
    SessionConflict,
};

fn signer(id: &str, seed: u8) -> CommitSigner {
    CommitSigner::from_bytes(id, &[seed; 32]).unwrap()
}

/// The whole log, read once it holds at least `min` commits (stores that seal later need a
/// moment).
async fn log_of(store: &Arc<dyn Store>, min: usize) -> Vec<CommitRecord> {
    within(async {
        loop {
            let mut all = Vec::new();
            let mut after = 0;
            loop {
                let page = store.read_log(after, 500).await.unwrap();
                let Some(last) = page.last() else { break };
                after = last.position;
                all.extend(page);
            }
            if all.len() >= min {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn head_at_least(store: &Arc<dyn Store>, min: u64) -> u64 {
    within(async {
        loop {
            let head = store.head().await.unwrap();
            if head >= min {
                return head;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A bus with a signing key signs the chain; `verify` checks the signatures with its key ring
/// and names the commit whose signature does not verify; after a key rotation the commits
/// signed with the old key still verify with the old public key kept in the ring.
pub async fn signed_commits_verify_and_old_keys_still_verify_after_a_rotation(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let old = signer("ops-1", 1);
    let old_public = old.verifying_key();
    let bus = builder(store.clone())
        .signing_key(old)
        .build()
        .await
        .unwrap();
    assert_eq!(bus.signing_key_id(), Some("ops-1"));
    for n in 0..20 {
        bus.transact([Event::new("a.b", json!({"n": n}))])
            .await
            .unwrap();
    }
    let head = head_at_least(&store, 21).await;
    let report = within(async {
        loop {
            let r = bus.verify().await.unwrap();
            if r.signed_through == Some(head) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(report.is_intact(), "{report:?}");
    assert!(report.signatures >= 1);
    let log = log_of(&store, 21).await;
    let signed: Vec<&CommitRecord> = log.iter().filter(|c| c.signature.is_some()).collect();
    assert!(!signed.is_empty());
    assert!(signed
        .iter()
        .all(|c| c.signature.as_ref().unwrap().key_id == "ops-1"));
    // The last commit is always vouched for: each group commit (sealing round) signs its last.
    assert!(log.last().unwrap().signature.is_some());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // Rotation: sign with a new key; keep the old public key in the ring.
    let store = h.reopen(&key).await;
    let ring = KeyRing::new().with("ops-1", old_public);
    let bus = builder(store.clone())
        .signing_key(signer("ops-2", 2))
        .verifying_keys(ring)
        .build()
        .await
        .unwrap();
    for n in 0..5 {
        bus.transact([Event::new("a.b", json!({"n": n}))])
            .await
            .unwrap();
    }
    let log = log_of(&store, 28).await;
    let head = log.last().unwrap().position;
    let report = within(async {
        loop {
            let r = bus.verify().await.unwrap();
            if r.signed_through == Some(head) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(report.is_intact(), "{report:?}");
    let keys: std::collections::BTreeSet<&str> = log
        .iter()
        .filter_map(|c| c.signature.as_ref().map(|s| s.key_id.as_str()))
        .collect();
    assert_eq!(keys, ["ops-1", "ops-2"].into_iter().collect());

    // Without the old key: the first commit it signed is named.
    let first_old = log.iter().find(|c| c.signature.is_some()).unwrap().position;
    let only_new = KeyRing::new().with("ops-2", signer("ops-2", 2).verifying_key());
    let r = bus
        .verify_with(&VerifyOptions::signatures(only_new))
        .await
        .unwrap();
    assert_eq!(
        r.first_broken,
        Some((
            first_old,
            Broken::UnknownKey {
                key_id: "ops-1".into()
            }
        ))
    );
    // Another public key under the old id: its signature does not verify there.
    let impostor = KeyRing::new()
        .with("ops-1", signer("ops-1", 9).verifying_key())
        .with("ops-2", signer("ops-2", 2).verifying_key());
    let r = bus
        .verify_with(&VerifyOptions::signatures(impostor))
        .await
        .unwrap();
    assert_eq!(
        r.first_broken,
        Some((
            first_old,
            Broken::BadSignature {
                key_id: "ops-1".into()
            }
        ))
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // A bus without the key appends unsigned commits: a ring that requires signatures names
    // the first commit no signature vouches for.
    let store = h.reopen(&key).await;
    let bus = builder(store.clone()).build().await.unwrap();
    bus.transact([Event::new("a.b", json!({}))]).await.unwrap();
    let log = log_of(&store, 30).await;
    let last_signed = log
        .iter()
        .rev()
        .find(|c| c.signature.is_some())
        .unwrap()
        .position;
    let both = KeyRing::new()
        .with("ops-1", old_public)
        .with("ops-2", signer("ops-2", 2).verifying_key());
    let r = bus
        .verify_with(&VerifyOptions::signatures(both.clone()).require_signatures(true))
        .await
        .unwrap();
    assert_eq!(r.first_broken, Some((last_signed + 1, Broken::Unsigned)));
    let r = bus
        .verify_with(&VerifyOptions::signatures(both))
        .await
        .unwrap();
    assert!(r.is_intact(), "not required: reported, not broken: {r:?}");
    assert_eq!(r.signed_through, Some(last_signed));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A commit read back exposes its checksums (the data hash recomputes from what it holds, the
/// chain links it to its parent) and the key–value writes it committed, which its data hash
/// covers.
pub async fn commits_read_back_with_their_checksums_and_key_writes(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store.clone())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    bus.commit(
        Commit::new()
            .event(Event::new("a.b", json!({"x": 1})))
            .kv(KvWrite::put("cart/1", b"apple".to_vec()).expect(KvExpect::Absent))
            .kv(KvWrite::put("cart/2", b"pear".to_vec()).ttl(Duration::from_secs(3600)))
            .kv(KvWrite::delete("cart/0")),
    )
    .await
    .unwrap();
    bus.transact([Event::new("a.b", json!({"x": 2}))])
        .await
        .unwrap();
    let log = log_of(&store, 2).await;
    let first = &log[0];
    assert_eq!(first.kv.len(), 3);
    assert_eq!(
        first.kv[0],
        KvWrite::put("cart/1", b"apple".to_vec()).expect(KvExpect::Absent)
    );
    assert_eq!(
        first.kv[1],
        KvWrite::put("cart/2", b"pear".to_vec()).ttl(Duration::from_secs(3600))
    );
    assert_eq!(first.kv[2], KvWrite::delete("cart/0"));
    let data = chain::data_hash(
        &first.operation_id.0,
        first.kind,
        first.created_at_ms,
        first.messages.iter().map(LogMessage::from),
        &first.kv,
    );
    assert_eq!(data, first.data_hash);
    assert_eq!(chain::chain_hash(&data, &chain::GENESIS), first.chain_hash);
    // Without its key writes the content would not match: the hash covers them.
    let without = chain::data_hash(
        &first.operation_id.0,
        first.kind,
        first.created_at_ms,
        first.messages.iter().map(LogMessage::from),
        &[],
    );
    assert_ne!(without, first.data_hash);
    assert!(log[1].kv.is_empty());
    assert_eq!(
        chain::chain_hash(&log[1].data_hash, &first.chain_hash),
        log[1].chain_hash
    );
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Commits read back from the log are commit values: two of them append (in log order: each
/// stream expected where it was) and diff like commits being built, and a contradiction
/// between them is named.
pub async fn commits_read_from_the_log_append_and_diff(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store.clone())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let first = Commit::new()
        .stream(
            "order-1",
            ExpectedVersion::NoStream,
            [Event::new("o.placed", json!({"n": 1}))],
        )
        .kv(KvWrite::put("cart/1", b"1".to_vec()));
    bus.commit(first.clone()).await.unwrap();
    bus.commit(
        Commit::new()
            .stream(
                "order-1",
                ExpectedVersion::Exact(1),
                [
                    Event::new("o.paid", json!({"n": 2})),
                    Event::new("o.sent", json!({"n": 3})),
                ],
            )
            .kv(KvWrite::put("cart/2", b"2".to_vec())),
    )
    .await
    .unwrap();
    bus.commit(
        Commit::new()
            .event(Event::new("o.note", json!({"n": 4})))
            .kv(KvWrite::put("cart/1", b"changed".to_vec())),
    )
    .await
    .unwrap();
    let log = log_of(&store, 3).await;

    // Records as values: append and diff.
    let (a, b) = (log[0].to_commit(), log[1].to_commit());
    let both = a.clone().append(b.clone()).unwrap();
    assert_eq!(both.len(), 3);
    let d = algebra::diff(&a, &b);
    assert!(d.is_disjoint());
    assert_eq!((d.only_left.len(), d.only_right.len()), (2, 3));
    let itself = algebra::diff(&a, &log[0].to_commit());
    assert_eq!(itself.same.len(), 2);
    assert!(itself.only_left.is_empty() && itself.varied.is_empty());

    // Read with the versions the streams were at: the commit as it was handed in.
    let at1 = bus.commit_at(1).await.unwrap().unwrap();
    let as_built = algebra::diff(&first, &at1);
    assert_eq!(as_built.same.len(), 2, "{as_built:?}");
    assert!(as_built.only_left.is_empty() && as_built.varied.is_empty());
    let at2 = bus.commit_at(2).await.unwrap().unwrap();
    assert_eq!(at1.clone().append(at2.clone()).unwrap().len(), 3);
    assert!(matches!(
        at2.append(at1.clone()),
        Err(algebra::Contradiction::Stream { stream, .. }) if stream == "order-1"
    ));
    // The third commit writes cart/1 again with another value.
    let at3 = bus.commit_at(3).await.unwrap().unwrap();
    assert_eq!(
        at1.append(at3).unwrap_err(),
        algebra::Contradiction::Key {
            key: "cart/1".into()
        }
    );
    assert!(bus.commit_at(4).await.unwrap().is_none());
    assert!(bus.commit_at(0).await.unwrap().is_none());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `state_at` rebuilds the key–value space and stream heads as of any position, and
/// `diff_versions` lists what changed between two.
pub async fn state_at_rebuilds_past_versions_and_diff_versions_lists_the_changes(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store.clone())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let put = |k: &str, v: &str| KvWrite::put(k, v.as_bytes().to_vec());
    let ev = |n: u32| Event::new("o.e", json!({"n": n}));
    // 1: order-1 v1, cart/a = 1
    bus.commit(
        Commit::new()
            .stream("order-1", ExpectedVersion::NoStream, [ev(1)])
            .kv(put("cart/a", "1")),
    )
    .await
    .unwrap();
    // 2: order-1 v2..3, order-2 v1, cart/a = 2, cart/b = 1
    bus.commit(
        Commit::new()
            .stream("order-1", ExpectedVersion::Exact(1), [ev(2), ev(3)])
            .stream("order-2", ExpectedVersion::NoStream, [ev(4)])
            .kv(put("cart/a", "2"))
            .kv(put("cart/b", "1")),
    )
    .await
    .unwrap();
    // 3: cart/a deleted, other/x = 1
    bus.commit(
        Commit::new()
            .event(ev(5))
            .kv(KvWrite::delete("cart/a"))
            .kv(put("other/x", "1")),
    )
    .await
    .unwrap();
    let head = head_at_least(&store, 3).await;
    assert_eq!(head, 3);

    let v0 = bus.state_at(0).await.unwrap();
    assert_eq!(v0.kv_get("cart/a").await.unwrap(), None);
    assert_eq!(v0.stream_version("order-1").await.unwrap(), 0);
    assert!(v0.streams(None, 10).await.unwrap().items.is_empty());

    let v1 = bus.state_at(1).await.unwrap();
    let a = v1.kv_get("cart/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.written_at), (&b"1"[..], 1));
    assert_eq!(v1.kv_get("cart/b").await.unwrap(), None);
    assert_eq!(v1.stream_version("order-1").await.unwrap(), 1);
    assert_eq!(v1.stream_version("order-2").await.unwrap(), 0);
    assert_eq!(v1.commits(0, 10).await.unwrap().len(), 1);

    let v2 = bus.state_at(2).await.unwrap();
    let scan: Vec<(String, Vec<u8>)> = v2
        .kv_scan("cart/", None, 10)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|v| (v.key, v.value))
        .collect();
    assert_eq!(
        scan,
        vec![
            ("cart/a".to_owned(), b"2".to_vec()),
            ("cart/b".to_owned(), b"1".to_vec())
        ]
    );
    // Paged: after "cart/a", one at a time.
    let page = v2.kv_scan("cart/", Some("cart/a"), 1).await.unwrap().items;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].key, "cart/b");
    assert_eq!(
        v2.streams(None, 10).await.unwrap().items,
        vec![("order-1".to_owned(), 3), ("order-2".to_owned(), 1)]
    );
    assert_eq!(
        v2.streams(Some("order-1"), 10).await.unwrap().items,
        vec![("order-2".to_owned(), 1)]
    );

    let v3 = bus.state_at(3).await.unwrap();
    assert_eq!(v3.kv_get("cart/a").await.unwrap(), None, "deleted at 3");
    let scan = v3.kv_scan("", None, 10).await.unwrap().items;
    let keys: Vec<&str> = scan.iter().map(|v| v.key.as_str()).collect();
    assert_eq!(keys, vec!["cart/b", "other/x"]);
    assert_eq!(v3.commits(1, 10).await.unwrap().len(), 2);
    assert!(matches!(
        bus.state_at(4).await,
        Err(Error::InvalidCommit(_))
    ));

    let d = bus.diff_versions(1, 3, 100).await.unwrap();
    assert_eq!((d.from, d.to, d.commits, d.truncated), (1, 3, 2, false));
    let changes: Vec<(&str, &Change<Vec<u8>>)> =
        d.keys.iter().map(|k| (k.key.as_str(), &k.change)).collect();
    assert_eq!(
        changes,
        vec![
            ("cart/a", &Change::Removed(b"1".to_vec())),
            ("cart/b", &Change::Added(b"1".to_vec())),
            ("other/x", &Change::Added(b"1".to_vec())),
        ]
    );
    let streams: Vec<(&str, u64, u64)> = d
        .streams
        .iter()
        .map(|s| (s.stream.as_str(), s.from, s.to))
        .collect();
    assert_eq!(streams, vec![("order-1", 1, 3), ("order-2", 0, 1)]);
    let d = bus.diff_versions(1, 2, 100).await.unwrap();
    assert_eq!(
        d.keys[0].change,
        Change::Changed(b"1".to_vec(), b"2".to_vec())
    );
    // Bounded: one commit at a time, resumable from `to`.
    let d = bus.diff_versions(0, 3, 1).await.unwrap();
    assert!(d.truncated);
    assert_eq!((d.to, d.commits), (1, 1));
    assert!(bus.diff_versions(3, 1, 10).await.is_err());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Scans of a past state are bounded: a call examines at most `max_examined` keys (or streams),
/// present then or not, and hands back a cursor. Keys and streams written only after the
/// position are skipped across pages, and the pages together hold exactly what was present.
pub async fn past_scans_skip_absent_keys_and_streams_in_bounded_pages(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store.clone())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let ev = |n: usize| Event::new("o.e", json!({"n": n}));
    // 1: the keys many/a and many/z, the streams s-a and s-z.
    bus.commit(
        Commit::new()
            .stream("s-a", ExpectedVersion::NoStream, [ev(0)])
            .stream("s-z", ExpectedVersion::NoStream, [ev(1)])
            .kv(KvWrite::put("many/a", b"a".to_vec()))
            .kv(KvWrite::put("many/z", b"z".to_vec())),
    )
    .await
    .unwrap();
    // 2: 200 keys and 200 streams between them, absent at position 1.
    let absent = 200usize;
    let mut c = Commit::new();
    for i in 0..absent {
        c = c
            .stream(format!("s-m{i:03}"), ExpectedVersion::NoStream, [ev(i)])
            .kv(KvWrite::put(format!("many/m{i:03}"), vec![1]));
    }
    bus.commit(c).await.unwrap();
    head_at_least(&store, 2).await;

    let bound = 25usize;
    let examined_in_all = absent + 2;
    let v1 = bus.state_at(1).await.unwrap().max_examined(bound);

    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    let (mut pages, mut empty_but_not_last) = (0usize, 0usize);
    loop {
        let page = v1.kv_scan("many/", after.as_deref(), 10).await.unwrap();
        pages += 1;
        assert!(pages <= examined_in_all, "the scan does not end");
        if page.items.is_empty() && !page.is_last() {
            empty_but_not_last += 1;
        }
        keys.extend(page.items.into_iter().map(|v| (v.key, v.value)));
        match page.resume_after {
            Some(next) => {
                assert!(
                    after.as_ref().is_none_or(|a| next > *a),
                    "the cursor moves on"
                );
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(
        keys,
        vec![
            ("many/a".to_owned(), b"a".to_vec()),
            ("many/z".to_owned(), b"z".to_vec())
        ]
    );
    // Each call examined `bound` keys, the last one what was left.
    assert_eq!(pages, examined_in_all.div_ceil(bound));
    assert!(
        empty_but_not_last > 0,
        "pages of absent keys only come back empty"
    );

    let mut streams = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0usize;
    loop {
        let page = v1.streams(after.as_deref(), 10).await.unwrap();
        pages += 1;
        assert!(pages <= examined_in_all, "the scan does not end");
        streams.extend(page.items);
        match page.resume_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(streams, vec![("s-a".to_owned(), 1), ("s-z".to_owned(), 1)]);
    assert_eq!(pages, examined_in_all.div_ceil(bound));

    // With the default bound the same scans take one call each.
    let whole = bus.state_at(1).await.unwrap();
    let page = whole.kv_scan("many/", None, 10).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.is_last());
    let page = whole.streams(None, 10).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.is_last());

    // At position 2 every key is present: pages are cut by `limit`, and together hold them all.
    let v2 = bus.state_at(2).await.unwrap().max_examined(bound);
    let mut count = 0usize;
    let mut after: Option<String> = None;
    loop {
        let page = v2.kv_scan("many/", after.as_deref(), 10).await.unwrap();
        assert!(page.items.len() <= 10);
        count += page.items.len();
        match page.resume_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(count, examined_in_all);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `build()` records the start and `shutdown` the stop as system commits: they are in the log
/// and verified, they create no deliveries, and their records say what started.
pub async fn system_commits_record_start_and_shutdown_without_deliveries(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let bus = builder(store.clone())
        .handler("everything", On::all(), move |_m: Message| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus.transact([Event::new("a.b", json!({}))]).await.unwrap();
    within(op.outcome()).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    let store = h.reopen(&key).await;
    let log = log_of(&store, 3).await;
    let kinds: Vec<CommitKind> = log.iter().map(|c| c.kind).collect();
    assert_eq!(
        &kinds[..3],
        &[CommitKind::System, CommitKind::Transact, CommitKind::System]
    );
    let started = &log[0].messages[0];
    assert_eq!(started.event_type, crate::system::STARTED);
    assert_eq!(started.module.as_deref(), Some(crate::system::MODULE));
    assert_eq!(started.payload["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(started.payload["handlers"][0]["name"], "everything");
    assert!(started.payload["host"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));
    assert!(started.payload["store"]["schema_version"].as_i64().unwrap() > 0);
    assert_eq!(log[2].messages[0].event_type, crate::system::STOPPED);
    assert_eq!(log[2].messages[0].payload["drained"], true);
    // The reopened bus recorded its own start.
    let bus = builder(store.clone())
        .handler("everything", On::all(), |_m: Message| async move { Ok(()) })
        .build()
        .await
        .unwrap();
    let log = log_of(&store, 4).await;
    assert_eq!(log[3].kind, CommitKind::System);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the handler saw the user's event only"
    );
    let stats = bus.stats().await.unwrap();
    assert_eq!(
        stats.deliveries.succeeded + stats.deliveries.pending + stats.deliveries.leased,
        1,
        "no delivery for a system commit"
    );
    let report = bus.verify().await.unwrap();
    assert!(report.is_intact());
    assert_eq!(report.verified, 4, "verify covers the system commits");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A session accumulates changes across calls and restarts; it commits once, together with
/// the removal of its record; when the log moved under it, `rebase` reports the conflicts and
/// nothing is written.
pub async fn sessions_survive_restarts_and_rebase_reports_conflicts(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let bus = builder(store).build().await.unwrap();
    let mut s = bus.session("signup/1").await.unwrap();
    s.add(Commit::new().event(Event::new("signup.step", json!({"step": 1}))))
        .await
        .unwrap();
    s.add(Commit::new().kv(KvWrite::put("signup/1/email", b"a@b.c".to_vec())))
        .await
        .unwrap();
    // A contradiction is refused and changes nothing.
    let err = s
        .add(Commit::new().kv(KvWrite::put("signup/1/email", b"other".to_vec())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("signup/1/email"), "{err}");
    assert_eq!(s.pending().len(), 1);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // After a restart it is still there.
    let bus = builder(h.reopen(&key).await).build().await.unwrap();
    assert_eq!(
        bus.sessions(None, 10).await.unwrap(),
        vec!["signup/1".to_owned()]
    );
    let mut s = bus.session("signup/1").await.unwrap();
    assert_eq!(s.pending().len(), 1);
    s.add(Commit::new().stream(
        "user-1",
        ExpectedVersion::NoStream,
        [Event::new("user.created", json!({"id": 1}))],
    ))
    .await
    .unwrap();
    // The log moves under it: another writer creates user-1 first.
    bus.commit(Commit::new().stream(
        "user-1",
        ExpectedVersion::NoStream,
        [Event::new("user.created", json!({"id": 1, "by": "other"}))],
    ))
    .await
    .unwrap();
    let before = bus.stats().await.unwrap().messages;
    let rebase = s.rebase().await.unwrap();
    assert_eq!(
        rebase.conflicts,
        vec![SessionConflict::Stream {
            stream: "user-1".into(),
            expected: ExpectedVersion::NoStream,
            actual: 1
        }]
    );
    let s = bus.session("signup/1").await.unwrap();
    let rebase = s.commit().await.unwrap().unwrap_err();
    assert_eq!(rebase.conflicts.len(), 1, "{rebase:?}");
    assert_eq!(
        bus.stats().await.unwrap().messages,
        before,
        "nothing written"
    );

    // Fixed (appended after the other writer), it commits once and its record is gone.
    let s = bus.session("signup/1").await.unwrap();
    s.abandon().await.unwrap();
    let mut s = bus.session("signup/1").await.unwrap();
    s.add(Commit::new().event(Event::new("signup.step", json!({"step": 1}))))
        .await
        .unwrap();
    s.add(Commit::new().stream(
        "user-1",
        ExpectedVersion::Exact(1),
        [Event::new("user.renamed", json!({"id": 1}))],
    ))
    .await
    .unwrap();
    bus.transact([Event::new("unrelated", json!({}))])
        .await
        .unwrap();
    let mut again = bus.session("signup/1").await.unwrap();
    // Stores that seal later show the new head a moment after the commit returns.
    head_at_least(bus.store(), again.base() + 1).await;
    let rebase = again.rebase().await.unwrap();
    assert!(rebase.conflicts.is_empty(), "{rebase:?}");
    assert!(rebase.to > rebase.from, "moved to the new head: {rebase:?}");
    let op = again.commit().await.unwrap().unwrap();
    within(op.outcome()).await.unwrap();
    assert_eq!(bus.stream_version("user-1").await.unwrap(), 2);
    assert!(bus.sessions(None, 10).await.unwrap().is_empty());
    // The stale handle cannot commit it twice: its conditions no longer hold.
    assert!(!matches!(s.commit().await, Ok(Ok(_))));
    assert_eq!(bus.stream_version("user-1").await.unwrap(), 2);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A batch commits bounded chunks with its checkpoint; a run that dies between chunks resumes
/// where the checkpoint says: every item once, none skipped; progress is reported.
pub async fn batches_commit_bounded_chunks_and_resume_without_duplicates_or_gaps(h: &dyn Harness) {
    let (_key, store) = h.create().await;
    let bus = builder(store.clone())
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let total = 2_500u64;
    let source = move |from: u64, die_at: Option<u64>| {
        (from..total).map(move |n| {
            // A run that dies while producing item `die_at` (between commits).
            assert_ne!(Some(n), die_at, "the run dies here");
            Event::new("row.imported", json!({"row": n}))
        })
    };
    let run = Batch::new(bus.clone(), "import")
        .chunk_size(300)
        .total(total)
        .run(move |from| source(from, Some(1_000)));
    let died = std::panic::AssertUnwindSafe(run).catch_unwind().await;
    assert!(died.is_err(), "the first run must die");
    let p = bus.batch_progress("import").await.unwrap().unwrap();
    assert_eq!((p.done, p.chunks, p.finished), (900, 3, false));
    assert_eq!(p.total, Some(total));

    let batch = Batch::new(bus.clone(), "import")
        .chunk_size(300)
        .total(total);
    let progress = batch.progress();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let mut progress = progress.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            while progress.changed().await.is_ok() {
                if let Some(p) = progress.borrow().clone() {
                    seen.lock().unwrap().push(p.done);
                }
            }
        })
    };
    let done = batch.run(move |from| source(from, None)).await.unwrap();
    assert_eq!((done.done, done.finished), (total, true));
    assert_eq!(done.chunks, 9);
    let _ = watcher.await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.last(), Some(&total), "{seen:?}");
    // Every row once, in order, each chunk one commit of the batch kind.
    let log = log_of(&store, 9).await;
    assert!(log.iter().all(|c| c.kind == CommitKind::Batch));
    assert!(log.iter().all(|c| c.messages.len() <= 300));
    let rows: Vec<u64> = log
        .iter()
        .flat_map(|c| {
            c.messages
                .iter()
                .map(|m| m.payload["row"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(rows, (0..total).collect::<Vec<_>>());
    assert_eq!(bus.batches(None, 10).await.unwrap(), vec![done.clone()]);
    // Running a finished batch again writes nothing.
    let again = Batch::new(bus.clone(), "import")
        .run(move |from| source(from, None))
        .await
        .unwrap();
    assert_eq!(again, done);
    assert_eq!(bus.stats().await.unwrap().messages, total);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Fields named by the encryption policy are stored encrypted and handed to handlers
/// decrypted; a policy whose key is missing fails the call and writes nothing.
pub async fn encrypted_fields_are_stored_sealed_and_handed_to_handlers_plain(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let policy = FieldEncryption::new()
        .key("pii-1", [5u8; 32])
        .unwrap()
        .encrypt_with("pii-1")
        .field("user.created", "/email");
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let bus = builder(store.clone())
        .field_encryption(policy.clone())
        .handler("mailer", On::event("user.created"), move |m: Message| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(m.payload()["email"].clone());
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new(
            "user.created",
            json!({"id": 7, "email": "secret-ada@example.com"}),
        )])
        .await
        .unwrap();
    assert!(within(op.outcome()).await.unwrap().is_ok());
    assert_eq!(
        got.lock().unwrap().as_slice(),
        &[json!("secret-ada@example.com")]
    );
    let log = log_of(&store, 2).await;
    let stored = log
        .iter()
        .flat_map(|c| &c.messages)
        .find(|m| m.event_type == "user.created")
        .unwrap();
    assert!(
        !stored.payload_json.contains("secret-ada"),
        "{}",
        stored.payload_json
    );
    assert_eq!(stored.payload["id"], 7);
    assert_eq!(stored.headers.extra["txbus-enc-key"], "pii-1");
    assert_eq!(
        bus.open_message(stored).unwrap().payload["email"],
        "secret-ada@example.com"
    );
    assert!(bus.verify().await.unwrap().is_intact());
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // The current key is not configured: a clear error, nothing written.
    let store = h.reopen(&key).await;
    let bus = builder(store.clone())
        .field_encryption(policy.clone().encrypt_with("pii-2"))
        .system_commits(false)
        .build()
        .await
        .unwrap();
    let before = bus.stats().await.unwrap().messages;
    let err = bus
        .transact([Event::new(
            "user.created",
            json!({"email": "b@example.com"}),
        )])
        .await
        .unwrap_err();
    match &err {
        Error::InvalidEvent { index, reason, .. } => {
            assert_eq!(*index, 0);
            assert!(reason.contains("pii-2"), "{reason}");
        }
        other => panic!("expected an invalid event, got {other:?}"),
    }
    assert_eq!(bus.stats().await.unwrap().messages, before);
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // Rotated: new events under pii-2, the old one still opens with pii-1 kept.
    let store = h.reopen(&key).await;
    let rotated = policy
        .key("pii-2", [6u8; 32])
        .unwrap()
        .encrypt_with("pii-2");
    let bus = builder(store.clone())
        .field_encryption(rotated)
        .build()
        .await
        .unwrap();
    bus.transact([Event::new(
        "user.created",
        json!({"email": "c@example.com"}),
    )])
    .await
    .unwrap();
    // Wait for the second user.created itself: on a store that seals after the commit, the
    // log may already hold four commits (system ones among them) before it is sealed.
    let log = within(async {
        loop {
            let log = log_of(&store, 4).await;
            let users = log
                .iter()
                .flat_map(|c| &c.messages)
                .filter(|m| m.event_type == "user.created")
                .count();
            if users >= 2 {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let users: Vec<_> = log
        .iter()
        .flat_map(|c| &c.messages)
        .filter(|m| m.event_type == "user.created")
        .collect();
    assert_eq!(users.len(), 2);
    assert_eq!(users[1].headers.extra["txbus-enc-key"], "pii-2");
    assert_eq!(
        bus.open_message(users[0]).unwrap().payload["email"],
        "secret-ada@example.com"
    );
    assert_eq!(
        bus.open_message(users[1]).unwrap().payload["email"],
        "c@example.com"
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A message whose encryption key is gone when it is delivered: its handler never runs on the
/// sealed payload; the delivery is retried, then dead-lettered with the missing key named, and
/// the operation fails naming it. Once the key is back, replaying the dead letter delivers the
/// plaintext.
pub async fn a_message_whose_key_is_gone_is_dead_lettered_naming_the_key(h: &dyn Harness) {
    let (key, store) = h.create().await;
    let with_key = FieldEncryption::new()
        .key("pii-1", [5u8; 32])
        .unwrap()
        .encrypt_with("pii-1")
        .field("user.created", "/email");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mailer = |calls: Arc<Mutex<Vec<serde_json::Value>>>| {
        move |m: Message| {
            let calls = calls.clone();
            async move {
                calls.lock().unwrap().push(m.payload()["email"].clone());
                Ok(())
            }
        }
    };
    // Committed by a bus that holds the key, and not delivered before it stops.
    let bus = builder(store.clone())
        .field_encryption(with_key.clone())
        .start_paused(true)
        .handler("mailer", On::event("user.created"), mailer(calls.clone()))
        .build()
        .await
        .unwrap();
    let op = bus
        .transact([Event::new(
            "user.created",
            json!({"id": 9, "email": "gone-key@example.com"}),
        )])
        .await
        .unwrap();
    let id = op.id();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // The next bus has only a newer key.
    let store = h.reopen(&key).await;
    let without = FieldEncryption::new()
        .key("pii-2", [6u8; 32])
        .unwrap()
        .encrypt_with("pii-2")
        .field("user.created", "/email");
    let bus = builder(store.clone())
        .field_encryption(without)
        .max_retries(1)
        .handler("mailer", On::event("user.created"), mailer(calls.clone()))
        .build()
        .await
        .unwrap();
    let outcome = within(bus.wait(id)).await.unwrap();
    let failure = outcome.error.expect("the operation fails");
    assert_eq!(failure.handler, "mailer");
    assert_eq!(failure.kind, crate::FailureKind::RetriesExhausted);
    assert_eq!(failure.attempts, 2, "retried once, then dead");
    assert!(
        failure.reason.contains("\"pii-1\"") && failure.reason.contains("not configured"),
        "{}",
        failure.reason
    );
    assert!(calls.lock().unwrap().is_empty(), "the handler never ran");
    let dead = bus.dead_letters(Default::default()).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].handler, "mailer");
    assert!(dead[0].error.contains("\"pii-1\""), "{}", dead[0].error);
    // What is stored stays sealed.
    assert!(!dead[0].message.payload_json.contains("gone-key"));
    let delivery = dead[0].delivery_id;
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    // The key is back: the dead letter replays and the handler gets the plaintext.
    let store = h.reopen(&key).await;
    let bus = builder(store.clone())
        .field_encryption(with_key)
        .handler("mailer", On::event("user.created"), mailer(calls.clone()))
        .build()
        .await
        .unwrap();
    bus.replay(delivery).await.unwrap();
    within(async {
        while calls.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        calls.lock().unwrap().as_slice(),
        &[json!("gone-key@example.com")]
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}
