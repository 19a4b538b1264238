//! CQRS scenarios (`txbus-cqrs`): a command through the command bus to an event-sourced
//! aggregate (load, handle, durable save), and cached queries over a projection's read model.
//! One caller, latency; each on a fresh store with default (durable) settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Bus, On, TypedEvent};
use txbus_cqrs::command::{self, Command, CommandBus, Tracing, Validation};
use txbus_cqrs::query::{self, Query, QueryBus};
use txbus_es::projection::{Projector, ReadModel, ReadModelTx};
use txbus_es::{Aggregate, EventStore, LogEvent, Repository};

use crate::report::{print_check, Line};
use crate::scenarios::BoxError;
use crate::store::Target;
use crate::Args;

/// Runs the scenario named in `args` when it is one of these; `None` otherwise.
pub async fn run(args: &Args) -> Option<Result<(), BoxError>> {
    let result = match args.scenario.as_str() {
        "command" => command(args).await,
        "query-cached" => query_cached(args).await,
        "cqrs" => match command(args).await {
            Ok(()) => query_cached(args).await,
            Err(e) => Err(e),
        },
        _ => return None,
    };
    Some(result)
}

/// Money paid into an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposited {
    cents: u64,
}

impl TypedEvent for Deposited {
    const EVENT_TYPE: &'static str = "bench.deposited";
}

/// An account: its balance and how many deposits made it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
    deposits: u64,
}

/// Why an account refuses a deposit.
#[derive(Debug)]
struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the balance would overflow")
    }
}

impl std::error::Error for Overflow {}

impl Aggregate for Account {
    const KIND: &'static str = "account";
    type Event = Deposited;
    type Command = u64;
    type Error = Overflow;

    fn create(_id: &str) -> Self {
        Self::default()
    }

    fn handle(&self, cents: &u64) -> Result<Vec<Deposited>, Overflow> {
        self.balance.checked_add(*cents).ok_or(Overflow)?;
        Ok(vec![Deposited { cents: *cents }])
    }

    fn apply(&mut self, e: &Deposited) {
        self.balance += e.cents;
        self.deposits += 1;
    }
}

/// The command: deposit into one account.
#[derive(Debug, Serialize)]
struct Deposit {
    account: String,
    cents: u64,
}

impl Command for Deposit {
    type Output = u64;
    const NAME: &'static str = "account.deposit";

    fn validate(&self) -> Result<(), String> {
        if self.cents == 0 {
            return Err("a deposit is at least one cent".into());
        }
        Ok(())
    }
}

/// Accounts the commands are spread over.
const ACCOUNTS: u64 = 1_000;

async fn open(target: &Target) -> Result<Bus, BoxError> {
    Ok(Bus::builder()
        .shared_store(target.open().await?)
        .build()
        .await?)
}

/// The line of a latency scenario, with p90 (ms) and the quantiles in µs beside the report's
/// usual fields.
fn line(name: &str, lat: Vec<u64>, elapsed: Duration) -> Line {
    let l = Line::new(name, lat.len() as u64, elapsed, lat);
    let (p50, p90, p99) = (
        l.percentile_ms(0.50),
        l.percentile_ms(0.90),
        l.percentile_ms(0.99),
    );
    l.with("p90_ms", p90)
        .with("p50_us", p50 * 1e3)
        .with("p90_us", p90 * 1e3)
        .with("p99_us", p99 * 1e3)
}

