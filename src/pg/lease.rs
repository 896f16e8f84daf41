//! The single-writer lease with fencing (docs/ARCHITECTURE.md, *The lease*).
//!
//! * The lease is a row: holder, epoch, and an expiry set from the
//!   database's clock. A process takes it over only once it has expired or
//!   was released, in one conditional update that increments the epoch. No
//!   advisory lock: engines without them (CockroachDB) can hold it too.
//! * The holder renews it every third of its time to live. Its own monotonic
//!   clock says how long it may still write: the time to live, less a
//!   margin, from the moment it *sent* its last successful renewal, so it
//!   stops before the database can consider the lease expired. Past that the
//!   lease has *lapsed* ([`LeaseState::Lapsed`]): flushes wait (the database
//!   may be away, or this process was frozen) and changes are still taken
//!   into memory, while the holder tries to renew at its own epoch. If the
//!   epoch is still its own, nobody took over and it holds the lease again;
//!   if it moved, another process holds it now and this one has lost it for
//!   good ([`LeaseState::Lost`]): it stops writing.
//! * Every flush transaction first reads the lease row `FOR SHARE` and
//!   commits only if the epoch is its own and the lease has not expired
//!   (`FENCE_SQL`). A takeover waits for those share locks, so once it has
//!   committed, no transaction of the old holder can commit: correctness
//!   rests on the epoch, not on clocks.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::DbError;
use crate::metrics as m;

/// Name of the lease row.
pub const LEASE_NAME: &str = "outbox";

/// The default time to live of the lease (`OUTBOX_LEASE_TTL_S`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The fencing check run first in every flush transaction: the current
/// epoch, and whether the lease is still unexpired by the database's clock,
/// holding a share lock on the lease row until commit.
pub(crate) const FENCE_SQL: &str = "SELECT epoch, expires_at > now() FROM outbox_lease WHERE name = $1 FOR SHARE";

/// What the fencing check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// Ours and unexpired: the transaction may commit.
    Ours,
    /// Ours but expired by the database's clock: renew before writing.
    Expired,
    /// Another epoch (or no lease row): another process holds the lease.
    Taken(Option<u64>),
}

impl Fence {
    /// Reads the fencing check's row for `ours`.
    pub(crate) fn of(row: Option<&tokio_postgres::Row>, ours: u64) -> Self {
        match row.map(|row| (row.get::<_, i64>(0).max(0) as u64, row.get::<_, bool>(1))) {
            Some((epoch, true)) if epoch == ours => Self::Ours,
            Some((epoch, false)) if epoch == ours => Self::Expired,
            other => Self::Taken(other.map(|(epoch, _)| epoch)),
        }
    }
}

/// One conditional update: the lease becomes ours, at the next epoch, if it
/// has expired or was released (or has never been taken).
const TAKE_SQL: &str = "INSERT INTO outbox_lease AS l (name, epoch, holder, acquired_at, expires_at)
     VALUES ($1, 1, $2, now(), now() + make_interval(secs => $3))
     ON CONFLICT (name) DO UPDATE SET epoch = l.epoch + 1, holder = EXCLUDED.holder, acquired_at = now(),
       expires_at = EXCLUDED.expires_at
     WHERE l.expires_at <= now()
     RETURNING epoch, expires_at";

/// Renewal: while the epoch is ours, nobody took over, so extending the
/// lease is safe even past its expiry (after an outage).
const RENEW_SQL: &str = "UPDATE outbox_lease SET expires_at = now() + make_interval(secs => $3)
     WHERE name = $1 AND epoch = $2 RETURNING expires_at";

/// Release: expires the lease at once, so that a standby takes over now.
const RELEASE_SQL: &str = "UPDATE outbox_lease SET expires_at = now() WHERE name = $1 AND epoch = $2";

/// Where the lease stands for its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Held at this epoch: flushes may proceed.
    Held(u64),
    /// Not renewed in time: flushes wait until a renewal at this process's
    /// epoch succeeds (or finds the lease taken).
    Lapsed,
    /// Taken by another process, or released: this process must not write
    /// again.
    Lost,
}

