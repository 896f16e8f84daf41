//! What the worker last saw of the database, for `GET /api/outbox/status`.

use std::sync::Mutex;
use std::time::SystemTime;

use super::classify::{Classified, ErrorClass};

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
    /// Whether the last flush attempt reached the database (`None` before
    /// the first attempt).
    pub db_up: Option<bool>,
    /// When the last batch committed.
    pub last_success: Option<SystemTime>,
    /// The last failure.
    pub last_error: Option<LastError>,
}

/// The persistence health, updated by the writers.
#[derive(Debug, Default)]
pub struct Health {
    /// `std::sync::Mutex`: held for an assignment or a clone.
    state: Mutex<HealthSnapshot>,
}

impl Health {
    /// A copy of the current state.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(crate) fn success(&self, at: SystemTime) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.db_up = Some(true);
        state.last_success = Some(at);
    }

    /// A health check reached the database, or did not.
    pub(crate) fn reachable(&self, up: bool) {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).db_up = Some(up);
    }

    pub(crate) fn failure(&self, classified: &Classified, reached_database: bool, message: String) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.db_up = Some(reached_database);
        state.last_error = Some(LastError {
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
