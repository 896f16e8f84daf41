//! The worker: takes dirty records off the outbox, batches them, and writes
//! each batch to PostgreSQL in one transaction.
//!
//! * A **coordinator** runs on a dedicated thread (never on an async
//!   runtime worker, I12): it blocks on the outbox channel, starts a batch
//!   when `batch_max` records are waiting or `linger` after the first one
//!   arrived (STYLE 6), takes whole groups from the store, and hands each
//!   batch to an idle writer. It also refreshes the depth and lag gauges
//!   every second, idle or not.
//! * **Writers** are async tasks, one per database connection they use at a
//!   time. Each encodes its batch once and writes it, retrying failures with
//!   capped, jittered exponential backoff (backon) until it commits. A
//!   second writer lets one batch be encoded and sent while the other
//!   commits; each PostgreSQL backend is bound to one core by jsonb parsing
//!   and index upkeep, so two writers use both cores of the target machine.
//! * **Drain** (I10): on shutdown the store closes, everything pending is
//!   flushed, then the worker stops. Past the deadline, writers give up
//!   and the report says what was left unwritten.

pub mod classify;
pub mod health;

use std::collections::VecDeque;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use crossbeam_channel::{Receiver, Sender, select};
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::metrics as m;
use crate::outbox::{Batch, DirtyRecord, OutboxReceiver};
use crate::pg::upsert::{self, Encoded};
use crate::store::Store;
use classify::{Classified, ErrorClass, classify_pool, classify_postgres};

/// How often the coordinator refreshes the depth and lag gauges.
const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// First pause after a failed flush; it doubles up to the configured cap.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);

/// How the worker batches and retries.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Most rows per batch (a group of entities changed together is never
    /// split, so a batch may exceed it by one group).
    pub batch_max: usize,
    /// How long a batch waits for more records after its first one.
    pub linger: Duration,
    /// Cap of the retry backoff.
    pub retry_max_delay: Duration,
    /// Batches written at once, each on its own connection.
    pub writers: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { batch_max: 1000, linger: Duration::from_millis(5), retry_max_delay: Duration::from_secs(10), writers: 2 }
    }
}

impl WorkerConfig {
    /// Batching and retry settings from the server configuration.
    pub fn from_config(config: &crate::Config) -> Self {
        Self {
            batch_max: config.batch_max,
            linger: config.linger(),
            retry_max_delay: config.retry_max_delay(),
            writers: config.writers,
        }
    }
}

/// How a shutdown drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Entities whose newest version was not written (0 when the drain
    /// finished).
    pub unwritten: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

impl DrainReport {
    /// Whether everything pending was written.
    pub fn complete(&self) -> bool {
        self.unwritten == 0
    }
}

enum Control {
    Drain,
}

struct Completion {
    writer: usize,
    batch: Batch,
    committed: bool,
}

/// A running worker. Dropping it without [`drain`](Self::drain) leaves the
/// coordinator running until the store is dropped.
pub struct Worker {
    store: Store,
    control: Sender<Control>,
    finished: Option<tokio::sync::oneshot::Receiver<()>>,
    abort: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts the coordinator thread and the writer tasks. Must be called
    /// inside a Tokio runtime (the writers run on it).
    pub fn start(store: Store, receiver: OutboxReceiver, pool: Pool, config: WorkerConfig) -> Self {
        let writers = config.writers.max(1);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (control_tx, control_rx) = crossbeam_channel::bounded(1);
        let abort = CancellationToken::new();
        let mut batch_senders = Vec::with_capacity(writers);
        for index in 0..writers {
            let (tx, rx) = mpsc::unbounded_channel();
            batch_senders.push(tx);
            let writer = Writer {
                index,
                store: store.clone(),
                pool: pool.clone(),
                retry_max_delay: config.retry_max_delay,
                abort: abort.clone(),
                done: done_tx.clone(),
            };
            tokio::spawn(writer.run(rx));
        }
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        let coordinator = Coordinator {
            store: store.clone(),
            receiver,
            config: WorkerConfig { writers, ..config },
            writers: batch_senders,
            completions: done_rx,
            control: control_rx,
        };
        let thread = thread::Builder::new()
            .name("outbox-worker".into())
            .spawn(move || {
                coordinator.run();
                let _ = finished_tx.send(());
            })
            .expect("the OS can start the worker thread");
        Self { store, control: control_tx, finished: Some(finished_rx), abort, thread: Some(thread) }
    }

