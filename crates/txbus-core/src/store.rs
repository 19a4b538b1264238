//! The store contract: what a backend implements so that every txbus feature works on it.
//!
//! A store keeps one ordered log of commits (each with its messages and hashes), a delivery per
//! (message, subscribed handler) with a lease, and each operation's outcome. The engine
//! ([`crate::Bus`]) does the rest. Writes that arrive together should be committed together
//! (group commit): the engine issues many small concurrent calls and relies on the store to
//! batch them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::chain::Hash;
pub use crate::conflict::Conflict;
use crate::kv::{KvEntry, KvWrite};
use crate::message::{OperationId, StoredMessage};
use crate::outcome::{Failure, OperationState, Outcome};
use crate::past_page::PastPage;
use crate::retention::{PruneReport, Retention};
use crate::signing::{CommitSignature, CommitSigner};
use crate::stream::{Direction, StreamAppend, StreamEvent};

/// Identifies one running bus instance: the holder of leases.
pub type OwnerId = Uuid;

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend failed (I/O, SQL, connection). Whether the call was applied is unknown only
    /// when `maybe_applied` is true.
    #[error("store backend failed: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The store is closed (shut down, or its writer stopped).
    #[error("the store is closed; open it again")]
    Closed,
    /// The store is held by another process.
    #[error(
        "the store at {path} is in use by another process; embedded stores allow one bus per file"
    )]
    Locked {
        /// The store's path.
        path: String,
    },
    /// The store was opened read-only (beside the process that holds it), and the call would
    /// write; nothing was written.
    #[error("the store at {path} is open read-only, so nothing was changed; stop the process that holds it and run this again, or act through that process (its bus or dashboard)")]
    ReadOnly {
        /// The store's path.
        path: String,
    },
    /// Stored data could not be read back (corrupt or edited by hand).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A condition of the call (a stream's expected version, a key's expected version) did not
    /// hold; nothing was written.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The call's input is unusable (a key too long, a stream id empty, …); nothing was
    /// written.
    #[error("invalid input, nothing was written: {0}")]
    Invalid(String),
    /// The stored schema is newer than this version of txbus.
    #[error("the store's schema version {found} is newer than this txbus supports ({supported}); upgrade txbus")]
    SchemaTooNew {
        /// Version in the store.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
}

impl Error {
    /// A backend error from any error type.
    pub fn backend(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// How a commit came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommitKind {
    /// A `transact`: its caller waits for the outcome.
    Transact = 1,
    /// A `publish`: nobody waits.
    Publish = 2,
    /// A system commit (the bus starting or stopping): it creates no deliveries, and relays
    /// and projections skip it unless asked for it.
    System = 3,
    /// A chunk of a batch ([`crate::batch`]): nobody waits; handlers run as for a publish.
    Batch = 4,
}

impl CommitKind {
    /// Its name in metrics, traces and tools: `transact`, `publish`, `system` or `batch`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Transact => "transact",
            Self::Publish => "publish",
            Self::System => "system",
            Self::Batch => "batch",
        }
    }

    /// From its stored number.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Transact),
            2 => Some(Self::Publish),
            3 => Some(Self::System),
            4 => Some(Self::Batch),
            _ => None,
        }
    }
}

/// A delivery to create with a commit.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// Index of the message within the commit.
    pub message_index: u32,
    /// The handler's stable name.
    pub handler: Arc<str>,
    /// Create it leased to [`NewCommit::lease_to`] (a handler of the committing bus, with room
    /// in memory); otherwise it is pending, for whichever bus claims it.
    pub leased: bool,
}

/// A handler subscription as a shared store keeps it, so that a bus routes messages to
/// handlers that live in other processes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subscription {
    /// The handler's stable name.
    pub name: String,
    /// Which messages it takes.
    pub filter: crate::On,
}

