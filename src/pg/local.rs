//! A private PostgreSQL server started from the machine's installed server
//! binaries, shared by `outbox serve` (when `DATABASE_URL` is
//! unset) and the test harness (a throwaway cluster per test binary).
//!
//! * Binaries: `postgres` and `initdb` on `PATH`, else the newest
//!   `/usr/lib/postgresql/*/bin`; when the cluster already exists, binaries of
//!   its major version are preferred.
//! * `initdb` runs once; later starts reuse the cluster, so data survives.
//! * The server listens on a unix socket inside its data folder (nothing on
//!   the network); when that path is too long for a socket, on a free
//!   loopback port instead.
//! * Running as root, PostgreSQL (which refuses root) runs as the `postgres`
//!   OS user, and the data folder is owned by that user.
//! * The postmaster is started in its own process group, so a Ctrl-C in the
//!   terminal reaches only outbox, which drains its queue before it stops
//!   PostgreSQL. It is started through `setpriv --pdeathsig`, so that if
//!   outbox dies without stopping it (a `kill -9`, or a test binary that
//!   exits), PostgreSQL gets a fast-shutdown signal instead of lingering.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User, chown};

/// The database superuser created by `initdb`; local connections trust it.
pub const SUPERUSER: &str = "postgres";

/// Unix socket paths longer than this do not fit `sockaddr_un` (108 bytes
/// including the `.s.PGSQL.<port>` file name and a terminating zero).
const MAX_SOCKET_DIR_LEN: usize = 90;

/// How long a starting PostgreSQL may take to accept connections. Crash
/// recovery after an unclean stop replays WAL, which can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a fast shutdown may take before the server is stopped harder.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for a previous postmaster on the same folder (one that
/// got its shutdown signal when its outbox died) to finish exiting.
const PREVIOUS_EXIT_WAIT: Duration = Duration::from_secs(30);

/// What can go wrong with the private PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked for `postgres` and `initdb` on PATH and in /usr/lib/postgresql/*/bin): install them (`apt-get install postgresql`) or set DATABASE_URL to an existing database"
    )]
    BinariesNotFound,
    /// Running as root needs the `postgres` OS user.
    #[error(
        "running as root, PostgreSQL must run as the `postgres` OS user, which does not exist: install PostgreSQL (`apt-get install postgresql`), run outbox as a normal user, or set DATABASE_URL"
    )]
    NoPostgresUser,
    /// The `postgres` OS user cannot reach the data folder.
    #[error(
        "the `postgres` OS user cannot reach {dir} ({blocking} is not searchable by it): set OUTBOX_DATA_DIR to a folder it can reach, or set DATABASE_URL"
    )]
    DataDirUnreachable {
        /// The cluster folder.
        dir: PathBuf,
        /// The ancestor that blocks it.
        blocking: PathBuf,
    },
    /// The folder exists but is not a PostgreSQL cluster.
    #[error("{0} exists and is not empty, but is not a PostgreSQL data folder (no PG_VERSION)")]
    NotACluster(PathBuf),
    /// Another postmaster is running on the folder.
    #[error(
        "PostgreSQL (pid {pid}) is already running on {dir}: another outbox may be using this data folder; stop it or choose another OUTBOX_DATA_DIR"
    )]
    AlreadyRunning {
        /// The folder.
        dir: PathBuf,
        /// The running postmaster.
        pid: i32,
    },
    /// `initdb` failed.
    #[error("initdb failed ({status}); its output is in {log}")]
    Initdb {
        /// Exit status.
        status: ExitStatus,
        /// Log file with its output.
        log: PathBuf,
    },
    /// The server did not come up.
    #[error("PostgreSQL did not start: {reason}; its log is {log}")]
    StartFailed {
        /// What was seen.
        reason: String,
        /// Log file.
        log: PathBuf,
    },
    /// The database could not be created.
    #[error("creating database {name}: {source}")]
    CreateDatabase {
        /// Its name.
        name: String,
        /// The cause.
        #[source]
        source: super::DbError,
    },
    /// A file-system or process error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LocalPostgresError {
    let context = context.into();
    move |source| LocalPostgresError::Io { context, source }
}

