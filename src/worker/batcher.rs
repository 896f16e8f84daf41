//! When the next batch is due: once `batch_max` records wait, or `linger`
//! after the first of them arrived, whichever comes first. Records whose
//! groups wait for a batch in flight do not count towards a full batch.

use std::time::{Duration, Instant};

/// Size-or-age batching, kept apart from the coordinator's other jobs.
#[derive(Debug)]
pub(crate) struct Batcher {
    batch_max: usize,
    linger: Duration,
    /// When the batch gathering now is due (`None`: nothing is waiting).
    due: Option<Instant>,
}

impl Batcher {
    pub(crate) fn new(batch_max: usize, linger: Duration) -> Self {
        Self { batch_max, linger, due: None }
    }

    /// The most rows a batch takes (a group is never split, so a batch may
    /// exceed it by one group).
    pub(crate) fn batch_max(&self) -> usize {
        self.batch_max
    }

    /// A record arrived: the batch is due `linger` after the first one.
    pub(crate) fn arrived(&mut self, now: Instant) {
        self.due.get_or_insert(now + self.linger);
    }

    /// Whether `waiting` records make a full batch.
    pub(crate) fn is_full(&self, waiting: usize) -> bool {
        waiting >= self.batch_max
    }

    /// The batch is due now (full, draining, or records freed by a batch
    /// that finished).
    pub(crate) fn due_now(&mut self) {
        self.due = Some(Instant::now());
    }

    /// Nothing is waiting that could be taken.
    pub(crate) fn clear(&mut self) {
        self.due = None;
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
        batcher.clear();
        assert!(!batcher.is_due(t0 + Duration::from_secs(1), false));
    }
}