/// A commit to append.
#[derive(Debug, Clone)]
pub struct NewCommit {
    /// The operation this commit is.
    pub operation_id: OperationId,
    /// Transact or publish.
    pub kind: CommitKind,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The messages, validated.
    pub messages: Vec<Arc<StoredMessage>>,
    /// One delivery per (message, subscribed handler).
    pub deliveries: Vec<NewDelivery>,
    /// The owner that deliveries marked [`NewDelivery::leased`] are leased to (fence 1), so that
    /// the committing process runs them without another round trip. `None`: all are pending.
    pub lease_to: Option<OwnerId>,
    /// Stream appends: each names messages of this commit and the version its stream must be
    /// at. The store checks every condition before writing; one that fails makes the append
    /// fail with [`Error::Conflict`] and nothing is written. Each message carries its stream
    /// id in [`crate::Headers::stream`] too.
    pub streams: Vec<StreamAppend>,
    /// Key–value writes committed atomically with the commit (checkpoints, dedupe marks,
    /// indexes); a condition that fails makes the whole append fail with [`Error::Conflict`].
    pub kv: Vec<KvWrite>,
    /// Acknowledgements (results [`DeliveryResult::Succeeded`]) of deliveries whose handler
    /// made this commit: the store applies them in the same transaction, exactly as
    /// [`Store::complete`] would, after the commit's own rows. Every one must still hold its
    /// lease (its fence is current and it is leased): otherwise the append fails with
    /// [`Conflict::Lease`] and nothing is written.
    pub acks: Vec<Completion>,
}

/// What an append returns once the commit is durable.
#[derive(Debug, Clone)]
pub struct AppendReceipt {
    /// The commit's id: the key of its operation's state in this store. On stores that order the
    /// log as they append (SQLite) it is also the log position; others give positions when they
    /// seal the chain.
    pub commit_id: u64,
    /// The delivery ids, in the order of [`NewCommit::deliveries`].
    pub delivery_ids: Vec<i64>,
    /// The commit's chain hash, when the store seals at append (`None` when it seals later).
    pub chain_hash: Option<Hash>,
    /// Set when the commit had no deliveries: the operation is finished at once.
    pub finished: Option<Outcome>,
    /// What each of [`NewCommit::acks`] did, in order: always
    /// [`CompletionEffect::Applied`], with the outcome of the operation it finished.
    pub acked: Vec<CompletionEffect>,
}

/// A delivery leased by [`Store::claim`].
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    /// The delivery id.
    pub id: i64,
    /// The fencing token of this lease; acks must carry it.
    pub fence: i64,
    /// Attempts already finished.
    pub attempts: u32,
    /// Times a bus holding this delivery stopped without releasing it (a crash, a kill) and
    /// its lease was taken over. An attempt cut short that way is never recorded, so this is
    /// what shows a message that brings its process down.
    pub interruptions: u32,
    /// The commit's id (see [`AppendReceipt::commit_id`]).
    pub commit_id: u64,
    /// The operation.
    pub operation_id: OperationId,
    /// Index of the message in the commit.
    pub message_index: u32,
    /// The handler.
    pub handler: String,
    /// The message.
    pub message: Arc<StoredMessage>,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone)]
pub enum DeliveryResult {
    /// The handler succeeded.
    Succeeded,
    /// The attempt failed; try again at `next_at_ms`. The lease stays with the owner.
    Retry {
        /// When the next attempt may run.
        next_at_ms: i64,
        /// Why this one failed.
        error: String,
    },
    /// Failed for good; the operation fails with this failure. `dead` puts the delivery in
    /// the dead-letter set (retries exhausted, timeout, panic); otherwise it was rejected.
    Failed {
        /// The failure to record as the operation's outcome.
        failure: Failure,
        /// True for a dead letter; false for a rejection.
        dead: bool,
    },
}

/// An acknowledgement of one attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The delivery.
    pub delivery_id: i64,
    /// The fence of the lease the attempt ran under: a stale fence counts for nothing.
    pub fence: i64,
    /// The commit's id (the operation to update).
    pub commit_id: u64,
    /// Attempts finished, including this one.
    pub attempts: u32,
    /// The delivery's handler (the store counts finished deliveries by handler).
    pub handler: Arc<str>,
    /// What happened.
    pub result: DeliveryResult,
}

/// What a completion did.
#[derive(Debug, Clone, PartialEq)]
pub enum CompletionEffect {
    /// The lease was superseded (fence moved on, or the delivery was released): nothing changed.
    Stale,
    /// Applied; carries the operation's outcome when this completion finished it.
    Applied(Option<Outcome>),
}

/// A commit as read back from the log.
#[derive(Debug, Clone)]
pub struct CommitRecord {
    /// Its position.
    pub position: u64,
    /// Its operation.
    pub operation_id: OperationId,
    /// Transact or publish.
    pub kind: CommitKind,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Its messages.
    pub messages: Vec<StoredMessage>,
    /// The stored data hash.
    pub data_hash: Hash,
    /// The stored chain hash.
    pub chain_hash: Hash,
    /// The key–value writes committed with it, as they were handed in (empty for commits
    /// written before the log kept them). The data hash covers them when there are any.
    pub kv: Vec<KvWrite>,
    /// The signature stored with this commit, when the bus that linked it into the chain had
    /// a signing key. It signs this commit's chain hash, so it vouches for this commit and,
    /// through the chain, for every commit before it; stores sign the last commit of each
    /// group commit (see [`crate::signing`]).
    pub signature: Option<CommitSignature>,
}

