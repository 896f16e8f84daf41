//! The outbox: which entities wait to be written, in what order, and who
//! waits for them.
//!
//! Everything here lives inside the store's lock and changes in the same
//! critical section as the entities (rules *Only through the store*, *Room
//! first*):
//!
//! * An entity that changes while nothing of it is pending gets a *pending
//!   mark* and one [`DirtyRecord`] on a bounded crossbeam channel to the
//!   worker. Changed again before it is written, it keeps its mark and sends
//!   nothing (coalescing, I5): the worker writes whatever is newest when it
//!   takes the entity.
//! * Room is reserved before a change is applied: an entity *occupies* the
//!   queue from its first unwritten change until its newest version is
//!   committed, and a change that would make more entities occupy it than
//!   its capacity is refused, state untouched.
//! * Entities changed together are *grouped* (I3): a group is taken whole
//!   into one batch, so no transaction carries half of a change set. Groups
//!   are a union of change sets over pending marks: if change set 1 touches
//!   A and B and change set 2 touches B and C before any is written, A, B
//!   and C go together, because B's newest state already contains change
//!   set 2.
//! * Every pending change has a sequence number; the oldest unwritten one
//!   gives the lag.
//! * A [`Ticket`] resolves when every entity of its change set has been
//!   committed at (at least) the version the change set gave it.

pub mod spill;
mod ticket;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

pub use ticket::{Ticket, TicketError};
pub(crate) use ticket::{TicketShared, Waiter, push_waiter};

use crate::entity::{JsonOnce, KindId, Stored};

/// One entity that has changed and is not yet being written, as sent to the
/// worker. `seq` ties it to the pending mark that sent it: a record whose mark
/// was since taken (with its group) is stale and skipped.
#[derive(Debug, Clone)]
pub struct DirtyRecord {
    pub(crate) kind: KindId,
    /// The entity's slot in its kind's table (positions there are for good).
    pub(crate) at: usize,
    pub(crate) seq: u64,
}

/// One row of a batch: an entity's newest state when it was taken.
pub(crate) struct Row {
    pub(crate) kind: KindId,
    pub(crate) id: Arc<str>,
    /// The entity's slot in its kind's table; `None` for a row that does
    /// not come from the store (a spill file's, replayed at start-up).
    pub(crate) at: Option<usize>,
    pub(crate) version: u64,
    /// `None`: a tombstone.
    pub(crate) value: Option<Arc<dyn Stored>>,
    /// `value`'s JSON, if its caller already made it.
    pub(crate) json: Option<JsonOnce>,
    /// The pending mark's sequence number (for lag).
    pub(crate) seq: u64,
    /// When the entity's oldest unwritten change was made.
    pub(crate) since: Instant,
    /// The version the database holds, as far as this process knows (0:
    /// no row): what a spill file's compare-and-set replay expects.
    pub(crate) base: u64,
    /// The entity has an unresolved dead letter: how this write marks it
    /// when it commits.
    pub(crate) resolves: Option<Resolution>,
}

/// How a committed write marks the unresolved dead letter of its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// A later change of the entity was written with its whole set.
    Superseded,
    /// An operator replayed the set.
    Replayed,
    /// An operator discarded the set (memory reverted to the database).
    Discarded,
}

impl Resolution {
    /// The text in the dead letter's `resolution` column.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Superseded => "superseded by a newer version",
            Self::Replayed => "replayed",
            Self::Discarded => "discarded",
        }
    }
}

/// A group of a batch that was quarantined: refused for good by the
/// database, or in conflict with a version written elsewhere.
pub(crate) struct Quarantined {
    /// Its rows in the batch.
    pub(crate) rows: Range<usize>,
    /// What its tickets resolve with; names the refused row.
    pub(crate) error: TicketError,
    /// The quarantine id linking its dead letters.
    pub(crate) set: u64,
}

/// Rows written in one transaction, made of whole groups (change sets are
/// never split across transactions).
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) rows: Vec<Row>,
    /// Row ranges of the groups, for splitting a failing batch without
    /// splitting a change set.
    pub(crate) groups: Vec<Range<usize>>,
}

/// The worker's end of the queue.
pub struct OutboxReceiver {
    pub(crate) records: Receiver<DirtyRecord>,
}

