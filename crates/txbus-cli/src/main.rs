//! `txbus`: look inside a txbus store and operate it — its status, operations, dead letters,
//! the log, the hash chain, projections, relays and sagas.
//!
//! ```text
//! txbus --store sqlite:./data/txbus.db status
//! txbus --store postgres://app@db/app --schema txbus dlq list --json
//! ```
//!
//! ```text
//! txbus --store sqlite:./data/txbus.db verify --public-key ops-2026=<64 hex digits> --require-signatures
//! txbus --store sqlite:./data/txbus.db batches show import-users --follow
//! ```
//!
//! Reading commands open an embedded store read-only, so they work while a service holds it;
//! commands that change the store (`dlq replay`, `dlq discard`) need it free. Exit status: 0 done, 1 the
//! chain does not verify, 2 an error (said on standard error).
#![allow(clippy::print_stderr)]

mod batches;
mod checkpoints;
mod dlq;
mod error;
mod log;
mod ops;
mod output;
mod sagas;
mod status;
mod store;
mod verify;

use clap::{Parser, Subcommand};

use crate::error::Error;
use crate::output::Output;
use crate::store::Location;

/// Inspect and operate a txbus store.
#[derive(Debug, Parser)]
#[command(name = "txbus", version, about, long_about = None)]
struct Cli {
    /// The store: `sqlite:PATH` (or a path) for an embedded store, `postgres://…` for PostgreSQL.
    #[arg(long, env = "TXBUS_STORE", global = true)]
    store: Option<String>,
    /// The PostgreSQL schema the store lives in.
    #[arg(long, default_value = "txbus", global = true)]
    schema: String,
    /// Print JSON (one document per result) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What the store holds: commits, messages, deliveries by state, pending operations.
    Status,
    /// Operations.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// The dead-letter set.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// The log of commits.
    #[command(subcommand)]
    Log(LogCommand),
    /// Walks the log and reports the first commit that was edited, removed or reordered: data
    /// and chain hashes, and signatures when public keys are given.
    Verify {
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// A public key to check signatures with: KEY_ID=HEX, the id the bus signs with and its
        /// 32-byte ed25519 public key in hex. Repeat it for every key that ever signed (after a
        /// rotation the old key still checks the commits it signed).
        #[arg(long = "public-key", value_name = "KEY_ID=HEX")]
        public_keys: Vec<String>,
        /// A file of public keys: one KEY_ID=HEX per line, `#` starts a comment.
        #[arg(long, value_name = "FILE")]
        keys: Option<std::path::PathBuf>,
        /// Fails unless every commit is vouched for by a valid signature at or after it (the
        /// end of the log must be signed). Needs the public keys.
        #[arg(long)]
        require_signatures: bool,
    },
    /// Bulk jobs (batches) and how far each has come.
    Batches {
        /// At most this many.
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: usize,
        /// Only those after this batch name (paging).
        #[arg(long)]
        after: Option<String>,
        #[command(subcommand)]
        show: Option<BatchCommand>,
    },
    /// Projections: their checkpoints and lag.
    Projections,
    /// Outbox relays: their checkpoints and lag.
    Relays,
    /// Sagas by status, or one saga's history.
    Sagas {
        /// Only this status (running, compensating, completed, failed, needs-attention).
        #[arg(long)]
        status: Option<String>,
        /// At most this many of each status.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(subcommand)]
        show: Option<SagaCommand>,
    },
}

#[derive(Debug, Subcommand)]
enum OpsCommand {
    /// The newest operations with their status.
    List {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: usize,
    },
    /// Where one operation stands, and why it failed.
    Show {
        /// The operation id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead letters, oldest first.
    List {
        /// Only this handler's.
        #[arg(long)]
        handler: Option<String>,
        /// Only those after this delivery id (paging).
        #[arg(long)]
        after: Option<i64>,
        /// How many (at most 1000).
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter: its message, headers, payload and last error.
    Show {
        /// The delivery id.
        id: i64,
    },
    /// Runs dead letters again, from attempt 1 (the operation's recorded outcome stays).
    Replay {
        /// Delivery ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Removes dead letters for good (their messages stay in the log).
    Discard {
        /// Delivery ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// The newest commits, oldest first.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        /// Keep printing commits as they come, until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BatchCommand {
    /// One batch: items done of the total, chunks, finished or not.
    Show {
        /// The batch's name.
        name: String,
        /// Keep showing its progress (a progress bar, or a JSON line per change) until it is
        /// finished or interrupted.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SagaCommand {
    /// One saga's history.
    Show {
        /// The saga id.
        id: String,
    },
}

async fn run(cli: Cli) -> Result<bool, Error> {
    let given = cli.store.ok_or_else(|| {
        Error::Usage(
            "no store given: pass --store sqlite:PATH or --store postgres://… (or set TXBUS_STORE)"
                .into(),
        )
    })?;
    let location = Location::parse(&given, &cli.schema)?;
    let out = Output { json: cli.json };
    let mut intact = true;
    let store = match &cli.command {
        Command::Dlq(DlqCommand::Replay { .. }) => location.open_to_write("dlq replay").await?,
        Command::Dlq(DlqCommand::Discard { .. }) => location.open_to_write("dlq discard").await?,
        _ => location.open_to_read().await?,
    };
    let s = store.as_ref();
    let result = match cli.command {
        Command::Status => status::status(s, out).await,
        Command::Ops(OpsCommand::List { limit }) => ops::list(s, limit, out).await,
        Command::Ops(OpsCommand::Show { id }) => ops::show(s, &id, out).await,
        Command::Dlq(DlqCommand::List {
            handler,
            after,
            limit,
        }) => dlq::list(s, handler, after, limit, out).await,
        Command::Dlq(DlqCommand::Show { id }) => dlq::show(s, id, out).await,
        Command::Dlq(DlqCommand::Replay { ids }) => dlq::replay(s, &ids, out).await,
        Command::Dlq(DlqCommand::Discard { ids }) => dlq::discard(s, &ids, out).await,
        Command::Log(LogCommand::Tail { count, follow }) => log::tail(s, count, follow, out).await,
        Command::Verify {
            quiet,
            public_keys,
            keys,
            require_signatures,
        } => {
            let signatures = verify::Signatures {
                public_keys,
                key_file: keys,
                require: require_signatures,
            };
            verify::verify(s, &signatures, !quiet, out).await.map(|ok| {
                intact = ok;
            })
        }
        Command::Batches {
            show: Some(BatchCommand::Show { name, follow }),
            ..
        } => batches::show(s, &name, follow, out).await,
        Command::Batches {
            limit,
            after,
            show: None,
        } => batches::list(s, after, limit, out).await,
        Command::Projections => checkpoints::list(s, checkpoints::Kind::Projections, out).await,
        Command::Relays => checkpoints::list(s, checkpoints::Kind::Relays, out).await,
        Command::Sagas {
            show: Some(SagaCommand::Show { id }),
            ..
        } => sagas::show(s, &id, out).await,
        Command::Sagas {
            status,
            limit,
            show: None,
        } => {
            let statuses = match status {
                Some(name) => vec![sagas::parse_status(&name)?],
                None => txbus_saga::SagaStatus::ALL.to_vec(),
            };
            sagas::list(s, &statuses, limit, out).await
        }
    };
    let closed = store.close().await;
    result?;
    closed?;
    Ok(intact)
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("txbus: cannot start: {e}");
            std::process::exit(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("txbus: error: {e}");
            std::process::exit(2);
        }
    }
}