/// How to run the private server.
#[derive(Debug, Clone)]
pub struct LocalPostgresOptions {
    /// The cluster folder (`$OUTBOX_DATA_DIR/postgres` for the server).
    pub data_dir: PathBuf,
    /// `false` turns off fsync and synchronous commit: for throwaway test
    /// clusters only, never for data that matters.
    pub durable: bool,
    /// Extra `-c name=value` server settings.
    pub settings: Vec<(String, String)>,
    /// Connect to a server already running on this folder (a serving
    /// outbox's) instead of waiting for it to stop; such a server is not
    /// stopped by this handle. For one-off commands (`migrate`,
    /// `dead-letters`).
    pub reuse_running: bool,
}

impl LocalPostgresOptions {
    /// Durable defaults for a cluster in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: data_dir.into(), durable: true, settings: Vec::new(), reuse_running: false }
    }
}

/// Where clients reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Socket { dir: PathBuf, port: u16 },
    Tcp { port: u16 },
}

/// A running postmaster and the thread that waits on it.
#[derive(Debug)]
struct Postmaster {
    pid: Pid,
    exited: mpsc::Receiver<io::Result<ExitStatus>>,
}

/// A private PostgreSQL server. Dropping it stops the server.
#[derive(Debug)]
pub struct LocalPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    log_path: PathBuf,
    run_as: Option<(Uid, Gid)>,
    endpoint: Endpoint,
    options: LocalPostgresOptions,
    /// `std::sync::Mutex`: only taken by the blocking start/stop calls.
    postmaster: Mutex<Option<Postmaster>>,
}

