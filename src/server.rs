//! The reference server's life cycle: open the database, bind, start up in
//! order (see docs/ARCHITECTURE.md), serve, and shut down in order.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::{self, AppState, Phase, Readiness};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig, Progress, StartError, retry_startup};
use crate::pg::{self, DbError, LocalPostgres, LocalPostgresError, LocalPostgresOptions};
use crate::worker::health::Health;

/// How often histogram upkeep runs in the metrics recorder.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How often expired `Idempotency-Key` records are deleted (at most).
const IDEMPOTENCY_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

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
    /// The engine could not start (a corrupt spill file, a row that does
    /// not decode): the server does not serve partial state.
    #[error("start-up failed: {0}")]
    Engine(#[from] StartError),
    /// The drain deadline passed with the database away: unwritten changes
    /// were spilled.
    #[error(
        "the database did not take every change before the drain deadline: {records} records were spilled to {path} and are replayed at the next start"
    )]
    Spilled {
        /// Records spilled.
        records: usize,
        /// The spill file.
        path: std::path::PathBuf,
    },
    /// Another process took the lease.
    #[error("the single-writer lease was taken by another process; {spilled} unwritten records were spilled")]
    LeaseLost {
        /// Records spilled.
        spilled: usize,
    },
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
    /// creates) the private PostgreSQL and its `outbox`
    /// database.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        Self::open_with(config, false).await
    }

    /// [`open`](Self::open) for a one-off command: a private PostgreSQL
    /// already running on the data folder (a serving outbox's) is used as
    /// it is, not waited for.
    pub async fn open_shared(config: &Config) -> Result<Self, ServerError> {
        Self::open_with(config, true).await
    }

    async fn open_with(config: &Config, reuse_running: bool) -> Result<Self, ServerError> {
        if let Some(url) = &config.database_url {
            let db_config = pg::parse_url(url)?;
            info!(database = %pg::describe(&db_config), "using DATABASE_URL");
            return Ok(Self { config: db_config, local: None });
        }
        let options = LocalPostgresOptions { reuse_running, ..LocalPostgresOptions::new(config.local_postgres_dir()) };
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

    let upkeep = tokio::spawn(metrics_upkeep(metrics.clone(), shutdown.clone()));
    let (store, receiver) = api::store_builder().capacity(config.queue_capacity).build();
    let health = Arc::new(Health::default());
    let state = AppState {
        health: health.clone(),
        readiness: readiness.clone(),
        pool: pool.clone(),
        metrics,
        store: store.clone(),
        ack: config.ack,
        body_limit: config.body_limit,
        request_timeout: config.request_timeout(),
        admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
        idempotency_ttl: Duration::from_secs(config.idempotency_ttl_s),
        in_flight: Default::default(),
    };
    let app = api::router(state);
    let http_shutdown = shutdown.clone();
    let limits = crate::connections::Limits {
        max_connections: config.max_connections,
        header_timeout: Duration::from_secs(config.header_timeout_s),
    };
    let http = tokio::spawn(async move { crate::connections::serve(listener, app, limits, http_shutdown).await });

    // Start-up (rule *Ready after start-up*). Until every step is done,
    // /readyz answers 503 with the step it is on.
    let engine_config = EngineConfig {
        worker: config.worker(),
        spill_dir: Some(config.spill_dir()),
        holder: crate::engine::default_holder(),
        health,
        lease_ttl: config.lease_ttl(),
        ..EngineConfig::default()
    };
    let started = start_engine(&pool, store, receiver, engine_config, &readiness, &shutdown).await;
    let engine = match started {
        Ok(Some(engine)) => {
            readiness.set(Phase::Ready);
            info!(%addr, "ready");
            let ttl = Duration::from_secs(config.idempotency_ttl_s);
            tokio::spawn(api::idempotency::expire_periodically(
                engine.store().clone(),
                ttl.min(IDEMPOTENCY_EXPIRY_INTERVAL),
                shutdown.clone(),
            ));
            engine
        }
        Ok(None) | Err(_) => {
            if started.is_ok() {
                info!("shutdown requested during start-up");
            }
            shutdown.cancel();
            let _ = http.await;
            upkeep.abort();
            pool.close();
            return started.map(|_| ());
        }
    };

    let lease_lost = tokio::select! {
        () = shutdown.cancelled() => false,
        () = engine.lease_lost() => {
            // Another process owns the database now: take no more changes
            // (503), and keep what is unwritten in a spill file.
            error!("the single-writer lease was lost: refusing changes, spilling unwritten ones, exiting");
            engine.store().close();
            shutdown.cancel();
            true
        }
    };
    readiness.set(Phase::ShuttingDown);
    let result = stop(config, engine, http, lease_lost).await;
    upkeep.abort();
    pool.close();
    result
}

/// Keeps the metrics recorder's histograms fresh until shutdown.
async fn metrics_upkeep(metrics: metrics_exporter_prometheus::PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
        metrics.run_upkeep();
    }
}

/// Migrations, then the engine (lease, spill replay, hydration, quarantined
/// sets), each step told to `/readyz`. `None`: shutdown came first.
async fn start_engine(
    pool: &deadpool_postgres::Pool,
    store: crate::store::Store,
    receiver: crate::outbox::OutboxReceiver,
    engine_config: EngineConfig,
    readiness: &Arc<Readiness>,
    shutdown: &CancellationToken,
) -> Result<Option<Engine>, ServerError> {
    readiness.set(Phase::Starting("running migrations".into()));
    if retry_startup("migrations", shutdown, || crate::api::schema::migrate(pool)).await.is_none() {
        return Ok(None);
    }
    let readiness = readiness.clone();
    let started = Engine::builder(store, receiver, pool.clone())
        .config(engine_config)
        .cancel_on(shutdown.clone())
        .on_progress(move |progress| match progress {
            Progress::Step(step) => readiness.set(Phase::Starting(step.to_owned())),
            Progress::Standby { holder } => readiness.set(Phase::Standby(holder.to_owned())),
        })
        .start()
        .await;
    match started {
        Ok(engine) => Ok(Some(engine)),
        Err(StartError::Cancelled) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Shutdown (rule *Drain or spill*), bounded from the signal on: in-flight
/// requests (a durable one may wait on an absent database) and the drain
/// share one deadline.
async fn stop(
    config: &Config,
    engine: Engine,
    mut http: tokio::task::JoinHandle<io::Result<()>>,
    lease_lost: bool,
) -> Result<(), ServerError> {
    let deadline = std::time::Instant::now() + config.drain_timeout();
    info!(deadline_s = config.drain_timeout_s, "shutting down: no new connections; finishing in-flight requests");
    let served = match tokio::time::timeout(config.drain_timeout(), &mut http).await {
        Ok(served) => served.expect("the HTTP server task does not panic"),
        Err(_) => {
            error!("in-flight requests did not finish before the drain deadline; closing their connections");
            http.abort();
            Ok(())
        }
    };
    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
    info!(remaining_ms = remaining.as_millis() as u64, "draining the outbox");
    let report = engine.shutdown(remaining).await;
    served.map_err(ServerError::Serve)?;
    if lease_lost || report.lease_lost {
        return Err(ServerError::LeaseLost { spilled: report.spilled.map_or(0, |(n, _)| n) });
    }
    match report.spilled {
        _ if report.complete() => Ok(()),
        Some((records, path)) => Err(ServerError::Spilled { records, path }),
        None => Err(ServerError::DrainIncomplete { unwritten: report.drain.unwritten }),
    }
}
