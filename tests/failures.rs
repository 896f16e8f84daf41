//! Failure modes against a real PostgreSQL and the real binary: a database
//! outage under steady writes, refused change sets and their quarantine, a
//! schema error, spill files (and their compare-and-set replay), a crash
//! under multi-entity load, a hung database, the single-writer lease, and
//! the operator's dead-letter tools. Every wait is bounded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    ServerProcess, TestDb, database_items, dedicated_postgres, fresh_db, http, memory_items, poll_until, scratch_dir,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "test-admin-token";

fn start(url: &str, data_dir: &Path, extra: &[(&str, &str)]) -> ServerProcess {
    let mut envs = vec![
        ("DATABASE_URL", url.to_owned()),
        ("OUTBOX_DATA_DIR", data_dir.display().to_string()),
        ("OUTBOX_RETRY_MAX_DELAY_MS", "500".to_owned()),
        ("OUTBOX_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ];
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    ServerProcess::start(&[], &envs)
}

async fn create_item(server: &ServerProcess, value: &str, extra: Value) -> reqwest::Response {
    let mut body = json!({"identifiers": [{"key": "n", "value": value}]});
    if !extra.is_null() {
        body["enriched_data"] = extra;
    }
    http().post(server.url("/api/items")).json(&body).send().await.expect("POST /api/items")
}

async fn status(server: &ServerProcess) -> Value {
    http().get(server.url("/api/outbox/status")).send().await.unwrap().json().await.unwrap()
}

async fn wait_drained(server: &ServerProcess, timeout: Duration) {
    let drained = poll_until(timeout, || async { status(server).await["depth"] == 0 }).await;
    assert!(drained, "the outbox drained: {}\n{}", status(server).await, server.log());
}

/// The value of a metric series whose line contains every `labels` part.
async fn metric(server: &ServerProcess, name: &str, labels: &[&str]) -> f64 {
    let text = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn outbox_cli(url: &str, data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("OUTBOX_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the outbox CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_under_steady_writes_converges_without_loss() {
    let postgres = dedicated_postgres("outage");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let url = postgres.connection_string("app");
    let server = start(&url, &scratch_dir("outage"), &[]);
    server.wait_ready(Duration::from_secs(30)).await;

    let started = Instant::now();
    let mut acknowledged: Vec<(String, i64)> = Vec::new();
    let mut refused = 0u32;
    let mut stopped = false;
    let mut restarted = false;
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(30) {
        if !stopped && started.elapsed() >= Duration::from_secs(10) {
            std::thread::scope(|s| s.spawn(|| postgres.stop()).join().unwrap()).expect("stop PostgreSQL");
            stopped = true;
        }
        if stopped && !restarted && started.elapsed() >= Duration::from_secs(20) {
            std::thread::scope(|s| s.spawn(|| postgres.restart()).join().unwrap()).expect("start PostgreSQL");
            restarted = true;
        }
        i += 1;
        let response = create_item(&server, &i.to_string(), json!({"i": i})).await;
        match response.status().as_u16() {
            201 => {
                let item: Value = response.json().await.unwrap();
                let dfid = item["dfid"].as_str().unwrap().to_owned();
                // Reads keep coming from memory, database or not.
                let read = http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap();
                assert_eq!(read.status(), 200);
                acknowledged.push((dfid, item["version"].as_i64().unwrap()));
            }
            503 => refused += 1,
            other => panic!("no 5xx but 503 during an outage; got {other}: {}", response.text().await.unwrap()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        acknowledged.len() > 500,
        "steady writes went on through the outage ({} acknowledged, {refused} refused)",
        acknowledged.len()
    );

    wait_drained(&server, Duration::from_secs(30)).await;
    let lag = status(&server).await["lag_seconds"].as_f64().unwrap();
    assert!(lag < 1.0, "lag is back to ~0 ({lag} s)");
    let client = outbox::pg::connect(&postgres.config("app")).await.unwrap();
    let database = database_items(&client).await;
    assert_eq!(database, memory_items(&server).await, "the database equals memory");
    for (dfid, version) in &acknowledged {
        assert!(database.get(dfid).is_some_and(|(v, _)| v >= version), "acknowledged {dfid} was lost");
    }
    let failures = metric(&server, "outbox_persist_failures_total", &["error_type=\"connection\""]).await
        + metric(&server, "outbox_persist_failures_total", &["error_type=\"timeout\""]).await;
    assert!(failures > 0.0, "the outage's failures are counted by type");
    assert!(metric(&server, "outbox_retries_total", &[]).await > 0.0);
    assert_eq!(metric(&server, "outbox_db_up", &[]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_are_quarantined_and_operators_resolve_them() {
    let db = fresh_db("poison").await;
    let data_dir = scratch_dir("poison");
    // A long linger puts the concurrent creates below into shared batches.
    let server = start(&db.url(), &data_dir, &[("OUTBOX_LINGER_MS", "300")]);
    server.wait_ready(Duration::from_secs(30)).await;
    let client = db.connect().await;
    client
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no_poison CHECK (coalesce(data->'enriched_data'->>'poison', '') <> 'yes')")
        .await
        .unwrap();

    // 40 creates in flight together, 5 of them poisoned.
    let mut creates = Vec::new();
    for i in 0..40 {
        let url = server.url("/api/items");
        let poison = i % 8 == 3;
        creates.push(tokio::spawn(async move {
            let body = json!({"identifiers": [{"key": "n", "value": i.to_string()}],
                              "enriched_data": if poison { json!({"poison": "yes"}) } else { json!({}) }});
            let item: Value = http().post(url).json(&body).send().await.unwrap().json().await.unwrap();
            (item["dfid"].as_str().unwrap().to_owned(), poison)
        }));
    }
    let mut healthy = Vec::new();
    let mut poisoned = Vec::new();
    for create in creates {
        let (dfid, poison) = create.await.unwrap();
        if poison { poisoned.push(dfid) } else { healthy.push(dfid) }
    }
    wait_drained(&server, Duration::from_secs(30)).await;

    let database = database_items(&client).await;
    assert!(healthy.iter().all(|d| database.contains_key(d)), "the healthy records of the batches committed");
    assert!(poisoned.iter().all(|d| !database.contains_key(d)), "no poisoned record is in the table");
    let letters = client
        .query(
            "SELECT id, entity_id, sqlstate, version FROM outbox_dead_letters WHERE resolved_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let quarantined: BTreeSet<String> = letters.iter().map(|r| r.get::<_, String>(1)).collect();
    assert_eq!(quarantined, poisoned.iter().cloned().collect(), "exactly the poisoned records are dead letters");
    assert!(letters.iter().all(|r| r.get::<_, Option<String>>(2).as_deref() == Some("23514")));
    for dfid in &poisoned {
        let read = http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap();
        assert_eq!(read.status(), 200, "a quarantined entity still reads from memory");
    }
    assert!(metric(&server, "outbox_dead_letters_total", &["entity=\"item\""]).await >= 5.0);
    assert_eq!(metric(&server, "outbox_dead_letters", &[]).await, 5.0);

    // A durable request for a poisoned record answers with the cause.
    let durable = http()
        .post(server.url("/api/items"))
        .header("Prefer", "durable")
        .json(&json!({"identifiers": [{"key": "n", "value": "d"}], "enriched_data": {"poison": "yes"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(durable.status(), 422);
    let problem: Value = durable.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("no_poison"), "the problem names the cause: {problem}");

    // Admin routes: no token, wrong token.
    let letters_url = server.url("/api/admin/dead-letters");
    assert_eq!(http().get(&letters_url).send().await.unwrap().status(), 401);
    assert_eq!(http().get(&letters_url).bearer_auth("nope").send().await.unwrap().status(), 401);
    let listed: Value = http().get(&letters_url).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["dead_letters"].as_array().unwrap().len(), 6);
    let (ok, out, err) = outbox_cli(&db.url(), &data_dir, &["dead-letters", "list"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len(), 6);

    // A replay while the constraint holds fails and keeps the dead letter.
    let id_of = |dfid: &str| letters.iter().find(|r| r.get::<_, String>(1) == dfid).unwrap().get::<_, i64>(0);
    let replay_url = |id: i64| server.url(&format!("/api/admin/dead-letters/{id}/replay"));
    let refused = http().post(replay_url(id_of(&poisoned[0]))).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(refused.status(), 422);

    // A newer version of a poisoned entity that the database accepts
    // resolves its dead letter.
    let update = http()
        .put(server.url(&format!("/api/items/{}", poisoned[2])))
        .header("Prefer", "durable")
        .json(&json!({"enriched_data": {"poison": null}}))
        .send()
        .await
        .unwrap();
    assert_eq!(update.status(), 200);
    let resolution: Option<String> = client
        .query_one("SELECT resolution FROM outbox_dead_letters WHERE id = $1", &[&id_of(&poisoned[2])])
        .await
        .unwrap()
        .get(0);
    assert!(resolution.is_some_and(|r| r.starts_with("superseded")), "the newer version resolved the dead letter");

    client.batch_execute("ALTER TABLE items DROP CONSTRAINT no_poison").await.unwrap();
    // While a server holds the lease, the CLI does not write entities: it
    // says to use the server's admin API.
    let (ok, _, err) = outbox_cli(&db.url(), &data_dir, &["dead-letters", "replay", &id_of(&poisoned[1]).to_string()]);
    assert!(!ok && err.contains("admin API") && err.contains("/replay"), "the CLI refuses while a holder runs: {err}");
    let (ok, _, err) = outbox_cli(&db.url(), &data_dir, &["dead-letters", "discard", &id_of(&poisoned[4]).to_string()]);
    assert!(!ok && err.contains("admin API"), "{err}");
    // Replay and discard over HTTP, through the holder's store.
    for dfid in [&poisoned[0], &poisoned[1]] {
        let replayed = http().post(replay_url(id_of(dfid))).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(replayed.status(), 200);
        let body: Value = replayed.json().await.unwrap();
        assert_eq!(body["dead_letters"][0]["resolution"], "replayed", "{body}");
    }
    for dfid in [&poisoned[3], &poisoned[4]] {
        let discard_url = server.url(&format!("/api/admin/dead-letters/{}", id_of(dfid)));
        assert_eq!(http().delete(&discard_url).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status(), 200);
        assert_eq!(http().delete(&discard_url).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status(), 404);
        // Memory reverted to what the database holds: nothing.
        let read = http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap();
        assert_eq!(read.status(), 404, "a discarded create is gone from memory too");
    }

    let database = database_items(&client).await;
    for dfid in &poisoned[..3] {
        let (version, data) = database.get(dfid).expect("replayed or superseded records are in the table");
        let memory: Value =
            http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap().json().await.unwrap();
        assert_eq!(*version, memory["version"].as_i64().unwrap());
        assert_eq!(data["identifiers"], memory["identifiers"]);
    }
    assert!(
        !database.contains_key(&poisoned[3]) && !database.contains_key(&poisoned[4]),
        "discarded records stay unwritten"
    );
    let unresolved = client.query("SELECT id FROM outbox_dead_letters WHERE resolved_at IS NULL", &[]).await.unwrap();
    assert_eq!(unresolved.len(), 1, "only the durable request's record is left");

    // With no server running, the CLI takes the lease and replays through
    // a store of its own.
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(30)).success());
    let last = unresolved[0].get::<_, i64>(0);
    let (ok, out, err) = outbox_cli(&db.url(), &data_dir, &["dead-letters", "replay", &last.to_string()]);
    assert!(ok, "{err}");
    let resolved: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(resolved[0]["resolution"], "replayed", "{resolved}");
    let (ok, _, err) = outbox_cli(&db.url(), &data_dir, &["dead-letters", "discard", "999999"]);
    assert!(!ok && err.contains("999999"), "a missing dead letter is a clear error: {err}");
    let written: i64 = client
        .query_one("SELECT count(*) FROM items WHERE data->'enriched_data'->>'poison' = 'yes'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 3, "the replayed poisoned creates (two, and the durable one) are in the table");
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_errors_wait_and_nothing_is_dead_lettered() {
    let db = fresh_db("schema").await;
    let server = start(&db.url(), &scratch_dir("schema"), &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let client = db.connect().await;
    client.batch_execute("ALTER TABLE items RENAME COLUMN data TO data_renamed").await.unwrap();

    let mut created = Vec::new();
    for i in 0..20 {
        let item: Value = create_item(&server, &i.to_string(), Value::Null).await.json().await.unwrap();
        created.push(item["dfid"].as_str().unwrap().to_owned());
    }
    let failing = poll_until(Duration::from_secs(15), || async {
        metric(&server, "outbox_persist_failures_total", &["error_type=\"schema\""]).await >= 2.0
    })
    .await;
    assert!(failing, "schema failures are retried and counted\n{}", server.log());
    let last_error = status(&server).await["last_error"].clone();
    assert_eq!(last_error["class"], "schema", "{last_error}");
    assert_eq!(last_error["sqlstate"], "42703");
    let message = last_error["message"].as_str().unwrap();
    assert!(message.contains("42703") && message.contains("does not exist"), "the server's own words: {message}");
    assert!(!server.log().contains("error=db error"), "logs carry the cause, not \"db error\"");
    assert_eq!(status(&server).await["depth"], 20, "the data waits");
    let dead: i64 = client.query_one("SELECT count(*) FROM outbox_dead_letters", &[]).await.unwrap().get(0);
    assert_eq!(dead, 0, "schema errors are never dead-lettered");

    client.batch_execute("ALTER TABLE items RENAME COLUMN data_renamed TO data").await.unwrap();
    wait_drained(&server, Duration::from_secs(30)).await;
    let database = database_items(&client).await;
    assert!(created.iter().all(|d| database.contains_key(d)), "everything commits once the schema is fixed");
    assert_eq!(database, memory_items(&server).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_the_database_down_spills_and_the_next_start_replays() {
    let postgres = dedicated_postgres("spill");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let url = postgres.connection_string("app");
    let data_dir = scratch_dir("spill");
    let mut server = start(&url, &data_dir, &[("OUTBOX_DRAIN_TIMEOUT_S", "3")]);
    server.wait_ready(Duration::from_secs(30)).await;
    let before: Value = create_item(&server, "committed", Value::Null).await.json().await.unwrap();
    wait_drained(&server, Duration::from_secs(10)).await;

    std::thread::scope(|s| s.spawn(|| postgres.stop()).join().unwrap()).expect("stop PostgreSQL");
    let mut acknowledged = Vec::new();
    for i in 0..25 {
        let item: Value = create_item(&server, &format!("down-{i}"), Value::Null).await.json().await.unwrap();
        acknowledged.push((item["dfid"].as_str().unwrap().to_owned(), item["version"].as_i64().unwrap()));
    }
    let updated: Value = http()
        .put(server.url(&format!("/api/items/{}", before["dfid"].as_str().unwrap())))
        .json(&json!({"enriched_data": {"changed": "while down"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    acknowledged.push((updated["dfid"].as_str().unwrap().to_owned(), updated["version"].as_i64().unwrap()));
    // A durable request is waiting when the signal comes: it must not hold
    // the shutdown past its deadline.
    let waiting = {
        let url = server.url("/api/items");
        tokio::spawn(async move {
            http()
                .post(url)
                .header("Prefer", "durable")
                .json(&json!({"identifiers": [{"key": "n", "value": "durable"}]}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal(Signal::SIGTERM);
    let status = server.wait(Duration::from_secs(30));
    assert!(signalled.elapsed() < Duration::from_secs(10), "the drain deadline bounds the shutdown");
    assert!(!status.success(), "exits non-zero after spilling");
    assert!(server.log().contains("spilled"), "{}", server.log());
    assert!(!matches!(waiting.await.unwrap(), Ok(200..=299)), "the durable request was not acknowledged");
    let spill_dir = data_dir.join("spill");
    let files = outbox::outbox::spill::list(&spill_dir).unwrap();
    assert_eq!(files.len(), 1, "one spill file");
    let spilled = outbox::outbox::spill::read(&files[0]).unwrap();
    assert!(spilled.records.len() >= acknowledged.len());
    assert!(spilled.records.iter().all(|r| r.base.is_some() && r.group.is_some()), "records carry base and group");

    std::thread::scope(|s| s.spawn(|| postgres.restart()).join().unwrap()).expect("start PostgreSQL");
    let server = start(&url, &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    assert!(outbox::outbox::spill::list(&spill_dir).unwrap().is_empty(), "the spill file is removed after its commit");
    let client = outbox::pg::connect(&postgres.config("app")).await.unwrap();
    let database = database_items(&client).await;
    for (dfid, version) in &acknowledged {
        assert!(
            database.get(dfid).is_some_and(|(v, _)| v == version),
            "acknowledged {dfid} v{version} is in the database"
        );
    }
    assert_eq!(database, memory_items(&server).await);
}

/// Starts the server on `db` and `data_dir`, expecting start-up to fail
/// (within 30 s, non-zero); returns what it wrote to stderr.
async fn start_up_failure(db: &TestDb, data_dir: &Path) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", db.url())
        .env("OUTBOX_DATA_DIR", data_dir)
        .env("OUTBOX_LISTEN", "127.0.0.1:0")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await.expect("start-up stops").unwrap();
    assert!(!output.status.success(), "start-up fails");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_spill_file_stops_start_up_and_is_kept() {
    let db = fresh_db("corrupt").await;
    let data_dir = scratch_dir("corrupt");
    let spill_dir = data_dir.join("spill");
    let record = outbox::outbox::spill::SpillRecord {
        kind: "item".into(),
        id: "DFID-x".into(),
        version: 3,
        base: Some(0),
        group: Some(1),
        deleted: false,
        data: Some(serde_json::value::to_raw_value(&json!({"dfid": "DFID-x"})).unwrap()),
    };
    let (path, _) = outbox::outbox::spill::write(&spill_dir, "test", None, [record.clone(), record]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();

    let stderr = start_up_failure(&db, &data_dir).await;
    assert!(stderr.contains("corrupt") && stderr.contains(&path.display().to_string()), "a clear error: {stderr}");
    assert!(path.exists(), "the corrupt spill file is kept");
}

/// An item as the reference service stores it, for hand-made spill files.
fn item_json(dfid: &str, note: &str) -> Value {
    json!({
        "dfid": dfid, "status": "active", "identifiers": [{"key": "n", "value": dfid}], "circuits": [],
        "enriched_data": {"note": note},
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    })
}

fn spill_record(
    dfid: &str,
    version: u64,
    base: u64,
    group: u64,
    data: Option<Value>,
) -> outbox::outbox::spill::SpillRecord {
    outbox::outbox::spill::SpillRecord {
        kind: "item".into(),
        id: dfid.into(),
        version,
        base: Some(base),
        group: Some(group),
        deleted: data.is_none(),
        data: data.map(|d| serde_json::value::to_raw_value(&d).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_spill_record_is_quarantined_and_the_rest_replays() {
    let db = fresh_db("refused-spill").await;
    let data_dir = scratch_dir("refused-spill");
    // Well-formed JSON that the items table can never store (the NUL
    // character: its generated `status` reads the document with `->>`,
    // which refuses it), in a group of two, beside two healthy groups.
    let records = vec![
        spill_record("DFID-ok-1", 1, 0, 1, Some(item_json("DFID-ok-1", "fine"))),
        spill_record("DFID-nul", 2, 0, 2, Some(item_json("DFID-nul", "nul \u{0} inside"))),
        spill_record("DFID-with-nul", 1, 0, 2, Some(item_json("DFID-with-nul", "same change set"))),
        spill_record("DFID-ok-2", 4, 0, 3, Some(item_json("DFID-ok-2", "fine too"))),
    ];
    let (path, _) = outbox::outbox::spill::write(&data_dir.join("spill"), "test", Some(1), records).unwrap();

    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    assert!(!path.exists(), "the replayed spill file is removed");
    let client = db.connect().await;
    let database = database_items(&client).await;
    assert_eq!(
        database.keys().cloned().collect::<Vec<_>>(),
        ["DFID-ok-1", "DFID-ok-2"],
        "the healthy groups are written"
    );
    let letters = client
        .query("SELECT entity_id, cause, payload IS NULL AND payload_text IS NOT NULL, quarantine_id FROM outbox_dead_letters WHERE resolved_at IS NULL ORDER BY entity_id", &[])
        .await
        .unwrap();
    let seen: Vec<(String, bool, bool)> = letters.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        seen,
        [("DFID-nul".to_owned(), true, true), ("DFID-with-nul".to_owned(), false, false)],
        "the refused group is quarantined whole, the refused record named, its payload kept as text"
    );
    assert_eq!(letters[0].get::<_, i64>(3), letters[1].get::<_, i64>(3), "one quarantine id links the set");
    // Memory holds the quarantined set, as before the restart.
    let read: Value = http().get(server.url("/api/items/DFID-with-nul")).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["version"], 1, "{read}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spill_never_overwrites_what_another_holder_wrote() {
    let db = fresh_db("fenced-spill").await;
    let data_dir = scratch_dir("fenced-spill");
    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let mut dfids = Vec::new();
    for i in 0..4 {
        let item: Value = create_item(&server, &format!("x{i}"), Value::Null).await.json().await.unwrap();
        dfids.push(item["dfid"].as_str().unwrap().to_owned());
    }
    wait_drained(&server, Duration::from_secs(10)).await;
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(30)).success());
    // Each item is at version 1. What a process that lost the lease would
    // spill, believing the database at version 1 (its base) ...
    let spilled = vec![
        spill_record(&dfids[0], 10, 1, 1, Some(item_json(&dfids[0], "zombie"))),
        spill_record(&dfids[1], 10, 1, 2, Some(item_json(&dfids[1], "zombie, would resurrect"))),
        spill_record(&dfids[2], 2, 1, 3, Some(item_json(&dfids[2], "zombie, lower"))),
        spill_record(&dfids[3], 2, 1, 4, Some(item_json(&dfids[3], "zombie, untouched"))),
    ];
    let (path, _) = outbox::outbox::spill::write(&data_dir.join("spill"), "lease lost", Some(1), spilled).unwrap();
    // ... while the new holder wrote version 6 of the first, deleted the
    // second at 6, and wrote version 5 of the third.
    let client = db.connect().await;
    client
        .batch_execute(&format!(
            "UPDATE items SET version = 6, data = jsonb_set(data::jsonb, '{{enriched_data}}', '{{\"by\": \"new holder\"}}') WHERE id = '{a}';
             UPDATE items SET version = 6, deleted = true, data = NULL WHERE id = '{b}';
             UPDATE items SET version = 5, data = jsonb_set(data::jsonb, '{{enriched_data}}', '{{\"by\": \"new holder\"}}') WHERE id = '{c}';",
            a = dfids[0], b = dfids[1], c = dfids[2]
        ))
        .await
        .unwrap();

    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    assert!(!path.exists());
    let rows: BTreeMap<String, (i64, bool, Option<Value>)> = client
        .query("SELECT id, version, deleted, data FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    assert_eq!(rows[&dfids[0]].0, 6, "the newer holder's write is not overwritten");
    assert_eq!(rows[&dfids[0]].2.as_ref().unwrap()["enriched_data"]["by"], "new holder");
    assert!(rows[&dfids[1]].1 && rows[&dfids[1]].0 == 6, "the tombstone is not brought back");
    assert_eq!(rows[&dfids[2]].0, 5, "a lower spilled version is not applied either");
    assert_eq!(rows[&dfids[3]].0, 2, "a row still at its base is written");
    assert_eq!(rows[&dfids[3]].2.as_ref().unwrap()["enriched_data"]["note"], "zombie, untouched");
    let conflicts = client
        .query(
            "SELECT entity_id, version, database_version, reason FROM outbox_dead_letters WHERE resolved_at IS NULL ORDER BY entity_id",
            &[],
        )
        .await
        .unwrap();
    let mut seen: Vec<(String, i64, Option<i64>, String)> =
        conflicts.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    seen.sort();
    let mut expected = vec![
        (dfids[0].clone(), 10, Some(6), "conflict".to_owned()),
        (dfids[1].clone(), 10, Some(6), "conflict".to_owned()),
        (dfids[2].clone(), 2, Some(5), "conflict".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected, "every record whose row moved on is a conflict, with both versions");
    assert_eq!(metric(&server, "outbox_dead_letters", &[]).await, 3.0);
    // Memory holds what the database holds.
    let read: Value =
        http().get(server.url(&format!("/api/items/{}", dfids[0]))).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["version"], 6);
    let gone = http().get(server.url(&format!("/api/items/{}", dfids[1]))).send().await.unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_change_set_load_leaves_no_half_change_set() {
    let db = fresh_db("crash").await;
    let data_dir = scratch_dir("crash");
    let mut server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let mut circuits = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let circuit: Value = server.send_json(reqwest::Method::POST, "/api/circuits", &json!({"name": name})).await;
        circuits.push(circuit["id"].as_str().unwrap().to_owned());
    }
    let mut items = Vec::new();
    for i in 0..200 {
        let item: Value = create_item(&server, &i.to_string(), Value::Null).await.json().await.unwrap();
        items.push(item["dfid"].as_str().unwrap().to_owned());
    }
    wait_drained(&server, Duration::from_secs(10)).await;
    let client = db.connect().await;
    let versions_before: BTreeMap<String, i64> = client
        .query("SELECT id, version FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Change sets in flight from eight clients: add an item to a circuit
    // (circuit and item change together).
    let mut load = Vec::new();
    for worker in 0..8usize {
        let (circuits, items, base) = (circuits.clone(), items.clone(), server.url(""));
        load.push(tokio::spawn(async move {
            for n in 0..items.len() {
                let item = &items[(n * 8 + worker) % items.len()];
                let circuit = &circuits[(n + worker) % circuits.len()];
                let sent = http()
                    .post(format!("{base}/api/circuits/{circuit}/items"))
                    .json(&json!({"dfid": item}))
                    .send()
                    .await;
                if sent.is_err() {
                    return; // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.signal(Signal::SIGKILL);
    server.wait(Duration::from_secs(10));
    for task in load {
        task.await.unwrap();
    }

    // The database holds whole change sets only: circuits and items agree.
    let check = |client: tokio_postgres::Client| async move {
        let rows = client.query("SELECT id, data FROM circuits", &[]).await.unwrap();
        let circuit_items: BTreeMap<String, BTreeSet<String>> = rows
            .iter()
            .map(|r| {
                let data: Value = r.get(1);
                (r.get(0), data["items"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_owned()).collect())
            })
            .collect();
        let rows = client.query("SELECT id, version, data FROM items", &[]).await.unwrap();
        let mut links = 0;
        for row in &rows {
            let dfid: String = row.get(0);
            let data: Value = row.get(2);
            for circuit in data["circuits"].as_array().unwrap() {
                let circuit = circuit.as_str().unwrap();
                assert!(circuit_items[circuit].contains(&dfid), "item {dfid} lists {circuit}, which does not list it");
                links += 1;
            }
        }
        let listed: usize = circuit_items.values().map(BTreeSet::len).sum();
        assert_eq!(listed, links, "every circuit entry has its item's side");
        rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect::<BTreeMap<_, _>>()
    };
    let after_crash = check(db.connect().await).await;
    assert!(
        after_crash.values().sum::<i64>() > versions_before.values().sum::<i64>(),
        "some change sets committed before the kill"
    );

    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    // More change sets after the restart; versions only grow.
    for (n, item) in items.iter().enumerate().take(40) {
        let circuit = &circuits[n % circuits.len()];
        let response = http()
            .post(server.url(&format!("/api/circuits/{circuit}/items")))
            .json(&json!({"dfid": item}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    wait_drained(&server, Duration::from_secs(10)).await;
    let after_restart = check(db.connect().await).await;
    for (dfid, version) in &after_crash {
        assert!(after_restart[dfid] >= *version && *version >= versions_before[dfid], "versions of {dfid} only grew");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_writer_per_database_and_a_fenced_writer_spills() {
    let db = fresh_db("lease").await;
    let mut first = start(&db.url(), &scratch_dir("lease-a"), &[]);
    first.wait_ready(Duration::from_secs(30)).await;

    let second_dir = scratch_dir("lease-b");
    let mut second = start(&db.url(), &second_dir, &[]);
    let waiting =
        poll_until(Duration::from_secs(10), || async { second.log().contains("following as a standby") }).await;
    assert!(waiting, "the second server says it is a standby\n{}", second.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let readyz = http().get(second.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503, "the second server is not ready while the first runs");
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["status"], "standby", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("lease holder"), "{body}");
    assert_eq!(status(&second).await["role"], "standby");
    assert_eq!(status(&first).await["role"], "leader");

    first.signal(Signal::SIGTERM);
    assert!(first.wait(Duration::from_secs(30)).success());
    let stopped = Instant::now();
    second.wait_ready(Duration::from_secs(15)).await;
    assert!(stopped.elapsed() < Duration::from_secs(10), "the second server takes over within seconds");

    // Force the epoch forward under the holder: it can no longer commit.
    let client = db.connect().await;
    let before = database_items(&client).await.len();
    client.batch_execute("UPDATE outbox_lease SET epoch = epoch + 1, holder = 'usurper'").await.unwrap();
    let item: Value = create_item(&second, "after-fence", Value::Null).await.json().await.unwrap();
    let status = second.wait(Duration::from_secs(30));
    assert!(!status.success(), "a fenced server exits non-zero\n{}", second.log());
    assert!(second.log().contains("lease was taken"), "it says why\n{}", second.log());
    assert_eq!(database_items(&client).await.len(), before, "a fenced server commits nothing");
    let files = outbox::outbox::spill::list(&second_dir.join("spill")).unwrap();
    assert_eq!(files.len(), 1, "it spills its unwritten records for the operator");
    let spilled = outbox::outbox::spill::read(&files[0]).unwrap();
    assert!(spilled.records.iter().any(|r| r.id == item["dfid"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_after_a_restart_never_swallows_the_next_durable_write() {
    let db = fresh_db("replay-restart").await;
    let data_dir = scratch_dir("replay-restart");
    let client = db.connect().await;
    let mut server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let item: Value = create_item(&server, "a", Value::Null).await.json().await.unwrap();
    let dfid = item["dfid"].as_str().unwrap().to_owned();
    wait_drained(&server, Duration::from_secs(10)).await;
    client
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no_poison CHECK (coalesce(data->'enriched_data'->>'poison', '') <> 'yes')")
        .await
        .unwrap();
    let put = |server: &ServerProcess, data: Value| {
        http()
            .put(server.url(&format!("/api/items/{dfid}")))
            .header("Prefer", "durable")
            .json(&json!({"enriched_data": data}))
            .send()
    };
    let refused = put(&server, json!({"poison": "yes"})).await.unwrap();
    assert_eq!(refused.status(), 422, "version 2 is refused and quarantined");

    // Restart: memory holds the quarantined version again.
    server.signal(Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(30)).success());
    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let read: Value = http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!((read["version"].as_i64(), read["enriched_data"]["poison"].as_str()), (Some(2), Some("yes")), "{read}");

    // The operator fixes the cause and replays: through the store, at a
    // version above both.
    client.batch_execute("ALTER TABLE items DROP CONSTRAINT no_poison").await.unwrap();
    let letters: Value = http()
        .get(server.url("/api/admin/dead-letters"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = letters["dead_letters"][0]["id"].as_i64().unwrap();
    let replayed = http()
        .post(server.url(&format!("/api/admin/dead-letters/{id}/replay")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 200);

    // The next durable write is acknowledged only because it is committed.
    let written = put(&server, json!({"client": "change"})).await.unwrap();
    assert_eq!(written.status(), 200);
    assert_eq!(written.headers()["preference-applied"], "durable");
    let acknowledged: Value = written.json().await.unwrap();
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(30)).success());
    let server = start(&db.url(), &data_dir, &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let read: Value = http().get(server.url(&format!("/api/items/{dfid}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["version"], acknowledged["version"]);
    assert_eq!(read["enriched_data"]["client"], "change", "the acknowledged change survived the restart: {read}");
    let row: (i64, Value) = client
        .query_one("SELECT version, data FROM items WHERE id = $1", &[&dfid])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(row.0, acknowledged["version"].as_i64().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_durable_request_on_a_quarantined_item_is_not_acknowledged() {
    let db = fresh_db("repeat-durable").await;
    let server = start(&db.url(), &scratch_dir("repeat-durable"), &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    let item: Value = create_item(&server, "a", Value::Null).await.json().await.unwrap();
    let dfid = item["dfid"].as_str().unwrap().to_owned();
    wait_drained(&server, Duration::from_secs(10)).await;
    let client = db.connect().await;
    client
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no_deprecation CHECK (data->>'status' <> 'deprecated')")
        .await
        .unwrap();
    let deprecate =
        || http().put(server.url(&format!("/api/items/{dfid}/deprecate"))).header("Prefer", "durable").send();
    assert_eq!(deprecate().await.unwrap().status(), 422, "the deprecation is refused");
    // Nothing is left to change in memory; the answer must still not claim
    // durability while the database says active.
    let repeated = deprecate().await.unwrap();
    assert_eq!(repeated.status(), 422, "the repeat is not acknowledged as durable");
    assert!(repeated.headers().get("preference-applied").is_none());
    let status: String =
        client.query_one("SELECT data->>'status' FROM items WHERE id = $1", &[&dfid]).await.unwrap().get(0);
    assert_eq!(status, "active");
}

/// Every process of a private PostgreSQL cluster: the postmaster and its
/// children (read from /proc).
fn cluster_processes(postmaster: i32) -> Vec<i32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent pid is the second field after the command's ")".
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if parent == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

fn signal_all(pids: &[i32], signal: Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
}

/// Processes stopped with SIGSTOP, continued when dropped (also when a test
/// fails).
struct Frozen(Vec<i32>);

impl Frozen {
    fn freeze(pids: Vec<i32>) -> Self {
        signal_all(&pids, Signal::SIGSTOP);
        Self(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_all(&self.0, Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_readiness_answer_from_memory_while_the_database_hangs() {
    let postgres = dedicated_postgres("hang");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let server = start(&postgres.connection_string("app"), &scratch_dir("hang"), &[]);
    server.wait_ready(Duration::from_secs(30)).await;
    create_item(&server, "a", Value::Null).await;
    wait_drained(&server, Duration::from_secs(10)).await;

    let frozen = Frozen::freeze(cluster_processes(postgres.pid().expect("postgres runs")));
    {
        create_item(&server, "b", Value::Null).await;
        // Many status and readiness calls at once take no connection.
        let mut calls = Vec::new();
        for n in 0..200 {
            let url = server.url(if n % 2 == 0 { "/api/outbox/status" } else { "/readyz" });
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let answer = http().get(url).send().await.map(|r| r.status().as_u16());
                (answer, started.elapsed())
            }));
        }
        for call in calls {
            let (answer, elapsed) = call.await.unwrap();
            assert!(answer.is_ok(), "answered");
            assert!(elapsed < Duration::from_secs(2), "answered from memory ({elapsed:?})");
        }
        let reported = poll_until(Duration::from_secs(10), || async {
            let status = status(&server).await;
            status["last_error"]["message"].as_str().is_some_and(|m| m.contains("no answer"))
                && status["dead_letters"] == 0
        })
        .await;
        assert!(reported, "the attempt under way is the last error: {}", status(&server).await);
        let unready = poll_until(Duration::from_secs(10), || async {
            http().get(server.url("/readyz")).send().await.is_ok_and(|r| r.status() == 503)
        })
        .await;
        assert!(unready, "readiness follows the hung database");
    }
    drop(frozen);
    wait_drained(&server, Duration::from_secs(60)).await;
    server.wait_ready(Duration::from_secs(30)).await;
}
