//! The worker: takes dirty records off the outbox, batches them, and writes
//! each batch to PostgreSQL in one transaction.
//!
//! * A **coordinator** runs on a dedicated thread (never on an async
//!   runtime worker, I12): it blocks on the outbox channel, starts a batch
//!   when `batch_max` records are waiting or `linger` after the first one
//!   arrived (STYLE 6), takes whole groups from the store, and hands each
//!   batch to a writer with room (each holds the batch it writes and the
//!   next). It also refreshes the depth and lag gauges
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
use std::ops::Range;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use crossbeam_channel::{Receiver, Sender, select};
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::metrics as m;
use crate::outbox::{Batch, DirtyRecord, OutboxReceiver, Quarantined, TicketError};
use crate::pg;
use crate::pg::DbError;
use crate::pg::dead_letters::{self, NewDeadLetter};
use crate::pg::lease::{Lease, LeaseState};
use crate::pg::upsert::{self, Encoded, WriteError};
use crate::store::Store;
use crate::store::kind::KindId;
use classify::{Classified, ErrorClass, classify_pool, classify_postgres};

/// How often the coordinator refreshes the depth and lag gauges.
const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// Longest one flush attempt may take before it is given up and retried:
/// past the server's own statement timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(pg::STATEMENT_TIMEOUT.as_secs() + 5);

/// Batches a writer holds at once: the one it writes and the next.
const WRITER_DEPTH: usize = 2;

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
    /// Benchmarks only: take batches and write nothing (changes are lost),
    /// to measure what persistence costs the rest of the server.
    pub discard: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_max: 1000,
            linger: Duration::from_millis(5),
            retry_max_delay: Duration::from_secs(2),
            writers: 2,
            discard: false,
        }
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
            discard: config.bench_discard_writes,
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
    outcome: Outcome,
}

/// How a batch ended.
enum Outcome {
    /// Committed, except for the groups quarantined as dead letters.
    Committed(Vec<Quarantined>),
    /// Not written: the drain deadline passed or the lease was lost.
    Abandoned,
}

/// A running worker. Dropping it without [`drain`](Self::drain) leaves the
/// coordinator running until the store is dropped.
pub struct Worker {
    store: Store,
    control: Sender<Control>,
    finished: Option<tokio::sync::oneshot::Receiver<()>>,
    abort: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
    lease: Option<Arc<Lease>>,
}

impl Worker {
    /// Starts the coordinator thread and the writer tasks. Must be called
    /// inside a Tokio runtime (the writers run on it).
    pub fn start(
        store: Store,
        receiver: OutboxReceiver,
        pool: Pool,
        config: WorkerConfig,
        lease: Option<Arc<Lease>>,
    ) -> Self {
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
                lease: lease.clone(),
                discard: config.discard,
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
        Self { store, control: control_tx, finished: Some(finished_rx), abort, thread: Some(thread), lease }
    }

