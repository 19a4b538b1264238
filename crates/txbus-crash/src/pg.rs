//! `txbus-crash pg-worker URL SCHEMA NAME`: a bus process on a shared PostgreSQL store.
//!
//! Its handler `work` (on `job` events) records which worker handled which message in
//! `<SCHEMA>.handled`, counting repeats, after sleeping `TXBUS_WORK_MS` (default 0) so that
//! a kill can land mid-handler. `TXBUS_LEASE_TTL_MS` sets the lease ttl (default 30 000). It
//! prints `ready` once its bus runs and works until stdin closes or it is killed.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use txbus::{Bus, HandlerError, Message, On};
use txbus_postgres::PostgresOptions;

use crate::BoxError;

fn env_ms(name: &str, default: u64) -> Result<Duration, BoxError> {
    match std::env::var(name) {
        Ok(v) => Ok(Duration::from_millis(
            v.parse().map_err(|e| format!("{name}={v:?}: {e}"))?,
        )),
        Err(_) => Ok(Duration::from_millis(default)),
    }
}

pub(crate) async fn worker(url: String, schema: String, name: String) -> Result<(), BoxError> {
    let work = env_ms("TXBUS_WORK_MS", 0)?;
    let ttl = env_ms("TXBUS_LEASE_TTL_MS", 30_000)?;
    let records = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    let insert = format!(
        "INSERT INTO \"{schema}\".handled (message_id, worker, times) VALUES ($1::uuid, $2, 1)
         ON CONFLICT (message_id, worker) DO UPDATE SET times = handled.times + 1"
    );
    let store = PostgresOptions::new(&url).schema(&schema).connect().await?;
    let bus = Bus::builder()
        .store(store)
        .lease_ttl(ttl)
        .poll_interval(Duration::from_millis(200))
        .handler("work", On::event("job"), move |m: Message| {
            let (records, insert, name) = (records.clone(), insert.clone(), name.clone());
            async move {
                tokio::time::sleep(work).await;
                sqlx::query(&insert)
                    .bind(m.id().to_string())
                    .bind(&name)
                    .execute(&records)
                    .await
                    .map_err(HandlerError::transient)?;
                Ok(())
            }
        })
        .build()
        .await?;
    tracing::info!("worker ready");
    // The parent process waits for this line on stdout before it starts the load.
    #[allow(clippy::print_stdout)]
    {
        println!("ready");
    }
    // Work until the parent closes stdin (or kills us).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
