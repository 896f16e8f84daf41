//! Restart tests against the real binary: every mutation route of the
//! reference service is exercised, the server is stopped (SIGTERM, or `kill -9` after
//! durable requests) and started again on the same database, and every
//! entity must read back exactly as before; the database rows must equal
//! memory.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{ServerProcess, TestDb, fresh_db, http, scratch_dir};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

struct Client {
    base: String,
    durable: bool,
}

impl Client {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = http().request(method.clone(), format!("{}{path}", self.base));
        if self.durable {
            request = request.header("Prefer", "durable");
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        if self.durable && method != reqwest::Method::GET && status < 300 {
            assert_eq!(
                response.headers().get("preference-applied").and_then(|v| v.to_str().ok()),
                Some("durable"),
                "{method} {path} says it was durable"
            );
        }
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.send(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
        answer
    }
}

/// What the scenario created: the ids to read back.
#[derive(Default)]
struct Known {
    items: Vec<String>,
    circuits: Vec<String>,
}

fn dfid(v: &Value) -> String {
    v["dfid"].as_str().expect("a dfid").to_owned()
}

/// Exercises every mutation route once or more.
async fn exercise_every_route(c: &Client) -> Known {
    use reqwest::Method as M;
    let mut known = Known::default();
    let ids = |pairs: &[(&str, &str)]| -> Value {
        pairs.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>().into()
    };
    let a = c
        .ok(M::POST, "/api/items", Some(json!({"identifiers": ids(&[("gtin", "A")]), "enriched_data": {"n": 1}})))
        .await;
    let b = c.ok(M::POST, "/api/items", Some(json!({"identifiers": ids(&[("gtin", "B"), ("sku", "b")])}))).await;
    let cc = c.ok(M::POST, "/api/items", Some(json!({"identifiers": ids(&[("gtin", "C")])}))).await;
    let batch = c
        .ok(
            M::POST,
            "/api/items/batch",
            Some(json!({"items": [{"identifiers": ids(&[("gtin", "D")])}, {"identifiers": ids(&[("gtin", "E")])}]})),
        )
        .await;
    let (a, b, cc) = (dfid(&a), dfid(&b), dfid(&cc));
    let (d, e) = (dfid(&batch["items"][0]), dfid(&batch["items"][1]));
    c.ok(
        M::PUT,
        &format!("/api/items/{a}"),
        Some(json!({"enriched_data": {"n": 2, "colour": "red"}, "identifiers": ids(&[("lot", "7")])})),
    )
    .await;
    c.ok(M::POST, &format!("/api/items/{a}/merge"), Some(json!({"source_dfid": b}))).await;
    let split =
        c.ok(M::POST, &format!("/api/items/{a}/split"), Some(json!({"identifiers": ids(&[("sku", "b")])}))).await;
    let f = dfid(&split["created"]);
    c.ok(M::PUT, &format!("/api/items/{cc}/deprecate"), None).await;
    c.ok(M::DELETE, &format!("/api/items/{d}"), None).await;

    let mut locals = Vec::new();
    for n in ["1", "2", "3"] {
        let local =
            c.ok(M::POST, "/api/items/local", Some(json!({"identifiers": ids(&[("lid", n), ("shared", "s")])}))).await;
        known.items.push(dfid(&local["item"]));
        locals.push(local["local_id"].as_str().unwrap().to_owned());
    }
    c.ok(M::POST, "/api/items/local/merge", Some(json!({"local_ids": locals}))).await;
    c.ok(M::POST, "/api/items/local/unmerge", Some(json!({"local_id": locals[2]}))).await;

    let circuit = c.ok(M::POST, "/api/circuits", Some(json!({"name": "north"}))).await;
    let k = circuit["id"].as_str().unwrap().to_owned();
    c.ok(M::POST, &format!("/api/circuits/{k}/items"), Some(json!({"dfid": a}))).await;
    c.ok(M::POST, &format!("/api/circuits/{k}/items"), Some(json!({"dfid": e}))).await;

    known.items.extend([a, b, cc, d, e, f]);
    known.circuits.push(k);
    known
}

/// Every known entity as the server returns it (`Null` for a 404).
async fn read_back(c: &Client, known: &Known) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (prefix, ids) in [("items", &known.items), ("circuits", &known.circuits)] {
        for id in ids {
            let (status, body) = c.send(reqwest::Method::GET, &format!("/api/{prefix}/{id}"), None).await;
            let value = match status {
                200 => body,
                404 => Value::Null,
                other => panic!("GET /api/{prefix}/{id}: {other}"),
            };
            out.insert(format!("{prefix}/{id}"), value);
        }
    }
    out
}