    /// Closes the store to new changes and writes everything pending, for at
    /// most `deadline`. Past it, writers stop retrying, tickets still waiting
    /// fail, and the report counts what was left unwritten.
    pub async fn drain(mut self, deadline: Duration) -> DrainReport {
        let started = Instant::now();
        self.store.close();
        let _ = self.control.try_send(Control::Drain);
        let finished = self.finished.take().expect("drain is called once");
        let lease = self.lease.clone();
        let lost = async move {
            match lease {
                Some(lease) => lease.lost().await,
                None => std::future::pending().await,
            }
        };
        // A lost lease means nothing more can be written: stop at once.
        let finished_in_time = tokio::select! {
            finished = tokio::time::timeout(deadline, finished) => finished.is_ok(),
            () = lost => false,
        };
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
        // Records at the front of `backlog` whose groups wait for a batch
        // in flight: they do not count towards a full batch.
        let mut blocked = 0usize;
        // Batches handed to each writer and not yet completed. A writer
        // holds up to `WRITER_DEPTH`: the one it writes and the next, so it
        // goes on without waiting for this thread to be scheduled (on a
        // machine whose cores PostgreSQL keeps busy, that wait is a large
        // part of a batch's time).
        let mut outstanding: Vec<usize> = vec![0; self.writers.len()];
        // An idle writer takes any due batch. A busy writer takes its next
        // one only when a full batch is waiting: below saturation, records
        // keep gathering until a writer is free, which makes fewer, larger
        // transactions (less database work per row).
        let free = |outstanding: &[usize], full_batch_waiting: bool| {
            let depth = if full_batch_waiting { WRITER_DEPTH } else { 1 };
            outstanding.iter().enumerate().filter(|(_, n)| **n < depth).min_by_key(|(_, n)| **n).map(|(w, _)| w)
        };
        let mut due: Option<Instant> = None;
        let mut draining = false;
        let mut swept = false;
        // Replaced by `never()` once the drain is requested (or the worker
        // dropped), so a disconnected channel is not selected again.
        let mut control = self.control.clone();
        let mut last_gauges = Instant::now() - GAUGE_INTERVAL;
        let gauges = m::OutboxGauges::new();
        loop {
            if self.writers.iter().any(|writer| writer.is_closed()) {
                // A writer ends only when the drain deadline aborts it, or
                // if it panicked: either way its batches will not complete.
                // Changes are refused from now on rather than accepted into
                // a store nothing writes; what is pending is reported (and
                // spilled) when the server stops.
                if !self.store.is_closed() {
                    error!("a writer has stopped; the worker stops and the store refuses changes");
                    self.store.close();
                }
                gauges.refresh(&self.store.outbox());
                return;
            }
            let now = Instant::now();
            if now.duration_since(last_gauges) >= GAUGE_INTERVAL {
                gauges.refresh(&self.store.outbox());
                last_gauges = now;
            }
            let next_gauges = last_gauges + GAUGE_INTERVAL;
            let wake = match due {
                Some(at) if free(&outstanding, false).is_some() => at.min(next_gauges),
                _ => next_gauges,
            };
            // Listen for records only while nothing waits to be written. Once
            // a batch is due (or writers are busy), more records would only
            // wake this thread, once per change, for nothing: they are drained
            // from the channel when the batch is taken.
            let records = if due.is_none() && backlog.is_empty() {
                self.receiver.records.clone()
            } else {
                crossbeam_channel::never()
            };
            select! {
                recv(records) -> record => {
                    // The coordinator holds a store, so the channel stays open.
                    if let Ok(record) = record {
                        backlog.push_back(record);
                        due.get_or_insert_with(|| Instant::now() + self.config.linger);
                    }
                },
                recv(self.completions) -> completion => {
                    // Every writer is gone (the runtime is shutting down).
                    let Ok(completion) = completion else { return };
                    match &completion.outcome {
                        Outcome::Committed(quarantined) => self.store.commit(&completion.batch, quarantined),
                        Outcome::Abandoned => self.store.abandon(&completion.batch),
                    }
                    outstanding[completion.writer] -= 1;
                    blocked = 0;
                    // Records that waited for this batch's entities may go now.
                    if !backlog.is_empty() {
                        due = Some(Instant::now());
                    }
                },
                recv(control) -> _ => {
                    draining = true;
                    due = Some(Instant::now());
                    control = crossbeam_channel::never();
                },
                default(wake.saturating_duration_since(Instant::now())) => {},
            }
            if backlog.len().saturating_sub(blocked) + self.receiver.records.len() >= self.config.batch_max {
                due = Some(Instant::now());
            }

            while let (Some(writer), Some(at)) = (
                free(
                    &outstanding,
                    backlog.len().saturating_sub(blocked) + self.receiver.records.len() >= self.config.batch_max,
                ),
                due,
            ) {
                if at > Instant::now() && !draining {
                    break;
                }
                let (batch, still_blocked) = self.store.take_batch(&self.receiver, &mut backlog, self.config.batch_max);
                blocked = still_blocked;
                if batch.rows.is_empty() {
                    // Nothing takeable: stale records, or groups waiting for a
                    // batch in flight (its completion sets `due` again).
                    due = None;
                    break;
                }
                debug!(writer, rows = batch.rows.len(), groups = batch.groups.len(), "batch taken");
                outstanding[writer] += 1;
                if self.writers[writer].send(batch).is_err() {
                    error!(writer, "writer task is gone; the runtime is shutting down");
                    return;
                }
                due = (backlog.len() > blocked || !self.receiver.records.is_empty()).then(Instant::now);
            }

            if draining && outstanding.iter().all(|n| *n == 0) {
                let depth = self.store.outbox().depth;
                if depth == 0 {
                    gauges.refresh(&self.store.outbox());
                    return;
                }
                if due.is_none() && backlog.is_empty() && self.receiver.records.is_empty() {
                    if swept {
                        // Still nothing to take: the rest cannot be written by
                        // this worker; the drain reports (and spills) it.
                        error!(depth, "entities are pending that no batch can take; ending the drain");
                        gauges.refresh(&self.store.outbox());
                        return;
                    }
                    // Pending entities with no record to reach them would be a
                    // bookkeeping bug; sweep them up once rather than hang.
                    let orphans = self.store.pending_records();
                    if !orphans.is_empty() {
                        error!(orphans = orphans.len(), depth, "pending entities without records; re-queueing them");
                    }
                    backlog.extend(orphans);
                    swept = true;
                    due = Some(Instant::now());
                }
            }
        }
    }
}

