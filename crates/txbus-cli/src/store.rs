//! Opening the store named by `--store`: `sqlite:PATH` (or a path) or `postgres://…`.

use std::path::PathBuf;
use std::sync::Arc;

use txbus_core::store::{self, Store};
use txbus_sqlite::SqliteStore;

use crate::error::Error;

/// Where the store is.
#[derive(Debug, Clone)]
pub enum Location {
    /// An embedded store file.
    Sqlite(PathBuf),
    /// A PostgreSQL database and the schema the store lives in.
    Postgres {
        /// The connection URL.
        url: String,
        /// The schema.
        schema: String,
    },
}

impl Location {
    /// Parses `--store` (and `--schema` for PostgreSQL).
    pub fn parse(given: &str, schema: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadStore {
            given: given.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = given.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad("no path after sqlite:; use sqlite:PATH"));
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if given.starts_with("postgres://") || given.starts_with("postgresql://") {
            return Ok(Self::Postgres {
                url: given.to_owned(),
                schema: schema.to_owned(),
            });
        }
        if given.contains("://") {
            return Err(bad(
                "unknown kind of store; use sqlite:PATH or postgres://USER@HOST/DB",
            ));
        }
        if given.is_empty() {
            return Err(bad("empty; use sqlite:PATH or postgres://USER@HOST/DB"));
        }
        Ok(Self::Sqlite(PathBuf::from(given)))
    }

    /// Opens the store to read: an embedded store read-only (it may be held by a running
    /// service), PostgreSQL as usual.
    pub async fn open_to_read(&self) -> Result<Arc<dyn Store>, Error> {
        match self {
            Self::Sqlite(path) => Ok(Arc::new(SqliteStore::open_read_only(path)?)),
            Self::Postgres { .. } => self.open_postgres().await,
        }
    }

    /// Opens the store to change it: an embedded store must not be held by another process.
    pub async fn open_to_write(&self, command: &'static str) -> Result<Arc<dyn Store>, Error> {
        match self {
            Self::Sqlite(path) => {
                // Refuse a path that holds no store rather than create one.
                if !path.is_file() {
                    return Err(Error::BadStore {
                        given: path.display().to_string(),
                        reason: "no store file there; check the path (a store is created by the first bus that opens it)".into(),
                    });
                }
                match SqliteStore::open(path) {
                    Ok(s) => Ok(Arc::new(s)),
                    Err(store::Error::Locked { path }) => Err(Error::Held { path, command }),
                    Err(e) => Err(e.into()),
                }
            }
            Self::Postgres { .. } => self.open_postgres().await,
        }
    }

    async fn open_postgres(&self) -> Result<Arc<dyn Store>, Error> {
        let Self::Postgres { url, schema } = self else {
            return Err(Error::Usage("not a PostgreSQL store".into()));
        };
        let bad = |reason: String| Error::BadStore {
            given: redact(url),
            reason,
        };
        // Connecting would create a missing schema: look first, so that a wrong name is an
        // error and not a new, empty store.
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
            .await
            .map_err(|e| bad(format!("cannot connect: {e}")))?;
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'commits'",
        )
        .bind(schema)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| bad(format!("cannot read the catalog: {e}")))?;
        let _ = sqlx::Connection::close(conn).await;
        if found.is_none() {
            return Err(bad(format!(
                "the database has no txbus store in schema {schema:?}; check --schema (default \"txbus\")"
            )));
        }
        let store = txbus_postgres::PostgresOptions::new(url.clone())
            .schema(schema.clone())
            .max_connections(2)
            .connect()
            .await?;
        Ok(Arc::new(store))
    }
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
