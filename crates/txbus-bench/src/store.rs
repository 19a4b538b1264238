//! Where a scenario's bus keeps its data: a fresh SQLite file (the default) or, with
//! `--store postgres://…`, a fresh schema in that PostgreSQL database.

use std::sync::Arc;

use txbus::store::Store;
use txbus::SqliteStore;
use txbus_postgres::PostgresOptions;

use crate::scenarios::{workdir, BoxError};
use crate::Args;

/// A fresh store location for one scenario.
pub enum Target {
    /// A SQLite file in a temporary directory.
    Sqlite(tempfile::TempDir),
    /// A schema of its own in a PostgreSQL database.
    Postgres {
        /// The database.
        url: String,
        /// The schema, dropped by [`Target::cleanup`].
        schema: String,
    },
}

impl Target {
    /// A location of the kind `--store` asks for.
    pub async fn new(args: &Args) -> Result<Self, BoxError> {
        match &args.store {
            None => Ok(Self::Sqlite(workdir(args)?)),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::Postgres {
                    url: url.clone(),
                    schema: format!("bench_{:016x}", fastrand::u64(..)),
                })
            }
            Some(other) => Err(format!(
                "--store {other:?}: give a postgres://… URL, or leave it out for SQLite"
            )
            .into()),
        }
    }

    /// Opens the store, with default (durable) settings.
    pub async fn open(&self) -> Result<Arc<dyn Store>, BoxError> {
        Ok(match self {
            Self::Sqlite(dir) => Arc::new(SqliteStore::open(dir.path().join("bench.db"))?),
            Self::Postgres { url, schema } => {
                Arc::new(PostgresOptions::new(url).schema(schema).connect().await?)
            }
        })
    }

    /// Removes what the scenario left (the SQLite directory goes with the value).
    pub async fn cleanup(&self) -> Result<(), BoxError> {
        if let Self::Postgres { url, schema } = self {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&pool)
                .await?;
            pool.close().await;
        }
        Ok(())
    }
}