/// The lease row as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Who holds (or last held) it.
    pub holder: String,
    /// Its epoch.
    pub epoch: u64,
    /// When it expires (or expired), by the database's clock.
    pub expires_at: SystemTime,
    /// Whether it has expired (by the database's clock, now).
    pub expired: bool,
}

/// The outcome of an attempt to take the lease.
#[derive(Debug)]
pub enum Attempt {
    /// It is ours.
    Taken(Arc<Lease>),
    /// Another process holds it.
    Held(LeaseRow),
}

/// The lease this process holds.
pub struct Lease {
    pool: Pool,
    holder: String,
    epoch: u64,
    ttl: Duration,
    state: watch::Sender<LeaseState>,
    /// Until when this process may write, by its own monotonic clock.
    /// `std::sync::Mutex`: held for a read or an assignment.
    valid_until: std::sync::Mutex<Instant>,
    /// When the lease expires by the database's clock, as last renewed.
    expires_at: watch::Sender<SystemTime>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("holder", &self.holder).field("epoch", &self.epoch).finish()
    }
}

/// How much sooner than the database this process considers its lease
/// expired: a fifth of the time to live, at least half a second, for the
/// difference between when a renewal was sent and when the database ran it.
fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500)).min(ttl / 2)
}

/// The lease row, if there is one.
pub async fn current(pool: &Pool) -> Result<Option<LeaseRow>, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT holder, epoch, expires_at, expires_at <= now() FROM outbox_lease WHERE name = $1",
            &[&LEASE_NAME],
        )
        .await?;
    Ok(row.map(|row| LeaseRow {
        holder: row.get(0),
        epoch: row.get::<_, i64>(1).max(0) as u64,
        expires_at: row.get::<_, chrono::DateTime<chrono::Utc>>(2).into(),
        expired: row.get(3),
    }))
}

impl Lease {
    /// Takes the lease if it is free (expired, released, or never taken);
    /// otherwise says who holds it.
    pub async fn try_take(pool: &Pool, holder: &str, ttl: Duration) -> Result<Attempt, DbError> {
        let sent = Instant::now();
        let taken = {
            let client = pool.get().await?;
            client.query_opt(TAKE_SQL, &[&LEASE_NAME, &holder, &ttl.as_secs_f64()]).await?
        };
        let Some(row) = taken else {
            return match current(pool).await? {
                Some(row) => Ok(Attempt::Held(row)),
                // Deleted between the two statements: try again later.
                None => Err(DbError::Timeout(Duration::ZERO)),
            };
        };
        let epoch = row.get::<_, i64>(0).max(0) as u64;
        let expires_at: SystemTime = row.get::<_, chrono::DateTime<chrono::Utc>>(1).into();
        info!(epoch, holder, ttl_s = ttl.as_secs_f64(), "took the single-writer lease");
        m::lease_taken(expires_at);
        let (state, _) = watch::channel(LeaseState::Held(epoch));
        let (expires, _) = watch::channel(expires_at);
        Ok(Attempt::Taken(Arc::new(Self {
            pool: pool.clone(),
            holder: holder.to_owned(),
            epoch,
            ttl,
            state,
            valid_until: std::sync::Mutex::new(sent + ttl - margin(ttl)),
            expires_at: expires,
        })))
    }

    /// The epoch this process holds.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This process's name in the lease row.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// When the lease expires by the database's clock, as last renewed.
    pub fn expires_at(&self) -> SystemTime {
        *self.expires_at.borrow()
    }

    /// Renewals, as they happen.
    pub fn renewals(&self) -> watch::Receiver<SystemTime> {
        self.expires_at.subscribe()
    }

    /// Changes of state, as they happen.
    pub fn states(&self) -> watch::Receiver<LeaseState> {
        self.state.subscribe()
    }

