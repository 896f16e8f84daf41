//! The real binary at its HTTP edge: `Idempotency-Key` (replay, mismatch,
//! in flight, expiry, and retries across a `kill -9`), over-limit bodies
//! answered 413 rather than reset, and connections that cannot exhaust the
//! server (half-open requests closed by the header timeout, a bound on open
//! connections).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{
    BlackHoleProxy, ServerProcess, dedicated_postgres_tcp, fresh_db, http, poll_until, scratch_dir, tcp_address,
};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

/// The tests that load the machine with connections run one at a time:
/// their deadlines mean little while another floods the same two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The answer to one request: status, `Idempotent-Replayed`, body.
struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

async fn send(server: &ServerProcess, method: Method, path: &str, key: Option<&str>, body: &Value) -> Answer {
    send_with(server, method, path, key, body, false).await
}

async fn send_with(
    server: &ServerProcess,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &Value,
    durable: bool,
) -> Answer {
    let mut request = http().request(method, server.url(path)).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if durable {
        request = request.header("Prefer", "durable");
    }
    let answer = request.send().await.expect("an answer");
    let status = answer.status().as_u16();
    let replayed = answer.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body = answer.json().await.unwrap_or(Value::Null);
    Answer { status, replayed, body }
}

async fn item_count(server: &ServerProcess) -> usize {
    let page: Value = http().get(server.url("/api/items?limit=1000")).send().await.unwrap().json().await.unwrap();
    page["items"].as_array().unwrap().len()
}