/// One caller sends deposits through the command bus (tracing and validation middleware) to
/// the account repository, over a thousand accounts: each is a load (its stream), the
/// aggregate's decision, and a durable save with the exact version.
async fn command(args: &Args) -> Result<(), BoxError> {
    let target = Target::new(args).await?;
    let bus = open(&target).await?;
    // The repository's defaults: no snapshots (each account's stream stays short here).
    let accounts = Repository::<Account>::new(EventStore::new(bus.clone()));
    let commands = CommandBus::builder()
        .middleware(Tracing)
        .middleware(Validation)
        .handler(move |d: Deposit| {
            let accounts = accounts.clone();
            async move {
                let saved = accounts
                    .execute(&d.account, d.cents)
                    .await
                    .map_err(command::Error::failed)?;
                Ok(saved.version)
            }
        })
        .build()?;
    let deposit = |n: u64| Deposit {
        account: format!("acct-{}", n % ACCOUNTS),
        cents: 1 + n % 97,
    };
    // Warm up: every account exists, the page cache and prepared statements are warm.
    for n in 0..ACCOUNTS {
        commands.send(deposit(n)).await?;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut n = ACCOUNTS;
    while start.elapsed() < args.secs {
        let d = deposit(n);
        let t = Instant::now();
        commands.send(d).await?;
        lat.push(t.elapsed().as_nanos() as u64);
        n += 1;
    }
    let elapsed = start.elapsed();
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    report(
        args,
        line("command", lat, elapsed),
        "command p50 ms",
        0.5,
        false,
    );
    Ok(())
}

/// The read model of the query scenario: deposits per account.
struct Balances;

const PREFIX: &str = "rm/bench-balances/";

#[txbus_es::async_trait]
impl ReadModel for Balances {
    fn prefix(&self) -> &str {
        PREFIX
    }

    fn filter(&self) -> On {
        On::event(Deposited::EVENT_TYPE)
    }

    async fn apply(&self, event: &LogEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        let Some(account) = event.stream().and_then(|s| s.strip_prefix("account-")) else {
            return Ok(());
        };
        let deposited: Deposited = event.decode()?;
        let key = format!("{PREFIX}{account}");
        let mut view: BalanceView = tx.get_json(&key).await?.unwrap_or_default();
        view.balance += deposited.cents;
        view.deposits += 1;
        tx.put_json(key, &view)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BalanceView {
    balance: u64,
    deposits: u64,
}

/// The query: one account's balance, from the read model.
#[derive(Debug, Serialize)]
struct GetBalance {
    account: String,
}

impl Query for GetBalance {
    type Output = Option<Arc<BalanceView>>;
    const NAME: &'static str = "account.balance";
}

/// Queries answered from the cache: a projection of 100 accounts' deposits, the query bus
/// over it depending on the projection's checkpoint, every query's result cached once; then
/// one caller asks them in turn. Each answer is a cache hit (checked).
async fn query_cached(args: &Args) -> Result<(), BoxError> {
    const QUERIED: u64 = 100;
    let target = Target::new(args).await?;
    let bus = open(&target).await?;
    let events = EventStore::new(bus.clone());
    let accounts = Repository::<Account>::new(events.clone());
    for n in 0..QUERIED * 3 {
        accounts
            .execute(&format!("acct-{}", n % QUERIED), 1 + n % 7)
            .await?;
    }
    let projection = Projector::read_model("bench-balances", Balances)
        .start(&events)
        .await?;
    projection.catch_up().await?;
    let reader = bus.clone();
    let queries = QueryBus::builder()
        .handler(
            move |q: GetBalance| {
                let bus = reader.clone();
                async move {
                    let entry = bus
                        .kv_get(&format!("{PREFIX}{}", q.account))
                        .await
                        .map_err(query::Error::failed)?;
                    entry
                        .map(|e| serde_json::from_slice(&e.value).map(Arc::new))
                        .transpose()
                        .map_err(query::Error::failed)
                }
            },
            [projection.checkpoint_watch()],
        )
        .build()?;
    let ask = |n: u64| GetBalance {
        account: format!("acct-{}", n % QUERIED),
    };
    for n in 0..QUERIED {
        if queries.ask(ask(n)).await?.is_none() {
            return Err(format!("query-cached: account {n} is missing from the read model").into());
        }
    }
    let misses = queries.cache_stats().misses;
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < args.secs {
        let q = ask(n);
        let t = Instant::now();
        let answer = queries.ask(q).await?;
        lat.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(answer);
        n += 1;
    }
    let elapsed = start.elapsed();
    let stats = queries.cache_stats();
    if stats.misses != misses {
        return Err(format!(
            "query-cached: {} queries missed the cache",
            stats.misses - misses
        )
        .into());
    }
    projection.stop().await?;
    bus.shutdown(Duration::from_secs(10)).await?;
    target.cleanup().await?;
    report(
        args,
        line("query-cached", lat, elapsed),
        "query-cached p50 us",
        10.0,
        true,
    );
    Ok(())
}

/// Prints the line and checks its p50 against the target (in ms, or µs when `micros`).
fn report(args: &Args, l: Line, check: &str, target: f64, micros: bool) {
    l.print(args.json);
    let p50 = l.percentile_ms(0.5) * if micros { 1e3 } else { 1.0 };
    print_check(
        args.json,
        check,
        p50,
        &format!("<= {target}"),
        p50 <= target,
    );
}