    /// The current state. Past the time this process may write (by its own
    /// clock), the lease has lapsed, whatever the database says.
    pub fn state(&self) -> LeaseState {
        let state = *self.state.borrow();
        if let LeaseState::Held(_) = state
            && Instant::now() >= self.valid_until()
        {
            warn!(epoch = self.epoch, "the lease was not renewed in time: flushes wait until it is");
            self.state.send_replace(LeaseState::Lapsed);
            m::lease_lapsed();
            return LeaseState::Lapsed;
        }
        state
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut states = self.state.subscribe();
        let _ = states.wait_for(|s| *s == LeaseState::Lost).await;
    }

    fn lose(&self, why: &str) {
        if *self.state.borrow() != LeaseState::Lost {
            error!(epoch = self.epoch, why, "lost the single-writer lease");
            self.state.send_replace(LeaseState::Lost);
            m::lease_lost();
        }
    }

    /// A flush found the epoch moved (or the lease expired): another process
    /// owns the database now, or may at any moment.
    pub(crate) fn fenced(&self, current: Option<u64>) {
        if *self.state.borrow() != LeaseState::Lost {
            error!(
                ours = self.epoch,
                current, "the single-writer lease was taken or has expired; this process stops writing"
            );
            self.state.send_replace(LeaseState::Lost);
            m::lease_lost();
        }
    }

    /// Renews the lease every third of its time to live until `cancel`
    /// fires or the lease is lost. A renewal that fails is retried soon; a
    /// lapsed lease is renewed as soon as the database answers.
    pub async fn keep(self: Arc<Self>, cancel: CancellationToken) {
        let every = self.ttl / 3;
        let retry = (every / 4).max(Duration::from_millis(100));
        let mut next = Instant::now() + every;
        loop {
            // Wake to renew, or when the lease would lapse (to say so).
            let until = match self.state() {
                LeaseState::Held(_) => next.min(self.valid_until()),
                LeaseState::Lapsed => next,
                LeaseState::Lost => return,
            };
            if cancel.run_until_cancelled(tokio::time::sleep_until(until.into())).await.is_none() {
                return;
            }
            if self.state() == LeaseState::Lost || Instant::now() < next {
                continue;
            }
            let sent = Instant::now();
            match tokio::time::timeout(every, self.renew()).await {
                Ok(Ok(Some(expires_at))) => {
                    *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        sent + self.ttl - margin(self.ttl);
                    if self.state.send_replace(LeaseState::Held(self.epoch)) == LeaseState::Lapsed {
                        info!(epoch = self.epoch, "renewed the lapsed lease: nobody took over; flushes resume");
                    }
                    self.expires_at.send_replace(expires_at);
                    m::lease_renewed(expires_at);
                    next = sent + every;
                }
                Ok(Ok(None)) => {
                    self.lose("another process took the lease over");
                    return;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot renew the single-writer lease yet; retrying");
                    next = Instant::now() + retry;
                }
                Err(_) => next = Instant::now() + retry,
            }
        }
    }

    async fn renew(&self) -> Result<Option<SystemTime>, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt(RENEW_SQL, &[&LEASE_NAME, &(self.epoch as i64), &self.ttl.as_secs_f64()]).await?;
        Ok(row.map(|row| row.get::<_, chrono::DateTime<chrono::Utc>>(0).into()))
    }

    /// Gives the lease up: it expires at once, so that a standby takes over
    /// without waiting for its time to live; this process writes nothing
    /// more. Bounded: a database that does not answer cannot hold a
    /// shutdown (the lease then expires by itself).
    pub async fn release(&self) {
        self.state.send_replace(LeaseState::Lost);
        m::lease_released();
        let released = async {
            let client = self.pool.get().await?;
            client.execute(RELEASE_SQL, &[&LEASE_NAME, &(self.epoch as i64)]).await?;
            Ok::<_, DbError>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), released).await {
            Ok(Ok(())) => info!(epoch = self.epoch, "released the single-writer lease"),
            Ok(Err(e)) => warn!(error = %e, "could not release the lease; it expires by itself"),
            Err(_) => warn!("the database did not confirm the lease's release; it expires by itself"),
        }
    }
}
