//! The Tx/Commit model: signed `transact` against unsigned in the same run
//! (`transact-signed`), the `verify` walk of an unsigned and of a signed log against a raw read
//! of the same rows (`verify`), and rebuilding a past state 100 000 commits back (`state-at`)
//! against a raw read of the current key–value table. `commits` runs the three. Embedded
//! SQLite, default (durable) settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use txbus::chain::{self, VerifyOptions};
use txbus::store::{CommitKind, NewCommit, Store};
use txbus::{
    Bus, Commit, CommitSigner, Event, ExpectedVersion, KeyRing, KvWrite, Message, On, OperationId,
    SqliteStore, StoredMessage,
};

use crate::report::{print_check, Line};
use crate::scenarios::{workdir, BoxError};
use crate::Args;

/// Runs the scenario named in `args` when it is one of these; `None` otherwise.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "transact-signed" => transact_signed(args).await,
        "verify" => verify(args).await,
        "state-at" => state_at(args).await,
        "commits" => all(args).await,
        _ => return None,
    };
    Some(result)
}

async fn all(args: &Args) -> Result<(), BoxError> {
    transact_signed(args).await?;
    verify(args).await?;
    state_at(args).await
}

fn signer() -> CommitSigner {
    CommitSigner::from_bytes("bench", &[42u8; 32]).expect("a valid key id")
}

/// `args.callers` callers, each committing one event and awaiting its outcome (one no-op
/// handler), as the `transact` scenario does; signed when `signed`.
async fn transact_run(args: &Args, signed: bool) -> Result<Line, BoxError> {
    let dir = workdir(args)?;
    let mut builder = Bus::builder()
        .store(SqliteStore::open(dir.path().join("bench.db"))?)
        .handler("noop", On::event("bench.event"), |_m: Message| async {
            Ok(())
        });
    if signed {
        builder = builder.signing_key(signer());
    }
    let bus = builder.build().await?;
    let deadline = Instant::now() + args.secs;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let op = bus
                    .transact([Event::new("bench.event", json!({"caller": c, "n": i}))])
                    .await?;
                let outcome = op.outcome().await?;
                if !outcome.is_ok() {
                    return Err::<Vec<u64>, BoxError>(
                        format!("operation failed: {outcome:?}").into(),
                    );
                }
                lat.push(t.elapsed().as_nanos() as u64);
                i += 1;
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    if signed {
        let report = bus.verify().await?;
        if !report.is_intact() || report.signed_through.is_none() {
            return Err(format!("the signed log does not verify: {report:?}").into());
        }
    }
    bus.shutdown(Duration::from_secs(10)).await?;
    let name = if signed {
        "transact-signed"
    } else {
        "transact"
    };
    Ok(Line::new(name, all.len() as u64, elapsed, all).with("callers", args.callers as f64))
}

/// Signed `transact` beside unsigned, in the same run.
async fn transact_signed(args: &Args) -> Result<(), BoxError> {
    let unsigned = transact_run(args, false).await?;
    unsigned.print(args.json);
    let signed = transact_run(args, true).await?;
    signed.print(args.json);
    let r = signed.ops_per_sec() / unsigned.ops_per_sec();
    print_check(
        args.json,
        "transact-signed ops/s / transact ops/s",
        r,
        ">= 0.8",
        r >= 0.8,
    );
    Ok(())
}

/// Commits in the logs the `verify` and `state-at` scenarios walk.
const LOG_COMMITS: u64 = 300_000;

fn message(n: u64) -> Arc<StoredMessage> {
    let payload = json!({"n": n, "text": "an event of the benchmark log"});
    Arc::new(StoredMessage {
        id: txbus::MessageId::new(),
        event_type: "bench.event".into(),
        module: Some("bench".into()),
        payload_json: payload.to_string(),
        payload,
        headers: Default::default(),
        headers_json: "{}".into(),
    })
}