fn item(value: &str) -> Value {
    json!({"identifiers": [{"key": "sku", "value": value}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_with_the_same_key_gets_the_first_answer_and_keys_expire() {
    let db = fresh_db("idempotency").await;
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("OUTBOX_DATA_DIR", scratch_dir("idempotency").display().to_string()),
            ("OUTBOX_IDEMPOTENCY_TTL_S", "2".to_owned()),
        ],
    );
    server.wait_ready(Duration::from_secs(60)).await;

    let first = send(&server, Method::POST, "/api/items", Some("order-1"), &item("a")).await;
    assert_eq!((first.status, first.replayed), (201, false), "{}", first.body);
    let retry = send(&server, Method::POST, "/api/items", Some("order-1"), &item("a")).await;
    assert_eq!((retry.status, retry.replayed), (201, true));
    assert_eq!(retry.body, first.body, "the same answer, the same DFID");
    assert_eq!(item_count(&server).await, 1);

    // The same key with another request: refused, nothing created.
    let other_body = send(&server, Method::POST, "/api/items", Some("order-1"), &item("b")).await;
    assert_eq!(other_body.status, 422, "{}", other_body.body);
    let other_path = send(&server, Method::POST, "/api/items/local", Some("order-1"), &item("a")).await;
    assert_eq!(other_path.status, 422, "{}", other_path.body);
    assert_eq!(item_count(&server).await, 1);

    // A key on an update and a delete: replayed, applied once.
    let dfid = first.body["dfid"].as_str().unwrap().to_owned();
    let update = json!({"enriched_data": {"colour": "red"}});
    let path = format!("/api/items/{dfid}");
    let updated = send(&server, Method::PUT, &path, Some("update-1"), &update).await;
    let again = send(&server, Method::PUT, &path, Some("update-1"), &update).await;
    assert_eq!((updated.body["version"].as_u64(), again.body["version"].as_u64()), (Some(2), Some(2)));
    assert!(again.replayed);

    // Malformed keys: 400, nothing changes.
    for key in ["", &"k".repeat(256), "two words", "tab\there"] {
        let answer = send(&server, Method::POST, "/api/items", Some(key), &item("c")).await;
        assert_eq!(answer.status, 400, "key {key:?}: {}", answer.body);
    }
    assert_eq!(item_count(&server).await, 1);

    // Expired (TTL 2 s): a tombstone in the database, and the key is new again.
    let client = db.connect().await;
    let expired = poll_until(Duration::from_secs(15), || async {
        client
            .query_opt("SELECT deleted FROM idempotency_keys WHERE id = 'order-1'", &[])
            .await
            .unwrap()
            .is_some_and(|row| row.get::<_, bool>(0))
    })
    .await;
    assert!(expired, "the expired key is written as a tombstone");
    let after = send(&server, Method::POST, "/api/items", Some("order-1"), &item("a")).await;
    assert_eq!((after.status, after.replayed), (201, false));
    assert_ne!(after.body["dfid"], first.body["dfid"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_across_a_kill_9_create_once() {
    let postgres = dedicated_postgres_tcp("idempotency-kill");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let proxy = BlackHoleProxy::start(tcp_address(&postgres.config("app"))).await;
    let url = format!("host=127.0.0.1 port={} user=postgres dbname=app", proxy.addr.port());
    let data_dir = scratch_dir("idempotency-kill");
    let envs = [
        ("DATABASE_URL", url),
        ("OUTBOX_DATA_DIR", data_dir.display().to_string()),
        ("OUTBOX_RETRY_MAX_DELAY_MS", "300".to_owned()),
        ("OUTBOX_LEASE_TTL_S", "3".to_owned()),
        ("OUTBOX_REQUEST_TIMEOUT_S", "8".to_owned()),
    ];
    let client = outbox::pg::connect(&postgres.config("app")).await.unwrap();
    let rows = |sku: &'static str| {
        let client = &client;
        async move {
            let sql = "SELECT count(*) FROM items WHERE data::jsonb->'identifiers' @> jsonb_build_array(jsonb_build_object('key', 'sku', 'value', $1::text))";
            client.query_one(sql, &[&sku]).await.unwrap().get::<_, i64>(0)
        }
    };

    // A durable create, acknowledged after its commit, then kill -9: the
    // retry gets the same item back, and the database holds it once.
    let server = ServerProcess::start(&[], &envs);
    server.wait_ready(Duration::from_secs(60)).await;
    let acked = send_with(&server, Method::POST, "/api/items", Some("durable-1"), &item("d"), true).await;
    assert_eq!(acked.status, 201, "{}", acked.body);
    server.signal(Signal::SIGKILL);
    let mut server = server;
    server.wait(Duration::from_secs(10));
    let server = ServerProcess::start(&[], &envs);
    server.wait_ready(Duration::from_secs(60)).await;
    let retry = send_with(&server, Method::POST, "/api/items", Some("durable-1"), &item("d"), true).await;
    assert_eq!((retry.status, retry.replayed), (201, true), "{}", retry.body);
    assert_eq!(retry.body["dfid"], acked.body["dfid"]);
    assert_eq!(rows("d").await, 1);

    // A create acknowledged from memory only, lost with the process (the
    // database was cut off, so it never committed): the retry creates the
    // item, once.
    proxy.cut();
    let lost = send(&server, Method::POST, "/api/items", Some("memory-1"), &item("m")).await;
    assert_eq!(lost.status, 201, "{}", lost.body);
    server.signal(Signal::SIGKILL);
    let mut server = server;
    server.wait(Duration::from_secs(10));
    proxy.restore();
    // Its spill file is never written by a kill -9; the change is gone.
    let server = ServerProcess::start(&[], &envs);
    server.wait_ready(Duration::from_secs(60)).await;
    let retry = send_with(&server, Method::POST, "/api/items", Some("memory-1"), &item("m"), true).await;
    assert_eq!((retry.status, retry.replayed), (201, false), "{}", retry.body);
    assert_ne!(retry.body["dfid"], lost.body["dfid"], "a new item");
    let again = send_with(&server, Method::POST, "/api/items", Some("memory-1"), &item("m"), true).await;
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body["dfid"], retry.body["dfid"]);
    assert_eq!(rows("m").await, 1, "created once");

    // While the first request with a key is being answered (durable, the
    // database cut off), a duplicate gets 409; once the database is back
    // the first is answered and a retry replays it.
    proxy.cut();
    let first = {
        let url = server.url("/api/items");
        tokio::spawn(async move {
            let answer = reqwest::Client::new()
                .post(url)
                .header("Idempotency-Key", "slow-1")
                .header("Prefer", "durable")
                .json(&item("s"))
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("an answer");
            (answer.status().as_u16(), answer.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let duplicate = send(&server, Method::POST, "/api/items", Some("slow-1"), &item("s")).await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.body);
    proxy.restore();
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 201, "{body}");
    let retry = send(&server, Method::POST, "/api/items", Some("slow-1"), &item("s")).await;
    assert_eq!((retry.status, retry.replayed), (201, true));
    assert_eq!(retry.body["dfid"], body["dfid"]);
}

/// Sends a whole request (headers and body) before reading anything, then
/// reads the answer's head.
fn send_whole_then_read(addr: &str, body_len: usize) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /api/items HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("send the head");
    let chunk = vec![b' '; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).expect("the server takes the whole body");
        left -= n;
    }
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
            Err(e) => panic!("reading the answer: {e} (after {} bytes)", answer.len()),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_gets_413_every_time() {
    let _serial = SERIAL.lock().await;
    let db = fresh_db("too-large").await;
    let server = ServerProcess::start(
        &[],
        &[("DATABASE_URL", db.url()), ("OUTBOX_DATA_DIR", scratch_dir("too-large").display().to_string())],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        for attempt in 0..100 {
            let answer = send_whole_then_read(&addr, 3 * 1024 * 1024);
            assert!(answer.starts_with("HTTP/1.1 413"), "attempt {attempt}: {answer}");
            assert!(answer.contains("application/problem+json"), "attempt {attempt}: {answer}");
        }
    })
    .await
    .unwrap();
    assert_eq!(item_count(&server).await, 0);
}

/// Open file descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Connections that send the start of a request and never finish its
/// headers.
fn half_open(addr: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n").expect("send part of a head");
            stream
        })
        .collect()
}

async fn healthz_answers(server: &ServerProcess) -> bool {
    matches!(http().get(server.url("/healthz")).send().await, Ok(r) if r.status() == 200)
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_requests_are_closed_by_the_header_timeout_and_healthz_is_answered_throughout() {
    let _serial = SERIAL.lock().await;
    // A header timeout longer than opening 3,000 connections takes on a
    // loaded machine, so that they are all open at once.
    let db = fresh_db("slowloris").await;
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("OUTBOX_DATA_DIR", scratch_dir("slowloris").display().to_string()),
            ("OUTBOX_HEADER_TIMEOUT_S", "30".to_owned()),
        ],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let baseline = open_fds(server.pid());

    let addr = server.addr.clone();
    let started = Instant::now();
    let mut slow = tokio::task::spawn_blocking(move || half_open(&addr, 3000)).await.unwrap();
    let opened = started.elapsed();
    let held = poll_until(Duration::from_secs(5), || async { open_fds(server.pid()) >= baseline + 2500 }).await;
    assert!(
        held,
        "the half-open connections are open: {} (baseline {baseline}, opened in {opened:?})",
        open_fds(server.pid())
    );
    // Ordinary requests are answered while they are held.
    while started.elapsed() < Duration::from_secs(8) {
        assert!(healthz_answers(&server).await, "/healthz is answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every half-open connection is answered 408 and closed by the server
    // within the timeout of its opening (and a little slack for a loaded
    // machine).
    tokio::task::spawn_blocking(move || {
        for stream in &mut slow {
            stream.set_read_timeout(Some(Duration::from_secs(45))).unwrap();
            let mut answer = Vec::new();
            match stream.read_to_end(&mut answer) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("a half-open connection was not closed: {e}"),
            }
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 408 "), "answered 408 before closing: {answer:?}");
        }
    })
    .await
    .unwrap();
    let closed = started.elapsed();
    assert!(closed < opened + Duration::from_secs(35), "opened in {opened:?}, all closed after {closed:?}");
    let back = poll_until(Duration::from_secs(5), || async { open_fds(server.pid()) <= baseline + 10 }).await;
    assert!(back, "file descriptors back to normal: {} (baseline {baseline})", open_fds(server.pid()));
    assert!(healthz_answers(&server).await);
    let metrics = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let timeouts = metrics
        .lines()
        .find(|l| l.starts_with("outbox_http_connections_refused_total{reason=\"header_timeout\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(timeouts >= 3000.0, "header timeouts counted: {timeouts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_the_connection_limit_new_connections_wait_and_are_counted() {
    let _serial = SERIAL.lock().await;
    let db = fresh_db("connection-limit").await;
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("OUTBOX_DATA_DIR", scratch_dir("connection-limit").display().to_string()),
            ("OUTBOX_HEADER_TIMEOUT_S", "2".to_owned()),
            ("OUTBOX_MAX_CONNECTIONS", "50".to_owned()),
        ],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let baseline = open_fds(server.pid());
    let addr = server.addr.clone();
    let slow = tokio::task::spawn_blocking(move || half_open(&addr, 200)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = open_fds(server.pid());
    assert!(open <= baseline + 50 + 5, "at most the limit is open: {open} (baseline {baseline})");
    // Waiting connections are taken as the held ones time out; an ordinary
    // request gets through within a few header timeouts.
    let answered = poll_until(Duration::from_secs(15), || healthz_answers(&server)).await;
    assert!(answered, "/healthz answered once the limit frees up");
    let metrics = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let limited = metrics
        .lines()
        .find(|l| l.starts_with("outbox_http_connections_refused_total{reason=\"limit\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(limited >= 1.0, "waits at the limit are counted: {limited}");
    drop(slow);
}
