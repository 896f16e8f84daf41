//! Everything that talks to PostgreSQL: the connection pool, migrations, and
//! the private local server used when `DATABASE_URL` is unset.

pub mod dead_letters;
pub(crate) mod feed;
pub mod hydrate;
pub mod lease;
#[cfg(feature = "local-postgres")]
pub mod local;
pub(crate) mod migrate;
pub(crate) mod sql;
pub mod tables;
pub(crate) mod upsert;

pub use crate::entity::DocumentType;
pub use migrate::{HISTORY_TABLE, migrate};
pub use sql::upsert_sql;
pub use tables::{TableError, create_table_sql, ensure_tables};

/// The pool and driver crates whose types appear in this API, at the
/// versions it was built with: use these paths rather than adding them as
/// dependencies of your own.
pub use deadpool_postgres::{self, Pool};
pub use tokio_postgres::{self, Config};

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;

#[cfg(feature = "local-postgres")]
pub use local::{LocalPostgres, LocalPostgresError, LocalPostgresOptions};

/// Name of the database the server uses inside its private PostgreSQL.
pub const LOCAL_DATABASE: &str = "outbox";

/// How long opening a connection may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a statement of a pooled connection may run, and a transaction
/// stay idle, before the server ends it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a pooled session may sit inside a transaction without sending
/// anything. This process's transactions never pause that long unless it is
/// frozen or starved; a frozen holder's open flush transaction holds a share
/// lock on the lease row, so this bounds how long it can delay a standby's
/// takeover past the lease's expiry.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalive idle time: a connection to a database host that vanished
/// (no reset, no FIN) is found dead in about a minute, not hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// How long a caller waits for a free pooled connection. Short, so that a
/// database outage shows up as a fast, classified error instead of a hang.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `DATABASE_URL` could not be parsed.
    #[error("DATABASE_URL is not a valid PostgreSQL connection string: {0}")]
    BadUrl(#[source] tokio_postgres::Error),
    /// A statement or connection failed.
    #[error("database error: {}", ErrorText(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No pooled connection could be had.
    #[error("database pool: {}", PoolErrorText(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A migration failed.
    #[error("migration failed: {}", MigrationErrorText(.0))]
    Migration(#[from] refinery::Error),
    /// The database did not answer in time.
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
}

/// Shows a database error with what the server said (severity, SQLSTATE,
/// message, detail, hint) or, for a connection failure, its cause:
/// `tokio_postgres::Error`'s own text is only "db error".
pub struct ErrorText<'a>(pub &'a tokio_postgres::Error);

impl std::fmt::Display for ErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(f, "{} {}: {}", db.severity(), db.code().code(), db.message())?;
                if let Some(detail) = db.detail() {
                    write!(f, " (detail: {detail})")?;
                }
                if let Some(hint) = db.hint() {
                    write!(f, " (hint: {hint})")?;
                }
                Ok(())
            }
            None => {
                write!(f, "{}", self.0)?;
                if let Some(source) = std::error::Error::source(self.0) {
                    write!(f, ": {source}")?;
                }
                Ok(())
            }
        }
    }
}

/// [`ErrorText`] for a pool error (whose backend error it shows).
pub struct PoolErrorText<'a>(pub &'a deadpool_postgres::PoolError);

impl std::fmt::Display for PoolErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            deadpool_postgres::PoolError::Backend(e) => ErrorText(e).fmt(f),
            other => other.fmt(f),
        }
    }
}

/// A migration error with the database's own words when it has them.
struct MigrationErrorText<'a>(&'a refinery::Error);

impl std::fmt::Display for MigrationErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.kind())?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            if let Some(postgres) = cause.downcast_ref::<tokio_postgres::Error>() {
                return write!(f, ": {}", ErrorText(postgres));
            }
            source = cause.source();
        }
        Ok(())
    }
}

/// `From` the driver's and the pool's errors, through [`DbError`], for an
/// error type with a `Db(DbError)` variant.
macro_rules! from_driver_errors {
    ($error:ty) => {
        impl From<tokio_postgres::Error> for $error {
            fn from(e: tokio_postgres::Error) -> Self {
                Self::Db($crate::pg::DbError::Postgres(e))
            }
        }

        impl From<deadpool_postgres::PoolError> for $error {
            fn from(e: deadpool_postgres::PoolError) -> Self {
                Self::Db($crate::pg::DbError::Pool(e))
            }
        }
    };
}
pub(crate) use from_driver_errors;

/// Parses `DATABASE_URL` (URL or `key=value` form).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    url.parse::<tokio_postgres::Config>().map_err(DbError::BadUrl)
}

/// A description of where `config` points, safe to log: host, port, user and
/// database, never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} user={} dbname={}",
        if hosts.is_empty() { "localhost".to_owned() } else { hosts.join(",") },
        if ports.is_empty() { "5432".to_owned() } else { ports.join(",") },
        config.get_user().unwrap_or("(default)"),
        config.get_dbname().unwrap_or("(default)"),
    )
}

/// A connection pool of `size` connections. Connections are opened lazily
/// and re-opened after the database returns from an outage: a closed
/// connection fails its recycle check and is replaced.
pub fn pool(mut config: tokio_postgres::Config, size: usize) -> Pool {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("outbox");
    }
    config.keepalives_idle(KEEPALIVE_IDLE);
    if config.get_options().is_none() {
        // A statement stuck on a lock, or a session left inside a
        // transaction, would hold a batch (and its locks) forever: let the
        // server end them, so the flush fails, is retried, and moves on.
        // Long reads (hydration) lift the limit for their own transaction.
        config.options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            STATEMENT_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        ));
    }
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .expect("a pool with a runtime and a non-zero size always builds")
}

/// Opens one connection outside any pool, driving it on a spawned task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives_idle(KEEPALIVE_IDLE);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %ErrorText(&e), "database connection closed");
        }
    });
    Ok(client)
}

/// Creates database `name` through an administrative connection described by
/// `admin`, unless it exists.
pub async fn create_database_if_missing(admin: &tokio_postgres::Config, name: &str) -> Result<(), DbError> {
    let client = connect(admin).await?;
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        client.batch_execute(&format!("CREATE DATABASE {}", quote_ident(name))).await?;
        tracing::info!(database = name, "created database");
    }
    Ok(())
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One round trip to the database, for readiness checks.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_never_shows_the_password() {
        let config = parse_url("postgres://alice:s3cret@db.example:6543/app").expect("parses");
        let text = describe(&config);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("db.example") && text.contains("6543") && text.contains("alice") && text.contains("app"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "tokio-postgres redacts its Debug output: {debug}");
    }

    #[test]
    fn quote_ident_escapes_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