/// An entity's persistence state while something of it is unwritten.
#[derive(Default)]
pub(crate) struct Track {
    /// Changed and not yet taken into a batch.
    pub(crate) pending: Option<Pending>,
    /// Taken into a batch that has not finished: the version being written.
    pub(crate) in_flight: Option<u64>,
    /// Tickets waiting for a version of this entity to commit.
    pub(crate) waiters: Vec<Waiter>,
    /// The version the database holds, as far as this process knows (0: no
    /// row).
    pub(crate) base: u64,
    /// While in flight: the id of its group in the batch (spill files keep
    /// groups together).
    pub(crate) batch_group: u64,
    /// The pending version's JSON, if its caller made it: taken with it
    /// into a batch.
    pub(crate) json: Option<JsonOnce>,
}

impl Track {
    /// Whether the entity occupies room in the queue.
    pub(crate) fn occupies(&self) -> bool {
        self.pending.is_some() || self.in_flight.is_some()
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) seq: u64,
    pub(crate) since: Instant,
    pub(crate) group: Option<u64>,
}

/// Identifies an entity across kinds.
pub(crate) type EntityKey = (KindId, Arc<str>);

/// The outbox's bookkeeping, kept inside the store's lock.
pub(crate) struct Ledger {
    pub(crate) capacity: usize,
    /// Distinct entities occupying the queue.
    pub(crate) depth: usize,
    pub(crate) sender: Sender<DirtyRecord>,
    next_seq: u64,
    lag: LagClock,
    pub(crate) groups: HashMap<u64, Vec<EntityKey>>,
    next_group: u64,
    /// Tracks of written entities, kept for the next ones to change: an
    /// entity is tracked from its first unwritten change until it is
    /// written, so under steady load about as many tracks end as begin,
    /// and reusing them keeps an allocation off the change path (and its
    /// free off the worker's thread). At most [`SPARE_TRACKS`].
    #[expect(clippy::vec_box, reason = "the boxes are what is reused: slots hold their tracks boxed")]
    spare: Vec<Box<Track>>,
}

/// How many ended tracks the ledger keeps for reuse (a few KiB).
const SPARE_TRACKS: usize = 256;

impl Ledger {
    pub(crate) fn new(capacity: usize) -> (Self, OutboxReceiver) {
        // The channel never holds more records than there are pending
        // marks (the worker drains it under the store lock before it takes
        // anything), and pending marks never outnumber occupying entities,
        // so the queue's capacity bounds the channel too.
        let (sender, records) = crossbeam_channel::bounded(capacity);
        let ledger = Self {
            capacity,
            depth: 0,
            sender,
            next_seq: 0,
            lag: LagClock::default(),
            groups: HashMap::new(),
            next_group: 0,
            spare: Vec::new(),
        };
        (ledger, OutboxReceiver { records })
    }

    /// A track for an entity that begins to have unwritten changes; the
    /// database holds version `base` of it.
    pub(crate) fn track(&mut self, base: u64) -> Box<Track> {
        match self.spare.pop() {
            Some(mut track) => {
                track.base = base;
                track
            }
            None => Box::new(Track { base, ..Track::default() }),
        }
    }

    /// An entity's track has ended (nothing of it unwritten, no ticket
    /// waiting): kept for reuse, as new (its waiters' room kept too).
    pub(crate) fn end_track(&mut self, mut track: Box<Track>) {
        if self.spare.len() < SPARE_TRACKS {
            let mut waiters = std::mem::take(&mut track.waiters);
            waiters.clear();
            *track = Track { waiters, ..Track::default() };
            self.spare.push(track);
        }
    }

    /// Starts a pending mark for the entity in slot `at` of its kind's
    /// table and sends its record.
    pub(crate) fn mark(&mut self, kind: KindId, at: usize, now: Instant) -> Pending {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.lag.push(seq, now);
        if let Err(e) = self.sender.try_send(DirtyRecord { kind, at, seq }) {
            // Unreachable while the reservation holds (see `new`); if it ever
            // happens the entity stays marked and is found by the drain's
            // sweep, so nothing is lost.
            tracing::error!(error = %e, "outbox channel refused a record despite its reservation");
        }
        Pending { seq, since: now, group: None }
    }

