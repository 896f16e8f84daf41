//! The library's schema: its own tables, with a migration history of its
//! own (`outbox_schema_history`), so that an application's migrations, in
//! refinery's default history table or anywhere else, never meet it.

use deadpool_postgres::Pool;
use refinery::{Runner, Target};

use super::DbError;

mod library {
    refinery::embed_migrations!("migrations/library");
}

/// The migrations of earlier versions, which kept their history in
/// refinery's default table (and made the reference service's tables too).
mod legacy {
    refinery::embed_migrations!("migrations/legacy");
}

/// Where the library's migration history is kept.
pub const HISTORY_TABLE: &str = "outbox_schema_history";

/// Where earlier versions kept it.
const LEGACY_HISTORY_TABLE: &str = "refinery_schema_history";

/// The names earlier versions recorded there, by version.
const LEGACY_NAMES: [&str; 5] = ["dead_letters", "entities", "lease", "quarantine_sets", "expiring_lease_and_feed"];

/// Held (a session advisory lock) while migrating, so that processes
/// starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6f75_7462_6f78_6d67;

/// Creates or updates the library's tables (the lease, dead letters, the
/// commit feed), each migration in its own transaction; returns how many
/// were applied now. The kinds' tables are the application's
/// ([`super::ensure_tables`] or its own migrations).
///
/// A database made by an earlier version, whose history is in refinery's
/// default table, is brought up to date by those migrations first; their
/// rows then leave that table (dropped if nothing else is left in it), so
/// the application may use it for its own.
pub async fn migrate(pool: &Pool) -> Result<usize, DbError> {
    migrate_with(pool, None).await
}

/// [`migrate`], then (under the same lock) an application's own migrations
/// with their history in the table named.
pub(crate) async fn migrate_with(pool: &Pool, application: Option<(Runner, &str)>) -> Result<usize, DbError> {
    let mut client = pool.get().await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(&mut client, application).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn migrate_locked(
    client: &mut tokio_postgres::Client,
    application: Option<(Runner, &str)>,
) -> Result<usize, DbError> {
    upgrade_legacy(client).await?;
    let mut applied = run(client, library::migrations::runner(), HISTORY_TABLE).await?;
    if let Some((runner, history)) = application {
        applied += run(client, runner, history).await?;
    }
    Ok(applied)
}

async fn run(client: &mut tokio_postgres::Client, mut runner: Runner, history: &str) -> Result<usize, DbError> {
    runner.set_migration_table_name(history);
    let report = runner.run_async(client).await?;
    let applied = report.applied_migrations();
    for migration in applied {
        tracing::info!(migration = %migration, history, "applied migration");
    }
    Ok(applied.len())
}

/// Moves an earlier version's history out of refinery's default table.
async fn upgrade_legacy(client: &mut tokio_postgres::Client) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL",
            &[&LEGACY_HISTORY_TABLE, &HISTORY_TABLE],
        )
        .await?;
    let (legacy_exists, history_exists): (bool, bool) = (row.get(0), row.get(1));
    if !legacy_exists {
        return Ok(());
    }
    let ours: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {LEGACY_HISTORY_TABLE} WHERE version = 1 AND name = $1"),
            &[&LEGACY_NAMES[0]],
        )
        .await?
        .get(0);
    if ours == 0 {
        return Ok(());
    }
    if !history_exists {
        // Bring the schema to where the earlier versions left it (their
        // files' comments have changed since: not an error here), which is
        // the schema of the library's first migration: record that one as
        // applied.
        let report =
            legacy::migrations::runner().set_abort_divergent(false).set_abort_missing(false).run_async(client).await?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, history = LEGACY_HISTORY_TABLE, "applied migration");
        }
        let mut recorded = library::migrations::runner().set_target(Target::FakeVersion(1));
        recorded.set_migration_table_name(HISTORY_TABLE);
        recorded.run_async(client).await?;
    }
    let transaction = client.transaction().await?;
    let versions: Vec<i32> = (1..=LEGACY_NAMES.len() as i32).collect();
    let moved = transaction
        .execute(
            &format!(
                "DELETE FROM {LEGACY_HISTORY_TABLE} \
                 WHERE (version, name) IN (SELECT * FROM unnest($1::int4[], $2::text[]))"
            ),
            &[&versions, &LEGACY_NAMES.as_slice()],
        )
        .await?;
    let left: i64 = transaction.query_one(&format!("SELECT count(*) FROM {LEGACY_HISTORY_TABLE}"), &[]).await?.get(0);
    if left == 0 {
        transaction.batch_execute(&format!("DROP TABLE {LEGACY_HISTORY_TABLE}")).await?;
    }
    transaction.commit().await?;
    tracing::info!(
        moved,
        from = LEGACY_HISTORY_TABLE,
        to = HISTORY_TABLE,
        dropped = left == 0,
        "moved the library's migration history to a table of its own"
    );
    Ok(())
}