impl CommitRecord {
    /// True for a system commit (start-up, shutdown).
    pub fn is_system(&self) -> bool {
        self.kind == CommitKind::System
    }
}

/// The hashed fields of one message, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct LogMessage<'a> {
    /// Message id.
    pub id: Uuid,
    /// Event type.
    pub event_type: &'a str,
    /// Module.
    pub module: Option<&'a str>,
    /// Payload as stored.
    pub payload_json: &'a str,
    /// Headers as stored.
    pub headers_json: &'a str,
}

impl<'a> From<&'a StoredMessage> for LogMessage<'a> {
    fn from(m: &'a StoredMessage) -> Self {
        Self {
            id: m.id.0,
            event_type: &m.event_type,
            module: m.module.as_deref(),
            payload_json: &m.payload_json,
            headers_json: &m.headers_json,
        }
    }
}

/// A delivery in the dead-letter set.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The delivery id (use it to replay).
    pub delivery_id: i64,
    /// The operation.
    pub operation_id: OperationId,
    /// The commit's id.
    pub commit_id: u64,
    /// Index of the message in the commit.
    pub message_index: u32,
    /// The handler.
    pub handler: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When it died, ms since the epoch.
    pub failed_at_ms: i64,
    /// The message.
    pub message: StoredMessage,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    /// Only this handler's.
    pub handler: Option<String>,
    /// Only those with a delivery id greater than this (for paging).
    pub after_id: Option<i64>,
    /// At most this many (the store caps it at 1000).
    pub limit: usize,
}

/// Counts of deliveries by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Waiting to be leased.
    pub pending: u64,
    /// Leased to a running bus.
    pub leased: u64,
    /// Succeeded (within retention).
    pub succeeded: u64,
    /// Rejected (within retention).
    pub rejected: u64,
    /// Dead letters.
    pub dead: u64,
}

/// A summary of the store's contents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commits in the log.
    pub commits: u64,
    /// Messages in the log.
    pub messages: u64,
    /// Deliveries by status.
    pub deliveries: DeliveryCounts,
    /// Operations without an outcome yet.
    pub pending_operations: u64,
}

/// What a store pushes to the buses on it, when it can: work and outcomes from other
/// processes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notification {
    /// Deliveries may be waiting: claim now rather than at the next poll.
    Work,
    /// An operation finished, possibly in another process: its outcome can be read.
    Finished(OperationId),
    /// Subscriptions changed (a bus with new handlers started): re-read them.
    Subscriptions,
}

/// A stream of notifications.
pub type Notifications = futures_util::stream::BoxStream<'static, Notification>;

/// How every store numbers an operation's state in its rows.
pub mod op_status {
    /// Deliveries remain.
    pub const PENDING: i64 = 0;
    /// Every delivery succeeded.
    pub const SUCCEEDED: i64 = 1;
    /// A delivery failed for good; the failure is stored as JSON.
    pub const FAILED: i64 = 2;
    /// Finished, and the outcome was removed by retention.
    pub const PRUNED: i64 = 3;
}

/// Rebuilds an operation's state from its stored columns (see [`op_status`]): `None` when the
/// outcome was pruned; an error when the row holds what no store writes.
pub fn operation_state(
    id: OperationId,
    status: i64,
    remaining: i64,
    failure_json: Option<&str>,
    finished_at_ms: Option<i64>,
) -> Result<Option<OperationState>, Error> {
    let finished_at_ms = finished_at_ms.unwrap_or(0);
    Ok(match status {
        op_status::PENDING => Some(OperationState::Pending {
            operation_id: id,
            remaining: u32::try_from(remaining).unwrap_or(0),
        }),
        op_status::SUCCEEDED => Some(OperationState::Finished(Outcome {
            operation_id: id,
            error: None,
            finished_at_ms,
        })),
        op_status::FAILED => {
            let failure: Failure =
                serde_json::from_str(failure_json.unwrap_or_default()).map_err(|e| {
                    Error::Corrupt(format!("operation {id}: stored failure is unreadable: {e}"))
                })?;
            Some(OperationState::Finished(Outcome {
                operation_id: id,
                error: Some(failure),
                finished_at_ms,
            }))
        }
        op_status::PRUNED => None,
        other => {
            return Err(Error::Corrupt(format!(
                "operation {id}: unknown status {other}"
            )))
        }
    })
}

