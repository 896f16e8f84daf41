//! The walking skeleton: the private PostgreSQL's life cycle, readiness,
//! configuration errors, and database isolation between tests.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{ServerProcess, fresh_db, http, poll_until, postmaster_pid, process_alive, scratch_dir};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn local_postgres_starts_stops_and_keeps_data_across_restarts() {
    let data_dir = scratch_dir("local-restart");
    let cluster_dir = data_dir.join("postgres");
    let envs = [("OUTBOX_DATA_DIR", data_dir.display().to_string())];

    let mut server = ServerProcess::start(&[], &envs);
    server.wait_ready(Duration::from_secs(60)).await;
    let first_postmaster = postmaster_pid(&cluster_dir).expect("the private PostgreSQL runs");

    // Write through the private server's socket, as any client would.
    let mut config = tokio_postgres::Config::new();
    config.host_path(&cluster_dir).port(5432).user("postgres").dbname("outbox");
    let client = outbox::pg::connect(&config).await.expect("connect to the private PostgreSQL");
    client
        .batch_execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('survives restarts')")
        .await
        .expect("write a row");
    drop(client);

    server.signal(Signal::SIGINT);
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "Ctrl-C exits cleanly: {status}; log:\n{}", server.log());
    assert!(!process_alive(first_postmaster), "PostgreSQL was stopped with the server");
    assert!(postmaster_pid(&cluster_dir).is_none(), "postmaster.pid is removed by a clean stop");

    let started = std::time::Instant::now();
    let mut again = ServerProcess::start(&[], &envs);
    again.wait_ready(Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(15), "a second start reuses the cluster quickly");
    assert!(!again.log().contains("initdb"), "the cluster is not created twice:\n{}", again.log());
    let client = outbox::pg::connect(&config).await.expect("reconnect");
    let row = client.query_one("SELECT note FROM kept", &[]).await.expect("the row survived");
    assert_eq!(row.get::<_, String>(0), "survives restarts");
    drop(client);

    let second_postmaster = postmaster_pid(&cluster_dir).expect("PostgreSQL runs again");
    again.signal(Signal::SIGTERM);
    assert!(again.wait(Duration::from_secs(60)).success(), "SIGTERM exits cleanly:\n{}", again.log());
    assert!(!process_alive(second_postmaster), "PostgreSQL was stopped on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_server_does_not_leave_postgres_behind() {
    let data_dir = scratch_dir("local-kill");
    let cluster_dir = data_dir.join("postgres");
    let envs = [("OUTBOX_DATA_DIR", data_dir.display().to_string())];
    let mut server = ServerProcess::start(&[], &envs);
    server.wait_ready(Duration::from_secs(60)).await;
    let postmaster = postmaster_pid(&cluster_dir).expect("the private PostgreSQL runs");

    server.signal(Signal::SIGKILL);
    server.wait(Duration::from_secs(10));
    let gone = poll_until(Duration::from_secs(30), || async { !process_alive(postmaster) }).await;
    assert!(gone, "PostgreSQL stops when the server that started it dies");

    let mut again = ServerProcess::start(&[], &envs);
    again.wait_ready(Duration::from_secs(60)).await;
    again.signal(Signal::SIGTERM);
    assert!(again.wait(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_database() {
    let postgres = common::dedicated_postgres("readyz");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.expect("create the database");
    let server = ServerProcess::start(&[], &[("DATABASE_URL", postgres.connection_string("app"))]);
    server.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(http().get(server.url("/healthz")).send().await.unwrap().status(), 200);

    let stopper = std::thread::scope(|s| s.spawn(|| postgres.stop()).join().unwrap());
    stopper.expect("stop PostgreSQL");
    let reason = std::sync::Mutex::new(String::new());
    let down = poll_until(Duration::from_secs(20), || async {
        let Ok(response) = http().get(server.url("/readyz")).send().await else { return false };
        if response.status() != 503 {
            return false;
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        *reason.lock().unwrap() = body["reason"].as_str().unwrap_or_default().to_owned();
        true
    })
    .await;
    let reason = reason.into_inner().unwrap();
    assert!(down, "/readyz turns 503 while the database is stopped");
    assert!(reason.contains("database"), "the 503 says why: {reason}");
    assert_eq!(
        http().get(server.url("/healthz")).send().await.unwrap().status(),
        200,
        "/healthz stays 200: the process runs"
    );

    std::thread::scope(|s| s.spawn(|| postgres.restart()).join().unwrap()).expect("start PostgreSQL again");
    server.wait_ready(Duration::from_secs(20)).await;
}

#[test]
fn bad_config_values_exit_non_zero_naming_the_setting() {
    for (name, value) in [
        ("OUTBOX_BATCH_MAX", "0"),
        ("OUTBOX_QUEUE_CAPACITY", "0"),
        ("OUTBOX_LISTEN", "not-an-address"),
        ("OUTBOX_LINGER_MS", "soon"),
        ("OUTBOX_ACK", "sometimes"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env(name, value)
            .env("OUTBOX_DATA_DIR", scratch_dir("bad-config"))
            .output()
            .expect("run outbox");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line for {name}={value}: {stderr}");
        assert!(stderr.contains(name), "the error names {name}: {stderr}");
        assert!(stderr.contains(value), "the error quotes the value: {stderr}");
    }
}

#[test]
fn help_lists_every_setting() {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox")).arg("--help").output().expect("run outbox --help");
    let help = String::from_utf8_lossy(&output.stdout);
    for name in [
        "DATABASE_URL",
        "OUTBOX_LISTEN",
        "OUTBOX_QUEUE_CAPACITY",
        "OUTBOX_BATCH_MAX",
        "OUTBOX_LINGER_MS",
        "OUTBOX_RETRY_MAX_DELAY_MS",
        "OUTBOX_DRAIN_TIMEOUT_S",
        "OUTBOX_ACK",
        "OUTBOX_DATA_DIR",
        "OUTBOX_ADMIN_TOKEN",
        "RUST_LOG",
        "OUTBOX_LOG_FORMAT",
    ] {
        assert!(help.contains(name), "--help lists {name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_command_applies_migrations_and_exits() {
    let db = fresh_db("migrate").await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("migrate")
        .env("DATABASE_URL", db.url())
        .env("OUTBOX_DATA_DIR", scratch_dir("migrate"))
        .output()
        .await
        .expect("run outbox migrate");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let client = db.connect().await;
    for history in ["outbox_schema_history", "reference_schema_history"] {
        let row = client
            .query_one(&format!("SELECT count(*) FROM {history}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{history} records the migrations: {e}"));
        assert!(row.get::<_, i64>(0) >= 1, "{history}");
    }
}

/// Both isolation tests write the same table name with their own marker and
/// wait (bounded) for each other, so that under a parallel test run they
/// overlap; each must see only its own row.
static ARRIVED: AtomicUsize = AtomicUsize::new(0);

async fn write_and_see_only_mine(marker: &str) {
    let db = fresh_db(marker).await;
    let client = db.connect().await;
    client
        .batch_execute(&format!("CREATE TABLE shared_name (marker text); INSERT INTO shared_name VALUES ('{marker}')"))
        .await
        .expect("write");
    ARRIVED.fetch_add(1, Ordering::SeqCst);
    poll_until(Duration::from_secs(5), || async { ARRIVED.load(Ordering::SeqCst) >= 2 }).await;
    let rows = client.query("SELECT marker FROM shared_name", &[]).await.expect("read");
    let markers: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(markers, vec![marker.to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_tests_do_not_see_each_other_a() {
    write_and_see_only_mine("alpha").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_tests_do_not_see_each_other_b() {
    write_and_see_only_mine("beta").await;
}
