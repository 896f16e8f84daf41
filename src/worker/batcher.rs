//! When the next batch is due: once `batch_max` records wait, or `linger`
//! after the first of them arrived, whichever comes first. Records whose
//! groups wait for a batch in flight do not count towards a full batch.
//! Records that have waited `LATE_LINGERS` lingers (counted from the first
//! arrival since a batch was last taken) are late: the coordinator then
//! hands them to a second writer rather than wait for the busy one.

use std::time::{Duration, Instant};

/// How many lingers the oldest waiting record may wait for a busy writer
/// before it is late.
const LATE_LINGERS: u32 = 4;

/// Size-or-age batching, kept apart from the coordinator's other jobs.
#[derive(Debug)]
pub(crate) struct Batcher {
    batch_max: usize,
    linger: Duration,
    /// When the batch gathering now is due (`None`: nothing is waiting).
    due: Option<Instant>,
    /// When the batch gathering now began: its first record's arrival.
    since: Option<Instant>,
}

impl Batcher {
    pub(crate) fn new(batch_max: usize, linger: Duration) -> Self {
        Self { batch_max, linger, due: None, since: None }
    }

    /// The most rows a batch takes (a group is never split, so a batch may
    /// exceed it by one group).
    pub(crate) fn batch_max(&self) -> usize {
        self.batch_max
    }

    /// A record arrived: the batch is due `linger` after the first one.
    pub(crate) fn arrived(&mut self, now: Instant) {
        self.due.get_or_insert(now + self.linger);
        self.since.get_or_insert(now);
    }

    /// Whether `waiting` records make a full batch.
    pub(crate) fn is_full(&self, waiting: usize) -> bool {
        waiting >= self.batch_max
    }

    /// The batch is due now (full, draining, or records freed by a batch
    /// that finished).
    pub(crate) fn due_now(&mut self) {
        let now = Instant::now();
        self.due = Some(now);
        self.since.get_or_insert(now);
    }

    /// A batch was taken. Records left over (more than a batch held, or
    /// arrived while it was taken) are due at once; the oldest went with
    /// the batch, so their wait for a busy writer counts from now.
    pub(crate) fn taken(&mut self, left_over: bool) {
        self.clear();
        if left_over {
            self.due_now();
        }
    }

    /// Nothing is waiting that could be taken.
    pub(crate) fn clear(&mut self) {
        self.due = None;
        self.since = None;
    }

    /// When the records gathering now become late (`None`: nothing is
    /// waiting).
    pub(crate) fn late_at(&self) -> Option<Instant> {
        self.since.map(|since| since + self.linger * LATE_LINGERS)
    }

    /// When the gathering batch is due, if one is.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether a batch should be taken now (a drain takes at once).
    pub(crate) fn is_due(&self, now: Instant, draining: bool) -> bool {
        self.due.is_some_and(|at| at <= now || draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_on_size_or_age_from_the_first_record() {
        let mut batcher = Batcher::new(3, Duration::from_millis(5));
        let t0 = Instant::now();
        assert!(!batcher.is_due(t0, false), "nothing waits");
        batcher.arrived(t0);
        batcher.arrived(t0 + Duration::from_millis(4));
        assert_eq!(batcher.due(), Some(t0 + Duration::from_millis(5)), "linger counts from the first record");
        assert!(!batcher.is_due(t0 + Duration::from_millis(4), false));
        assert!(batcher.is_due(t0 + Duration::from_millis(5), false));
        assert!(batcher.is_due(t0, true), "a drain does not linger");
        assert!(!batcher.is_full(2) && batcher.is_full(3));
        assert_eq!(batcher.late_at(), Some(t0 + Duration::from_millis(20)), "late after four lingers from the first");
        batcher.clear();
        assert!(!batcher.is_due(t0 + Duration::from_secs(1), false));
        assert_eq!(batcher.late_at(), None, "nothing waits, nothing is late");
    }

    #[test]
    fn records_made_due_at_once_are_late_from_then_unless_older_ones_wait() {
        let mut batcher = Batcher::new(3, Duration::from_millis(5));
        let before = Instant::now();
        batcher.due_now();
        let late = batcher.late_at().expect("records wait");
        assert!(late >= before + Duration::from_millis(20) && late <= Instant::now() + Duration::from_millis(20));
        batcher.clear();
        let t0 = Instant::now() - Duration::from_secs(1);
        batcher.arrived(t0);
        batcher.due_now();
        assert_eq!(batcher.late_at(), Some(t0 + Duration::from_millis(20)), "the first record's wait counts");
    }

    #[test]
    fn records_left_over_by_a_batch_are_due_at_once_and_late_from_then() {
        let mut batcher = Batcher::new(3, Duration::from_millis(5));
        let t0 = Instant::now() - Duration::from_secs(1);
        batcher.arrived(t0);
        let before = Instant::now();
        batcher.taken(true);
        assert!(batcher.is_due(Instant::now(), false), "left-over records go at once");
        let late = batcher.late_at().expect("records wait");
        assert!(late >= before + Duration::from_millis(20), "the taken batch's age does not make them late");
        batcher.taken(false);
        assert_eq!((batcher.due(), batcher.late_at()), (None, None), "nothing left, nothing waits");
    }
}
