//! One typed configuration for the server, from command-line flags with
//! environment-variable fallbacks.
//!
//! Every field is validated when it is read: a zero batch size, a zero queue
//! capacity or an unparsable address stops the process at start with a
//! one-line error naming the setting, before anything is started.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::worker::WorkerConfig;

pub use crate::api::AckMode;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The server's configuration. Every setting is a flag and an environment
/// variable; the flag wins when both are given.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// PostgreSQL connection string (`postgres://user:pass@host/db` or
    /// `host=... dbname=...`). Unset: a private PostgreSQL is started from the
    /// installed server binaries, with its data in `$OUTBOX_DATA_DIR/postgres`.
    /// The password is never logged.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address the HTTP server listens on (`host:port`; port 0 picks a free
    /// one, printed at start).
    #[arg(long, env = "OUTBOX_LISTEN", value_name = "OUTBOX_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: SocketAddr,

    /// Most distinct entities that may wait for persistence at once. When it
    /// is full, changes are refused with 503 and `Retry-After`.
    /// Memory held by pending work is bounded by this number.
    #[arg(long, env = "OUTBOX_QUEUE_CAPACITY", value_name = "OUTBOX_QUEUE_CAPACITY", default_value_t = 100_000, value_parser = positive_usize, global = true)]
    pub queue_capacity: usize,

    /// Most rows written in one batch transaction.
    #[arg(long, env = "OUTBOX_BATCH_MAX", value_name = "OUTBOX_BATCH_MAX", default_value_t = 5000, value_parser = positive_usize, global = true)]
    pub batch_max: usize,

    /// Milliseconds a batch waits for more records after its first one
    /// before it is written.
    #[arg(long, env = "OUTBOX_LINGER_MS", value_name = "OUTBOX_LINGER_MS", default_value_t = 5, value_parser = positive_u64, global = true)]
    pub linger_ms: u64,

    /// Longest pause, in milliseconds, between two attempts to write a batch
    /// that failed; the backoff grows exponentially up to it, with jitter.
    /// It bounds how long after a database returns the backlog starts
    /// flowing again; two writers retrying every couple of seconds put no
    /// load on a recovering database.
    #[arg(long, env = "OUTBOX_RETRY_MAX_DELAY_MS", value_name = "OUTBOX_RETRY_MAX_DELAY_MS", default_value_t = 2_000, value_parser = positive_u64, global = true)]
    pub retry_max_delay_ms: u64,

    /// Seconds the shutdown waits for pending changes to be written before it
    /// gives up on the database.
    #[arg(long, env = "OUTBOX_DRAIN_TIMEOUT_S", value_name = "OUTBOX_DRAIN_TIMEOUT_S", default_value_t = 30, value_parser = positive_u64, global = true)]
    pub drain_timeout_s: u64,

    /// When a change is acknowledged: `memory` (after the in-memory change)
    /// or `durable` (after its commit). A request's `Prefer: durable` header
    /// asks for `durable` whatever this says.
    #[arg(long, env = "OUTBOX_ACK", value_name = "OUTBOX_ACK", value_enum, default_value_t = AckMode::Memory, global = true)]
    pub ack: AckMode,

    /// Folder for local state: the private PostgreSQL's data (when
    /// `DATABASE_URL` is unset) and spill files.
    #[arg(long, env = "OUTBOX_DATA_DIR", value_name = "OUTBOX_DATA_DIR", default_value = ".data", global = true)]
    pub data_dir: PathBuf,

    /// Bearer token for the `/api/admin` routes. Unset: the admin routes are
    /// not served at all.
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN", value_name = "OUTBOX_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,

    /// Seconds the single-writer lease lasts unless renewed (it is renewed
    /// every third of it). A frozen or cut-off holder is replaced by a
    /// standby after about this long; shorter means faster failover and more
    /// renewals, and a holder must be able to renew within it.
    #[arg(long, env = "OUTBOX_LEASE_TTL_S", value_name = "OUTBOX_LEASE_TTL_S", default_value_t = 10, value_parser = positive_u64, global = true)]
    pub lease_ttl_s: u64,

    /// Connections in the database pool (the worker's writers, readiness
    /// checks and admin queries share it).
    #[arg(long, env = "OUTBOX_POOL_SIZE", value_name = "OUTBOX_POOL_SIZE", default_value_t = 8, value_parser = positive_usize, global = true)]
    pub pool_size: usize,

    /// Batches written at once, each on its own database connection. Two
    /// use both cores of a 2-core database; more rarely help.
    #[arg(long, env = "OUTBOX_WRITERS", value_name = "OUTBOX_WRITERS", default_value_t = 2, value_parser = positive_usize, global = true)]
    pub writers: usize,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "OUTBOX_BODY_LIMIT", value_name = "OUTBOX_BODY_LIMIT", default_value_t = 1024 * 1024, value_parser = positive_usize, global = true)]
    pub body_limit: usize,

    /// Seconds a request may take before it is answered 408 (a durable
    /// request waiting on a database outage is bounded by this).
    #[arg(long, env = "OUTBOX_REQUEST_TIMEOUT_S", value_name = "OUTBOX_REQUEST_TIMEOUT_S", default_value_t = 30, value_parser = positive_u64, global = true)]
    pub request_timeout_s: u64,

    /// Seconds an `Idempotency-Key`'s first answer is kept and replayed to
    /// retries of the same request; then it expires (a tombstone).
    #[arg(long, env = "OUTBOX_IDEMPOTENCY_TTL_S", value_name = "OUTBOX_IDEMPOTENCY_TTL_S", default_value_t = 86_400, value_parser = positive_u64, global = true)]
    pub idempotency_ttl_s: u64,

    /// Seconds a connection may take to send a request's headers; then it
    /// is answered 408 and closed. Also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "OUTBOX_HEADER_TIMEOUT_S", value_name = "OUTBOX_HEADER_TIMEOUT_S", default_value_t = 10, value_parser = positive_u64, global = true)]
    pub header_timeout_s: u64,

    /// Most HTTP connections open at once; beyond it new connections wait
    /// in the listen queue until one closes.
    #[arg(long, env = "OUTBOX_MAX_CONNECTIONS", value_name = "OUTBOX_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = positive_usize, global = true)]
    pub max_connections: usize,

    /// For benchmarks only: the worker takes batches but writes nothing, so
    /// every change is lost. Measures what persistence costs the server.
    #[arg(
        long,
        env = "OUTBOX_BENCH_DISCARD_WRITES",
        value_name = "OUTBOX_BENCH_DISCARD_WRITES",
        default_value_t = false,
        global = true
    )]
    pub bench_discard_writes: bool,

    /// Log filter, in `tracing` `EnvFilter` syntax (e.g. `info`,
    /// `outbox=debug,tower_http=info`).
    #[arg(long = "log", env = "RUST_LOG", value_name = "RUST_LOG", default_value = "info", global = true)]
    pub log_filter: String,

    /// Log line format: `text` or `json`.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", value_name = "OUTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl Config {
    /// The worker's batching and retry settings.
    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            batch_max: self.batch_max,
            linger: self.linger(),
            retry_max_delay: self.retry_max_delay(),
            writers: self.writers,
            discard: self.bench_discard_writes,
        }
    }

    /// How long a batch waits for more records after its first one.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    /// The cap of the retry backoff.
    pub fn retry_max_delay(&self) -> Duration {
        Duration::from_millis(self.retry_max_delay_ms)
    }

    /// How long shutdown waits for the outbox to drain.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
    }

    /// How long the lease lasts unless renewed.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s)
    }

    /// How long one request may take.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_s)
    }

    /// Where spill files go.
    pub fn spill_dir(&self) -> PathBuf {
        self.data_dir.join("spill")
    }

    /// Where the private PostgreSQL keeps its cluster.
    pub fn local_postgres_dir(&self) -> PathBuf {
        self.data_dir.join("postgres")
    }
}

fn positive_usize(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err("must be a positive whole number".to_owned()),
    }
}

fn positive_u64(value: &str) -> Result<u64, String> {
    match value.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err("must be a positive whole number".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Cli::try_parse_from(std::iter::once("outbox").chain(args.iter().copied())).map(|c| c.config)
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).expect("defaults parse");
        assert!(config.batch_max >= 1);
        assert!(config.queue_capacity >= 1);
    }

    #[test]
    fn zero_batch_size_is_refused_naming_the_setting() {
        let err = parse(&["--batch-max", "0"]).expect_err("zero refused").to_string();
        assert!(err.contains("OUTBOX_BATCH_MAX"), "{err}");
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn zero_capacity_and_bad_address_are_refused() {
        assert!(parse(&["--queue-capacity", "0"]).is_err());
        let err = parse(&["--listen", "nowhere"]).expect_err("bad address").to_string();
        assert!(err.contains("OUTBOX_LISTEN"), "{err}");
    }
}