    /// A pending change is written (or quarantined): it no longer counts
    /// for lag.
    pub(crate) fn settle(&mut self, seq: u64) {
        self.lag.remove(seq);
    }

    /// When the oldest unwritten change was made.
    pub(crate) fn oldest_pending(&self) -> Option<Instant> {
        self.lag.oldest()
    }

    pub(crate) fn new_group(&mut self) -> u64 {
        let id = self.next_group_id();
        self.groups.insert(id, Vec::new());
        id
    }

    /// A fresh group id, not registered (for groups of a batch).
    pub(crate) fn next_group_id(&mut self) -> u64 {
        let id = self.next_group;
        self.next_group += 1;
        id
    }
}

/// Sequence numbers of unwritten changes in order, to find the oldest in
/// O(1): numbers are handed out consecutively, so a deque indexed by
/// `seq - first` holds them, and settled ones at the front are popped.
#[derive(Default)]
struct LagClock {
    first: u64,
    slots: VecDeque<Option<Instant>>,
}

impl LagClock {
    fn push(&mut self, seq: u64, at: Instant) {
        if self.slots.is_empty() {
            self.first = seq;
        }
        debug_assert_eq!(seq, self.first + self.slots.len() as u64, "sequence numbers are consecutive");
        self.slots.push_back(Some(at));
    }

    fn remove(&mut self, seq: u64) {
        let Some(index) = seq.checked_sub(self.first) else { return };
        if let Some(slot) = self.slots.get_mut(index as usize) {
            *slot = None;
        }
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    fn oldest(&self) -> Option<Instant> {
        self.slots.front().copied().flatten()
    }
}

/// A point-in-time view of the outbox, for metrics and the status route.
#[derive(Debug, Clone, Copy)]
pub struct OutboxSnapshot {
    /// Distinct entities waiting to be written.
    pub depth: usize,
    /// The bound.
    pub capacity: usize,
    /// Age of the oldest unwritten change (zero when none).
    pub lag: Duration,
    /// Wall-clock time of the oldest unwritten change (now when none).
    pub oldest_pending: SystemTime,
}

impl OutboxSnapshot {
    pub(crate) fn of(ledger: &Ledger) -> Self {
        let lag = ledger.oldest_pending().map(|t| t.elapsed()).unwrap_or_default();
        Self { depth: ledger.depth, capacity: ledger.capacity, lag, oldest_pending: SystemTime::now() - lag }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A track reused after its entity was written starts as a new one
    /// does (only the room for waiters kept), and the ledger keeps at most
    /// `SPARE_TRACKS` of them.
    #[test]
    fn a_reused_track_starts_as_new() {
        let (mut ledger, _receiver) = Ledger::new(8);
        let mut track = ledger.track(3);
        let (shared, _ticket) = TicketShared::new(1);
        track.pending = Some(Pending { seq: 9, since: Instant::now(), group: Some(4) });
        track.in_flight = Some(7);
        track.waiters.push(Waiter::new(7, &shared));
        track.batch_group = 5;
        track.json = Some(JsonOnce::default());
        ledger.end_track(track);
        let track = ledger.track(11);
        assert!(track.pending.is_none() && track.in_flight.is_none() && track.json.is_none());
        assert!(track.waiters.is_empty() && track.waiters.capacity() > 0);
        assert_eq!((track.base, track.batch_group), (11, 0));

        for _ in 0..SPARE_TRACKS + 10 {
            ledger.end_track(Box::default());
        }
        assert_eq!(ledger.spare.len(), SPARE_TRACKS);
    }

    #[test]
    fn lag_clock_tracks_the_oldest_unsettled() {
        let mut clock = LagClock::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1);
        let t2 = t0 + Duration::from_millis(2);
        clock.push(0, t0);
        clock.push(1, t1);
        clock.push(2, t2);
        clock.remove(1);
        assert_eq!(clock.oldest(), Some(t0));
        clock.remove(0);
        assert_eq!(clock.oldest(), Some(t2));
        clock.remove(2);
        assert_eq!(clock.oldest(), None);
        clock.push(3, t2);
        assert_eq!(clock.oldest(), Some(t2));
    }
}
