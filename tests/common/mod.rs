//! Test harness shared by the integration tests: a throwaway PostgreSQL
//! cluster per test binary (fsync off), a fresh database per test, and a
//! handle on the real `outbox` binary.
//!
//! With `DATABASE_URL` set, tests create their databases there instead of in
//! a private cluster.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use outbox::pg::{self, LocalPostgres, LocalPostgresOptions};

/// The cluster every test of this binary shares.
pub struct Cluster {
    local: Option<LocalPostgres>,
    admin: tokio_postgres::Config,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Where this user's test clusters live. Stale folders of test binaries that
/// are gone are removed when the next one starts.
fn scratch_root() -> PathBuf {
    let root = std::env::temp_dir().join(format!("outbox-tests-{}", nix::unistd::getuid()));
    std::fs::create_dir_all(&root).expect("create the scratch root");
    // The postgres OS user (when tests run as root) must reach folders below.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("open the scratch root");
    root
}

fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if kill(Pid::from_raw(pid), None).is_ok() {
            continue; // its test binary still runs
        }
        let postmaster_alive = std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("postmaster.pid")).ok())
            .filter_map(|c| c.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .any(|pid| kill(Pid::from_raw(pid), None).is_ok());
        if !postmaster_alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh folder for this test binary, reachable by the postgres OS user.
pub fn scratch_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let root = scratch_root();
    let dir = root.join(format!("{}-{label}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("create a scratch folder");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("open the scratch folder");
    dir
}

/// A private, non-durable PostgreSQL in its own folder, for tests that stop
/// and start the database.
pub fn dedicated_postgres(label: &str) -> LocalPostgres {
    let mut options = LocalPostgresOptions::new(scratch_dir(label).join("pg"));
    options.durable = false;
    LocalPostgres::start(options).expect("start a dedicated PostgreSQL")
}

/// The shared cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let admin = pg::parse_url(&url).expect("DATABASE_URL parses");
            return Cluster { local: None, admin };
        }
        remove_stale(&scratch_root());
        let mut options = LocalPostgresOptions::new(scratch_dir("cluster").join("pg"));
        options.durable = false;
        options.settings.push(("max_connections".into(), "300".into()));
        let local = LocalPostgres::start(options).expect("start the test cluster");
        let admin = local.config("postgres");
        Cluster { local: Some(local), admin }
    })
}

/// A database of its own for one test.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// How to connect to it.
    pub config: tokio_postgres::Config,
}

impl TestDb {
    /// A `DATABASE_URL` value for a server process.
    pub fn url(&self) -> String {
        match &cluster().local {
            Some(local) => local.connection_string(&self.name),
            None => {
                let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set");
                replace_dbname(&base, &self.name)
            }
        }
    }

    /// One connection to it.
    pub async fn connect(&self) -> tokio_postgres::Client {
        pg::connect(&self.config).await.expect("connect to the test database")
    }
}

fn replace_dbname(url: &str, dbname: &str) -> String {
    if url.contains("://") {
        let (head, query) = url.split_once('?').map_or((url, None), |(h, q)| (h, Some(q)));
        let base = match head.rfind('/') {
            Some(i) if i > head.find("://").unwrap_or(0) + 2 => &head[..i],
            _ => head,
        };
        match query {
            Some(q) => format!("{base}/{dbname}?{q}"),
            None => format!("{base}/{dbname}"),
        }
    } else {
        format!("{url} dbname={dbname}")
    }
}

/// Creates a fresh database for one test; `label` makes it easy to find.
pub async fn fresh_db(label: &str) -> TestDb {
    let cluster = cluster();
    let name = format!(
        "t_{}_{}_{}",
        label.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin = pg::connect(&cluster.admin).await.expect("connect to the test cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", pg::quote_ident(&name)))
        .await
        .expect("create the test database");
    let mut config = cluster.admin.clone();
    config.dbname(&name);
    TestDb { name, config }
}