struct Writer {
    index: usize,
    store: Store,
    pool: Pool,
    lease: Option<Arc<Lease>>,
    discard: bool,
    retry_max_delay: Duration,
    abort: CancellationToken,
    done: Sender<Completion>,
}

/// Why a write stopped short of committing.
enum Failure {
    /// The database refuses these rows for good (or they cannot be
    /// encoded): isolate and quarantine.
    Permanent { classified: Classified, message: String },
    /// The drain deadline passed, or the lease was lost: write nothing more.
    Stop,
}

impl Writer {
    async fn run(self, mut batches: mpsc::UnboundedReceiver<Batch>) {
        loop {
            let batch = tokio::select! {
                batch = batches.recv() => match batch { Some(batch) => batch, None => return },
                _ = self.abort.cancelled() => return,
            };
            let outcome = self.flush(&batch).await;
            if self.done.send(Completion { writer: self.index, batch, outcome }).is_err() {
                return;
            }
        }
    }

    /// Writes `batch` until it commits, isolating and quarantining groups
    /// the database refuses for good (I8), or until the drain deadline or a
    /// lost lease stops it.
    async fn flush(&self, batch: &Batch) -> Outcome {
        let span = info_span!("flush", writer = self.index, rows = batch.rows.len(), groups = batch.groups.len());
        let _entered = span.enter();
        m::batch_taken(batch.rows.len());
        if self.discard {
            return Outcome::Committed(Vec::new());
        }
        let quarantined = match self.write_groups(batch, &batch.groups, 1).await {
            Ok(quarantined) => quarantined,
            Err(()) => return Outcome::Abandoned,
        };
        if quarantined.is_empty() {
            return Outcome::Committed(Vec::new());
        }
        match self.record_dead_letters(batch, &quarantined).await {
            Ok(()) => Outcome::Committed(quarantined.into_iter().map(|(q, _)| q).collect()),
            Err(()) => Outcome::Abandoned,
        }
    }

    /// Writes the rows of `groups` in one transaction; when the database
    /// refuses them for good, splits the groups in halves (never a group
    /// itself: a change set is never split) until the refused groups are
    /// isolated, and commits the rest. Returns the refused groups with the
    /// number of attempts that included them.
    async fn write_groups(
        &self,
        batch: &Batch,
        groups: &[Range<usize>],
        attempts: i32,
    ) -> Result<Vec<(Quarantined, i32)>, ()> {
        let rows: Vec<usize> = groups.iter().flat_map(Clone::clone).collect();
        match self.write_rows(batch, &rows).await {
            Ok(()) => Ok(Vec::new()),
            Err(Failure::Stop) => Err(()),
            Err(Failure::Permanent { classified, message }) if groups.len() == 1 => {
                let kinds = self.store.kinds();
                let first = &batch.rows[groups[0].start];
                error!(
                    kind = kinds[first.kind].name, id = %first.id, version = first.version,
                    rows = groups[0].len(), sqlstate = ?classified.sqlstate, error = %message,
                    "the database refuses a change set for good; quarantining it as dead letters"
                );
                let error = TicketError::Quarantined {
                    kind: kinds[first.kind].name.to_owned(),
                    id: first.id.to_string(),
                    version: first.version,
                    sqlstate: classified.sqlstate.clone(),
                    message: message.clone(),
                };
                Ok(vec![(Quarantined { rows: groups[0].clone(), error }, attempts)])
            }
            Err(Failure::Permanent { .. }) => {
                let (left, right) = groups.split_at(groups.len() / 2);
                debug!(left = left.len(), right = right.len(), "splitting a refused batch");
                let mut refused = Box::pin(self.write_groups(batch, left, attempts + 1)).await?;
                refused.extend(Box::pin(self.write_groups(batch, right, attempts + 1)).await?);
                Ok(refused)
            }
        }
    }