    /// Closes the store to new changes and writes everything pending, for at
    /// most `deadline`. Past it, writers stop retrying, tickets still waiting
    /// fail, and the report counts what was left unwritten.
    pub async fn drain(mut self, deadline: Duration) -> DrainReport {
        let started = Instant::now();
        self.store.close();
        let _ = self.control.try_send(Control::Drain);
        let finished = self.finished.take().expect("drain is called once");
        let finished_in_time = tokio::time::timeout(deadline, finished).await.is_ok();
        if !finished_in_time {
            self.abort.cancel();
        }
        if let Some(thread) = self.thread.take() {
            // The coordinator exits once every writer has reported back,
            // which after an abort is immediate.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let unwritten = self.store.outbox().depth;
        if unwritten > 0 {
            self.store.fail_waiters();
        }
        let report = DrainReport { unwritten, elapsed: started.elapsed() };
        if report.complete() {
            info!(elapsed_ms = report.elapsed.as_millis() as u64, "outbox drained: every change is written");
        } else {
            error!(unwritten, deadline_s = deadline.as_secs(), "outbox drain deadline passed with changes unwritten");
        }
        report
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker dropped without drain (e.g. a failed start-up) must not
        // keep retrying forever in the background.
        if self.thread.is_some() {
            self.abort.cancel();
            let _ = self.control.try_send(Control::Drain);
        }
    }
}

struct Coordinator {
    store: Store,
    receiver: OutboxReceiver,
    config: WorkerConfig,
    writers: Vec<mpsc::UnboundedSender<Batch>>,
    completions: Receiver<Completion>,
    control: Receiver<Control>,
}

impl Coordinator {
    fn run(self) {
        let mut backlog: VecDeque<DirtyRecord> = VecDeque::new();
        let mut idle: Vec<usize> = (0..self.writers.len()).rev().collect();
        let mut due: Option<Instant> = None;
        let mut draining = false;
        let mut last_gauges = Instant::now() - GAUGE_INTERVAL;
        let gauges = Gauges::new();
        loop {
            let now = Instant::now();
            if now.duration_since(last_gauges) >= GAUGE_INTERVAL {
                gauges.refresh(&self.store);
                last_gauges = now;
            }
            let next_gauges = last_gauges + GAUGE_INTERVAL;
            let wake = match due {
                Some(at) if !idle.is_empty() => at.min(next_gauges),
                _ => next_gauges,
            };
            select! {
                recv(self.receiver.records) -> record => match record {
                    Ok(record) => {
                        backlog.push_back(record);
                        due.get_or_insert_with(|| Instant::now() + self.config.linger);
                    }
                    // Every store handle is gone: nothing can change any more.
                    Err(_) => draining = true,
                },
                recv(self.completions) -> completion => {
                    let completion = completion.expect("the coordinator holds a writer's sender");
                    if completion.committed {
                        self.store.commit(&completion.batch);
                    } else {
                        self.store.abandon(&completion.batch);
                    }
                    idle.push(completion.writer);
                    // Records that waited for this batch's entities may go now.
                    if !backlog.is_empty() {
                        due = Some(Instant::now());
                    }
                },
                recv(self.control) -> control => match control {
                    Ok(Control::Drain) | Err(_) => {
                        draining = true;
                        due = Some(Instant::now());
                    }
                },
                default(wake.saturating_duration_since(Instant::now())) => {},
            }
            if backlog.len() + self.receiver.records.len() >= self.config.batch_max {
                due = Some(Instant::now());
            }

            while let (Some(&writer), Some(at)) = (idle.last(), due) {
                if at > Instant::now() && !draining {
                    break;
                }
                let batch = self.store.take_batch(&self.receiver, &mut backlog, self.config.batch_max);
                if batch.rows.is_empty() {
                    // Nothing takeable: stale records, or groups waiting for a
                    // batch in flight (its completion sets `due` again).
                    due = None;
                    break;
                }
                debug!(writer, rows = batch.rows.len(), groups = batch.groups.len(), "batch taken");
                idle.pop();
                if self.writers[writer].send(batch).is_err() {
                    error!(writer, "writer task is gone; the runtime is shutting down");
                    return;
                }
                due = (!backlog.is_empty() || !self.receiver.records.is_empty()).then(Instant::now);
            }

            if draining && idle.len() == self.writers.len() {
                let depth = self.store.outbox().depth;
                if depth == 0 || self.writers_aborted() {
                    gauges.refresh(&self.store);
                    return;
                }
                if due.is_none() && backlog.is_empty() && self.receiver.records.is_empty() {
                    // Pending entities with no record to reach them would be a
                    // bookkeeping bug; sweep them up rather than hang.
                    let orphans = self.store.pending_records();
                    error!(orphans = orphans.len(), depth, "pending entities without records; re-queueing them");
                    backlog.extend(orphans);
                    due = Some(Instant::now());
                }
            }
        }
    }

