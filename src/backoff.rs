//! The one retry policy of the crate: exponential backoff from 50 ms,
//! doubling, capped, with jitter, without a limit on attempts. Flushes,
//! dead-letter records, start-up steps and the lease's re-take all retry
//! with it; only the cap differs.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// First pause after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(50);

/// The policy, capped at `max_delay`: for `backon`'s `Retryable`.
pub fn policy(max_delay: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default().with_min_delay(MIN_DELAY).with_max_delay(max_delay).with_jitter().without_max_times()
}

/// The policy's pauses, one per failure, for loops that retry by hand
/// because they also wait on something else (cancellation, a lock).
/// Jitter never takes a pause past the cap.
pub fn delays(max_delay: Duration) -> impl Iterator<Item = Duration> {
    policy(max_delay).build().map(move |delay| delay.min(max_delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_never_end() {
        let pauses: Vec<Duration> = delays(Duration::from_millis(400)).take(20).collect();
        assert_eq!(pauses.len(), 20, "no limit on attempts");
        assert!(pauses[0] >= MIN_DELAY && pauses[0] < MIN_DELAY * 2);
        assert!(pauses.iter().all(|p| *p <= Duration::from_millis(400)), "{pauses:?}");
        assert!(pauses[10] >= Duration::from_millis(200), "grown towards the cap: {pauses:?}");
    }
}
