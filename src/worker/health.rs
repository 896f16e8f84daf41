//! What this process last saw of the database, kept in memory so that
//! `/readyz` and `GET /api/outbox/status` answer at once, whatever state
//! the database is in (they never take a pooled connection).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::classify::{Classified, ErrorClass};
use crate::pg::lease::LeaseState;

/// An attempt without an answer for this long is reported as the last
/// error (the database may hang: stopped, or a network cut).
const STALLED_AFTER: Duration = Duration::from_secs(2);

/// The last flush error, without secrets (database messages name tables,
/// columns and values, never connection passwords).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// `transient`, `permanent` or `schema`.
    pub class: &'static str,
    /// The `error_type` label it was counted under.
    pub error_type: &'static str,
    /// SQLSTATE, when the database sent one.
    pub sqlstate: Option<String>,
    /// The error's message.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// A snapshot of [`Health`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Whether the last flush attempt or health check reached the database
    /// (`None` before the first).
    pub db_up: Option<bool>,
    /// When the last batch committed.
    pub last_success: Option<SystemTime>,
    /// The last failure, or the attempt under way when it has had no
    /// answer for a while.
    pub last_error: Option<LastError>,
    /// Unresolved dead letters, as last counted in the database.
    pub dead_letters: Option<i64>,
    /// The single-writer lease.
    pub lease: LeaseView,
}

#[derive(Debug, Default)]
struct State {
    snapshot: HealthSnapshot,
    /// Database calls under way (flush attempts, health checks), by id,
    /// with when they started.
    under_way: BTreeMap<u64, (SystemTime, &'static str)>,
}

/// The persistence health, updated by the writers and the health check.
#[derive(Debug, Default)]
pub struct Health {
    /// `std::sync::Mutex`: held for an assignment or a clone.
    state: Mutex<State>,
    next_call: AtomicU64,
    /// The lease this process holds, once it holds one: asked directly
    /// (its own clock) whether a commit is possible now.
    lease: std::sync::OnceLock<std::sync::Arc<crate::pg::lease::Lease>>,
}

/// A database call under way; dropping it says it ended.
pub(crate) struct UnderWay<'a> {
    health: &'a Health,
    id: u64,
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.health.lock().under_way.remove(&self.id);
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> HealthSnapshot {
        let state = self.lock();
        let mut snapshot = state.snapshot.clone();
        let now = SystemTime::now();
        if let Some((started, what)) = state.under_way.values().min_by_key(|(started, _)| *started)
            && let Ok(waited) = now.duration_since(*started)
            && waited >= STALLED_AFTER
            && snapshot.last_error.as_ref().is_none_or(|e| e.at < *started)
        {
            snapshot.last_error = Some(LastError {
                class: "transient",
                error_type: "timeout",
                sqlstate: None,
                message: format!("{what} has had no answer from the database for {} s", waited.as_secs()),
                at: now,
            });
        }
        snapshot
    }

    /// A database call starts (`what` names it in the status).
    pub(crate) fn under_way(&self, what: &'static str) -> UnderWay<'_> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.lock().under_way.insert(id, (SystemTime::now(), what));
        UnderWay { health: self, id }
    }

    pub(crate) fn success(&self, at: SystemTime) {
        let mut state = self.lock();
        state.snapshot.db_up = Some(true);
        state.snapshot.last_success = Some(at);
    }

    /// A health check reached the database, or did not.
    pub(crate) fn reachable(&self, up: bool) {
        self.lock().snapshot.db_up = Some(up);
    }

    /// The unresolved dead letters were counted.
    pub(crate) fn dead_letters(&self, count: i64) {
        self.lock().snapshot.dead_letters = Some(count);
    }

    pub(crate) fn failure(&self, classified: &Classified, reached_database: bool, message: String) {
        let mut state = self.lock();
        state.snapshot.db_up = Some(reached_database);
        state.snapshot.last_error = Some(LastError {
            class: match classified.class {
                ErrorClass::Transient => "transient",
                ErrorClass::Permanent => "permanent",
                ErrorClass::Schema => "schema",
            },
            error_type: classified.error_type,
            sqlstate: classified.sqlstate.clone(),
            message,
            at: SystemTime::now(),
        });
    }
}

/// What a process is in the single-writer lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Not yet known (start-up).
    #[default]
    Starting,
    /// It holds the lease and writes.
    Leader,
    /// Another process holds it; this one follows, ready to take over.
    Standby,
    /// It held the lease and lost it (expired or taken): it writes nothing
    /// more.
    Fenced,
}

impl Role {
    /// As the status route says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Leader => "leader",
            Self::Standby => "standby",
            Self::Fenced => "fenced",
        }
    }
}

/// The lease as this process sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// This process's role.
    pub role: Role,
    /// The lease's epoch (this process's when it holds it).
    pub epoch: Option<u64>,
    /// Who holds it.
    pub holder: Option<String>,
    /// When it expires unless renewed, by the database's clock.
    pub expires_at: Option<SystemTime>,
    /// Held, but not renewed in time: no commits until it is (the database
    /// is away, or this process was frozen and may have been replaced).
    pub lapsed: bool,
}

impl LeaseView {
    /// Held by this process.
    pub fn held(epoch: u64, holder: &str, expires_at: SystemTime) -> Self {
        Self {
            role: Role::Leader,
            epoch: Some(epoch),
            holder: Some(holder.to_owned()),
            expires_at: Some(expires_at),
            lapsed: false,
        }
    }
}

impl Health {
    /// The lease as this process sees it now.
    pub fn lease(&self) -> LeaseView {
        let mut view = self.lock().snapshot.lease.clone();
        view.lapsed = self.lease.get().is_some_and(|lease| lease.state() == LeaseState::Lapsed);
        view
    }

    /// Whether a change could be committed now: this process holds the
    /// lease and it has not lapsed (by this process's own clock, asked
    /// now: a process that wakes from a freeze knows at once). Without a
    /// lease (an engine that runs without one), yes.
    pub fn may_commit(&self) -> bool {
        self.lease.get().is_none_or(|lease| matches!(lease.state(), LeaseState::Held(_)))
    }

    pub(crate) fn set_lease_handle(&self, lease: std::sync::Arc<crate::pg::lease::Lease>) {
        let _ = self.lease.set(lease);
    }

    pub(crate) fn set_lease(&self, lease: LeaseView) {
        self.lock().snapshot.lease = lease;
    }
}
