//! Failover between two servers on one database: a frozen holder and a
//! holder cut off from the database are replaced by a standby, and what they
//! take in afterwards never lands; a rolling deploy hands over within a
//! second; a standby that followed two writers takes over equal to the
//! database; the commit feed numbers commits densely, in commit order.
//! Every wait is bounded; every process a test stops, it started.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    BlackHoleProxy, ServerProcess, database_items, dedicated_postgres_tcp, fresh_db, http, memory_items, poll_until,
    scratch_dir, tcp_address,
};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "test-admin-token";

/// The lease's time to live in the tests that wait for it to expire.
const TTL: Duration = Duration::from_secs(3);

/// The servers of one test at a time: the takeover windows measured here
/// mean little while another test's servers load the two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start(url: &str, data_dir: &Path, extra: &[(&str, &str)]) -> ServerProcess {
    let mut envs = vec![
        ("DATABASE_URL", url.to_owned()),
        ("OUTBOX_DATA_DIR", data_dir.display().to_string()),
        ("OUTBOX_RETRY_MAX_DELAY_MS", "300".to_owned()),
        ("OUTBOX_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ];
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    ServerProcess::start(&[], &envs)
}

/// A server whose lease lives `TTL`.
fn start_short_lease(url: &str, data_dir: &Path) -> ServerProcess {
    start(url, data_dir, &[("OUTBOX_LEASE_TTL_S", &TTL.as_secs().to_string())])
}

/// Sends one request to `base` (`http://addr`); the status (0: no answer)
/// and the JSON body (null if none).
async fn send(method: Method, url: String, body: Option<Value>, durable: bool) -> (u16, Value) {
    let mut request = http().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if durable {
        request = request.header("Prefer", "durable");
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            (status, answer.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

fn create_body(value: &str, data: Value) -> Value {
    json!({"identifiers": [{"key": "n", "value": value}], "enriched_data": data})
}

async fn create(server: &ServerProcess, value: &str, data: Value, durable: bool) -> Value {
    let (status, body) = send(Method::POST, server.url("/api/items"), Some(create_body(value, data)), durable).await;
    assert_eq!(status, 201, "created {value}: {body}");
    body
}

async fn update(server: &ServerProcess, dfid: &str, data: Value, durable: bool) -> Value {
    let url = server.url(&format!("/api/items/{dfid}"));
    let (status, body) = send(Method::PUT, url, Some(json!({"enriched_data": data})), durable).await;
    assert_eq!(status, 200, "updated {dfid}: {body}");
    body
}

async fn status(server: &ServerProcess) -> Value {
    http().get(server.url("/api/outbox/status")).send().await.unwrap().json().await.unwrap()
}

async fn wait_drained(server: &ServerProcess, timeout: Duration) {
    let drained = poll_until(timeout, || async { status(server).await["depth"] == 0 }).await;
    assert!(drained, "the outbox drained: {}\n{}", status(server).await, server.log());
}

/// Polls `/readyz` until 200; how long it took, `None` past `timeout`.
async fn time_to_ready(server: &ServerProcess, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() <= timeout {
        if matches!(http().get(server.url("/readyz")).send().await, Ok(r) if r.status() == 200) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until a starting server says it follows the holder as a hydrated
/// standby.
async fn wait_standby(server: &ServerProcess, timeout: Duration) {
    let following =
        poll_until(timeout, || async { server.log().contains("standby hydrated; following the holder") }).await;
    assert!(following, "a hydrated standby\n{}", server.log());
    assert_eq!(status(server).await["role"], "standby");
}

/// Waits (bounded, without blocking the runtime) for a server to exit.
async fn wait_exit(server: &mut ServerProcess, timeout: Duration) -> (ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = server.try_wait() {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < timeout, "the server did not exit within {timeout:?}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every row, tombstones too: id → (version, deleted, data).
type Rows = BTreeMap<String, (i64, bool, Option<Value>)>;

async fn all_rows(client: &tokio_postgres::Client) -> Rows {
    client
        .query("SELECT id, version, deleted, data FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// Unresolved dead letters: (entity id, version, database version, reason).
async fn unresolved_dead_letters(client: &tokio_postgres::Client) -> BTreeSet<(String, i64, Option<i64>, String)> {
    client
        .query(
            "SELECT entity_id, version, database_version, reason FROM outbox_dead_letters WHERE resolved_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Every record of every spill file in `data_dir`.
fn spilled_records(data_dir: &Path) -> Vec<outbox::outbox::spill::SpillRecord> {
    let files = outbox::outbox::spill::list(&data_dir.join("spill")).unwrap();
    files.iter().flat_map(|f| outbox::outbox::spill::read(f).unwrap().records).collect()
}

/// A server stopped with SIGSTOP, continued when dropped (also when a test
/// fails).
struct Frozen(i32);

impl Frozen {
    fn freeze(server: &ServerProcess) -> Self {
        server.signal(Signal::SIGSTOP);
        Self(server.pid())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// A write sent to a holder that has lost (or is losing) the lease.
#[derive(Debug)]
struct Late {
    /// The item it changes (for a create: the one it made, if answered).
    dfid: Option<String>,
    durable: bool,
    status: u16,
    body: Value,
}

impl Late {
    fn acknowledged(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends a late update of `dfid` to `base` in its own task.
fn late_update(base: &str, dfid: &str, data: Value, durable: bool) -> tokio::task::JoinHandle<Late> {
    let (url, dfid) = (format!("{base}/api/items/{dfid}"), dfid.to_owned());
    tokio::spawn(async move {
        let (status, body) = send(Method::PUT, url, Some(json!({"enriched_data": data})), durable).await;
        Late { dfid: Some(dfid), durable, status, body }
    })
}

/// Sends a late create to `base` in its own task.
fn late_create(base: &str, value: &str, data: Value, durable: bool) -> tokio::task::JoinHandle<Late> {
    let (url, body) = (format!("{base}/api/items"), create_body(value, data));
    tokio::spawn(async move {
        let (status, body) = send(Method::POST, url, Some(body), durable).await;
        Late { dfid: body["dfid"].as_str().map(str::to_owned), durable, status, body }
    })
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Late>>) -> Vec<Late> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// What a holder that lost the lease acknowledged: never a durable write
/// (it cannot commit), and whatever it acknowledged from memory is in its
/// spill file, since it cannot have been written.
fn check_late_acknowledgements(late: &[Late], spilled: &[outbox::outbox::spill::SpillRecord]) {
    for write in late {
        assert!(!(write.durable && write.acknowledged()), "a durable late write is never acknowledged: {write:?}");
    }
    let spilled_ids: BTreeSet<&str> = spilled.iter().map(|r| r.id.as_str()).collect();
    for write in late.iter().filter(|w| w.acknowledged()) {
        let dfid = write.dfid.as_deref().expect("an acknowledged write names its item");
        assert!(spilled_ids.contains(dfid), "the acknowledged late write of {dfid} was spilled: {late:?}");
    }
}

/// A holder that lost the lease answers a change 503 (another server
/// serves: try there), or 2xx if it took it into memory in the instant
/// before it noticed. Checked last, so that a test that fails here has
/// checked everything else first.
fn check_late_answers(late: &[Late]) {
    for write in late {
        // 0: the connection was refused, the holder having stopped listening
        // on its way out; nothing was answered.
        assert!(
            [0, 503].contains(&write.status) || write.acknowledged(),
            "a late write is answered 503, or 2xx from memory; got {} for {:?} (durable: {}): {}",
            write.status,
            write.dfid,
            write.durable,
            write.body
        );
    }
}

/// Nothing a holder wrote after losing the lease is in the database: no row
/// carries its marker, and no item it created then exists.
async fn assert_no_late_write_landed(client: &tokio_postgres::Client, late: &[Late], marker: &str) {
    let rows = all_rows(client).await;
    for (dfid, (_, _, data)) in &rows {
        let by = data.as_ref().and_then(|d| d["enriched_data"]["by"].as_str());
        assert_ne!(by, Some(marker), "a late write of the old holder landed on {dfid}");
    }
    for write in late.iter().filter(|w| w.acknowledged()) {
        let dfid = write.dfid.as_deref().unwrap();
        if let Some((_, _, data)) = rows.get(dfid) {
            let by = data.as_ref().and_then(|d| d["enriched_data"]["by"].as_str());
            assert_ne!(by, Some(marker), "the late write of {dfid} landed");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_is_replaced_and_its_late_writes_never_land() {
    let _serial = SERIAL.lock().await;
    let db = fresh_db("frozen").await;
    let client = db.connect().await;
    let (a_dir, b_dir) = (scratch_dir("frozen-a"), scratch_dir("frozen-b"));
    let mut a = start_short_lease(&db.url(), &a_dir);
    a.wait_ready(Duration::from_secs(30)).await;
    let mut dfids = Vec::new();
    for i in 0..8 {
        let item = create(&a, &format!("frozen-{i}"), json!({"by": "A", "i": i}), true).await;
        dfids.push(item["dfid"].as_str().unwrap().to_owned());
    }
    // Frozen between transactions: a transaction frozen open would hold its
    // share lock on the lease row until PostgreSQL ends the session.
    wait_drained(&a, Duration::from_secs(10)).await;
    let a_epoch = status(&a).await["epoch"].as_i64().unwrap();

    let frozen = Frozen::freeze(&a);
    let frozen_at = Instant::now();
    let b = start_short_lease(&db.url(), &b_dir);
    let budget = (TTL + Duration::from_secs(5)).saturating_sub(frozen_at.elapsed());
    let ready = time_to_ready(&b, budget).await;
    let takeover = frozen_at.elapsed();
    eprintln!("frozen holder: the standby served {takeover:?} after the freeze (lease TTL {TTL:?})");
    assert!(ready.is_some(), "B is ready within TTL + 5 s of the freeze\n{}", b.log());
    let b_status = status(&b).await;
    assert_eq!(b_status["role"], "leader", "{b_status}");
    assert!(b_status["epoch"].as_i64().unwrap() > a_epoch, "a new epoch: {b_status}");

    // B's writes: updates of A's items, a delete, new items; all committed.
    let mut b_versions: BTreeMap<String, i64> = BTreeMap::new();
    for (i, dfid) in dfids[..4].iter().enumerate() {
        let item = update(&b, dfid, json!({"by": "B", "n": i}), true).await;
        b_versions.insert(dfid.clone(), item["version"].as_i64().unwrap());
    }
    let (deleted, _) = send(Method::DELETE, b.url(&format!("/api/items/{}", dfids[4])), None, true).await;
    assert_eq!(deleted, 204);
    let mut b_created = Vec::new();
    for i in 0..3 {
        let item = create(&b, &format!("frozen-b-{i}"), json!({"by": "B"}), true).await;
        b_created.push(item["dfid"].as_str().unwrap().to_owned());
    }

    // A's late writes, other content than B's: the first wave waits in A's
    // socket queue while it is frozen and reaches it the instant it wakes;
    // the second comes just after.
    let base = format!("http://{}", a.addr);
    let late_data = || json!({"by": "A-late"});
    let mut tasks = vec![
        late_update(&base, &dfids[0], late_data(), false),
        late_update(&base, &dfids[4], late_data(), false),
        late_update(&base, &dfids[5], late_data(), false),
        late_update(&base, &dfids[1], late_data(), true),
        late_create(&base, "frozen-late-1", late_data(), false),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(frozen);
    let continued = Instant::now();
    tasks.extend([
        late_update(&base, &dfids[2], late_data(), false),
        late_update(&base, &dfids[6], late_data(), false),
        late_create(&base, "frozen-late-2", late_data(), false),
        late_create(&base, "frozen-late-3", late_data(), true),
    ]);
    let late = collect(tasks).await;
    eprintln!("frozen holder: late answers {:?}", late.iter().map(|l| l.status).collect::<Vec<_>>());

    let (exit, exited_after) = wait_exit(&mut a, Duration::from_secs(60)).await;
    eprintln!(
        "frozen holder: exited {exit} {exited_after:?} after SIGCONT ({:?} since continued)",
        continued.elapsed()
    );
    assert!(!exit.success(), "the old holder exits non-zero\n{}", a.log());
    assert!(a.log().contains("single-writer lease was lost"), "it says why\n{}", a.log());

    // While B runs, the database holds B's writes exactly, none of A's.
    assert_no_late_write_landed(&client, &late, "A-late").await;
    let database = database_items(&client).await;
    assert_eq!(database, memory_items(&b).await, "the database equals B's memory");
    for (dfid, version) in &b_versions {
        let (v, data) = &database[dfid];
        assert_eq!((v, data["enriched_data"]["by"].as_str()), (version, Some("B")), "B's write of {dfid}");
    }
    let rows = all_rows(&client).await;
    assert!(rows[&dfids[4]].1, "B's delete holds");
    assert!(b_created.iter().all(|d| database[d].0 == 1), "B's creates hold");
    for dfid in &dfids[5..] {
        assert_eq!(database[dfid].0, 1, "{dfid}, which B did not touch, is as A committed it");
    }

    let spilled = spilled_records(&a_dir);
    check_late_acknowledgements(&late, &spilled);
    eprintln!("frozen holder: {} records spilled", spilled.len());

    let mut b = b;
    b.signal(Signal::SIGTERM);
    let (exit, _) = wait_exit(&mut b, Duration::from_secs(30)).await;
    assert!(exit.success(), "B stops cleanly\n{}", b.log());

    // A again, on its own folder: it holds the lease and replays its spill
    // file by compare-and-set.
    let before = all_rows(&client).await;
    let a = start_short_lease(&db.url(), &a_dir);
    a.wait_ready(Duration::from_secs(30)).await;
    assert!(spilled_records(&a_dir).is_empty(), "the spill file is replayed and removed");
    let after = all_rows(&client).await;
    let letters = unresolved_dead_letters(&client).await;
    if spilled.is_empty() {
        // A noticed before it took any late write in: it answered them all
        // 503 and had nothing to spill. Nothing moves.
        assert!(late.iter().all(|l| !l.acknowledged()), "{late:?}");
        assert_eq!(after, before, "nothing was replayed");
        assert!(letters.is_empty(), "{letters:?}");
    } else {
        // A group is written whole or set aside whole: a group with a record
        // whose row moved on since A knew it (its base) is a conflict.
        let held = |id: &str| before.get(id).map_or(0, |row| row.0);
        let moved: BTreeSet<Option<u64>> =
            spilled.iter().filter(|r| r.base != Some(held(&r.id) as u64)).map(|r| r.group).collect();
        let mut expected = BTreeSet::new();
        for record in &spilled {
            if moved.contains(&record.group) {
                assert_eq!(after.get(&record.id), before.get(&record.id), "{} is left as B wrote it", record.id);
                let database_version = before.get(&record.id).map(|row| row.0);
                expected.insert((record.id.clone(), record.version as i64, database_version, "conflict".to_owned()));
            } else {
                // Nobody wrote the row since A knew it: the record is written.
                let row = &after[&record.id];
                assert_eq!((row.0, row.1), (record.version as i64, record.deleted), "{} is replayed", record.id);
                let data: Option<Value> = record.data.as_ref().map(|d| serde_json::from_str(d.get()).unwrap());
                assert_eq!(row.2, data, "{} is replayed as spilled", record.id);
            }
        }
        for record in spilled.iter().filter(|r| b_versions.contains_key(&r.id) || r.id == dfids[4]) {
            assert!(moved.contains(&record.group), "{}, which B changed, is a conflict", record.id);
        }
        assert_eq!(letters, expected, "every record whose row moved on is an unresolved conflict");
        let replayed: BTreeSet<&str> = spilled.iter().map(|r| r.id.as_str()).collect();
        for (dfid, row) in &before {
            if !replayed.contains(dfid.as_str()) {
                assert_eq!(after.get(dfid), Some(row), "{dfid}, not spilled, is unchanged");
            }
        }
    }
    assert_eq!(database_items(&client).await, memory_items(&a).await, "A's memory equals the database");
    check_late_answers(&late);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_holder_cut_off_from_the_database_is_replaced_like_a_frozen_one() {
    let _serial = SERIAL.lock().await;
    let postgres = dedicated_postgres_tcp("cut-off");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let proxy = BlackHoleProxy::start(tcp_address(&postgres.config("app"))).await;
    let a_url = format!("host=127.0.0.1 port={} user=postgres dbname=app", proxy.addr.port());
    let b_url = postgres.connection_string("app");
    let client = outbox::pg::connect(&postgres.config("app")).await.unwrap();

    let a_dir = scratch_dir("cut-off-a");
    let mut a = start_short_lease(&a_url, &a_dir);
    a.wait_ready(Duration::from_secs(30)).await;
    let mut dfids = Vec::new();
    for i in 0..6 {
        let item = create(&a, &format!("cut-{i}"), json!({"by": "A", "i": i}), true).await;
        dfids.push(item["dfid"].as_str().unwrap().to_owned());
    }
    wait_drained(&a, Duration::from_secs(10)).await;
    let b = start_short_lease(&b_url, &scratch_dir("cut-off-b"));
    wait_standby(&b, Duration::from_secs(30)).await;

    proxy.cut();
    let cut_at = Instant::now();
    let base = format!("http://{}", a.addr);
    let late_data = || json!({"by": "A-late"});
    // Taken in while A still believes it holds the lease, or after it lapsed.
    let mut tasks = vec![
        late_update(&base, &dfids[0], late_data(), false),
        late_update(&base, &dfids[1], late_data(), false),
        late_update(&base, &dfids[5], late_data(), false),
        late_create(&base, "cut-late-1", late_data(), false),
        late_update(&base, &dfids[2], late_data(), true),
    ];
    let ready = time_to_ready(&b, TTL + Duration::from_secs(5)).await;
    let takeover = cut_at.elapsed();
    eprintln!("cut-off holder: the standby served {takeover:?} after the cut (lease TTL {TTL:?})");
    assert!(ready.is_some(), "B is ready within TTL + 5 s of the cut\n{}", b.log());

    let mut b_versions: BTreeMap<String, i64> = BTreeMap::new();
    for (i, dfid) in dfids[..3].iter().enumerate() {
        let item = update(&b, dfid, json!({"by": "B", "n": i}), true).await;
        b_versions.insert(dfid.clone(), item["version"].as_i64().unwrap());
    }
    let (deleted, _) = send(Method::DELETE, b.url(&format!("/api/items/{}", dfids[3])), None, true).await;
    assert_eq!(deleted, 204);
    tasks.extend([
        late_update(&base, &dfids[1], late_data(), false),
        late_update(&base, &dfids[3], late_data(), false),
        late_create(&base, "cut-late-2", late_data(), false),
    ]);

    // A cannot reach the database to learn that the epoch moved. See what
    // it does on its own for a while.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let on_its_own = a.try_wait();
    let restored_at = Instant::now();
    let exit = match on_its_own {
        Some(exit) => {
            eprintln!("cut-off holder: exited by itself while cut off ({exit})");
            exit
        }
        None => {
            let readyz = http().get(a.url("/readyz")).send().await.map(|r| r.status().as_u16());
            eprintln!(
                "cut-off holder: still running {:?} after the cut (readyz {readyz:?}, role {}); restoring the link",
                cut_at.elapsed(),
                status(&a).await["role"]
            );
            assert_no_late_write_landed(&client, &[], "A-late").await;
            proxy.restore();
            let (exit, after) = wait_exit(&mut a, Duration::from_secs(60)).await;
            eprintln!("cut-off holder: exited {exit} {after:?} after the link came back");
            exit
        }
    };
    assert!(!exit.success(), "the old holder exits non-zero\n{}", a.log());
    assert!(a.log().contains("single-writer lease was lost"), "it says why\n{}", a.log());
    let late = collect(tasks).await;
    eprintln!(
        "cut-off holder: late answers {:?} ({:?} after the restore)",
        late.iter().map(|l| l.status).collect::<Vec<_>>(),
        restored_at.elapsed()
    );

    assert_no_late_write_landed(&client, &late, "A-late").await;
    let database = database_items(&client).await;
    assert_eq!(database, memory_items(&b).await, "the database equals B's memory");
    for (dfid, version) in &b_versions {
        let (v, data) = &database[dfid];
        assert_eq!((v, data["enriched_data"]["by"].as_str()), (version, Some("B")), "B's write of {dfid}");
    }
    assert!(!database.contains_key(&dfids[3]), "B's delete holds");
    let spilled = spilled_records(&a_dir);
    eprintln!("cut-off holder: {} records spilled", spilled.len());
    check_late_acknowledgements(&late, &spilled);

    let mut b = b;
    b.signal(Signal::SIGTERM);
    let (exit, _) = wait_exit(&mut b, Duration::from_secs(30)).await;
    assert!(exit.success(), "B stops cleanly\n{}", b.log());
    check_late_answers(&late);
}

/// One acknowledged create under the rolling deploy's load.
struct Ack {
    dfid: String,
    /// 0: the old holder, 1: the new one.
    server: usize,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_deploy_hands_over_within_a_second() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let db = fresh_db("rolling").await;
    let client = db.connect().await;
    // The default lease time to live (10 s): a handover within a second can
    // only come from the release, not from the lease expiring.
    let mut a = start(&db.url(), &scratch_dir("rolling-a"), &[]);
    a.wait_ready(Duration::from_secs(30)).await;

    // 100,000 items, 1000 a request, two requests at a time.
    let mut batches = tokio::task::JoinSet::new();
    for lane in 0..2 {
        let url = a.url("/api/items/batch");
        batches.spawn(async move {
            for batch in (lane..100).step_by(2) {
                let items: Vec<Value> =
                    (0..1000).map(|i| create_body(&format!("pre-{batch}-{i}"), json!({"i": i}))).collect();
                let (status, _) = send(Method::POST, url.clone(), Some(json!({"items": items})), false).await;
                assert_eq!(status, 201, "batch {batch}");
            }
        });
    }
    while let Some(done) = batches.join_next().await {
        done.unwrap();
    }
    wait_drained(&a, Duration::from_secs(60)).await;
    eprintln!("rolling deploy: 100,000 items created and written in {:?}", started.elapsed());

    let mut b = start(&db.url(), &scratch_dir("rolling-b"), &[]);
    wait_standby(&b, Duration::from_secs(60)).await;
    eprintln!("rolling deploy: the standby hydrated {:?} into the test", started.elapsed());

    // Steady load: each create goes to whichever server answers.
    let stop = Arc::new(AtomicBool::new(false));
    let servers = Arc::new([a.url("/api/items"), b.url("/api/items")]);
    let mut loops = Vec::new();
    for lane in 0..4 {
        let (stop, servers) = (stop.clone(), servers.clone());
        loops.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
            let mut acks = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = create_body(&format!("load-{lane}-{n}"), json!({"lane": lane}));
                let mut answered = false;
                for (server, url) in servers.iter().enumerate() {
                    let Ok(answer) = client.post(url).json(&body).send().await else { continue };
                    if answer.status().is_success() {
                        let item: Value = answer.json().await.unwrap();
                        let dfid = item["dfid"].as_str().unwrap().to_owned();
                        acks.push(Ack { dfid, server, at: Instant::now() });
                        answered = true;
                        break;
                    }
                    assert_eq!(answer.status(), 503, "only 503 while the servers hand over");
                }
                if !answered {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal(Signal::SIGTERM);
    let terminated = Instant::now();
    let (exit, _) = wait_exit(&mut a, Duration::from_secs(30)).await;
    assert!(exit.success(), "the old holder drains and stops cleanly\n{}", a.log());
    let ready = time_to_ready(&b, Duration::from_secs(15)).await;
    assert!(ready.is_some(), "the new holder serves\n{}", b.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for lane in loops {
        acks.extend(lane.await.unwrap());
    }

    let last_old = acks.iter().filter(|a| a.server == 0).map(|a| a.at).max().expect("the old holder served");
    let first_new = acks.iter().filter(|a| a.server == 1).map(|a| a.at).min().expect("the new holder served");
    let window = first_new.saturating_duration_since(last_old);
    eprintln!(
        "rolling deploy: {} creates acknowledged ({} by the old holder, {} by the new); \
         window from the old holder's last 2xx to the new holder's first: {window:?} \
         (SIGTERM to first new 2xx: {:?})",
        acks.len(),
        acks.iter().filter(|a| a.server == 0).count(),
        acks.iter().filter(|a| a.server == 1).count(),
        first_new.saturating_duration_since(terminated)
    );
    assert!(first_new > last_old, "one holder at a time answers");
    assert!(window <= Duration::from_secs(1), "the handover takes at most a second ({window:?})\n{}", b.log());

    wait_drained(&b, Duration::from_secs(30)).await;
    let ids: Vec<&str> = acks.iter().map(|a| a.dfid.as_str()).collect();
    let stored: i64 = client
        .query_one("SELECT count(*) FROM items WHERE NOT deleted AND id = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, ids.len(), "every acknowledged create is in the database");
    let total: i64 = client.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(total as usize, 100_000 + ids.len());
    b.signal(Signal::SIGTERM);
    assert!(wait_exit(&mut b, Duration::from_secs(30)).await.0.success());
    eprintln!("rolling deploy: whole test {:?}", started.elapsed());
}

/// A small xorshift generator: the writes differ from run to run without
/// a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_follows_two_writers_and_takes_over_equal_to_the_database() {
    let _serial = SERIAL.lock().await;
    let db = fresh_db("follow").await;
    let client = db.connect().await;
    let mut a = start(&db.url(), &scratch_dir("follow-a"), &[("OUTBOX_WRITERS", "2")]);
    a.wait_ready(Duration::from_secs(30)).await;
    // B hydrates the empty database: everything it holds at the end came
    // through the commit feed.
    let b = start(&db.url(), &scratch_dir("follow-b"), &[]);
    wait_standby(&b, Duration::from_secs(30)).await;

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("follow: seed {seed}");
    let until = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for lane in 0..4u64 {
        let base = format!("http://{}", a.addr);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(lane + 1) | 1);
            let (mut live, mut deleted, mut ops) = (Vec::<String>::new(), Vec::<String>::new(), 0u64);
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let roll = rng.below(100);
                ops += 1;
                if live.is_empty() || roll < 30 {
                    let body = create_body(&format!("follow-{lane}-{n}"), json!({"lane": lane, "n": n}));
                    let (status, item) = send(Method::POST, format!("{base}/api/items"), Some(body), false).await;
                    assert_eq!(status, 201, "{item}");
                    live.push(item["dfid"].as_str().unwrap().to_owned());
                } else if roll < 40 {
                    let items: Vec<Value> = (0..1 + rng.below(20))
                        .map(|i| create_body(&format!("follow-{lane}-{n}-{i}"), json!({"batch": n})))
                        .collect();
                    let url = format!("{base}/api/items/batch");
                    let (status, made) = send(Method::POST, url, Some(json!({"items": items})), false).await;
                    assert_eq!(status, 201, "{made}");
                    live.extend(
                        made["items"].as_array().unwrap().iter().map(|i| i["dfid"].as_str().unwrap().to_owned()),
                    );
                } else if roll < 85 {
                    let dfid = &live[rng.below(live.len() as u64) as usize];
                    let key = format!("k{}", rng.below(4));
                    let value = if rng.below(5) == 0 { Value::Null } else { json!(rng.below(1000)) };
                    let url = format!("{base}/api/items/{dfid}");
                    let (status, body) =
                        send(Method::PUT, url, Some(json!({"enriched_data": {key: value}})), false).await;
                    assert_eq!(status, 200, "{body}");
                } else {
                    let dfid = live.swap_remove(rng.below(live.len() as u64) as usize);
                    let (status, _) = send(Method::DELETE, format!("{base}/api/items/{dfid}"), None, false).await;
                    assert_eq!(status, 204);
                    deleted.push(dfid);
                }
            }
            (deleted, ops)
        }));
    }
    let (mut deleted, mut ops) = (Vec::new(), 0);
    for task in tasks {
        let (gone, count) = task.await.unwrap();
        deleted.extend(gone);
        ops += count;
    }
    eprintln!("follow: {ops} random writes in 10 s, {} deletes", deleted.len());

    a.signal(Signal::SIGTERM);
    let terminated = Instant::now();
    let (exit, _) = wait_exit(&mut a, Duration::from_secs(30)).await;
    assert!(exit.success(), "the old holder stops cleanly\n{}", a.log());
    let ready = time_to_ready(&b, Duration::from_secs(15)).await;
    assert!(ready.is_some(), "the standby takes over\n{}", b.log());
    eprintln!("follow: the standby served {:?} after SIGTERM", terminated.elapsed());
    assert_eq!(status(&b).await["role"], "leader");
    assert!(!b.log().contains("hydrating again"), "it followed the feed, never reloaded\n{}", b.log());
    wait_drained(&b, Duration::from_secs(10)).await;

    let database = database_items(&client).await;
    let memory = memory_items(&b).await;
    assert!(database.len() > 100, "the load wrote something ({} items)", database.len());
    let differing: Vec<&String> =
        database.keys().chain(memory.keys()).filter(|id| database.get(*id) != memory.get(*id)).take(5).collect();
    assert!(differing.is_empty(), "B's memory equals the database entity by entity; differing: {differing:?}");
    for dfid in &deleted {
        let (status, _) = send(Method::GET, b.url(&format!("/api/items/{dfid}")), None, false).await;
        assert_eq!(status, 404, "deleted {dfid} is gone on B");
    }
    let mut b = b;
    b.signal(Signal::SIGTERM);
    assert!(wait_exit(&mut b, Duration::from_secs(30)).await.0.success());
}

/// `APPEND_SQL` of src/pg/feed.rs: one commit feed entry, numbered from
/// `outbox_feed_head` under that row's lock.
const APPEND_SQL: &str = "WITH head AS (
       INSERT INTO outbox_feed_head AS h (name, seq) VALUES ($1, 1)
       ON CONFLICT (name) DO UPDATE SET seq = h.seq + 1 RETURNING seq)
     INSERT INTO outbox_feed (seq, epoch, kinds, kind_ends, ids) SELECT seq, $2, $3, $4, $5 FROM head";

/// Appends an entry inside the open transaction of `client`; the number it
/// took.
async fn append(client: &tokio_postgres::Client, id: &str) -> Result<i64, tokio_postgres::Error> {
    let (kinds, ends, ids) = (vec!["item"], vec![1i32], vec![id]);
    client.execute(APPEND_SQL, &[&"outbox", &1i64, &kinds, &ends, &ids]).await?;
    Ok(client.query_one("SELECT seq FROM outbox_feed_head WHERE name = 'outbox'", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_numbers_follow_commit_order() {
    let db = fresh_db("feed-order").await;
    let pool = outbox::pg::pool(db.config.clone(), 2);
    outbox::pg::migrate(&pool).await.unwrap();
    let (first, second) = (db.connect().await, db.connect().await);

    first.batch_execute("BEGIN").await.unwrap();
    assert_eq!(append(&first, "a").await.unwrap(), 1);
    // A second transaction waits for the first to end before it gets a
    // number.
    second.batch_execute("BEGIN; SET LOCAL lock_timeout = '300ms'").await.unwrap();
    let waited = Instant::now();
    let error = append(&second, "b").await.expect_err("the second transaction waits for the first");
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE), "{error}");
    assert!(waited.elapsed() >= Duration::from_millis(250), "it waited ({:?})", waited.elapsed());
    second.batch_execute("ROLLBACK").await.unwrap();
    first.batch_execute("COMMIT").await.unwrap();

    // A number taken by a transaction that rolls back is taken again.
    second.batch_execute("BEGIN").await.unwrap();
    assert_eq!(append(&second, "b").await.unwrap(), 2);
    second.batch_execute("ROLLBACK").await.unwrap();
    first.batch_execute("BEGIN").await.unwrap();
    assert_eq!(append(&first, "c").await.unwrap(), 2, "no gap");

    // A transaction that started waiting while another held a number gets
    // the next one once that one commits: numbers follow commit order.
    let second = Arc::new(second);
    let waiting = {
        let second = second.clone();
        tokio::spawn(async move {
            second.batch_execute("BEGIN").await.unwrap();
            let seq = append(&second, "d").await.unwrap();
            second.batch_execute("COMMIT").await.unwrap();
            seq
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "it waits for the open transaction");
    first.batch_execute("COMMIT").await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap(), 3);

    let entries: Vec<(i64, Vec<String>)> = first
        .query("SELECT seq, ids FROM outbox_feed ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        entries,
        vec![(1, vec!["a".to_owned()]), (2, vec!["c".to_owned()]), (3, vec!["d".to_owned()])],
        "dense numbers, in the order the transactions committed"
    );
}