/// The real `outbox` binary, running.
pub struct ServerProcess {
    child: Child,
    /// Where it listens.
    pub addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

/// How long a server may take to print its listen address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

impl ServerProcess {
    /// Starts `outbox` with `args` and `envs` (on a free loopback port,
    /// text logs), and waits until it prints its address.
    pub fn start(args: &[&str], envs: &[(&str, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env("OUTBOX_LISTEN", "127.0.0.1:0")
            .env("OUTBOX_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the outbox binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                        let _ = addr_tx.send(addr);
                    }
                    if std::env::var_os("OUTBOX_TEST_ECHO").is_some() {
                        eprintln!("[outbox] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let addr = match addr_rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("outbox did not start listening; its log:\n{}", lines.lock().unwrap().join("\n"));
            }
        };
        Self { child, addr, lines }
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends `body` as JSON to `path` with `method` and returns the
    /// answer's JSON body.
    pub async fn send_json(&self, method: reqwest::Method, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let answer = http().request(method, self.url(path)).json(body).send().await.expect("send the request");
        answer.json().await.expect("a JSON answer")
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the server");
    }

    /// Waits (bounded) for it to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("outbox did not exit within {timeout:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `/readyz` until it answers 200 (bounded).
    pub async fn wait_ready(&self, timeout: Duration) {
        let ok = poll_until(timeout, || async {
            matches!(http().get(self.url("/readyz")).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(ok, "outbox was not ready within {timeout:?}; its log:\n{}", self.log());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP client with a short timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("build the HTTP client")
}

/// Calls `check` every 100 ms until it is true or `timeout` passes.
pub async fn poll_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a process with this id exists.
pub fn process_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// The postmaster pid recorded in a cluster folder, if it runs.
pub fn postmaster_pid(cluster_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(cluster_dir.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

impl ServerProcess {
    /// Its exit status if it has exited; never blocks (for callers that
    /// bound the wait themselves and report a hang in their own words).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll the server")
    }
}

/// A private, non-durable PostgreSQL that listens on a loopback TCP port
/// (for tests that put something between a server and the database).
/// `LocalPostgres` chooses TCP by itself when its folder's path is too long
/// for a unix socket (see `pg/local.rs`); a long folder name gets that.
pub fn dedicated_postgres_tcp(label: &str) -> LocalPostgres {
    let mut options = LocalPostgresOptions::new(scratch_dir(label).join(format!("pg-over-tcp-{}", "x".repeat(100))));
    options.durable = false;
    let local = LocalPostgres::start(options).expect("start a dedicated PostgreSQL on TCP");
    assert!(
        local.connection_string("postgres").contains("host=127.0.0.1"),
        "the dedicated PostgreSQL listens on loopback TCP: {}",
        local.connection_string("postgres")
    );
    local
}

/// The loopback TCP address a PostgreSQL configuration points to.
pub fn tcp_address(config: &tokio_postgres::Config) -> std::net::SocketAddr {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => {
            format!("{host}:{port}").parse().expect("a numeric loopback address")
        }
        other => panic!("not a TCP endpoint: {other:?}"),
    }
}

/// A TCP proxy on 127.0.0.1 that forwards to `target` both ways, with a
/// switch that stops forwarding while keeping both sockets open: a black
/// hole, like a cut network link (no reset, no FIN; keepalives are answered
/// by the proxy's own sockets). Bytes read while cut are held, not dropped,
/// and are delivered once forwarding is restored, as TCP retransmission
/// would after a partition heals. Connections accepted while cut reach the
/// target only once restored.
pub struct BlackHoleProxy {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
}

impl BlackHoleProxy {
    /// Starts forwarding to `target` (call inside a tokio runtime).
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (open, _) = tokio::sync::watch::channel(true);
        let stop = tokio_util::sync::CancellationToken::new();
        let (switch, cancel) = (open.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = cancel.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                let (switch, cancel) = (switch.subscribe(), cancel.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = proxy_connection(inbound, target, switch) => {}
                    }
                });
            }
        });
        Self { addr, open, stop }
    }

    /// Stops forwarding; both sockets of every connection stay open.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards again, held bytes first.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn proxy_connection(
    inbound: tokio::net::TcpStream,
    target: std::net::SocketAddr,
    mut open: tokio::sync::watch::Receiver<bool>,
) {
    if open.wait_for(|o| *o).await.is_err() {
        return;
    }
    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(pump(in_read, out_write, open.clone()), pump(out_read, in_write, open));
}

/// Copies one direction, holding whatever it has read while the switch is
/// off.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let n = from.read(&mut buffer).await.unwrap_or(0);
        // An end of stream is held like data: a cut link carries no FIN.
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Every live item in memory (paged through the API): dfid → (version, item).
pub async fn memory_items(server: &ServerProcess) -> std::collections::BTreeMap<String, (i64, serde_json::Value)> {
    let mut out = std::collections::BTreeMap::new();
    let mut path = "/api/items?limit=1000".to_owned();
    loop {
        let page: serde_json::Value = http().get(server.url(&path)).send().await.unwrap().json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            let mut data = item.clone();
            let version = data.as_object_mut().unwrap().remove("version").unwrap().as_i64().unwrap();
            out.insert(item["dfid"].as_str().unwrap().to_owned(), (version, data));
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/api/items?limit=1000&after={next}"),
            None => return out,
        }
    }
}

/// Every live item in the database: dfid → (version, item).
pub async fn database_items(
    client: &tokio_postgres::Client,
) -> std::collections::BTreeMap<String, (i64, serde_json::Value)> {
    client
        .query("SELECT id, version, data FROM items WHERE NOT deleted", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get::<_, i64>(1), r.get::<_, serde_json::Value>(2))))
        .collect()
}