    /// Writes `rows` of `batch` in one transaction, retrying transient and
    /// schema failures with capped, jittered backoff without a limit on
    /// attempts (I7).
    async fn write_rows(&self, batch: &Batch, rows: &[usize]) -> Result<(), Failure> {
        let kinds = self.store.kinds();
        let encoded = match upsert::encode(kinds, batch, rows.iter().copied()) {
            Ok(encoded) => encoded,
            Err(e) => {
                let row = &batch.rows[e.row];
                return Err(Failure::Permanent {
                    classified: Classified {
                        class: ErrorClass::Permanent,
                        error_type: "data",
                        sqlstate: None,
                        unknown: false,
                    },
                    message: format!("{} {} cannot be serialized: {}", kinds[row.kind].name, row.id, e.error),
                });
            }
        };
        let mut resolve: Vec<(KindId, Vec<String>)> = Vec::new();
        for &index in rows {
            let row = &batch.rows[index];
            if row.dead_lettered {
                match resolve.iter_mut().find(|(kind, _)| *kind == row.kind) {
                    Some((_, ids)) => ids.push(row.id.to_string()),
                    None => resolve.push((row.kind, vec![row.id.to_string()])),
                }
            }
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(self.retry_max_delay)
            .with_jitter()
            .without_max_times();
        let cap = self.retry_max_delay;
        let attempt = || self.attempt(&encoded, &resolve, rows.len());
        let retried = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &WriteError| match e {
                WriteError::Fenced { .. } => false,
                e => classify_write(e).class != ErrorClass::Permanent,
            })
            .adjust(move |_, delay| delay.map(|d| d.min(cap)))
            .notify(|e: &WriteError, delay| {
                let classified = classify_write(e);
                m::retry_scheduled();
                let delay_ms = delay.as_millis() as u64;
                if classified.unknown {
                    error!(error = %e, rows = rows.len(), delay_ms, "flush failed with an unrecognized error; retrying as transient");
                } else if classified.class == ErrorClass::Schema {
                    error!(error = %e, sqlstate = ?classified.sqlstate, rows = rows.len(), delay_ms,
                        "flush failed: the schema does not fit (an operator must fix it); data waits and is retried");
                } else {
                    warn!(error = %e, error_type = classified.error_type, sqlstate = ?classified.sqlstate,
                        rows = rows.len(), delay_ms, "flush failed; retrying");
                }
            });
        let result = tokio::select! {
            result = retried => result,
            _ = self.abort.cancelled() => {
                warn!(rows = rows.len(), "drain deadline passed; batch abandoned");
                return Err(Failure::Stop);
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(WriteError::Fenced { current, .. }) => {
                if let Some(lease) = &self.lease {
                    lease.fenced(current);
                }
                Err(Failure::Stop)
            }
            Err(e) => {
                let classified = classify_write(&e);
                let message = match &e {
                    WriteError::Postgres(pg) => {
                        pg.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned())
                    }
                    _ => e.to_string(),
                };
                Err(Failure::Permanent { classified, message })
            }
        }
    }

