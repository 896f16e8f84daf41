//! The single-writer lease with fencing (docs/ARCHITECTURE.md, *The lease*).
//!
//! * A process takes the lease by getting a PostgreSQL advisory lock on a
//!   dedicated connection, then incrementing the lease row's `epoch`. A
//!   second process polls for the lock, logging that it waits.
//! * Every flush transaction first reads the lease row `FOR SHARE` and
//!   checks the epoch is still its own (`FENCE_SQL`). A new holder's
//!   increment waits for those share locks, so once it has incremented, no
//!   transaction of the old holder can commit: the epoch, not the advisory
//!   lock, is what keeps two processes from writing the same state.
//! * If the lock connection is lost (a database outage), the holder keeps
//!   serving from memory; flushes wait until the lease is re-taken. If the
//!   epoch moved meanwhile, another process owns the database now: the lease
//!   is [`LeaseState::Lost`] and this process must stop writing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::DbError;

/// Name of the lease row.
pub const LEASE_NAME: &str = "outbox";

/// Advisory lock key of the lease ("outbox" in ASCII).
const LOCK_KEY: i64 = 0x6f75_7462_6f78;

/// How often a waiting process retries the lock, and the holder checks its
/// lock connection.
const POLL: Duration = Duration::from_secs(1);

/// How long one check of the lock connection may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks in a row without an answer after which the lock connection is
/// taken for lost.
const UNANSWERED_CHECKS: u32 = 3;

/// What a check of the lock connection found.
enum Check {
    Alive,
    Unanswered,
    Gone,
}

/// How long the lock may stay held at our own epoch, while we re-take the
/// lease, before the holding session is taken for our own stale one.
const STALE_SESSION_AFTER: Duration = Duration::from_secs(10);

/// The fencing check run first in every flush transaction: returns the
/// current epoch, holding a share lock on the lease row until commit.
pub(crate) const FENCE_SQL: &str = "SELECT epoch FROM outbox_lease WHERE name = $1 FOR SHARE";

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Held at this epoch: flushes may proceed.
    Held(u64),
    /// The lock connection was lost; flushes wait until it is re-taken.
    Reacquiring,
    /// Another process took the lease: this one must not write again.
    Lost,
}

/// The lease this process holds.
pub struct Lease {
    config: tokio_postgres::Config,
    holder: String,
    epoch: AtomicU64,
    state: watch::Sender<LeaseState>,
    /// The connection holding the advisory lock (a Tokio mutex: it is held
    /// across the awaits of a check).
    lock_connection: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("holder", &self.holder).field("state", &*self.state.borrow()).finish()
    }
}

async fn try_lock(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY]).await?.get(0))
}

async fn current(client: &tokio_postgres::Client) -> Result<Option<(u64, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT epoch, holder FROM outbox_lease WHERE name = $1", &[&LEASE_NAME])
        .await?
        .map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
}

/// Ends the session holding the lease's advisory lock: called only when it
/// has held the lock at our own epoch for a while, i.e. it is this
/// process's old lock connection. Needs the right to signal that backend
/// (the same role, or `pg_signal_backend`); without it, a warning says what
/// blocks the re-take.
async fn end_stale_session(client: &tokio_postgres::Client) {
    let ended = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
               AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&LOCK_KEY],
        )
        .await;
    match ended {
        Ok(rows) if rows.iter().any(|r| r.get::<_, bool>(0)) => {
            warn!("ended this process's stale lock session to re-take the lease");
        }
        Ok(_) => warn!("the lease lock is held at our epoch by a session that cannot be ended; waiting"),
        Err(e) => warn!(error = %e, "cannot end the stale lease session; waiting"),
    }
}

impl Lease {
    /// Takes the lease, waiting (polling, cancellable) while another process
    /// holds it. `waiting` is called once, with the holder's name, if it has
    /// to wait.
    pub async fn acquire(
        config: &tokio_postgres::Config,
        holder: &str,
        cancel: &CancellationToken,
        waiting: impl FnOnce(&str),
    ) -> Result<Option<std::sync::Arc<Self>>, DbError> {
        let client = super::connect(config).await?;
        let mut waiting = Some(waiting);
        loop {
            if try_lock(&client).await? {
                break;
            }
            if let Some(report) = waiting.take() {
                let other = current(&client).await?.map(|(_, h)| h).unwrap_or_else(|| "another process".into());
                warn!(holder = %other, "waiting for the single-writer lease; another process writes to this database");
                report(&other);
            }
            if cancel.run_until_cancelled(tokio::time::sleep(POLL)).await.is_none() {
                return Ok(None);
            }
        }
        Self::take(config, client, holder).await.map(Some)
    }

    /// Takes the lease if no other process holds it; otherwise says who
    /// does (`Ok(Err(holder))`).
    pub async fn try_acquire(
        config: &tokio_postgres::Config,
        holder: &str,
    ) -> Result<Result<std::sync::Arc<Self>, String>, DbError> {
        let client = super::connect(config).await?;
        if !try_lock(&client).await? {
            let other = current(&client).await?.map(|(_, h)| h).unwrap_or_else(|| "another process".into());
            return Ok(Err(other));
        }
        Self::take(config, client, holder).await.map(Ok)
    }

