//! The reference service's tables: its own migrations, with their own
//! history (`reference_schema_history`), after the library's.

use deadpool_postgres::Pool;

use crate::pg::DbError;

mod embedded {
    refinery::embed_migrations!("migrations/reference");
}

/// Where the reference service's migration history is kept.
pub const HISTORY_TABLE: &str = "reference_schema_history";

/// The library's migrations, then the reference service's (`items`,
/// `circuits`, `local_ids`); returns how many were applied now.
pub async fn migrate(pool: &Pool) -> Result<usize, DbError> {
    crate::pg::migrate::migrate_with(pool, Some((embedded::migrations::runner(), HISTORY_TABLE))).await
}