    async fn attempt(
        &self,
        encoded: &Encoded,
        resolve: &[(KindId, Vec<String>)],
        rows: usize,
    ) -> Result<(), WriteError> {
        let started = Instant::now();
        let result = async {
            // Flush only under the lease; while it is being re-taken (the
            // database went away) the attempt fails like any other
            // connection failure, and is counted and retried.
            let epoch = match &self.lease {
                Some(lease) => match lease.state() {
                    LeaseState::Held(epoch) => Some(epoch),
                    LeaseState::Reacquiring => return Err(WriteError::LeaseUnavailable),
                    LeaseState::Lost => return Err(WriteError::Fenced { ours: lease.epoch(), current: None }),
                },
                None => None,
            };
            let mut client = self.pool.get().await?;
            // The server ends a stuck statement after STATEMENT_TIMEOUT; a
            // connection that hangs without an answer is given up here.
            tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                upsert::write(&mut client, self.store.kinds(), encoded, epoch, resolve),
            )
            .await
            .unwrap_or(Err(WriteError::TimedOut(ATTEMPT_TIMEOUT)))
        }
        .await;
        let elapsed = started.elapsed();
        match &result {
            Ok(()) => {
                m::flush_committed(elapsed);
                self.store.health().success(SystemTime::now());
                debug!(rows, elapsed_us = elapsed.as_micros() as u64, "batch committed");
            }
            Err(WriteError::Fenced { .. }) => m::flush_fenced(elapsed),
            Err(e) => {
                let classified = classify_write(e);
                let reached_database = classified.sqlstate.is_some() && classified.error_type != "connection";
                m::flush_failed(elapsed, classified.error_type, reached_database);
                self.store.health().failure(&classified, reached_database, e.to_string());
            }
        }
        result
    }

    /// Writes the dead letters of refused groups, retrying until it
    /// succeeds (or the drain deadline stops it): a record is only ever
    /// dropped from the queue once it is in the dead-letter table.
    async fn record_dead_letters(&self, batch: &Batch, refused: &[(Quarantined, i32)]) -> Result<(), ()> {
        let kinds = self.store.kinds();
        let mut letters = Vec::new();
        for (quarantined, attempts) in refused {
            let TicketError::Quarantined { sqlstate, message, .. } = &quarantined.error else { continue };
            for index in quarantined.rows.clone() {
                let row = &batch.rows[index];
                let payload = row.value.as_ref().and_then(|value| {
                    let mut json = Vec::new();
                    value.write_json(&mut json).ok().map(|()| json)
                });
                letters.push(NewDeadLetter {
                    kind: kinds[row.kind].name,
                    entity_id: row.id.to_string(),
                    version: i64::try_from(row.version).unwrap_or(i64::MAX),
                    payload,
                    deleted: row.value.is_none(),
                    sqlstate: sqlstate.clone(),
                    message: message.clone(),
                    attempts: *attempts,
                });
            }
        }
        let mut delay = RETRY_MIN_DELAY;
        loop {
            let recorded = tokio::select! {
                recorded = tokio::time::timeout(ATTEMPT_TIMEOUT, dead_letters::record(&self.pool, &letters)) => recorded,
                _ = self.abort.cancelled() => return Err(()),
            };
            let error = match recorded {
                Ok(Ok(())) => {
                    if let Ok(count) = dead_letters::count_unresolved(&self.pool).await {
                        m::dead_letters_unresolved(count);
                    }
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => DbError::Timeout(ATTEMPT_TIMEOUT),
            };
            let permanent = match &error {
                DbError::Postgres(e) => classify_postgres(e).class == ErrorClass::Permanent,
                _ => false,
            };
            if permanent && letters.iter().any(|l| l.payload.is_some()) {
                // The payload itself is refused (it is what the database
                // refused in the first place): keep the dead letters without
                // it rather than never keeping them.
                error!(error = %error, records = letters.len(), "dead-letter payloads are refused too; recording them without payload");
                for letter in &mut letters {
                    letter.payload = None;
                    letter.message = format!("{} (payload not storable: {error})", letter.message);
                }
                continue;
            }
            error!(error = %error, records = letters.len(), "cannot write dead letters; retrying");
            if self.abort.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                return Err(());
            }
            delay = (delay * 2).min(self.retry_max_delay);
        }
    }
}

fn classify_write(error: &WriteError) -> Classified {
    match error {
        WriteError::Pool(e) => classify_pool(e),
        WriteError::Postgres(e) => classify_postgres(e),
        WriteError::TimedOut(_) => {
            Classified { class: ErrorClass::Transient, error_type: "timeout", sqlstate: None, unknown: false }
        }
        WriteError::LeaseUnavailable => {
            Classified { class: ErrorClass::Transient, error_type: "connection", sqlstate: None, unknown: false }
        }
        WriteError::Fenced { .. } => {
            Classified { class: ErrorClass::Transient, error_type: "other", sqlstate: None, unknown: false }
        }
    }
}
