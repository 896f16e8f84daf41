//! The worker: takes dirty records off the outbox, batches them, and writes
//! each batch to PostgreSQL in one transaction.
//!
//! * A **coordinator** runs on a dedicated thread (never on an async
//!   runtime worker, I12): it blocks on the outbox channel, starts a batch
//!   when `batch_max` records are waiting or `linger` after the first one
//!   arrived (`Batcher`), takes whole groups from the store, and hands each
//!   batch to a writer with room (each holds the batch it writes and the
//!   next). Below saturation a batch waits for a busy writer rather than go
//!   to an idle one, until its records are late (`free_writer`). It also
//!   refreshes the depth and lag gauges every `GAUGE_INTERVAL`, idle or not.
//! * **Writers** are async tasks, one per database connection they use at a
//!   time. Each encodes its batch once and writes it, retrying failures with
//!   capped, jittered exponential backoff (backon) until it commits. A
//!   second writer lets one batch be encoded and sent while the other
//!   commits; each PostgreSQL backend is bound to one core by checking or
//!   parsing the JSON and index upkeep, so two writers use both cores of the target machine.
//! * **Drain** (I10): on shutdown the store closes, everything pending is
//!   flushed, then the worker stops. Past the deadline, writers give up
//!   and the report says what was left unwritten.

mod batcher;
pub mod classify;
pub(crate) mod flush;
pub mod health;

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::metrics as m;
use crate::outbox::{Batch, DirtyRecord, OutboxReceiver};
use crate::pg::lease::Lease;
use crate::pg::upsert::Mode;
use crate::store::Store;
use batcher::Batcher;
use flush::{Flusher, Outcome};
use health::Health;