/// The store contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends one commit atomically and durably (under the store's durability setting), with
    /// its data and chain hashes and its deliveries. Returns once it is durable; on error
    /// nothing was written.
    async fn append(&self, commit: NewCommit) -> Result<AppendReceipt, Error>;

    /// Leases up to `limit` deliveries for `handlers` that are due: pending ones whose time has
    /// come, and leased ones whose owner has not sent a heartbeat within `lease_ttl`. Each lease
    /// gets a new, higher fence; taking over the lease of a stopped owner (or freeing it when
    /// the store is opened after a crash) counts one [`ClaimedDelivery::interruptions`].
    async fn claim(
        &self,
        owner: OwnerId,
        handlers: &[String],
        limit: usize,
        lease_ttl: Duration,
    ) -> Result<Vec<ClaimedDelivery>, Error>;

    /// Records attempts. A completion whose fence is not the delivery's current one, or whose
    /// delivery is no longer leased, is [`CompletionEffect::Stale`] and changes nothing.
    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<CompletionEffect>, Error>;

    /// Records that `owner` is alive; its leases stay valid for `lease_ttl` from now.
    async fn heartbeat(&self, owner: OwnerId) -> Result<(), Error>;

    /// Returns every delivery leased by `owner` to pending (on shutdown), keeping their
    /// scheduled times, and forgets the owner.
    async fn release(&self, owner: OwnerId) -> Result<u64, Error>;

    /// Reads an operation's state; `None` when unknown or pruned.
    async fn operation(&self, id: OperationId) -> Result<Option<OperationState>, Error>;

    /// Lists dead letters, oldest first.
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, Error>;

    /// Puts a dead letter back to pending with its attempts reset. False when it is not a
    /// dead letter (unknown, already replayed, or pruned).
    async fn replay(&self, delivery_id: i64) -> Result<bool, Error>;

    /// Removes finished deliveries and outcomes beyond the retention bounds.
    async fn prune(&self, retention: &Retention) -> Result<PruneReport, Error>;

    /// Reads up to `limit` commits after `after_position`, in position order.
    async fn read_log(&self, after_position: u64, limit: usize)
        -> Result<Vec<CommitRecord>, Error>;

    /// Counts what the store holds.
    async fn stats(&self) -> Result<Stats, Error>;

    /// Reads up to `limit` events of `stream`, from version `from` (inclusive) in `direction`.
    /// An unknown stream reads as empty.
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StreamEvent>, Error>;

    /// The version of a stream's last event; 0 when the stream has none.
    async fn stream_version(&self, stream: &str) -> Result<u64, Error>;

    /// Reads one key; expired entries read as absent.
    async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, Error>;

    /// Applies writes atomically and durably: all or none. A condition that does not hold
    /// fails the call with [`Error::Conflict`] and nothing is written. Returns each written
    /// key's new version (0 for a delete).
    async fn kv_write(&self, writes: Vec<KvWrite>) -> Result<Vec<u64>, Error>;

    /// Lists up to `limit` live entries whose key starts with `prefix`, in key order, after
    /// the key `after` when given (for paging).
    async fn kv_scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KvEntry>, Error>;

    /// True when several processes share this store: buses then record their subscriptions in
    /// it and route to the handlers of every process. Embedded stores (one process per file)
    /// keep the default, `false`, and route to their own handlers only.
    fn is_shared(&self) -> bool {
        false
    }

    /// Records (or updates) subscriptions. Only called on shared stores.
    async fn subscribe(&self, subscriptions: Vec<Subscription>) -> Result<(), Error> {
        let _ = subscriptions;
        Ok(())
    }

    /// Every recorded subscription. Only called on shared stores.
    async fn subscriptions(&self) -> Result<Vec<Subscription>, Error> {
        Ok(Vec::new())
    }

    /// Forgets a subscription (a handler retired from every process); its pending deliveries
    /// stay, visible, until pruned or handled. True when it existed.
    async fn unsubscribe(&self, name: &str) -> Result<bool, Error> {
        let _ = name;
        Ok(false)
    }

    /// Notifications pushed by the store (another process committed work, an operation
    /// finished elsewhere). A store without a push channel returns `None` (the default), and
    /// buses rely on their poll interval instead; a single-process store needs none.
    fn notifications(&self) -> Option<Notifications> {
        None
    }

    /// Signs the chain from now on with `signer` (`None`: stop signing). Stores sign the chain
    /// hash of the last commit of each group commit (or, on stores that seal later, of each
    /// sealing round) in the same transaction, and keep the signature with that commit. A store
    /// that cannot sign keeps the default, which refuses.
    fn set_signer(&self, signer: Option<std::sync::Arc<CommitSigner>>) -> Result<(), Error> {
        let _ = signer;
        Err(Error::Invalid(
            "this store cannot sign commits; use a store that supports signatures".into(),
        ))
    }

    /// The position of the last commit in the log (0 when empty). The default pages through
    /// the log; stores answer from their index.
    async fn head(&self) -> Result<u64, Error> {
        let mut head = 0;
        loop {
            match self.read_log(head, 10_000).await?.last() {
                Some(c) => head = c.position,
                None => return Ok(head),
            }
        }
    }

    /// Reads up to `limit` commits after `after_position` for hashing (what `verify` walks):
    /// like [`Store::read_log`], but a store may leave the messages' payloads and headers
    /// unparsed (`payload` null, `headers` empty) — `payload_json` and `headers_json` hold the
    /// stored text, which is what the hashes cover. The default is `read_log`.
    async fn read_chain(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<CommitRecord>, Error> {
        self.read_log(after_position, limit).await
    }

    /// The store's kind and schema version, recorded by the bus's start-up commit.
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "unknown",
            schema_version: 0,
        }
    }

    /// The value `key` held just after the commit at `position`, as the log's key–value writes
    /// made it: `None` when no commit up to `position` wrote it, or the last one deleted it.
    /// Writes made outside commits ([`Store::kv_write`]) are not part of the log and not seen.
    async fn kv_at(&self, key: &str, position: u64) -> Result<Option<KvVersion>, Error> {
        let _ = (key, position);
        Err(unsupported("kv_at"))
    }

    /// Up to `limit` keys under `prefix` (after `after`), in key order, with the values they
    /// held just after the commit at `position` (see [`Store::kv_at`]); keys absent then are
    /// left out. Examines at most `max_examined` keys, present or not (see
    /// [`crate::past_page`]), and says where to continue.
    async fn kv_scan_at(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<KvVersion>, Error> {
        let _ = (prefix, after, limit, position, max_examined);
        Err(unsupported("kv_scan_at"))
    }

    /// The version of `stream` just after the commit at `position` (0: no event yet).
    async fn stream_version_at(&self, stream: &str, position: u64) -> Result<u64, Error> {
        let _ = (stream, position);
        Err(unsupported("stream_version_at"))
    }

    /// Up to `limit` streams (after `after`, in stream id order) that had events just after the
    /// commit at `position`, each with its version then. Examines at most `max_examined`
    /// streams, with events then or not (see [`crate::past_page`]), and says where to continue.
    async fn streams_at(
        &self,
        after: Option<&str>,
        limit: usize,
        position: u64,
        max_examined: usize,
    ) -> Result<PastPage<(String, u64)>, Error> {
        let _ = (after, limit, position, max_examined);
        Err(unsupported("streams_at"))
    }

    /// What the store answers about its contents (per-handler counts, throughput,
    /// operations, dead letters): see [`crate::inspect`]. `None` (the default) when it cannot;
    /// [`crate::Bus::inspect`] then answers [`crate::Error::Unsupported`].
    fn inspect(&self) -> Option<&dyn crate::inspect::Inspect> {
        None
    }

    /// Flushes and closes; later calls fail with [`Error::Closed`].
    async fn close(&self) -> Result<(), Error>;
}

fn unsupported(what: &str) -> Error {
    Error::Invalid(format!(
        "this store does not keep the history {what} needs; use the SQLite or PostgreSQL store"
    ))
}

/// What a store is, for the start-up record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreInfo {
    /// The backend (`sqlite`, `postgres`).
    pub backend: &'static str,
    /// The version of its schema (its migrations applied).
    pub schema_version: i64,
}

/// A key's value as of a position of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvVersion {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// The position of the commit that wrote this value.
    pub written_at: u64,
    /// When the value expires (ms since the epoch), if it was written with a time to live.
    pub expires_at_ms: Option<i64>,
}
