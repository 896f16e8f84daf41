//! A ledger service built on `outbox` as another team would build it: with
//! `default-features = false` and `derive`, through the public API only, and
//! no dependency beyond `outbox`, `serde` and `tokio`.

use std::fmt;
use std::time::Duration;

use outbox::engine::{ShutdownReport, StartError};
use outbox::pg::{Pool, tokio_postgres};
use outbox::store::{ApplyError, StoreError, Ticket};
use outbox::{CancellationToken, Engine, Entity, Store};
use serde::{Deserialize, Serialize};

/// An account, one `data json` document per row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[entity(kind = "account", table = "accounts")]
pub struct Account {
    /// Its id.
    #[entity(id)]
    pub id: String,
    /// Its balance in cents.
    pub balance: i64,
}

/// A transfer, in typed columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[entity(kind = "transfer", table = "transfers", columns)]
pub struct Transfer {
    /// Its id.
    #[entity(id)]
    pub id: String,
    /// Debited.
    pub from_account: String,
    /// Credited.
    pub to_account: String,
    /// Cents.
    pub amount: i64,
    /// Free text.
    pub memo: Option<String>,
}

/// Why a ledger operation was declined; nothing changed.
#[derive(Debug)]
pub enum Declined {
    /// The store refused it (an account missing, an id taken).
    Store(StoreError),
    /// Not enough money.
    Funds {
        /// The account debited.
        account: String,
        /// Its balance.
        balance: i64,
    },
    /// Not a positive amount.
    Amount(i64),
}

impl fmt::Display for Declined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Declined::Store(e) => e.fmt(f),
            Declined::Funds { account, balance } => write!(f, "{account} has only {balance}"),
            Declined::Amount(amount) => write!(f, "{amount} is not a positive amount"),
        }
    }
}

impl std::error::Error for Declined {}

impl From<StoreError> for Declined {
    fn from(e: StoreError) -> Self {
        Declined::Store(e)
    }
}

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The ledger: accounts and transfers in memory, persisted behind it.
pub struct Ledger {
    engine: Engine,
}

impl Ledger {
    /// Connects, makes the library's and the ledger's tables, loads what
    /// the database holds and starts persisting.
    pub async fn open(config: tokio_postgres::Config, cancel: CancellationToken) -> Result<Self, BoxError> {
        let pool = outbox::pg::pool(config, 4);
        outbox::pg::migrate(&pool).await?;
        let (store, receiver) = Self::store();
        outbox::pg::ensure_tables(&pool, &store).await?;
        Ok(Self::start(store, receiver, pool, cancel).await?)
    }

    /// Starts on a database whose tables someone else made (or did not).
    pub async fn open_existing(pool: Pool, cancel: CancellationToken) -> Result<Self, StartError> {
        let (store, receiver) = Self::store();
        Self::start(store, receiver, pool, cancel).await
    }

    fn store() -> (Store, outbox::store::OutboxReceiver) {
        Store::builder().kind::<Account>().kind::<Transfer>().capacity(10_000).build()
    }

    async fn start(
        store: Store,
        receiver: outbox::store::OutboxReceiver,
        pool: Pool,
        cancel: CancellationToken,
    ) -> Result<Self, StartError> {
        let engine = Engine::builder(store, receiver, pool)
            .holder("ledger")
            .linger(Duration::from_millis(2))
            .cancel_on(cancel)
            .start()
            .await?;
        Ok(Self { engine })
    }

    /// Opens an account (durable: the ticket resolves once it is committed).
    pub fn open_account(&self, id: &str, balance: i64) -> Result<Ticket, ApplyError<StoreError>> {
        let account = Account { id: id.to_owned(), balance };
        Ok(self.engine.store().apply_durable(|set| set.insert(account))?.1)
    }

    /// Debits `from`, credits `to` and records the transfer, all or nothing.
    pub fn transfer(
        &self,
        from: &str,
        to: &str,
        amount: i64,
        memo: Option<&str>,
    ) -> Result<Ticket, ApplyError<Declined>> {
        let (_, ticket) = self.engine.store().apply_durable(|set| {
            if amount <= 0 {
                return Err(Declined::Amount(amount));
            }
            let balance = set.get::<Account>(from).map_or(0, |a| a.value.balance);
            if balance < amount {
                return Err(Declined::Funds { account: from.to_owned(), balance });
            }
            set.update::<Account>(from, |a| a.balance -= amount)?;
            set.update::<Account>(to, |a| a.balance += amount)?;
            let id = format!("t{}", set.view().count::<Transfer>() + 1);
            let memo = memo.map(str::to_owned);
            set.insert(Transfer { id, from_account: from.to_owned(), to_account: to.to_owned(), amount, memo })?;
            Ok(())
        })?;
        Ok(ticket)
    }

    /// An account's balance and version.
    pub fn balance(&self, id: &str) -> Option<(i64, u64)> {
        self.engine.store().get::<Account>(id).map(|a| (a.value.balance, a.version))
    }

    /// Every transfer, in id order.
    pub fn transfers(&self) -> Vec<Transfer> {
        let mut all: Vec<Transfer> =
            self.engine.store().read(|view| view.iter::<Transfer>().map(|t| Transfer::clone(&t.value)).collect());
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// How many rows start-up loaded.
    pub fn loaded(&self) -> u64 {
        self.engine.hydration().total
    }

    /// Writes everything pending, then stops.
    pub async fn close(self) -> ShutdownReport {
        self.engine.shutdown(Duration::from_secs(30)).await
    }
}