/// How often the coordinator refreshes the depth and lag gauges.
const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// Batches a writer holds at once: the one it writes and the next.
const WRITER_DEPTH: usize = 2;

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
            batch_max: 5000,
            linger: Duration::from_millis(5),
            retry_max_delay: Duration::from_secs(2),
            writers: 2,
            discard: false,
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
        health: Arc<Health>,
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
                flusher: Flusher {
                    store: store.clone(),
                    health: health.clone(),
                    pool: pool.clone(),
                    lease: lease.clone(),
                    retry_max_delay: config.retry_max_delay,
                    abort: abort.clone(),
                    mode: Mode::Upsert,
                    name: "writer",
                    index,
                },
                discard: config.discard,
                done: done_tx.clone(),
            };
            tokio::spawn(writer.run(rx));
        }
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        let coordinator = Coordinator {
            store: store.clone(),
            receiver,
            outstanding: vec![0; batch_senders.len()],
            writers: batch_senders,
            completions: done_rx,
            control: control_rx,
            batcher: Batcher::new(config.batch_max, config.linger),
            backlog: VecDeque::new(),
            blocked: 0,
            draining: false,
            swept: false,
            gauges: m::OutboxGauges::new(),
            last_gauges: Instant::now() - GAUGE_INTERVAL,
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

/// The coordinator thread: receives records, decides when a batch is due,
/// takes batches from the store and hands them to writers, applies their
/// outcomes, keeps the gauges fresh, and runs the drain.
struct Coordinator {
    store: Store,
    receiver: OutboxReceiver,
    writers: Vec<mpsc::UnboundedSender<Batch>>,
    completions: Receiver<Completion>,
    control: Receiver<Control>,
    batcher: Batcher,
    /// Records received and not yet taken, oldest first.
    backlog: VecDeque<DirtyRecord>,
    /// Records at the front of `backlog` whose groups wait for a batch in
    /// flight: they do not count towards a full batch.
    blocked: usize,
    /// Batches handed to each writer and not yet completed. A writer holds
    /// up to `WRITER_DEPTH`: the one it writes and the next, so it goes on
    /// without waiting for this thread to be scheduled (on a machine whose
    /// cores PostgreSQL keeps busy, that wait is a large part of a batch's
    /// time).
    outstanding: Vec<usize>,
    draining: bool,
    /// The drain swept the store for orphaned pending marks once.
    swept: bool,
    gauges: m::OutboxGauges,
    last_gauges: Instant,
}

/// What the coordinator does next.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

impl Coordinator {
    fn run(mut self) {
        // Replaced by `never()` once the drain is requested (or the worker
        // dropped), so a disconnected channel is not selected again.
        let mut control = self.control.clone();
        loop {
            if self.a_writer_stopped() {
                return;
            }
            self.refresh_gauges_when_due();
            if self.wait(&mut control) == Next::Stop || self.dispatch() == Next::Stop {
                return;
            }
            if self.draining && self.drain_step() == Next::Stop {
                self.refresh_gauges();
                return;
            }
        }
    }

    /// A writer ends only when the drain deadline aborts it, or if it
    /// panicked: either way its batches will not complete. Changes are
    /// refused from then on rather than accepted into a store nothing
    /// writes; what is pending is reported (and spilled) when the server
    /// stops.
    fn a_writer_stopped(&self) -> bool {
        if !self.writers.iter().any(|writer| writer.is_closed()) {
            return false;
        }
        if !self.store.is_closed() {
            error!("a writer has stopped; the worker stops and the store refuses changes");
            self.store.close();
        }
        self.refresh_gauges();
        true
    }

    fn refresh_gauges(&self) {
        let outbox = self.store.outbox();
        self.gauges.refresh(outbox.depth, outbox.lag, outbox.oldest_pending);
    }

    /// Depth and lag are refreshed every `GAUGE_INTERVAL`, idle or not.
    fn refresh_gauges_when_due(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_gauges) >= GAUGE_INTERVAL {
            self.refresh_gauges();
            self.last_gauges = now;
        }
    }

    /// Records waiting to be taken, not counting those blocked.
    fn waiting(&self) -> usize {
        self.backlog.len().saturating_sub(self.blocked) + self.receiver.records.len()
    }

    /// The writer to hand the next batch to, at `now` (see [`pick_writer`]).
    fn free_writer(&self, full_batch_waiting: bool, now: Instant) -> Option<usize> {
        let late = self.draining || self.batcher.late_at().is_some_and(|late| late <= now);
        pick_writer(&self.outstanding, full_batch_waiting, late)
    }

    /// When the batch gathering now may be handed to a writer, as far as
    /// time decides (see [`dispatch_at`]).
    fn dispatch_at(&self) -> Option<Instant> {
        dispatch_at(&self.outstanding, self.draining, self.batcher.due(), self.batcher.late_at())
    }

    /// Blocks until a record, a completion, the drain request, or the next
    /// time something is due.
    fn wait(&mut self, control: &mut Receiver<Control>) -> Next {
        let next_gauges = self.last_gauges + GAUGE_INTERVAL;
        let wake = self.dispatch_at().map_or(next_gauges, |at| at.min(next_gauges));
        // Listen for records only while nothing waits to be written. Once a
        // batch is due (or writers are busy), more records would only wake
        // this thread, once per change, for nothing: they are drained from
        // the channel when the batch is taken.
        let records = if self.batcher.due().is_none() && self.backlog.is_empty() {
            self.receiver.records.clone()
        } else {
            crossbeam_channel::never()
        };
        select! {
            recv(records) -> record => {
                // The coordinator holds a store, so the channel stays open.
                if let Ok(record) = record {
                    self.backlog.push_back(record);
                    self.batcher.arrived(Instant::now());
                }
            },
            recv(self.completions) -> completion => {
                // Every writer is gone (the runtime is shutting down).
                let Ok(completion) = completion else { return Next::Stop };
                self.completed(completion);
            },
            recv(control) -> _ => {
                self.draining = true;
                self.batcher.due_now();
                *control = crossbeam_channel::never();
            },
            default(wake.saturating_duration_since(Instant::now())) => {},
        }
        if self.batcher.is_full(self.waiting()) {
            self.batcher.due_now();
        }
        Next::Continue
    }

    /// A writer finished a batch: the store learns what was written.
    fn completed(&mut self, completion: Completion) {
        match &completion.outcome {
            Outcome::Committed(quarantined) => self.store.commit(&completion.batch, quarantined),
            Outcome::Abandoned => self.store.abandon(&completion.batch),
        }
        self.outstanding[completion.writer] -= 1;
        self.blocked = 0;
        // Records that waited for this batch's entities may go now.
        if !self.backlog.is_empty() {
            self.batcher.due_now();
        }
    }

    /// Takes due batches from the store and hands them to free writers.
    fn dispatch(&mut self) -> Next {
        loop {
            let now = Instant::now();
            let Some(writer) = self.free_writer(self.batcher.is_full(self.waiting()), now) else { break };
            if !self.batcher.is_due(now, self.draining) {
                break;
            }
            let (batch, blocked) = self.store.take_batch(&self.receiver, &mut self.backlog, self.batcher.batch_max());
            self.blocked = blocked;
            if batch.rows.is_empty() {
                // Nothing takeable: stale records, or groups waiting for a
                // batch in flight (its completion makes the batch due again).
                self.batcher.clear();
                break;
            }
            debug!(writer, rows = batch.rows.len(), groups = batch.groups.len(), "batch taken");
            self.outstanding[writer] += 1;
            if self.writers[writer].send(batch).is_err() {
                error!(writer, "writer task is gone; the runtime is shutting down");
                return Next::Stop;
            }
            self.batcher.taken(self.backlog.len() > self.blocked || !self.receiver.records.is_empty());
        }
        Next::Continue
    }

    /// While draining, once no batch is out: done when nothing is pending;
    /// otherwise sweep the store once for pending entities without records,
    /// and give up (reporting) if even that leaves nothing to take.
    fn drain_step(&mut self) -> Next {
        if self.outstanding.iter().any(|n| *n > 0) {
            return Next::Continue;
        }
        let depth = self.store.outbox().depth;
        if depth == 0 {
            return Next::Stop;
        }
        if self.batcher.due().is_some() || !self.backlog.is_empty() || !self.receiver.records.is_empty() {
            return Next::Continue;
        }
        if self.swept {
            // Still nothing to take: the rest cannot be written by this
            // worker; the drain reports (and spills) it.
            error!(depth, "entities are pending that no batch can take; ending the drain");
            return Next::Stop;
        }
        // Pending entities with no record to reach them would be a
        // bookkeeping bug; sweep them up once rather than hang.
        let orphans = self.store.pending_records();
        if !orphans.is_empty() {
            error!(orphans = orphans.len(), depth, "pending entities without records; re-queueing them");
        }
        self.backlog.extend(orphans);
        self.swept = true;
        self.batcher.due_now();
        Next::Continue
    }
}

