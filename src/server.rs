//! The reference server's life cycle: open the database, bind, start up in
//! the order of DESIGN I9, serve, and shut down in the order of I10.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AppState, Phase, Readiness};
use crate::config::Config;
use crate::engine::Engine;
use crate::pg::hydrate::HydrateError;
use crate::pg::{self, DbError, LocalPostgres, LocalPostgresError, LocalPostgresOptions};
use crate::worker::WorkerConfig;

/// How often histogram upkeep runs in the metrics recorder.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest pause between two attempts of a start-up step that needs the
/// database (it may still be starting).
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The private PostgreSQL could not be started or stopped.
    #[error(transparent)]
    LocalPostgres(#[from] LocalPostgresError),
    /// A database step failed for good.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (OUTBOX_LISTEN): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] io::Error),
    /// Hydration failed: the server does not serve partial state.
    #[error("hydration failed: {0}")]
    Hydrate(#[from] HydrateError),
    /// The drain deadline passed with changes unwritten.
    #[error("{unwritten} entities were not written before the drain deadline (OUTBOX_DRAIN_TIMEOUT_S)")]
    DrainIncomplete {
        /// Entities whose newest version is not in the database.
        unwritten: usize,
    },
}

/// Where the database is, and the private server when we run one.
pub struct Database {
    /// Connection settings for the application database.
    pub config: tokio_postgres::Config,
    /// The private PostgreSQL, when `DATABASE_URL` is unset.
    pub local: Option<LocalPostgres>,
}

impl Database {
    /// Uses `DATABASE_URL` when set; otherwise starts (and, on first use,
    /// creates) the private PostgreSQL of DESIGN C2 and its `outbox`
    /// database.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        if let Some(url) = &config.database_url {
            let db_config = pg::parse_url(url)?;
            info!(database = %pg::describe(&db_config), "using DATABASE_URL");
            return Ok(Self { config: db_config, local: None });
        }
        let options = LocalPostgresOptions::new(config.local_postgres_dir());
        info!(dir = %options.data_dir.display(), "DATABASE_URL is unset: starting a private PostgreSQL");
        let local = tokio::task::spawn_blocking(move || LocalPostgres::start(options))
            .await
            .expect("the PostgreSQL start task does not panic")?;
        pg::create_database_if_missing(&local.config("postgres"), pg::LOCAL_DATABASE).await?;
        let db_config = local.config(pg::LOCAL_DATABASE);
        info!(database = %pg::describe(&db_config), log = %local.log_path().display(), "private PostgreSQL is ready");
        Ok(Self { config: db_config, local: Some(local) })
    }

    /// Stops the private PostgreSQL, if there is one, and waits for it.
    pub async fn close(self) -> Result<(), ServerError> {
        if let Some(local) = self.local {
            tokio::task::spawn_blocking(move || local.stop())
                .await
                .expect("the PostgreSQL stop task does not panic")?;
        }
        Ok(())
    }
}

/// Runs the server until `shutdown` is cancelled, then shuts down in order:
/// stop accepting, finish in-flight requests, stop the database we started.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    let metrics = crate::metrics::install();
    let readiness = Arc::new(Readiness::new());
    let database = Database::open(&config).await?;
    let result = serve(&config, &database, metrics, readiness, shutdown).await;
    let closed = database.close().await;
    result.and(closed)
}

async fn serve(
    config: &Config,
    database: &Database,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let pool = pg::pool(database.config.clone(), config.pool_size);
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    info!(%addr, "listening on http://{addr}");

    let upkeep = {
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                metrics.run_upkeep();
            }
        })
    };

    let (store, receiver) = api::store_builder().capacity(config.queue_capacity).build();
    let state = AppState {
        readiness: readiness.clone(),
        pool: pool.clone(),
        metrics,
        store: store.clone(),
        ack: config.ack,
        body_limit: config.body_limit,
        request_timeout: config.request_timeout(),
        admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
    };
    let app = api::router(state);
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(http_shutdown.cancelled_owned()).await
    });

    // Start-up (DESIGN I9). Until every step is done, /readyz answers 503
    // with the step it is on.
    let started = shutdown
        .run_until_cancelled(async {
            readiness.set(Phase::Starting("running migrations".into()));
            retry_startup_step("migrations", || pg::migrate(&pool)).await;
            readiness.set(Phase::Starting("hydrating".into()));
            let (engine, _) = Engine::start(store, receiver, pool.clone(), WorkerConfig::from_config(config)).await?;
            readiness.set(Phase::Ready);
            info!(%addr, "ready");
            Ok::<Engine, ServerError>(engine)
        })
        .await;
    let engine = match started {
        Some(Ok(engine)) => Some(engine),
        Some(Err(e)) => {
            shutdown.cancel();
            let _ = http.await;
            upkeep.abort();
            return Err(e);
        }
        None => {
            info!("shutdown requested during start-up");
            None
        }
    };

    shutdown.cancelled().await;
    readiness.set(Phase::ShuttingDown);
    info!("shutting down: no new connections; finishing in-flight requests");
    let served = http.await.expect("the HTTP server task does not panic");
    // Shutdown (I10): the last request is answered; now write what is pending.
    let drained = match engine {
        Some(engine) => {
            info!(deadline_s = config.drain_timeout_s, "draining the outbox");
            engine.shutdown(config.drain_timeout()).await
        }
        None => crate::worker::DrainReport { unwritten: 0, elapsed: Duration::ZERO },
    };
    upkeep.abort();
    pool.close();
    served.map_err(ServerError::Serve)?;
    if drained.complete() { Ok(()) } else { Err(ServerError::DrainIncomplete { unwritten: drained.unwritten }) }
}

/// Retries a start-up step until it succeeds: the database may be starting
/// or briefly away, and the server should come up as soon as it is back.
/// Each failure is logged with its cause; `/readyz` shows the step.
async fn retry_startup_step<T, F, Fut>(step: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(value) => {
                if failures > 0 {
                    info!(step, failures, "start-up step succeeded after retries");
                }
                return value;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(step, error = %e, "start-up step failed; retrying");
                } else {
                    error!(step, error = %e, failures, "start-up step still failing; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(STARTUP_RETRY_MAX);
            }
        }
    }
}