    fn writers_aborted(&self) -> bool {
        self.writers.iter().all(|w| w.is_closed())
    }
}

/// The outbox gauges, refreshed by the coordinator.
struct Gauges {
    depth: metrics::Gauge,
    lag: metrics::Gauge,
    oldest: metrics::Gauge,
}

impl Gauges {
    fn new() -> Self {
        Self {
            depth: metrics::gauge!(m::QUEUE_DEPTH),
            lag: metrics::gauge!(m::LAG_SECONDS),
            oldest: metrics::gauge!(m::OLDEST_PENDING_TIMESTAMP),
        }
    }

    fn refresh(&self, store: &Store) {
        let snapshot = store.outbox();
        self.depth.set(snapshot.depth as f64);
        self.lag.set(snapshot.lag.as_secs_f64());
        self.oldest.set(unix_seconds(snapshot.oldest_pending));
    }
}

pub(crate) fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Why one attempt to write a batch failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlushError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl FlushError {
    fn classify(&self) -> Classified {
        match self {
            Self::Pool(e) => classify_pool(e),
            Self::Postgres(e) => classify_postgres(e),
        }
    }
}

struct Writer {
    index: usize,
    store: Store,
    pool: Pool,
    retry_max_delay: Duration,
    abort: CancellationToken,
    done: Sender<Completion>,
}

impl Writer {
    async fn run(self, mut batches: mpsc::UnboundedReceiver<Batch>) {
        loop {
            let batch = tokio::select! {
                batch = batches.recv() => match batch { Some(batch) => batch, None => return },
                _ = self.abort.cancelled() => return,
            };
            let committed = self.flush(&batch).await;
            if self.done.send(Completion { writer: self.index, batch, committed }).is_err() {
                return;
            }
        }
    }

    /// Writes `batch` until it commits (true) or the drain deadline aborts
    /// it (false).
    async fn flush(&self, batch: &Batch) -> bool {
        let span = info_span!("flush", writer = self.index, rows = batch.rows.len());
        let _entered = span.enter();
        let kinds = self.store.kinds();
        let encoded = match upsert::encode(kinds, batch, 0..batch.rows.len()) {
            Ok(encoded) => encoded,
            Err(e) => {
                let row = &batch.rows[e.row];
                error!(kind = kinds[row.kind].name, id = %row.id, version = row.version, error = %e.error,
                    "an entity cannot be serialized; its batch cannot be written");
                return false;
            }
        };
        metrics::histogram!(m::BATCH_ROWS).record(batch.rows.len() as f64);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(self.retry_max_delay)
            .with_jitter()
            .without_max_times();
        let cap = self.retry_max_delay;
        let attempt = || self.attempt(&encoded);
        let retried =
            attempt.retry(backoff).sleep(tokio::time::sleep).adjust(move |_, delay| delay.map(|d| d.min(cap))).notify(
                |e: &FlushError, delay| {
                    let classified = e.classify();
                    metrics::counter!(m::RETRIES_TOTAL).increment(1);
                    if classified.unknown {
                        error!(error = %e, rows = batch.rows.len(), delay_ms = delay.as_millis() as u64,
                        "flush failed with an unrecognized error; retrying as transient");
                    } else {
                        warn!(error = %e, error_type = classified.error_type, sqlstate = ?classified.sqlstate,
                        rows = batch.rows.len(), delay_ms = delay.as_millis() as u64, "flush failed; retrying");
                    }
                },
            );
        tokio::select! {
            result = retried => result.is_ok(),
            _ = self.abort.cancelled() => {
                warn!(rows = batch.rows.len(), "drain deadline passed; batch abandoned");
                false
            }
        }
    }

    async fn attempt(&self, encoded: &Encoded) -> Result<(), FlushError> {
        let started = Instant::now();
        let result = async {
            let mut client = self.pool.get().await?;
            upsert::write(&mut client, self.store.kinds(), encoded).await?;
            Ok::<(), FlushError>(())
        }
        .await;
        metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                let now = SystemTime::now();
                metrics::counter!(m::BATCHES_TOTAL, "result" => "ok").increment(1);
                metrics::gauge!(m::DB_UP).set(1.0);
                metrics::gauge!(m::LAST_SUCCESS_TIMESTAMP).set(unix_seconds(now));
                self.store.health().success(now);
            }
            Err(e) => {
                let classified = e.classify();
                metrics::counter!(m::BATCHES_TOTAL, "result" => "error").increment(1);
                metrics::counter!(m::PERSIST_FAILURES_TOTAL, "error_type" => classified.error_type).increment(1);
                let reached_database = classified.sqlstate.is_some() && classified.error_type != "connection";
                metrics::gauge!(m::DB_UP).set(if reached_database { 1.0 } else { 0.0 });
                self.store.health().failure(&classified, reached_database, e.to_string());
                if classified.class == ErrorClass::Permanent {
                    warn!(error = %e, sqlstate = ?classified.sqlstate, "batch refused by the database");
                }
            }
        }
        result
    }
}