    /// With the lock held on `client`: increments the epoch.
    async fn take(
        config: &tokio_postgres::Config,
        client: tokio_postgres::Client,
        holder: &str,
    ) -> Result<std::sync::Arc<Self>, DbError> {
        let row = client
            .query_one(
                "INSERT INTO outbox_lease (name, epoch, holder, acquired_at) VALUES ($1, 1, $2, now())
                 ON CONFLICT (name) DO UPDATE SET epoch = outbox_lease.epoch + 1, holder = EXCLUDED.holder,
                   acquired_at = now()
                 RETURNING epoch",
                &[&LEASE_NAME, &holder],
            )
            .await?;
        let epoch = row.get::<_, i64>(0) as u64;
        info!(epoch, holder, "took the single-writer lease");
        let (state, _) = watch::channel(LeaseState::Held(epoch));
        Ok(std::sync::Arc::new(Self {
            config: config.clone(),
            holder: holder.to_owned(),
            epoch: AtomicU64::new(epoch),
            state,
            lock_connection: Mutex::new(Some(client)),
        }))
    }

    /// The epoch this process holds.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut states = self.state.subscribe();
        let _ = states.wait_for(|s| *s == LeaseState::Lost).await;
    }

    /// A flush found the epoch moved: another process owns the database.
    pub(crate) fn fenced(&self, current: Option<u64>) {
        if self.state() != LeaseState::Lost {
            error!(
                ours = self.epoch(),
                current, "the single-writer lease was taken by another process; this process stops writing"
            );
            self.state.send_replace(LeaseState::Lost);
        }
    }

    /// Watches the lock connection; when it is lost (a database outage),
    /// re-takes the lock once the database answers and checks that the
    /// epoch is still ours. Runs until `cancel` fires or the lease is lost.
    pub async fn keep(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let mut unanswered = 0u32;
        loop {
            if cancel.run_until_cancelled(tokio::time::sleep(POLL)).await.is_none() {
                return;
            }
            if self.state() == LeaseState::Lost {
                return;
            }
            let check = {
                let guard = self.lock_connection.lock().await;
                match guard.as_ref() {
                    Some(client) if !client.is_closed() => {
                        match tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("SELECT 1")).await {
                            Ok(Ok(_)) => Check::Alive,
                            Ok(Err(e)) if !client.is_closed() && e.as_db_error().is_some() => Check::Alive,
                            Ok(Err(_)) => Check::Gone,
                            Err(_) => Check::Unanswered,
                        }
                    }
                    _ => Check::Gone,
                }
            };
            match check {
                Check::Alive => {
                    unanswered = 0;
                    continue;
                }
                // A slow answer is not a lost connection (the lock is held
                // as long as the session lives); only a connection that
                // stays silent for several checks is given up.
                Check::Unanswered if unanswered + 1 < UNANSWERED_CHECKS => {
                    unanswered += 1;
                    warn!(unanswered, "the lease's lock connection did not answer a check in time");
                    continue;
                }
                Check::Unanswered | Check::Gone => unanswered = 0,
            }
            warn!("lost the lease's lock connection; flushes wait until the lease is re-taken");
            self.state.send_replace(LeaseState::Reacquiring);
            *self.lock_connection.lock().await = None;
            match self.retake(&cancel).await {
                Some(true) => {
                    info!(epoch = self.epoch(), "re-took the single-writer lease");
                    self.state.send_replace(LeaseState::Held(self.epoch()));
                }
                Some(false) => {
                    self.fenced(None);
                    return;
                }
                None => return,
            }
        }
    }

    /// `Some(true)`: re-taken at our epoch; `Some(false)`: another process
    /// took it; `None`: cancelled.
    async fn retake(&self, cancel: &CancellationToken) -> Option<bool> {
        let mut delays = crate::backoff::delays(POLL);
        let mut held_at_our_epoch_since: Option<std::time::Instant> = None;
        loop {
            let attempt = async {
                let client = super::connect(&self.config).await?;
                let locked = try_lock(&client).await?;
                let epoch = current(&client).await?.map(|(e, _)| e);
                Ok::<_, DbError>((client, locked, epoch))
            }
            .await;
            match attempt {
                Ok((_, _, epoch)) if epoch != Some(self.epoch()) => return Some(false),
                Ok((client, true, _)) => {
                    *self.lock_connection.lock().await = Some(client);
                    return Some(true);
                }
                // Our epoch, but the lock is held: a new holder about to
                // increment it (a matter of milliseconds), or our own old
                // session, which the server has not noticed is gone (a
                // network cut). If it lasts, end that session.
                Ok((client, false, _)) => {
                    let since = *held_at_our_epoch_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > STALE_SESSION_AFTER {
                        end_stale_session(&client).await;
                        held_at_our_epoch_since = None;
                    }
                }
                Err(e) => warn!(error = %e, "cannot re-take the lease yet"),
            }
            cancel.run_until_cancelled(tokio::time::sleep(delays.next().unwrap_or(POLL))).await?;
        }
    }

    /// Gives the lease up (the advisory lock; the epoch stays, so the next
    /// holder increments past it).
    ///
    /// Bounded: a database that does not answer (frozen, cut off) cannot hold
    /// a shutdown. The lock connection is closed either way, and a closed
    /// session releases its advisory lock when the server notices.
    pub async fn release(&self) {
        let Ok(mut guard) = tokio::time::timeout(CHECK_TIMEOUT, self.lock_connection.lock()).await else {
            warn!("the lease's lock connection is busy; leaving it to close with the process");
            return;
        };
        if let Some(client) = guard.take() {
            let unlocked =
                tokio::time::timeout(CHECK_TIMEOUT, client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]))
                    .await;
            if !matches!(unlocked, Ok(Ok(_))) {
                warn!("the database did not confirm the lease's release; closing its connection instead");
            }
        }
    }
}