impl LocalPostgres {
    /// Finds the binaries, creates the cluster on first use, starts the
    /// server and waits until it accepts connections. Blocking: call it from
    /// `spawn_blocking` inside a runtime.
    pub fn start(options: LocalPostgresOptions) -> Result<Self, LocalPostgresError> {
        let data_dir = absolute(&options.data_dir)?;
        let run_as = postgres_identity()?;
        let existing_major = fs::read_to_string(data_dir.join("PG_VERSION")).ok().map(|v| v.trim().to_owned());
        let bin_dir = find_binaries(existing_major.as_deref())?;
        let parent = data_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
        let log_path =
            parent.join(format!("{}.log", data_dir.file_name().and_then(|n| n.to_str()).unwrap_or("postgres")));
        if let Some((uid, _)) = run_as {
            check_reachable(&data_dir, uid)?;
        }

        if options.reuse_running
            && let Some(endpoint) = running_endpoint(&data_dir)
        {
            tracing::info!(dir = %data_dir.display(), "using the PostgreSQL already running on this folder");
            return Ok(Self { data_dir, bin_dir, log_path, run_as, endpoint, options, postmaster: Mutex::new(None) });
        }
        let endpoint = if data_dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
            Endpoint::Socket { dir: data_dir.clone(), port: 5432 }
        } else {
            Endpoint::Tcp { port: free_loopback_port()? }
        };
        let server = Self { data_dir, bin_dir, log_path, run_as, endpoint, options, postmaster: Mutex::new(None) };
        if existing_major.is_none() {
            server.initdb()?;
        }
        server.start_postmaster()?;
        Ok(server)
    }

    /// One call for an example or a small service: starts (creating it on
    /// first use) a durable private server in `data_dir`, creates database
    /// `dbname` in it when missing, and returns the server (dropping it
    /// stops the server) with the settings to connect to that database.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let (_postgres, config) = outbox::pg::LocalPostgres::open(".data/postgres", "bank").await?;
    /// let pool = outbox::pg::pool(config, 4);
    /// # Ok(()) }
    /// ```
    pub async fn open(
        data_dir: impl Into<PathBuf>,
        dbname: &str,
    ) -> Result<(Self, tokio_postgres::Config), LocalPostgresError> {
        let options = LocalPostgresOptions::new(data_dir);
        let server = tokio::task::spawn_blocking(move || Self::start(options)).await.map_err(|e| {
            LocalPostgresError::Io { context: "starting PostgreSQL".into(), source: io::Error::other(e) }
        })??;
        super::create_database_if_missing(&server.config("postgres"), dbname)
            .await
            .map_err(|source| LocalPostgresError::CreateDatabase { name: dbname.to_owned(), source })?;
        let config = server.config(dbname);
        Ok((server, config))
    }

    /// The cluster folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.lock().as_ref().map(|p| p.pid.as_raw())
    }

    /// Connection settings for database `dbname` as the superuser.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.user(SUPERUSER).dbname(dbname).application_name("outbox");
        match &self.endpoint {
            Endpoint::Socket { dir, port } => config.host_path(dir).port(*port),
            Endpoint::Tcp { port } => config.host("127.0.0.1").port(*port),
        };
        config
    }

    /// A `key=value` connection string for database `dbname`, usable as
    /// `DATABASE_URL` by another process.
    pub fn connection_string(&self, dbname: &str) -> String {
        match &self.endpoint {
            Endpoint::Socket { dir, port } => {
                format!("host={} port={port} user={SUPERUSER} dbname={dbname}", dir.display())
            }
            Endpoint::Tcp { port } => {
                format!("host=127.0.0.1 port={port} user={SUPERUSER} dbname={dbname}")
            }
        }
    }

    /// Stops the server (fast shutdown: open sessions are ended, a
    /// checkpoint is written) and waits until it has exited. Idempotent.
    pub fn stop(&self) -> Result<(), LocalPostgresError> {
        let Some(postmaster) = self.lock().take() else {
            return Ok(());
        };
        tracing::info!(pid = postmaster.pid.as_raw(), "stopping PostgreSQL");
        for (signal, wait) in [
            (Signal::SIGINT, STOP_TIMEOUT),
            (Signal::SIGQUIT, Duration::from_secs(10)),
            (Signal::SIGKILL, Duration::from_secs(10)),
        ] {
            // An error means the process is already gone; the wait below sees it.
            let _ = kill(postmaster.pid, signal);
            match postmaster.exited.recv_timeout(wait) {
                Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    tracing::info!(pid = postmaster.pid.as_raw(), "PostgreSQL stopped");
                    return Ok(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        pid = postmaster.pid.as_raw(),
                        ?signal,
                        "PostgreSQL did not stop in time; signalling harder"
                    );
                }
            }
        }
        Err(LocalPostgresError::Io {
            context: format!("stopping PostgreSQL (pid {})", postmaster.pid),
            source: io::Error::new(io::ErrorKind::TimedOut, "it ignored SIGKILL"),
        })
    }

    /// Starts the server again after [`stop`](Self::stop), on the same data.
    pub fn restart(&self) -> Result<(), LocalPostgresError> {
        self.stop()?;
        self.start_postmaster()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Postmaster>> {
        self.postmaster.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn command(&self, program: &str) -> Command {
        self.command_for(&self.bin_dir.join(program))
    }

    /// A command run as PostgreSQL's OS user, from `/` (the caller's folder
    /// may not be readable by that user).
    fn command_for(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.current_dir("/").env_remove("PGDATA").env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        command
    }

    fn log_file(&self) -> Result<File, LocalPostgresError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(format!("opening {}", self.log_path.display())))
    }

    fn initdb(&self) -> Result<(), LocalPostgresError> {
        let dir = &self.data_dir;
        if dir.exists() {
            let empty = fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?.next().is_none();
            if !empty {
                return Err(LocalPostgresError::NotACluster(dir.clone()));
            }
        } else {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("setting permissions of {}", dir.display())))?;
        if let Some((uid, gid)) = self.run_as {
            chown(dir, Some(uid), Some(gid)).map_err(|e| LocalPostgresError::Io {
                context: format!("giving {} to the postgres user", dir.display()),
                source: e.into(),
            })?;
        }
        tracing::info!(dir = %dir.display(), bin = %self.bin_dir.display(), "creating PostgreSQL cluster (initdb)");
        let log = self.log_file()?;
        let mut command = self.command("initdb");
        command
            .arg("--pgdata")
            .arg(dir)
            .args(["--username", SUPERUSER, "--auth", "trust", "--encoding", "UTF8", "--locale", "C"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("duplicating the log file"))?)
            .stderr(log);
        if !self.options.durable {
            command.arg("--no-sync");
        }
        let status = command.status().map_err(io_err("running initdb"))?;
        if !status.success() {
            return Err(LocalPostgresError::Initdb { status, log: self.log_path.clone() });
        }
        Ok(())
    }

    /// The `-c` settings of the postmaster: where it listens, durability,
    /// and the caller's own.
    fn server_settings(&self) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = match &self.endpoint {
            Endpoint::Socket { dir, port } => vec![
                ("listen_addresses".into(), String::new()),
                ("unix_socket_directories".into(), dir.display().to_string()),
                ("port".into(), port.to_string()),
            ],
            Endpoint::Tcp { port } => vec![
                ("listen_addresses".into(), "127.0.0.1".into()),
                ("unix_socket_directories".into(), String::new()),
                ("port".into(), port.to_string()),
            ],
        };
        if !self.options.durable {
            settings.push(("fsync".into(), "off".into()));
            settings.push(("synchronous_commit".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(self.options.settings.iter().cloned());
        settings
    }

    fn start_postmaster(&self) -> Result<(), LocalPostgresError> {
        let mut guard = self.lock();
        if guard.is_some() {
            return Ok(());
        }
        self.wait_for_previous_postmaster()?;

        let settings = self.server_settings();
        let log = self.log_file()?;
        let postgres = self.bin_dir.join("postgres");
        let mut command = match which("setpriv") {
            // The uid switch (in `command`) happens before setpriv runs, so
            // the parent-death signal it sets survives: a credential change
            // would clear it.
            Some(setpriv) => {
                let mut command = self.command_for(&setpriv);
                command.args(["--pdeathsig", "INT", "--"]).arg(&postgres);
                command
            }
            None => {
                tracing::warn!("setpriv not found: PostgreSQL will outlive outbox if outbox is killed");
                self.command_for(&postgres)
            }
        };
        command.arg("-D").arg(&self.data_dir);
        for (name, value) in &settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("duplicating the log file"))?)
            .stderr(log);

        // The child is spawned from a thread that lives exactly as long as the
        // postmaster, because the parent-death signal follows the thread that
        // forked it, not the process.
        let (started_tx, started_rx) = mpsc::channel();
        let (exited_tx, exited_rx) = mpsc::channel();
        thread::Builder::new()
            .name("postgres-supervisor".into())
            .spawn(move || match command.spawn() {
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
                Ok(mut child) => {
                    let _ = started_tx.send(Ok(child.id()));
                    let _ = exited_tx.send(child.wait());
                }
            })
            .map_err(io_err("starting the PostgreSQL supervisor thread"))?;
        let pid = started_rx
            .recv()
            .map_err(|_| LocalPostgresError::StartFailed {
                reason: "the supervisor thread ended".into(),
                log: self.log_path.clone(),
            })?
            .map_err(io_err(format!("starting {}", postgres.display())))?;
        let pid = Pid::from_raw(pid as i32);
        let postmaster = Postmaster { pid, exited: exited_rx };
        self.wait_until_ready(&postmaster)?;
        tracing::info!(pid = pid.as_raw(), dir = %self.data_dir.display(), "PostgreSQL is ready");
        *guard = Some(postmaster);
        Ok(())
    }

    fn wait_until_ready(&self, postmaster: &Postmaster) -> Result<(), LocalPostgresError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            match postmaster.exited.try_recv() {
                Ok(status) => {
                    let reason = match status {
                        Ok(status) => format!("it exited ({status})"),
                        Err(e) => format!("waiting on it failed: {e}"),
                    };
                    return Err(LocalPostgresError::StartFailed { reason, log: self.log_path.clone() });
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(LocalPostgresError::StartFailed {
                        reason: "its supervisor thread ended".into(),
                        log: self.log_path.clone(),
                    });
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if let Ok(contents) = fs::read_to_string(&pid_file) {
                let mut lines = contents.lines();
                let owner = lines.next().and_then(|l| l.trim().parse::<i32>().ok());
                // Line 8 of postmaster.pid is the postmaster's status.
                let status = contents.lines().nth(7).map(str::trim);
                if owner == Some(postmaster.pid.as_raw()) && status == Some("ready") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = kill(postmaster.pid, Signal::SIGQUIT);
                return Err(LocalPostgresError::StartFailed {
                    reason: format!("not ready after {} s", START_TIMEOUT.as_secs()),
                    log: self.log_path.clone(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A postmaster left by an outbox that died is shutting down (it got
    /// its parent-death signal); give it time to finish before starting.
    fn wait_for_previous_postmaster(&self) -> Result<(), LocalPostgresError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let deadline = Instant::now() + PREVIOUS_EXIT_WAIT;
        let mut logged = false;
        loop {
            let Some(pid) = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|c| c.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            else {
                return Ok(());
            };
            // Signal 0 checks that the process exists. A stale file whose
            // process is gone is cleaned up by PostgreSQL itself.
            if kill(Pid::from_raw(pid), None).is_err() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalPostgresError::AlreadyRunning { dir: self.data_dir.clone(), pid });
            }
            if !logged {
                tracing::info!(pid, "waiting for a previous PostgreSQL on this data folder to exit");
                logged = true;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "could not stop PostgreSQL");
        }
    }
}

/// Where a postmaster running (and ready) on `data_dir` listens, from its
/// `postmaster.pid` (line 4: port, 5: socket folder, 6: listen address, 8:
/// status).
fn running_endpoint(data_dir: &Path) -> Option<Endpoint> {
    let contents = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = contents.lines().map(str::trim).collect();
    let pid = lines.first()?.parse::<i32>().ok()?;
    if kill(Pid::from_raw(pid), None).is_err() || lines.get(7) != Some(&"ready") {
        return None;
    }
    let port = lines.get(3)?.parse::<u16>().ok()?;
    match lines.get(4).filter(|dir| !dir.is_empty()) {
        Some(dir) => Some(Endpoint::Socket { dir: PathBuf::from(dir), port }),
        None => Some(Endpoint::Tcp { port }),
    }
}

/// The OS identity PostgreSQL runs as: `None` to run as ourselves, the
/// `postgres` user when we are root.
fn postgres_identity() -> Result<Option<(Uid, Gid)>, LocalPostgresError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name(SUPERUSER) {
        Ok(Some(user)) => Ok(Some((user.uid, user.gid))),
        Ok(None) => Err(LocalPostgresError::NoPostgresUser),
        Err(e) => Err(LocalPostgresError::Io { context: "looking up the postgres user".into(), source: e.into() }),
    }
}

/// Every existing ancestor of `dir` must be searchable by `uid` (as owner or
/// as "other"; group membership is not assumed).
fn check_reachable(dir: &Path, uid: Uid) -> Result<(), LocalPostgresError> {
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(ancestor) else { continue };
        let mode = meta.mode();
        let searchable = if meta.uid() == uid.as_raw() { mode & 0o100 != 0 } else { mode & 0o001 != 0 };
        if !searchable {
            return Err(LocalPostgresError::DataDirUnreachable {
                dir: dir.to_path_buf(),
                blocking: ancestor.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf, LocalPostgresError> {
    std::path::absolute(path).map_err(io_err(format!("resolving {}", path.display())))
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_file() && m.mode() & 0o111 != 0).unwrap_or(false)
}

/// The major version a `postgres` binary reports (`postgres (PostgreSQL) 15.18 ...`).
fn major_version(bin_dir: &Path) -> Option<String> {
    let output = Command::new(bin_dir.join("postgres")).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    Some(version.split('.').next()?.to_owned())
}

/// Candidate binary folders, in order of preference: `PATH` first, then
/// `/usr/lib/postgresql/*/bin`, newest first.
fn candidate_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if is_executable(&dir.join("postgres")) && is_executable(&dir.join("initdb")) {
                // Resolve symlinked wrappers to the real folder.
                let real = fs::canonicalize(dir.join("postgres"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| is_executable(&d.join("initdb")))
                    .unwrap_or(dir);
                dirs.push(real);
            }
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (is_executable(&bin.join("postgres")) && is_executable(&bin.join("initdb"))).then_some((version, bin))
        })
        .collect();
    versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    dirs.extend(versioned.into_iter().map(|(_, bin)| bin));
    dirs.dedup();
    dirs
}

/// The folder holding `postgres` and `initdb`; binaries of the cluster's
/// own major version win when the cluster exists.
pub fn find_binaries(cluster_major: Option<&str>) -> Result<PathBuf, LocalPostgresError> {
    let candidates = candidate_bin_dirs();
    if let Some(major) = cluster_major
        && let Some(dir) = candidates.iter().find(|d| major_version(d).as_deref() == Some(major))
    {
        return Ok(dir.clone());
    }
    candidates.into_iter().next().ok_or(LocalPostgresError::BinariesNotFound)
}

fn free_loopback_port() -> Result<u16, LocalPostgresError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(io_err("finding a free loopback port"))?;
    Ok(listener.local_addr().map_err(io_err("finding a free loopback port"))?.port())
}
