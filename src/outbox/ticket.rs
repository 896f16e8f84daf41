//! Commit tickets (DESIGN I11): a caller that wants durability waits on a
//! ticket that resolves when the batch carrying its change set's versions has
//! committed. Many tickets resolve from one batch (group commit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Why a ticket did not resolve with a commit.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// A record of the change set can never be written and was quarantined
    /// as a dead letter. The change is live in memory but not durable.
    #[error("{kind} {id} version {version} was quarantined: {message}")]
    Quarantined {
        /// Entity kind.
        kind: String,
        /// Entity id.
        id: String,
        /// The version that failed.
        version: u64,
        /// SQLSTATE of the failure, when the database gave one.
        sqlstate: Option<String>,
        /// The database's message.
        message: String,
    },
    /// The outbox stopped (shutdown deadline) before the change committed.
    #[error("the outbox stopped before the change was committed")]
    Abandoned,
}

impl TicketError {
    /// Whether the failure is a property of the data (the client sent
    /// something the database refuses) rather than of the server.
    pub fn is_data_error(&self) -> bool {
        matches!(self, Self::Quarantined { sqlstate: Some(code), .. } if code.starts_with("22") || code.starts_with("23"))
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
        (shared, Ticket { outcome: Some(rx) })
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
/// `target` of it has committed.
pub(crate) struct Waiter {
    pub(crate) target: u64,
    pub(crate) ticket: Arc<TicketShared>,
}

/// Resolves when the change set it was issued for is committed.
#[must_use = "a ticket does nothing unless waited on"]
#[derive(Debug)]
pub struct Ticket {
    outcome: Option<oneshot::Receiver<Outcome>>,
}

impl Ticket {
    /// A ticket for a change set that changed nothing: already durable.
    pub(crate) fn done() -> Self {
        Self { outcome: None }
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
