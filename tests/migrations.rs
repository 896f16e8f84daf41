//! The library's migrations keep a history of their own: a database made by
//! an earlier version (history in refinery's default table) is upgraded in
//! place to the same schema a fresh one gets, and an application's own
//! refinery migrations coexist with the library's in either order.

mod common;

use common::{TestDb, fresh_db};
use refinery::{Migration, Runner, Target};

/// The migrations as earlier versions shipped them.
mod legacy {
    refinery::embed_migrations!("migrations/legacy");
}

/// The schema of the library's and the reference service's tables:
/// columns, constraints and indexes, in a comparable form.
async fn schema(db: &TestDb) -> Vec<String> {
    let client = db.connect().await;
    let mut lines = Vec::new();
    let columns = client
        .query(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, coalesce(column_default, ''), \
                    coalesce(generation_expression, '') \
             FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name NOT LIKE '%schema_history' \
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap();
    for row in columns {
        lines.push(format!(
            "column {}.{} {} {} null={} default={} generated={}",
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, String>(2),
            row.get::<_, String>(3),
            row.get::<_, String>(4),
            row.get::<_, String>(5),
            row.get::<_, String>(6),
        ));
    }
    let constraints = client
        .query(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text NOT LIKE '%schema_history' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    for row in constraints {
        lines.push(format!(
            "constraint {} {} {}",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        ));
    }
    let indexes = client
        .query(
            "SELECT indexname, indexdef FROM pg_indexes \
             WHERE schemaname = 'public' AND tablename NOT LIKE '%schema_history' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    for row in indexes {
        lines.push(format!("index {} {}", row.get::<_, String>(0), row.get::<_, String>(1)));
    }
    let sequences = client
        .query("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1", &[])
        .await
        .unwrap();
    for row in sequences {
        lines.push(format!("sequence {}", row.get::<_, String>(0)));
    }
    lines
}

async fn table_exists(db: &TestDb, table: &str) -> bool {
    let client = db.connect().await;
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.unwrap().get(0)
}

async fn history(db: &TestDb, table: &str) -> Vec<(i32, String)> {
    let client = db.connect().await;
    client
        .query(&format!("SELECT version, name FROM {table} ORDER BY version"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Runs the earlier versions' migrations up to `version`, as they did.
async fn migrate_as_an_earlier_version(db: &TestDb, version: i32) {
    let mut client = db.connect().await;
    legacy::migrations::runner().set_target(Target::Version(version)).run_async(&mut client).await.unwrap();
}

async fn migrate_as_the_reference_service(db: &TestDb) -> usize {
    let pool = outbox::pg::pool(db.config.clone(), 2);
    let applied = outbox::api::schema::migrate(&pool).await.expect("migrations");
    pool.close();
    applied
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_of_an_earlier_version_is_upgraded_to_the_schema_a_fresh_one_gets() {
    let fresh = fresh_db("migrate-fresh").await;
    assert_eq!(
        migrate_as_the_reference_service(&fresh).await,
        4,
        "the library's one and the reference service's three"
    );
    let expected = schema(&fresh).await;
    assert!(expected.iter().any(|line| line.contains("outbox_dead_letters.14 quarantine_id")), "{expected:#?}");
    for table in ["items", "circuits", "local_ids", "idempotency_keys"] {
        assert!(
            expected.iter().any(|line| line.starts_with(&format!("column {table}.")) && line.contains(" data json ")),
            "{table} holds its documents as json: {expected:#?}"
        );
    }
    assert!(
        expected.iter().any(|line| line.contains("column items.") && line.contains(" status text ")),
        "{expected:#?}"
    );

    for earlier in [3, 4, 5] {
        let db = fresh_db(&format!("migrate-from-v{earlier}")).await;
        migrate_as_an_earlier_version(&db, earlier).await;
        // What such a version wrote stays.
        let client = db.connect().await;
        let (set_column, set_value) =
            if earlier >= 4 { (", quarantine_id", ", nextval('outbox_quarantine_ids')") } else { ("", "") };
        client
            .batch_execute(&format!(
                "INSERT INTO outbox_dead_letters (kind, entity_id, version, payload, message{set_column}) \
                     VALUES ('item', 'a', 3, '{{}}', 'refused'{set_value}); \
                 INSERT INTO outbox_lease (name, epoch, holder) VALUES ('outbox', 7, 'old'); \
                 INSERT INTO items (id, version, data) VALUES ('a', 2, '{{\"status\": \"active\"}}');",
            ))
            .await
            .unwrap();

        migrate_as_the_reference_service(&db).await;
        assert_eq!(schema(&db).await, expected, "upgraded from version {earlier}");
        assert_eq!(history(&db, outbox::pg::HISTORY_TABLE).await, vec![(1, "outbox".to_owned())]);
        assert_eq!(history(&db, outbox::api::schema::HISTORY_TABLE).await.len(), 3);
        assert!(!table_exists(&db, "refinery_schema_history").await, "the default history table is left free");
        let kept: (i64, i64, String) = {
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM outbox_dead_letters WHERE quarantine_id IS NOT NULL), \
                            (SELECT epoch FROM outbox_lease), (SELECT status FROM items WHERE id = 'a')",
                    &[],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1), row.get(2))
        };
        assert_eq!(kept, (1, 7, "active".to_owned()), "upgraded from version {earlier}");

        // Once upgraded, nothing more to do.
        assert_eq!(migrate_as_the_reference_service(&db).await, 0);
    }
}

/// An application's own migrations, in refinery's default history table.
fn bank_migrations() -> Runner {
    let accounts = "CREATE TABLE accounts (id text PRIMARY KEY, version bigint NOT NULL, \
                    deleted boolean NOT NULL DEFAULT false, data jsonb, updated_at timestamptz NOT NULL DEFAULT now())";
    Runner::new(&[
        Migration::unapplied("V1__bank", accounts).unwrap(),
        Migration::unapplied("V2__bank_index", "CREATE INDEX accounts_updated ON accounts (updated_at)").unwrap(),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn an_applications_own_refinery_migrations_coexist_with_the_librarys() {
    // The application's first, then the library's; and the other way round;
    // and on a database upgraded from an earlier version.
    for order in ["application first", "library first", "upgraded"] {
        let db = fresh_db("migrate-coexist").await;
        let pool = outbox::pg::pool(db.config.clone(), 2);
        let mut client = db.connect().await;
        if order == "upgraded" {
            migrate_as_an_earlier_version(&db, 5).await;
        }
        if order == "application first" {
            bank_migrations().run_async(&mut client).await.expect("the application's migrations");
        }
        outbox::pg::migrate(&pool).await.unwrap_or_else(|e| panic!("{order}: {e}"));
        bank_migrations().run_async(&mut client).await.unwrap_or_else(|e| panic!("{order}: {e}"));
        // Again, both: nothing to do, nothing divergent.
        assert_eq!(outbox::pg::migrate(&pool).await.unwrap(), 0, "{order}");
        let again = bank_migrations().run_async(&mut client).await.unwrap_or_else(|e| panic!("{order}: {e}"));
        assert!(again.applied_migrations().is_empty(), "{order}");

        assert_eq!(
            history(&db, "refinery_schema_history").await,
            vec![(1, "bank".to_owned()), (2, "bank_index".to_owned())],
            "{order}"
        );
        assert_eq!(history(&db, outbox::pg::HISTORY_TABLE).await, vec![(1, "outbox".to_owned())], "{order}");
        for table in ["accounts", "outbox_lease", "outbox_dead_letters", "outbox_feed"] {
            assert!(table_exists(&db, table).await, "{order}: {table}");
        }
        if order != "upgraded" {
            // The library alone makes no table of the reference service.
            assert!(!table_exists(&db, "items").await, "{order}");
        }
        pool.close();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_migrating_together_take_turns() {
    let db = fresh_db("migrate-together").await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let config = db.config.clone();
            tokio::spawn(async move {
                let pool = outbox::pg::pool(config, 1);
                let applied = outbox::api::schema::migrate(&pool).await;
                pool.close();
                applied
            })
        })
        .collect();
    let mut applied = 0;
    for run in runs {
        applied += run.await.unwrap().expect("every process's migrations succeed");
    }
    assert_eq!(applied, 4, "each migration applied once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_says_what_the_database_said() {
    let db = fresh_db("migrate-fails").await;
    db.connect().await.batch_execute("CREATE TABLE outbox_lease (something_else integer)").await.unwrap();
    let pool = outbox::pg::pool(db.config.clone(), 1);
    let error = outbox::pg::migrate(&pool).await.expect_err("the table is in the way").to_string();
    assert!(error.contains("42P07") && error.contains("\"outbox_lease\" already exists"), "{error}");
    pool.close();
}