/// Memory (every item, paged through the API) equals the database rows.
async fn assert_database_equals_memory(c: &Client, db: &TestDb) {
    let mut memory = BTreeMap::new();
    let mut path = "/api/items?limit=7".to_owned();
    loop {
        let page = c.ok(reqwest::Method::GET, &path, None).await;
        for item in page["items"].as_array().unwrap() {
            let mut data = item.clone();
            let version = data.as_object_mut().unwrap().remove("version").unwrap();
            memory.insert(dfid(item), (version.as_i64().unwrap(), data));
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/api/items?limit=7&after={next}"),
            None => break,
        }
    }
    let client = db.connect().await;
    let rows = client.query("SELECT id, version, data FROM items WHERE NOT deleted", &[]).await.unwrap();
    let database: BTreeMap<String, (i64, Value)> =
        rows.iter().map(|r| (r.get::<_, String>(0), (r.get::<_, i64>(1), r.get::<_, Value>(2)))).collect();
    assert_eq!(database, memory, "database rows equal memory");
}

async fn start(db: &TestDb, data_dir: &std::path::Path) -> ServerProcess {
    start_with(db, data_dir, "5").await
}

async fn start_with(db: &TestDb, data_dir: &std::path::Path, linger_ms: &str) -> ServerProcess {
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("OUTBOX_DATA_DIR", data_dir.display().to_string()),
            ("OUTBOX_LINGER_MS", linger_ms.to_owned()),
        ],
    );
    server.wait_ready(Duration::from_secs(30)).await;
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_survives_a_sigterm_restart() {
    let db = fresh_db("restart").await;
    let data_dir = scratch_dir("restart");
    let mut server = start(&db, &data_dir).await;
    let client = Client { base: format!("http://{}", server.addr), durable: false };
    let known = exercise_every_route(&client).await;
    let before = read_back(&client, &known).await;

    server.signal(Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(60)).success(), "{}", server.log());

    let server = start(&db, &data_dir).await;
    let client = Client { base: format!("http://{}", server.addr), durable: false };
    let after = read_back(&client, &known).await;
    assert_eq!(after, before, "every entity reads back as it was before the restart");
    assert_database_equals_memory(&client, &db).await;

    // Versions continue after the restart.
    let a = &known.items[3];
    let version = after[&format!("items/{a}")]["version"].as_u64().unwrap();
    let updated = client
        .ok(reqwest::Method::PUT, &format!("/api/items/{a}"), Some(json!({"enriched_data": {"again": true}})))
        .await;
    assert_eq!(updated["version"].as_u64().unwrap(), version + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_durable_change_survives_kill_9() {
    let db = fresh_db("kill9").await;
    let data_dir = scratch_dir("kill9");
    // A long linger: a change acknowledged before its commit would still be
    // waiting when the process is killed.
    let mut server = start_with(&db, &data_dir, "400").await;
    let client = Client { base: format!("http://{}", server.addr), durable: true };
    let known = exercise_every_route(&client).await;
    let before = read_back(&client, &known).await;

    // No drain: every 2xx durable answer must already be in the database.
    server.signal(Signal::SIGKILL);
    server.wait(Duration::from_secs(10));

    let server = start(&db, &data_dir).await;
    let client = Client { base: format!("http://{}", server.addr), durable: false };
    let after = read_back(&client, &known).await;
    assert_eq!(after, before, "every durably acknowledged change survived kill -9");
    assert_database_equals_memory(&client, &db).await;
}
