//! Commit tickets: a caller that wants durability waits on a ticket that
//! resolves when the batch carrying its change set's versions has
//! committed. Many tickets resolve from one batch (group commit).
//!
//! The entities a ticket waits on hold only a weak claim on it: a caller
//! that gives up (a request that timed out, a client that went away) drops
//! its ticket, and the claims it left are pruned the next time the entity is
//! waited on, so memory does not grow with requests during an outage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

/// Why a ticket did not resolve with a commit.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// The database refuses a row of the change set for good; the whole
    /// change set was quarantined as dead letters. The change is live in
    /// memory but not durable. `kind`, `id` and `version` name the row the
    /// database refused.
    #[error("{kind} {id} version {version} was refused by the database ({}): {message}; its change set is quarantined", sqlstate.as_deref().unwrap_or("no SQLSTATE"))]
    Quarantined {
        /// Entity kind of the refused row.
        kind: String,
        /// Entity id of the refused row.
        id: String,
        /// The version refused.
        version: u64,
        /// SQLSTATE of the failure, when the database gave one.
        sqlstate: Option<String>,
        /// The database's message.
        message: String,
    },
    /// The database holds a version of a row of the change set that this
    /// process did not write (an equal version with other content, or a
    /// newer one): the change set was quarantined as a conflict instead of
    /// overwriting it.
    #[error("{kind} {id}: the database holds version {} written elsewhere, this process has version {version}; its change set is quarantined as a conflict", database_version.map_or_else(|| "none".to_owned(), |v| v.to_string()))]
    Conflict {
        /// Entity kind of the conflicting row.
        kind: String,
        /// Entity id of the conflicting row.
        id: String,
        /// The version this process tried to write.
        version: u64,
        /// The version the database holds (`None`: no row).
        database_version: Option<u64>,
    },
    /// The outbox stopped (shutdown deadline) before the change committed.
    #[error("the outbox stopped before the change was committed")]
    Abandoned,
}

impl TicketError {
    /// Whether the failure is a property of the data (the client sent
    /// something the database refuses) rather than of the server.
    pub fn is_data_error(&self) -> bool {
        matches!(self, Self::Quarantined { sqlstate: Some(code), .. }
            if ["21", "22", "23", "54"].iter().any(|class| code.starts_with(class)))
    }
}

type Outcome = Result<(), TicketError>;

/// Shared between a ticket and the entities it waits on.
pub(crate) struct TicketShared {
    remaining: AtomicUsize,
    /// `std::sync::Mutex`: taken once, to send the outcome.
    sender: Mutex<Option<oneshot::Sender<Outcome>>>,
}

impl TicketShared {
    pub(crate) fn new(parts: usize) -> (Arc<Self>, Ticket) {
        let (tx, rx) = oneshot::channel();
        let shared = Arc::new(Self { remaining: AtomicUsize::new(parts), sender: Mutex::new(Some(tx)) });
        (shared.clone(), Ticket { outcome: Some(rx), _claim: Some(shared) })
    }

    /// One entity of the change set has committed.
    pub(crate) fn arrive(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Ok(()));
        }
    }

    /// The change set cannot become durable.
    pub(crate) fn fail(&self, error: TicketError) {
        self.finish(Err(error));
    }

    fn finish(&self, outcome: Outcome) {
        let sender = self.sender.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(sender) = sender {
            // The waiter may have given up (a client that went away).
            let _ = sender.send(outcome);
        }
    }
}

/// A ticket's claim on one entity: resolved when a version at least
/// `target` of it has committed. Weak: the ticket's holder owns it.
pub(crate) struct Waiter {
    pub(crate) target: u64,
    ticket: Weak<TicketShared>,
}

impl Waiter {
    pub(crate) fn new(target: u64, ticket: &Arc<TicketShared>) -> Self {
        Self { target, ticket: Arc::downgrade(ticket) }
    }

    /// Whether someone still waits on the ticket.
    pub(crate) fn is_live(&self) -> bool {
        self.ticket.strong_count() > 0
    }

    /// The entity committed at `target` or later.
    pub(crate) fn arrive(&self) {
        if let Some(ticket) = self.ticket.upgrade() {
            ticket.arrive();
        }
    }

    /// The entity will not be committed at `target`.
    pub(crate) fn fail(&self, error: TicketError) {
        if let Some(ticket) = self.ticket.upgrade() {
            ticket.fail(error);
        }
    }
}

/// Adds a waiter to an entity's list, first dropping the claims of
/// tickets nobody waits on any more.
pub(crate) fn push_waiter(waiters: &mut Vec<Waiter>, waiter: Waiter) {
    waiters.retain(Waiter::is_live);
    waiters.push(waiter);
}

/// Resolves when the change set it was issued for is committed.
#[must_use = "a ticket does nothing unless waited on"]
#[derive(Debug)]
pub struct Ticket {
    outcome: Option<oneshot::Receiver<Outcome>>,
    /// Keeps the claims of the entities alive while someone holds the
    /// ticket.
    _claim: Option<Arc<TicketShared>>,
}

impl std::fmt::Debug for TicketShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketShared").field("remaining", &self.remaining.load(Ordering::Relaxed)).finish()
    }
}

impl Ticket {
    /// A ticket for a change set that changed nothing: already durable.
    pub(crate) fn done() -> Self {
        Self { outcome: None, _claim: None }
    }

    /// A ticket that has failed already.
    pub(crate) fn failed(error: TicketError) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(error));
        Self { outcome: Some(rx), _claim: None }
    }

    /// Waits until the change set is committed, or fails for good.
    pub async fn wait(self) -> Result<(), TicketError> {
        match self.outcome {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(TicketError::Abandoned)),
        }
    }

    /// [`wait`](Self::wait) for threads outside an async runtime.
    pub fn wait_blocking(self) -> Result<(), TicketError> {
        match self.outcome {
            None => Ok(()),
            Some(rx) => rx.blocking_recv().unwrap_or(Err(TicketError::Abandoned)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_of_dropped_tickets_are_pruned() {
        let mut waiters = Vec::new();
        for _ in 0..1000 {
            let (shared, ticket) = TicketShared::new(1);
            push_waiter(&mut waiters, Waiter::new(1, &shared));
            drop(shared);
            drop(ticket); // the caller gave up
        }
        assert_eq!(waiters.len(), 1, "only the newest claim is left until the next push");
        let (shared, ticket) = TicketShared::new(1);
        push_waiter(&mut waiters, Waiter::new(1, &shared));
        drop(shared);
        assert_eq!(waiters.len(), 1);
        waiters[0].arrive();
        assert_eq!(ticket.wait_blocking(), Ok(()));
    }
}
