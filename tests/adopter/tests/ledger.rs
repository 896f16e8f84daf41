//! The ledger against a real PostgreSQL, started here (or `DATABASE_URL`'s
//! server, a database of its own per test).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use adopter::{Account, Declined, Ledger, Transfer};
use outbox::CancellationToken;
use outbox::engine::StartError;
use outbox::pg::{LocalPostgres, tokio_postgres};
use outbox::store::ApplyError;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A private PostgreSQL and its folder, both gone when dropped.
struct Private {
    postgres: Option<LocalPostgres>,
    dir: PathBuf,
}

impl Drop for Private {
    fn drop(&mut self) {
        drop(self.postgres.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database for one test: on `DATABASE_URL`'s server when set, else in
/// a private PostgreSQL under the test scratch folder.
async fn database(label: &str) -> (Option<Private>, tokio_postgres::Config) {
    let name = format!("adopter_{label}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let admin = outbox::pg::parse_url(&url).expect("DATABASE_URL parses");
            outbox::pg::create_database_if_missing(&admin, &name).await.expect("create the test database");
            let mut config = admin.clone();
            config.dbname(&name);
            (None, config)
        }
        Err(_) => {
            let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
            let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0);
            let dir = base.join(format!("outbox-tests-{uid}")).join(&name);
            std::fs::create_dir_all(&dir).expect("scratch folder");
            // PostgreSQL runs as its own OS user when the tests run as root.
            for folder in [dir.parent().unwrap(), dir.as_path()] {
                std::fs::set_permissions(folder, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            }
            let (postgres, config) = LocalPostgres::open(dir.join("pg"), &name).await.expect("start PostgreSQL");
            (Some(Private { postgres: Some(postgres), dir }), config)
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_are_durable_all_or_nothing_and_come_back_after_a_restart() {
    let (_postgres, config) = database("ledger").await;
    let ledger = Ledger::open(config.clone(), CancellationToken::new()).await.expect("open");
    assert_eq!(ledger.loaded(), 0);
    ledger.open_account("alice", 100).unwrap().wait().await.unwrap();
    ledger.open_account("bob", 50).unwrap().wait().await.unwrap();
    ledger.transfer("alice", "bob", 30, Some("rent")).unwrap().wait().await.unwrap();

    // Declined, nothing changed: not enough money, a missing account, a bad amount.
    match ledger.transfer("bob", "alice", 1_000, None) {
        Err(ApplyError::Failed(Declined::Funds { account, balance })) => {
            assert_eq!((account.as_str(), balance), ("bob", 80))
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(matches!(ledger.transfer("alice", "carol", 10, None), Err(ApplyError::Failed(Declined::Store(_)))));
    assert!(matches!(ledger.transfer("alice", "bob", -5, None), Err(ApplyError::Failed(Declined::Amount(-5)))));
    assert_eq!(ledger.balance("alice"), Some((70, 2)));
    assert_eq!(ledger.balance("bob"), Some((80, 2)));
    assert!(ledger.close().await.complete());

    // What the database holds: the document and the typed columns.
    let client = outbox::pg::connect(&config).await.unwrap();
    let row = client.query_one("SELECT data->>'balance', version FROM accounts WHERE id = 'alice'", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), ("70".to_owned(), 2));
    let row = client
        .query_one("SELECT from_account, to_account, amount, memo FROM transfers WHERE id = 't1'", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, Option<String>>(3)),
        ("alice".to_owned(), "bob".to_owned(), 30, Some("rent".to_owned()))
    );

    // A restart loads it all back; versions continue.
    let ledger = Ledger::open(config.clone(), CancellationToken::new()).await.expect("reopen");
    assert_eq!(ledger.loaded(), 3);
    assert_eq!(ledger.balance("alice"), Some((70, 2)));
    assert_eq!(
        ledger.transfers(),
        vec![Transfer {
            id: "t1".into(),
            from_account: "alice".into(),
            to_account: "bob".into(),
            amount: 30,
            memo: Some("rent".into())
        }]
    );
    ledger.transfer("bob", "alice", 80, None).unwrap().wait().await.unwrap();
    assert_eq!(ledger.balance("bob"), Some((0, 3)));
    assert!(ledger.close().await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_its_tables_the_ledger_does_not_start_and_says_what_to_create() {
    let (_postgres, config) = database("tables").await;
    let pool = outbox::pg::pool(config, 2);
    outbox::pg::migrate(&pool).await.unwrap();
    let started = Instant::now();
    let error = match Ledger::open_existing(pool.clone(), CancellationToken::new()).await {
        Err(error) => error,
        Ok(_) => panic!("started without tables"),
    };
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(matches!(error, StartError::Table(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("accounts") && message.contains("CREATE TABLE"), "{message}");
    assert!(outbox::pg::create_table_sql::<Account>().contains("data       json,"));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_can_be_cancelled() {
    let (_postgres, config) = database("cancel").await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    match Ledger::open(config, cancel).await {
        Err(error) => assert!(matches!(error.downcast_ref::<StartError>(), Some(StartError::Cancelled)), "{error}"),
        Ok(_) => panic!("started although cancelled"),
    }
}
