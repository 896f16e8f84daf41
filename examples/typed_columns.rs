//! A kind stored in typed columns of a table of its own (rather than one
//! `data json` document per row): what a team with an existing relational
//! schema needs. Writes are still one version-guarded `UNNEST` upsert per
//! kind per batch; hydration reads the same columns back.
//!
//! `cargo run --example typed_columns` uses `DATABASE_URL` when set, else
//! starts a private PostgreSQL in `target/example-data/typed`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox::store::StoreError;
use outbox::{Engine, Entity, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[entity(kind = "invoice", table = "invoices", columns)]
struct Invoice {
    #[entity(id)]
    id: String,
    customer: String,         // text
    lines: i32,               // integer
    total_cents: i64,         // bigint
    paid: bool,               // boolean
    issued_at: DateTime<Utc>, // timestamptz
    note: Option<String>,     // text, NULL when None
    tags: Vec<String>,        // jsonb
    #[entity(sql = "numeric")] // numeric, chosen explicitly
    tax_rate: f64,
}

fn invoice(n: i64) -> Invoice {
    Invoice {
        id: format!("inv-{n}"),
        customer: format!("customer {}", n % 3),
        lines: n as i32,
        total_cents: n * 12_345,
        paid: n % 2 == 0,
        issued_at: DateTime::from_timestamp(1_767_225_600 + n * 86_400, 0).expect("a valid date"),
        note: (n % 3 == 0).then(|| "net 30".to_owned()),
        tags: vec!["example".into(), format!("batch-{}", n / 10)],
        tax_rate: 0.19,
    }
}

async fn start(pool: &outbox::pg::Pool) -> Result<Engine, Box<dyn std::error::Error>> {
    let (store, receiver) = Store::builder().kind::<Invoice>().build();
    // Creates the table when missing (an application may instead put
    // `create_table_sql` into its own migrations).
    outbox::pg::ensure_tables(pool, &store).await?;
    let engine = Engine::builder(store, receiver, pool.clone()).spill_dir("target/example-data/typed/spill");
    let engine = engine.start().await?;
    println!("started: loaded {} invoices", engine.hydration().total);
    Ok(engine)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_postgres, config) = match std::env::var("DATABASE_URL") {
        Ok(url) => (None, outbox::pg::parse_url(&url)?),
        Err(_) => {
            let (postgres, config) =
                outbox::pg::LocalPostgres::open("target/example-data/typed/postgres", "typed").await?;
            (Some(postgres), config)
        }
    };
    let pool = outbox::pg::pool(config, 4);
    outbox::pg::migrate(&pool).await?;
    println!("the table, as `create_table_sql::<Invoice>()` gives it:\n{}", outbox::pg::create_table_sql::<Invoice>());

    let engine = start(&pool).await?;
    let ((), ticket) = engine.store().apply_durable(|set| -> Result<(), StoreError> {
        for n in 1..=20 {
            set.upsert(invoice(n))?;
        }
        set.update::<Invoice>("inv-3", |i| i.paid = true)?;
        set.delete::<Invoice>("inv-20")?; // a tombstone: deleted = true, no values
        Ok(())
    })?;
    ticket.wait().await?;
    println!("20 invoices written, one paid, one deleted: committed");
    engine.shutdown(Duration::from_secs(10)).await;

    // Plain SQL sees plain columns.
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, customer, total_cents, paid, issued_at, note, tags, tax_rate::text, version, deleted \
             FROM invoices WHERE id IN ('inv-3', 'inv-20') ORDER BY id",
            &[],
        )
        .await?;
    for row in rows {
        let issued_at: Option<DateTime<Utc>> = row.get(4);
        let tags: Option<serde_json::Value> = row.get(6);
        println!(
            "{}: customer={:?} total_cents={:?} paid={:?} issued_at={:?} note={:?} tags={:?} tax_rate={:?} version={} deleted={}",
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<i64>>(2),
            row.get::<_, Option<bool>>(3),
            issued_at.map(|t| t.to_rfc3339()),
            row.get::<_, Option<String>>(5),
            tags.map(|t| t.to_string()),
            row.get::<_, Option<String>>(7),
            row.get::<_, i64>(8),
            row.get::<_, bool>(9),
        );
    }
    drop(client);

    // Read back from the columns into the same values.
    let engine = start(&pool).await?;
    let mut expected = invoice(3);
    expected.paid = true;
    let loaded = engine.store().get::<Invoice>("inv-3").ok_or("inv-3 missing")?;
    if *loaded.value != expected {
        return Err(format!("inv-3 came back as {:?}", loaded.value).into());
    }
    println!("inv-3 hydrated equal to what was written, at version {}", loaded.version);
    if engine.store().get::<Invoice>("inv-20").is_some() {
        return Err("inv-20 was deleted".into());
    }
    engine.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