/// Appends `count` one-message commits to `store`, 64 writers at once (group commits).
async fn fill(store: &Arc<dyn Store>, count: u64) -> Result<(), BoxError> {
    let writers = 64u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(store);
        tasks.push(tokio::spawn(async move {
            let mut n = w;
            while n < count {
                store
                    .append(NewCommit {
                        operation_id: OperationId::new(),
                        kind: CommitKind::Publish,
                        created_at_ms: txbus::time::now_ms(),
                        messages: vec![message(n)],
                        deliveries: Vec::new(),
                        lease_to: None,
                        streams: Vec::new(),
                        kv: Vec::new(),
                        acks: Vec::new(),
                    })
                    .await?;
                n += writers;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The raw limit: the same rows (commit and message columns, in position order) read with
/// plain rusqlite, nothing hashed or parsed.
fn raw_read(path: &std::path::Path) -> Result<(u64, Duration), BoxError> {
    let conn = rusqlite::Connection::open(path)?;
    let start = Instant::now();
    let mut stmt = conn.prepare(
        "SELECT c.position, c.op_id, c.kind, c.created_at, c.data_hash, c.chain_hash,
                m.id, m.event_type, m.module, m.payload, m.headers
         FROM commits c JOIN messages m ON m.position = c.position ORDER BY c.position, m.idx",
    )?;
    let mut rows = stmt.query([])?;
    let mut n = 0u64;
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let payload: String = r.get(9)?;
        let headers: String = r.get(10)?;
        let hash: Vec<u8> = r.get(5)?;
        bytes += payload.len() + headers.len() + hash.len();
        n += 1;
    }
    std::hint::black_box(bytes);
    Ok((n, start.elapsed()))
}

/// `verify` over a log of [`LOG_COMMITS`] commits, unsigned and signed, each beside the raw
/// read of its rows.
async fn verify(args: &Args) -> Result<(), BoxError> {
    for signed in [false, true] {
        let dir = workdir(args)?;
        let path = dir.path().join("bench.db");
        let sqlite = SqliteStore::open(&path)?;
        let ring = KeyRing::new().with("bench", signer().verifying_key());
        if signed {
            sqlite.set_signer(Some(Arc::new(signer())))?;
        }
        let store: Arc<dyn Store> = Arc::new(sqlite);
        fill(&store, LOG_COMMITS).await?;
        // Warm the page cache the same way for both readers.
        let _ = raw_read(&path)?;
        let (raw_rows, raw_elapsed) = raw_read(&path)?;
        let raw = Line::new(
            if signed {
                "raw-sqlite-read-signed"
            } else {
                "raw-sqlite-read"
            },
            raw_rows,
            raw_elapsed,
            Vec::new(),
        );
        raw.print(args.json);
        // The store's chain read alone (what verify walks), to show where the time goes.
        let start = Instant::now();
        let mut read = 0u64;
        let mut after = 0;
        loop {
            let page = store.read_chain(after, chain::VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            read += page.len() as u64;
        }
        Line::new(
            if signed {
                "read-chain-signed"
            } else {
                "read-chain"
            },
            read,
            start.elapsed(),
            Vec::new(),
        )
        .print(args.json);
        let options = if signed {
            VerifyOptions::signatures(ring).require_signatures(true)
        } else {
            VerifyOptions::hashes()
        };
        let start = Instant::now();
        let report = chain::verify_with(store.as_ref(), &options).await?;
        let elapsed = start.elapsed();
        if !report.is_intact() || report.verified != LOG_COMMITS {
            return Err(format!("the benchmark log does not verify: {report:?}").into());
        }
        let name = if signed { "verify-signed" } else { "verify" };
        let line = Line::new(name, report.verified, elapsed, Vec::new())
            .with("signatures", report.signatures as f64);
        line.print(args.json);
        let rate = line.ops_per_sec();
        print_check(
            args.json,
            &format!("{name} commits/s"),
            rate,
            ">= 200000",
            rate >= 200_000.0,
        );
        print_check(
            args.json,
            &format!("{name} / raw read"),
            rate / raw.ops_per_sec(),
            "(ratio)",
            true,
        );
        store.close().await?;
    }
    Ok(())
}

/// Keys and streams the `state-at` log writes, cycling.
const KEYS: u64 = 1000;
const STREAMS: u64 = 100;

/// A log of 110 000 commits, each writing one key of [`KEYS`] and appending to one stream of
/// [`STREAMS`]; then the state 100 000 commits back is rebuilt: every key and every stream head
/// (the whole state), one key with one stream head, and a page of 100 keys.
async fn state_at(args: &Args) -> Result<(), BoxError> {
    let dir = workdir(args)?;
    let path = dir.path().join("bench.db");
    let bus = Bus::builder()
        .store(SqliteStore::open(&path)?)
        .system_commits(false)
        .build()
        .await?;
    let total = 110_000u64;
    let writers = 64u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = w;
            while n < total {
                bus.commit_unwatched(
                    Commit::new()
                        .stream(
                            format!("stream-{}", n % STREAMS),
                            ExpectedVersion::Any,
                            [Event::new("bench.event", json!({"n": n}))],
                        )
                        .kv(KvWrite::put(format!("acct/{:04}", n % KEYS), n.to_string())),
                )
                .await?;
                n += writers;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let head = bus.head_position().await?;
    let position = head - 100_000;

    // The raw limit: the current key-value table read with plain rusqlite.
    let conn = rusqlite::Connection::open(&path)?;
    let mut raw_lat = Vec::new();
    let raw_start = Instant::now();
    for _ in 0..50 {
        let t = Instant::now();
        let mut stmt = conn.prepare_cached("SELECT key, value, version FROM kv ORDER BY key")?;
        let rows: Vec<(String, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        std::hint::black_box(rows.len());
        raw_lat.push(t.elapsed().as_nanos() as u64);
    }
    let raw =
        Line::new("raw-sqlite-kv-read", 50, raw_start.elapsed(), raw_lat).with("keys", KEYS as f64);
    raw.print(args.json);

    let mut full = Vec::new();
    let start = Instant::now();
    for _ in 0..50 {
        let t = Instant::now();
        let v = bus.state_at(position).await?;
        let mut keys = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = v.kv_scan("", after.as_deref(), 1000).await?;
            keys += page.items.len() as u64;
            match page.resume_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut streams = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = v.streams(after.as_deref(), 1000).await?;
            streams += page.items.len() as u64;
            match page.resume_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        if keys != KEYS || streams != STREAMS {
            return Err(format!("state_at({position}): {keys} keys, {streams} streams").into());
        }
        full.push(t.elapsed().as_nanos() as u64);
    }
    let full = Line::new("state-at-100k-back", 50, start.elapsed(), full)
        .with("keys", KEYS as f64)
        .with("streams", STREAMS as f64);
    full.print(args.json);

    let mut point = Vec::new();
    let start = Instant::now();
    for i in 0..2000u64 {
        let t = Instant::now();
        let v = bus.state_at(position).await?;
        let key = v.kv_get(&format!("acct/{:04}", i % KEYS)).await?;
        let version = v.stream_version(&format!("stream-{}", i % STREAMS)).await?;
        std::hint::black_box((key, version));
        point.push(t.elapsed().as_nanos() as u64);
    }
    Line::new("state-at-key-and-stream", 2000, start.elapsed(), point).print(args.json);

    let mut page = Vec::new();
    let start = Instant::now();
    for _ in 0..200 {
        let t = Instant::now();
        let v = bus.state_at(position).await?;
        std::hint::black_box(v.kv_scan("acct/", None, 100).await?);
        page.push(t.elapsed().as_nanos() as u64);
    }
    Line::new("state-at-page-100", 200, start.elapsed(), page).print(args.json);

    let p50 = full.percentile_ms(0.50);
    let p99 = full.percentile_ms(0.99);
    print_check(
        args.json,
        "state-at-100k-back p50 ms (whole state)",
        p50,
        "<= 50",
        p50 <= 50.0,
    );
    print_check(
        args.json,
        "state-at-100k-back p99 ms (whole state)",
        p99,
        "<= 50",
        p99 <= 50.0,
    );
    print_check(
        args.json,
        "state-at-100k-back p50 / raw kv read p50",
        p50 / raw.percentile_ms(0.50),
        "(ratio)",
        true,
    );
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