/// Which writer takes the next batch, given the batches each holds.
/// * A full batch goes to the writer holding the fewest, if it holds fewer
///   than `WRITER_DEPTH`.
/// * Any other batch goes to an idle writer while no writer is busy. Once
///   one is, records keep gathering for it, and a second writer takes them
///   only when they are `late` (or the worker drains). Below saturation this
///   makes fewer, larger transactions: each costs the database work per
///   row, and the server round trips and wake-ups of the database's backend
///   whatever its size.
fn pick_writer(outstanding: &[usize], full: bool, late: bool) -> Option<usize> {
    if !full && !late && outstanding.iter().any(|n| *n > 0) {
        return None;
    }
    let depth = if full { WRITER_DEPTH } else { 1 };
    outstanding.iter().enumerate().filter(|(_, n)| **n < depth).min_by_key(|(_, n)| **n).map(|(w, _)| w)
}

/// When a batch that is not full may be handed to a writer: when it is
/// `due`, and later (at `late_at`) if only late records would get a writer
/// ([`pick_writer`] decides). `None` when nothing is due or no writer would
/// take it (a completion wakes the coordinator).
fn dispatch_at(
    outstanding: &[usize],
    draining: bool,
    due: Option<Instant>,
    late_at: Option<Instant>,
) -> Option<Instant> {
    let due = due?;
    if pick_writer(outstanding, false, draining).is_some() {
        return Some(due);
    }
    pick_writer(outstanding, false, true)?;
    late_at.map(|late| late.max(due))
}

/// A writer task: writes the batches the coordinator hands it, one at a
/// time, on its own database connection.
struct Writer {
    flusher: Flusher,
    discard: bool,
    done: Sender<Completion>,
}

impl Writer {
    async fn run(self, mut batches: mpsc::UnboundedReceiver<Batch>) {
        loop {
            let batch = tokio::select! {
                batch = batches.recv() => match batch { Some(batch) => batch, None => return },
                _ = self.flusher.abort.cancelled() => return,
            };
            m::batch_taken(batch.rows.len());
            let outcome = if self.discard { Outcome::Committed(Vec::new()) } else { self.flusher.flush(&batch).await };
            if self.done.send(Completion { writer: self.flusher.index, batch, outcome }).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_saturation_a_busy_writer_gets_the_batch_unless_records_are_late() {
        assert_eq!(pick_writer(&[0, 0], false, false), Some(0), "nothing busy: an idle writer takes it");
        assert_eq!(pick_writer(&[1, 0], false, false), None, "one busy: the batch waits for it");
        assert_eq!(pick_writer(&[1, 0], false, true), Some(1), "late records go to the idle writer");
        assert_eq!(pick_writer(&[1, 1], false, true), None, "no writer idle");
        assert_eq!(pick_writer(&[1, 0], true, false), Some(1), "a full batch goes to the one holding fewest");
        assert_eq!(pick_writer(&[1, 1], true, false), Some(0), "each writer holds a next batch when full");
        assert_eq!(pick_writer(&[WRITER_DEPTH, WRITER_DEPTH], true, true), None, "every writer holds its most");
    }

    #[test]
    fn a_waiting_batch_is_handed_over_when_due_or_once_late_while_a_writer_is_busy() {
        let due = Instant::now();
        let late = due + Duration::from_millis(20);
        assert_eq!(dispatch_at(&[0, 0], false, None, None), None, "nothing is due");
        assert_eq!(dispatch_at(&[0, 0], false, Some(due), Some(late)), Some(due), "nothing busy: when due");
        assert_eq!(dispatch_at(&[1, 0], false, Some(due), Some(late)), Some(late), "one busy: once late");
        assert_eq!(
            dispatch_at(&[1, 0], false, Some(late + late.duration_since(due)), Some(late)),
            Some(late + late.duration_since(due)),
            "never before due"
        );
        assert_eq!(dispatch_at(&[1, 0], true, Some(due), Some(late)), Some(due), "a drain does not wait");
        assert_eq!(dispatch_at(&[1, 1], false, Some(due), Some(late)), None, "no writer idle: a completion wakes");
    }
}
