//! A randomized, model-based fault test in the spirit of Jepsen and of
//! FoundationDB's simulation: the real `outbox` binary against a real,
//! private PostgreSQL, driven by one seeded random sequence of operations
//! and faults, checked against a model of what the client was told.
//!
//! * **Operations** (each `Prefer: durable` about half of the time): create
//!   an item, create a batch of 2–5 tagged items (one change set), enrich
//!   (sometimes with a `poison` key the fault constraint refuses, sometimes
//!   curing it), deprecate, delete, create a circuit, add an item to a
//!   circuit, merge two active items.
//! * **Faults**: stop PostgreSQL and start it a few steps later; freeze it
//!   (SIGSTOP of this cluster's postmaster and its children) and thaw it a
//!   few steps later; add or drop a CHECK constraint refusing poisoned items
//!   (change sets are then quarantined); SIGTERM the server (it drains, or
//!   spills when the database is away) and start it again; `kill -9` it and
//!   start it again; replay or discard a random dead letter.
//! * **Invariants**, checked after every step while the database is up
//!   (read directly, in one repeatable-read snapshot): (1) a durably
//!   acknowledged version is never lost nor overwritten by an older one, a
//!   durable delete or merge stays; (2) the database never holds part of a
//!   change set: batches are all there or not at all, circuits and items
//!   agree, a merged item's target exists and holds its identifiers;
//!   (3) per entity, the database's version never decreases and rows never
//!   vanish; (4) a tombstone never comes back (not in the database, not in
//!   memory); (5) at checkpoints (every 20 steps, after every server restart
//!   and at the end), once drained, memory equals the database for every
//!   item and known circuit outside unresolved quarantined sets; (6) a
//!   SIGTERM ends within seconds whatever the database does, and keeps
//!   everything acknowledged, durable or not (memory after the restart
//!   equals memory before it); with the database up it exits cleanly.
//!
//! Traffic goes to loopback only; the test stops only the processes it
//! started (the server, its PostgreSQL cluster and that cluster's children
//! when freezing); every wait is bounded and the run ends by itself.
//!
//! Reproduce a run with the seed it prints (in the first line and in every
//! failure): `OUTBOX_FAULT_SEED=1234 cargo test --test faults -- --nocapture`.
//! The seed fixes every random choice; what the server answers depends on
//! timing too, so a replay follows the same path as long as the answers are
//! the same. `OUTBOX_FAULT_STEPS=N` stops after N steps (a failure message
//! names its step), `OUTBOX_FAULT_VERBOSE=1` prints every step.
//!
//! Length: `OUTBOX_FAULT_SECONDS` (default 60). Soak:
//! `OUTBOX_FAULT_SECONDS=1200 cargo test --release --test faults -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{ServerProcess, dedicated_postgres, poll_until, scratch_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use outbox::pg::LocalPostgres;
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "faults-admin-token";
/// A full memory-versus-database comparison every this many steps.
const CHECKPOINT_EVERY: u64 = 20;
/// Percent of steps that inject a fault rather than an operation.
const FAULT_PERCENT: u64 = 7;
/// How long a checkpoint waits for the outbox to drain with the database up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a (re)started server may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signalled server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on every direct database call of the test.
const DB_TIMEOUT: Duration = Duration::from_secs(15);
/// Steps kept for the failure report.
const RECENT_STEPS: usize = 60;
/// The CHECK constraint the constraint fault adds and drops.
const ADD_CONSTRAINT: &str = "ALTER TABLE items ADD CONSTRAINT fault_poison \
     CHECK (coalesce(data->'enriched_data'->>'poison', '') <> 'yes') NOT VALID";
const DROP_CONSTRAINT: &str = "ALTER TABLE items DROP CONSTRAINT IF EXISTS fault_poison";

#[tokio::test(flavor = "multi_thread")]
async fn random_operations_and_faults_keep_every_invariant() {
    let settings = Settings::from_env();
    let steps = match settings.max_steps {
        u64::MAX => "no step limit".to_owned(),
        n => format!("{n} steps at most"),
    };
    println!(
        "faults: seed {seed} ({} s, {steps}); rerun with OUTBOX_FAULT_SEED={seed}",
        settings.seconds,
        seed = settings.seed
    );
    let started = Instant::now();
    let mut world = World::start(settings).await;
    while started.elapsed() < Duration::from_secs(world.settings.seconds) && world.step < world.settings.max_steps {
        world.step().await;
    }
    world.finish().await;
    println!("{}", world.summary(started.elapsed()));
}

// ---------------------------------------------------------------------------
// Settings and randomness
// ---------------------------------------------------------------------------

struct Settings {
    seed: u64,
    seconds: u64,
    max_steps: u64,
    verbose: bool,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str| {
            std::env::var(name).ok().map(|v| v.trim().parse::<u64>().unwrap_or_else(|_| panic!("{name}={v}: a number")))
        };
        let fresh_seed = || {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970");
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        };
        Self {
            seed: number("OUTBOX_FAULT_SEED").unwrap_or_else(fresh_seed),
            seconds: number("OUTBOX_FAULT_SECONDS").unwrap_or(60),
            max_steps: number("OUTBOX_FAULT_STEPS").unwrap_or(u64::MAX),
            verbose: std::env::var_os("OUTBOX_FAULT_VERBOSE").is_some(),
        }
    }
}

/// SplitMix64: tiny, fast and fully determined by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    fn weighted<T: Copy>(&mut self, choices: &[(T, u64)]) -> T {
        let total: u64 = choices.iter().map(|(_, w)| w).sum();
        let mut roll = self.next() % total;
        for (choice, weight) in choices {
            if roll < *weight {
                return *choice;
            }
            roll -= weight;
        }
        unreachable!("the roll is below the total weight")
    }
}

// ---------------------------------------------------------------------------
// The model: what the client was told
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Item,
    Circuit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Active,
    Deprecated,
    Merged,
}

impl Status {
    fn of(item: &Value) -> Option<Self> {
        match item["status"].as_str()? {
            "active" => Some(Self::Active),
            "deprecated" => Some(Self::Deprecated),
            "merged" => Some(Self::Merged),
            _ => None,
        }
    }
}

/// A batch create: its tag, its size, and its items when the answer showed
/// them (a batch answered 422/504 is in memory but its DFIDs are unknown).
struct Batch {
    tag: String,
    size: usize,
    ids: Option<Vec<String>>,
}

#[derive(Default)]
struct Model {
    /// Items the client believes exist, in creation order (a deterministic
    /// order to pick from), with their last known status.
    items: Vec<(String, Status)>,
    circuits: Vec<String>,
    batches: Vec<Batch>,
    counter: u64,
    /// The highest version acknowledged durably per entity.
    acked: BTreeMap<(Kind, String), i64>,
    durably_deleted: BTreeSet<String>,
    /// Source → target of durably acknowledged merges.
    durably_merged: BTreeMap<String, String>,
    /// The database's version per entity at the last check.
    db_versions: BTreeMap<(Kind, String), i64>,
    /// Items seen deleted in the database.
    db_deleted: BTreeSet<String>,
}

impl Model {
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn pick_item(&self, rng: &mut Rng, only: Option<Status>) -> Option<String> {
        let candidates: Vec<&String> =
            self.items.iter().filter(|(_, s)| only.is_none_or(|o| *s == o)).map(|(id, _)| id).collect();
        (!candidates.is_empty()).then(|| candidates[rng.below(candidates.len())].clone())
    }

    fn add_item(&mut self, item: &Value) {
        if let (Some(id), Some(status)) = (item["dfid"].as_str(), Status::of(item)) {
            self.items.push((id.to_owned(), status));
        }
    }

    fn set_status(&mut self, id: &str, status: Status) {
        if let Some(entry) = self.items.iter_mut().find(|(i, _)| i == id) {
            entry.1 = status;
        }
    }

    fn forget_item(&mut self, id: &str) {
        self.items.retain(|(i, _)| i != id);
    }

    /// Records what a `Preference-Applied: durable` answer showed.
    fn acknowledge(&mut self, kind: Kind, entity: &Value) -> bool {
        let id_field = if kind == Kind::Item { "dfid" } else { "id" };
        let (Some(id), Some(version)) = (entity[id_field].as_str(), entity["version"].as_i64()) else {
            return false;
        };
        let acked = self.acked.entry((kind, id.to_owned())).or_insert(version);
        *acked = (*acked).max(version);
        true
    }
}

#[derive(Default)]
struct Stats {
    operations: BTreeMap<&'static str, u64>,
    faults: BTreeMap<&'static str, u64>,
    answers: BTreeMap<u16, u64>,
    durable_acks: u64,
    checks: u64,
    acks_checked: u64,
    checkpoints: u64,
    full_compares: u64,
    items_compared: u64,
    dead_letters_seen: u64,
    /// SIGTERMs that ended non-zero: the drain spilled.
    spilled_shutdowns: u64,
}

// ---------------------------------------------------------------------------
// The system under test
// ---------------------------------------------------------------------------

/// Where the database stands.
enum Database {
    Up,
    /// Stopped; started again at step `until`.
    Down {
        until: u64,
    },
    /// Every process of the cluster got SIGSTOP; SIGCONT at step `until`.
    Frozen {
        until: u64,
        pids: Vec<i32>,
    },
}

/// An HTTP answer, read whole.
struct Answer {
    status: u16,
    durable: bool,
    body: Value,
}

impl Answer {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn durably_ok(&self) -> bool {
        self.ok() && self.durable
    }
}

/// One row of an entity table as the checks need it.
struct Row {
    version: i64,
    deleted: bool,
    status: Option<String>,
    merged_into: Option<String>,
}

/// What one repeatable-read snapshot of the database shows.
struct Snapshot {
    items: BTreeMap<String, Row>,
    circuits: BTreeMap<String, Row>,
    /// Live rows per batch tag.
    tags: BTreeMap<String, i64>,
    /// Broken circuit/item links and broken merges, described.
    broken: Vec<String>,
}

struct World {
    settings: Settings,
    rng: Rng,
    // The server is declared before PostgreSQL so it is dropped first.
    server: Option<ServerProcess>,
    pg: LocalPostgres,
    url: String,
    data_dir: PathBuf,
    database: Database,
    constraint: bool,
    client: Option<tokio_postgres::Client>,
    http: reqwest::Client,
    model: Model,
    stats: Stats,
    recent: VecDeque<String>,
    /// The last lines of servers that were stopped, for failure reports.
    previous_log: String,
    /// Set when the server was restarted during this step.
    restarted: bool,
    step: u64,
}

impl Drop for World {
    /// A frozen cluster ignores the fast-shutdown signal the
    /// `LocalPostgres` drop sends: thaw it first (also when a check panics).
    fn drop(&mut self) {
        if let Database::Frozen { pids, .. } = &self.database {
            thaw(pids);
        }
    }
}

impl World {
    async fn start(settings: Settings) -> Self {
        let pg = tokio::task::block_in_place(|| dedicated_postgres("faults"));
        outbox::pg::create_database_if_missing(&pg.config("postgres"), "app").await.expect("create database app");
        let url = pg.connection_string("app");
        let rng = Rng(settings.seed);
        let mut world = Self {
            settings,
            rng,
            server: None,
            pg,
            url,
            data_dir: scratch_dir("faults"),
            database: Database::Up,
            constraint: false,
            client: None,
            http: common::http(),
            model: Model::default(),
            stats: Stats::default(),
            recent: VecDeque::new(),
            previous_log: String::new(),
            restarted: false,
            step: 0,
        };
        world.start_server().await;
        world
    }

    async fn start_server(&mut self) {
        let envs = [
            ("DATABASE_URL", self.url.clone()),
            ("OUTBOX_DATA_DIR", self.data_dir.display().to_string()),
            ("OUTBOX_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("OUTBOX_RETRY_MAX_DELAY_MS", "300".to_owned()),
            ("OUTBOX_DRAIN_TIMEOUT_S", "3".to_owned()),
            ("OUTBOX_REQUEST_TIMEOUT_S", "5".to_owned()),
            ("OUTBOX_LINGER_MS", "2".to_owned()),
        ];
        let server = tokio::task::block_in_place(|| ServerProcess::start(&[], &envs));
        let ready = poll_until(READY_TIMEOUT, || async {
            matches!(self.http.get(server.url("/readyz")).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        self.server = Some(server);
        if !ready {
            self.violation(format!("the server was not ready within {READY_TIMEOUT:?}"));
        }
    }

    fn server(&self) -> &ServerProcess {
        self.server.as_ref().expect("a server runs between steps")
    }

    fn database_up(&self) -> bool {
        matches!(self.database, Database::Up)
    }

    fn note(&mut self, line: String) {
        if self.settings.verbose {
            println!("{line}");
        }
        if self.recent.len() == RECENT_STEPS {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    /// Fails the test with everything needed to understand and replay it.
    fn violation(&self, what: impl Display) -> ! {
        let tail = |log: &str, n: usize| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let server_log = self.server.as_ref().map(|s| s.log()).unwrap_or_default();
        panic!(
            "INVARIANT VIOLATED at step {step}: {what}\n\
             rerun with OUTBOX_FAULT_SEED={seed} (OUTBOX_FAULT_STEPS={step} stops there)\n\
             last steps:\n{recent}\n\
             previous server's log (tail):\n{previous}\n\
             server log (tail):\n{current}\n\
             PostgreSQL log: {pg_log}",
            step = self.step,
            seed = self.settings.seed,
            recent = self.recent.iter().cloned().collect::<Vec<_>>().join("\n"),
            previous = tail(&self.previous_log, 30),
            current = tail(&server_log, 60),
            pg_log = self.pg.log_path().display(),
        )
    }

    // -- one step -----------------------------------------------------------

    async fn step(&mut self) {
        self.step += 1;
        self.heal_when_due().await;
        let line = if self.rng.percent(FAULT_PERCENT) { self.fault().await } else { self.operation().await };
        let line = format!("#{} {line}", self.step);
        self.note(line);
        if self.database_up() {
            self.check().await;
            // A restarted server's memory was rebuilt from the database (and
            // its spill file): compare at once.
            if self.step.is_multiple_of(CHECKPOINT_EVERY) || std::mem::take(&mut self.restarted) {
                self.checkpoint(false).await;
            }
        }
    }

    /// Restarts or thaws PostgreSQL when its outage is over.
    async fn heal_when_due(&mut self) {
        let due = match &self.database {
            Database::Up => false,
            Database::Down { until } | Database::Frozen { until, .. } => self.step >= *until,
        };
        if due {
            let line = self.heal();
            self.note(format!("#{} {line}", self.step));
        }
    }

    fn heal(&mut self) -> String {
        match std::mem::replace(&mut self.database, Database::Up) {
            Database::Up => "database already up".to_owned(),
            Database::Down { .. } => {
                if let Err(e) = tokio::task::block_in_place(|| self.pg.restart()) {
                    self.violation(format!("PostgreSQL did not start again: {e}"));
                }
                "PostgreSQL started again".to_owned()
            }
            Database::Frozen { pids, .. } => {
                thaw(&pids);
                format!("PostgreSQL thawed ({} processes)", pids.len())
            }
        }
    }

    // -- HTTP ---------------------------------------------------------------

    async fn call(&mut self, method: Method, path: &str, body: Option<Value>, durable: bool) -> Answer {
        let mut request = self.http.request(method.clone(), self.server().url(path));
        if durable {
            request = request.header("Prefer", "durable");
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.finish_call(method, path, request).await
    }

    async fn admin(&mut self, method: Method, path: &str) -> Answer {
        let request = self.http.request(method.clone(), self.server().url(path)).bearer_auth(ADMIN_TOKEN);
        self.finish_call(method, path, request).await
    }

    async fn finish_call(&mut self, method: Method, path: &str, request: reqwest::RequestBuilder) -> Answer {
        let response = match request.send().await {
            Ok(response) => response,
            // Every route answers within OUTBOX_REQUEST_TIMEOUT_S (5 s): no
            // answer within the client's 10 s is a hang.
            Err(e) => self.violation(format!("{method} {path}: no answer: {e}")),
        };
        let status = response.status().as_u16();
        let durable = response.headers().get("preference-applied").is_some_and(|v| v == "durable");
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) => self.violation(format!("{method} {path}: the answer's body was cut: {e}")),
        };
        *self.stats.answers.entry(status).or_default() += 1;
        if status == 500 {
            self.violation(format!("{method} {path} answered 500: {text}"));
        }
        Answer { status, durable, body: serde_json::from_str(&text).unwrap_or(Value::Null) }
    }

    /// After a 409, learns the item's status again (or that it is gone).
    async fn refresh_item(&mut self, dfid: &str) {
        let answer = self.call(Method::GET, &format!("/api/items/{dfid}"), None, false).await;
        match (answer.status, Status::of(&answer.body)) {
            (200, Some(status)) => self.model.set_status(dfid, status),
            (404, _) => self.model.forget_item(dfid),
            _ => {}
        }
    }

    // -- operations ---------------------------------------------------------

    async fn operation(&mut self) -> String {
        #[derive(Clone, Copy)]
        enum Op {
            Create,
            Batch,
            Update,
            Deprecate,
            Delete,
            Circuit,
            AddToCircuit,
            Merge,
        }
        let op = self.rng.weighted(&[
            (Op::Create, 20),
            (Op::Batch, 10),
            (Op::Update, 25),
            (Op::Deprecate, 5),
            (Op::Delete, 8),
            (Op::Circuit, 4),
            (Op::AddToCircuit, 12),
            (Op::Merge, 8),
        ]);
        // Durable requests wait (up to 4.5 s) for a database that is away:
        // fewer of them then, so that an outage does not eat the run.
        let durable = self.rng.percent(if self.database_up() { 50 } else { 10 });
        let (name, line) = match op {
            Op::Create => ("create", self.create_item(durable).await),
            Op::Batch => ("batch", self.create_batch(durable).await),
            Op::Update => ("update", self.update_item(durable).await),
            Op::Deprecate => ("deprecate", self.deprecate_item(durable).await),
            Op::Delete => ("delete", self.delete_item(durable).await),
            Op::Circuit => ("circuit", self.create_circuit(durable).await),
            Op::AddToCircuit => ("add_to_circuit", self.add_to_circuit(durable).await),
            Op::Merge => ("merge", self.merge_items(durable).await),
        };
        *self.stats.operations.entry(name).or_default() += 1;
        let mode = if durable { "durable" } else { "memory" };
        format!("{name} [{mode}] {line}")
    }

    fn outcome(answer: &Answer) -> String {
        let detail = answer.body["detail"].as_str().map(|d| format!(" ({})", truncate(d, 100))).unwrap_or_default();
        format!("→ {}{}{detail}", answer.status, if answer.durable { " durable" } else { "" })
    }

    async fn create_item(&mut self, durable: bool) -> String {
        let n = self.model.next();
        let mut data = json!({"n": n});
        let poison = self.rng.percent(5);
        if poison {
            data["poison"] = json!("yes");
        }
        let body = json!({"identifiers": [{"key": "n", "value": n.to_string()}], "enriched_data": data});
        let answer = self.call(Method::POST, "/api/items", Some(body), durable).await;
        if answer.status == 201 {
            self.model.add_item(&answer.body);
        }
        if answer.durably_ok() && self.model.acknowledge(Kind::Item, &answer.body) {
            self.stats.durable_acks += 1;
        }
        let dfid = answer.body["dfid"].as_str().unwrap_or("-");
        format!("n={n}{} {dfid} {}", if poison { " poison" } else { "" }, Self::outcome(&answer))
    }

    async fn create_batch(&mut self, durable: bool) -> String {
        let tag = format!("b{}", self.model.next());
        let size = self.rng.between(2, 5) as usize;
        // Now and then one member is poisoned: the whole set is refused.
        let poisoned = self.rng.percent(10).then(|| self.rng.below(size));
        let items: Vec<Value> = (0..size)
            .map(|i| {
                let mut data = json!({"batch": tag, "size": size, "i": i});
                if poisoned == Some(i) {
                    data["poison"] = json!("yes");
                }
                json!({"identifiers": [{"key": "batch", "value": format!("{tag}-{i}")}], "enriched_data": data})
            })
            .collect();
        let answer = self.call(Method::POST, "/api/items/batch", Some(json!({"items": items})), durable).await;
        let mut ids = None;
        if answer.status == 201 {
            let created = answer.body["items"].as_array().cloned().unwrap_or_default();
            for item in &created {
                self.model.add_item(item);
                if answer.durable && self.model.acknowledge(Kind::Item, item) {
                    self.stats.durable_acks += 1;
                }
            }
            ids = Some(created.iter().filter_map(|i| i["dfid"].as_str().map(str::to_owned)).collect());
        }
        self.model.batches.push(Batch { tag: tag.clone(), size, ids });
        format!("{tag} size={size}{} {}", if poisoned.is_some() { " poison" } else { "" }, Self::outcome(&answer))
    }

    async fn update_item(&mut self, durable: bool) -> String {
        let Some(dfid) = self.model.pick_item(&mut self.rng, None) else { return self.create_item(durable).await };
        let n = self.model.next();
        let mut data = json!({"n": n});
        let roll = self.rng.below(100);
        if roll < 15 {
            data["poison"] = json!("yes");
        } else if roll < 25 {
            data["poison"] = Value::Null; // cures it
        }
        let body = json!({"enriched_data": data});
        let answer = self.call(Method::PUT, &format!("/api/items/{dfid}"), Some(body), durable).await;
        self.after_item_change(&dfid, &answer).await;
        format!("{dfid} {data} {}", Self::outcome(&answer))
    }

    async fn deprecate_item(&mut self, durable: bool) -> String {
        let Some(dfid) = self.model.pick_item(&mut self.rng, None) else { return self.create_item(durable).await };
        let answer = self.call(Method::PUT, &format!("/api/items/{dfid}/deprecate"), None, durable).await;
        self.after_item_change(&dfid, &answer).await;
        format!("{dfid} {}", Self::outcome(&answer))
    }

    /// Learns from the answer to a change of one item.
    async fn after_item_change(&mut self, dfid: &str, answer: &Answer) {
        match answer.status {
            200 => {
                if let Some(status) = Status::of(&answer.body) {
                    self.model.set_status(dfid, status);
                }
                if answer.durable && self.model.acknowledge(Kind::Item, &answer.body) {
                    self.stats.durable_acks += 1;
                }
            }
            404 => self.model.forget_item(dfid),
            409 => self.refresh_item(dfid).await,
            _ => {}
        }
    }

    async fn delete_item(&mut self, durable: bool) -> String {
        let Some(dfid) = self.model.pick_item(&mut self.rng, None) else { return self.create_item(durable).await };
        let answer = self.call(Method::DELETE, &format!("/api/items/{dfid}"), None, durable).await;
        if answer.status == 204 || answer.status == 404 {
            self.model.forget_item(&dfid);
        }
        if answer.status == 204 && answer.durable {
            self.model.durably_deleted.insert(dfid.clone());
            self.stats.durable_acks += 1;
        }
        format!("{dfid} {}", Self::outcome(&answer))
    }

    async fn create_circuit(&mut self, durable: bool) -> String {
        let n = self.model.next();
        let answer = self.call(Method::POST, "/api/circuits", Some(json!({"name": format!("c{n}")})), durable).await;
        if answer.status == 201
            && let Some(id) = answer.body["id"].as_str()
        {
            self.model.circuits.push(id.to_owned());
        }
        if answer.durably_ok() && self.model.acknowledge(Kind::Circuit, &answer.body) {
            self.stats.durable_acks += 1;
        }
        format!("c{n} {} {}", answer.body["id"].as_str().unwrap_or("-"), Self::outcome(&answer))
    }

    async fn add_to_circuit(&mut self, durable: bool) -> String {
        if self.model.circuits.is_empty() {
            return self.create_circuit(durable).await;
        }
        let circuit = self.model.circuits[self.rng.below(self.model.circuits.len())].clone();
        let Some(dfid) = self.model.pick_item(&mut self.rng, Some(Status::Active)) else {
            return self.create_item(durable).await;
        };
        let path = format!("/api/circuits/{circuit}/items");
        let answer = self.call(Method::POST, &path, Some(json!({"dfid": dfid})), durable).await;
        if answer.durably_ok() && self.model.acknowledge(Kind::Circuit, &answer.body) {
            self.stats.durable_acks += 1;
        }
        match answer.status {
            404 => self.refresh_item(&dfid).await,
            409 => self.refresh_item(&dfid).await,
            _ => {}
        }
        format!("{dfid} into {circuit} {}", Self::outcome(&answer))
    }

    async fn merge_items(&mut self, durable: bool) -> String {
        let target = self.model.pick_item(&mut self.rng, Some(Status::Active));
        let source = self.model.pick_item(&mut self.rng, Some(Status::Active));
        let (Some(target), Some(source)) = (target, source) else { return self.create_item(durable).await };
        if target == source {
            return self.create_item(durable).await;
        }
        let path = format!("/api/items/{target}/merge");
        let answer = self.call(Method::POST, &path, Some(json!({"source_dfid": source})), durable).await;
        match answer.status {
            200 => {
                self.model.set_status(&source, Status::Merged);
                if answer.durable && self.model.acknowledge(Kind::Item, &answer.body) {
                    self.model.durably_merged.insert(source.clone(), target.clone());
                    self.stats.durable_acks += 1;
                }
            }
            404 | 409 => {
                self.refresh_item(&target).await;
                self.refresh_item(&source).await;
            }
            _ => {}
        }
        format!("{source} into {target} {}", Self::outcome(&answer))
    }

    // -- faults -------------------------------------------------------------

    async fn fault(&mut self) -> String {
        #[derive(Clone, Copy)]
        enum Fault {
            StopDatabase,
            FreezeDatabase,
            Constraint,
            Terminate,
            Kill,
            DeadLetter,
        }
        let fault = self.rng.weighted(&[
            (Fault::StopDatabase, 3),
            (Fault::FreezeDatabase, 3),
            (Fault::Constraint, 4),
            (Fault::Terminate, 2),
            (Fault::Kill, 2),
            (Fault::DeadLetter, 4),
        ]);
        let needs_database =
            matches!(fault, Fault::StopDatabase | Fault::FreezeDatabase | Fault::Constraint | Fault::DeadLetter);
        let fault = match fault {
            // Not applicable while the database is away: half of the time a
            // SIGTERM instead (the drain then spills, and the next start
            // replays the spill file), else an operation.
            _ if needs_database && !self.database_up() && self.rng.percent(50) => Fault::Terminate,
            _ if needs_database && !self.database_up() => return self.operation().await,
            fault => fault,
        };
        let (name, line) = match fault {
            Fault::StopDatabase => ("pg_stop", self.stop_database()),
            Fault::FreezeDatabase => ("pg_freeze", self.freeze_database()),
            Fault::Constraint => ("constraint", self.toggle_constraint().await),
            Fault::Terminate => ("server_sigterm", self.restart_server(Signal::SIGTERM).await),
            Fault::Kill => ("server_kill9", self.restart_server(Signal::SIGKILL).await),
            Fault::DeadLetter => ("dead_letter", self.resolve_dead_letter().await),
        };
        *self.stats.faults.entry(name).or_default() += 1;
        format!("FAULT {name}: {line}")
    }

    fn stop_database(&mut self) -> String {
        self.client = None;
        if let Err(e) = tokio::task::block_in_place(|| self.pg.stop()) {
            self.violation(format!("PostgreSQL did not stop: {e}"));
        }
        let until = self.step + self.rng.between(2, 7);
        self.database = Database::Down { until };
        format!("PostgreSQL stopped until step {until}")
    }

    fn freeze_database(&mut self) -> String {
        let Some(postmaster) = self.pg.pid() else { self.violation("PostgreSQL is up but has no postmaster pid") };
        let pids = freeze(postmaster);
        let until = self.step + self.rng.between(2, 7);
        let line = format!("PostgreSQL frozen ({} processes) until step {until}", pids.len());
        self.database = Database::Frozen { until, pids };
        line
    }

    async fn toggle_constraint(&mut self) -> String {
        let statement = if self.constraint { DROP_CONSTRAINT } else { ADD_CONSTRAINT };
        // A bounded lock wait: the writers hold row locks only briefly.
        let sql = format!("SET lock_timeout = '5s'; {statement}");
        match self.execute(&sql).await {
            Ok(()) => {
                self.constraint = !self.constraint;
                format!("poison constraint {}", if self.constraint { "added" } else { "dropped" })
            }
            Err(e) => format!("poison constraint unchanged: {e}"),
        }
    }

    /// Stops the server with `signal` and starts it again on the same data
    /// folder, with the database back first; then checks memory.
    async fn restart_server(&mut self, signal: Signal) -> String {
        let database_was_up = self.database_up();
        // A SIGTERM keeps everything acknowledged, durable or not: written,
        // spilled and replayed, or quarantined and reloaded.
        let before = if signal == Signal::SIGTERM { Some(self.memory_state().await) } else { None };
        let server = self.server.as_mut().expect("a server runs between steps");
        server.signal(signal);
        let status = self.wait_for_exit(signal).await;
        let server = self.server.take().expect("it ran until now");
        self.previous_log = server.log();
        drop(server);
        // With the database up the whole time, a SIGTERM drains everything
        // and exits cleanly (non-zero means it had to spill).
        if signal == Signal::SIGTERM && database_was_up && !status.success() {
            self.violation(format!("SIGTERM with the database up exited with {status}"));
        }
        let healed = if database_was_up { String::new() } else { format!("; {}", self.heal()) };
        self.start_server().await;
        self.restarted = true;
        if signal == Signal::SIGTERM && !status.success() {
            self.stats.spilled_shutdowns += 1;
        }
        if let Some(before) = before {
            let after = self.memory_state().await;
            self.compare_states("before the SIGTERM", &before, "after the restart", &after);
        }
        format!("server {signal} exited {status}{healed}; started again")
    }

    /// Every item and every known circuit in memory: (kind, id) → (version,
    /// entity).
    async fn memory_state(&mut self) -> BTreeMap<(Kind, String), (i64, Value)> {
        let mut state: BTreeMap<(Kind, String), (i64, Value)> =
            self.memory_items().await.into_iter().map(|(id, entity)| ((Kind::Item, id), entity)).collect();
        for id in self.model.circuits.clone() {
            let answer = self.call(Method::GET, &format!("/api/circuits/{id}"), None, false).await;
            if answer.status == 200 {
                state.insert((Kind::Circuit, id), without_version(answer.body));
            }
        }
        state
    }

    fn compare_states(
        &self,
        first: &str,
        a: &BTreeMap<(Kind, String), (i64, Value)>,
        second: &str,
        b: &BTreeMap<(Kind, String), (i64, Value)>,
    ) {
        for key in a.keys().chain(b.keys()) {
            if a.get(key) != b.get(key) {
                self.violation(format!(
                    "{:?} {} differs {first} and {second}:\n  {first}: {:?}\n  {second}: {:?}",
                    key.0,
                    key.1,
                    a.get(key),
                    b.get(key)
                ));
            }
        }
    }

    /// Waits (bounded) for the signalled server to exit. A SIGTERM must
    /// end in OUTBOX_DRAIN_TIMEOUT_S (3 s) plus the time to write a spill
    /// file, whatever the database does; 15 s is generous.
    async fn wait_for_exit(&mut self, signal: Signal) -> std::process::ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.server.as_mut().and_then(ServerProcess::try_wait) {
                return status;
            }
            if Instant::now() > deadline {
                let database = match self.database {
                    Database::Up => "up",
                    Database::Down { .. } => "stopped",
                    Database::Frozen { .. } => "frozen (SIGSTOP)",
                };
                self.violation(format!(
                    "the server did not exit within {EXIT_TIMEOUT:?} of {signal} (OUTBOX_DRAIN_TIMEOUT_S=3); \
                     the database was {database}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn dead_letters(&mut self) -> Vec<Value> {
        let answer = self.admin(Method::GET, "/api/admin/dead-letters").await;
        if answer.status != 200 {
            self.violation(format!("listing dead letters answered {}: {}", answer.status, answer.body));
        }
        answer.body["dead_letters"].as_array().cloned().unwrap_or_default()
    }

    async fn resolve_dead_letter(&mut self) -> String {
        let letters = self.dead_letters().await;
        self.stats.dead_letters_seen += letters.len() as u64;
        if letters.is_empty() {
            return "no dead letter".to_owned();
        }
        let letter = &letters[self.rng.below(letters.len())];
        let id = letter["id"].as_i64().unwrap_or_default();
        let members = letters.iter().filter(|l| l["quarantine_id"] == letter["quarantine_id"]).count();
        let replay = self.rng.percent(50);
        let mut line = String::new();
        if replay && self.constraint {
            line += &self.toggle_constraint().await;
            line += "; ";
        }
        let answer = if replay {
            self.admin(Method::POST, &format!("/api/admin/dead-letters/{id}/replay")).await
        } else {
            self.admin(Method::DELETE, &format!("/api/admin/dead-letters/{id}")).await
        };
        let action = if replay { "replay" } else { "discard" };
        format!(
            "{line}{action} dead letter {id} ({members} in its set, {} unresolved) {}",
            letters.len(),
            Self::outcome(&answer)
        )
    }

    // -- the database, directly ---------------------------------------------

    async fn db(&mut self) -> &mut tokio_postgres::Client {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            match tokio::time::timeout(DB_TIMEOUT, outbox::pg::connect(&self.pg.config("app"))).await {
                Ok(Ok(client)) => self.client = Some(client),
                Ok(Err(e)) => self.violation(format!("cannot connect to the database while it is up: {e}")),
                Err(_) => self.violation("connecting to the database timed out while it is up"),
            }
        }
        self.client.as_mut().expect("connected above")
    }

    async fn execute(&mut self, sql: &str) -> Result<(), String> {
        let client = self.db().await;
        match tokio::time::timeout(DB_TIMEOUT, client.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.client = None; // it may be a connection left over from before a restart
                Err(e.to_string())
            }
            Err(_) => {
                self.client = None;
                Err("timed out".to_owned())
            }
        }
    }

    /// One consistent snapshot; a stale connection is replaced once.
    async fn snapshot(&mut self) -> Snapshot {
        for attempt in 0..2 {
            let client = self.db().await;
            match tokio::time::timeout(DB_TIMEOUT, read_snapshot(client)).await {
                Ok(Ok(snapshot)) => return snapshot,
                Ok(Err(e)) if attempt == 0 => {
                    self.client = None;
                    self.note(format!("#{} (reconnecting the checker: {e:?})", self.step));
                }
                Ok(Err(e)) => self.violation(format!("reading the database failed while it is up: {e:?}")),
                Err(_) => self.violation(format!("reading the database took over {DB_TIMEOUT:?} while it is up")),
            }
        }
        unreachable!("the second attempt returns or fails")
    }

    // -- invariants ---------------------------------------------------------

    /// Invariants 1–4 against one snapshot of the database.
    async fn check(&mut self) {
        let snapshot = self.snapshot().await;
        self.stats.checks += 1;
        if let Some(problem) = snapshot.broken.first() {
            self.violation(format!(
                "the database holds part of a change set ({} problems): {problem}",
                snapshot.broken.len()
            ));
        }
        self.check_acknowledged(&snapshot);
        self.check_batches(&snapshot);
        self.check_history(&snapshot);
    }

    /// (1) Durable acknowledgements hold.
    fn check_acknowledged(&mut self, snapshot: &Snapshot) {
        for ((kind, id), acked) in &self.model.acked {
            let table = if *kind == Kind::Item { &snapshot.items } else { &snapshot.circuits };
            match table.get(id) {
                Some(row) if row.version >= *acked => {}
                Some(row) => self.violation(format!(
                    "{kind:?} {id} was acknowledged durable at version {acked}; the database holds {} (deleted: {})",
                    row.version, row.deleted
                )),
                None => self.violation(format!("{kind:?} {id} was acknowledged durable at version {acked}; no row")),
            }
        }
        for id in &self.model.durably_deleted {
            if !snapshot.items.get(id).is_some_and(|r| r.deleted) {
                self.violation(format!("item {id} was deleted durably; the database holds it live (or not at all)"));
            }
        }
        for (source, target) in &self.model.durably_merged {
            let row = snapshot.items.get(source);
            let merged = row.is_some_and(|r| {
                r.deleted
                    || (r.status.as_deref() == Some("merged") && r.merged_into.as_deref() == Some(target.as_str()))
            });
            if !merged {
                self.violation(format!("item {source} was merged into {target} durably; the database does not say so"));
            }
        }
        self.stats.acks_checked +=
            (self.model.acked.len() + self.model.durably_deleted.len() + self.model.durably_merged.len()) as u64;
    }

    /// (2) A batch is in the database whole or not at all.
    fn check_batches(&self, snapshot: &Snapshot) {
        for batch in &self.model.batches {
            let present = match &batch.ids {
                // Tombstones keep their rows: count rows, live or deleted.
                Some(ids) => ids.iter().filter(|id| snapshot.items.contains_key(*id)).count(),
                // Unknown DFIDs were never deleted by the test: count tags.
                None => snapshot.tags.get(&batch.tag).copied().unwrap_or(0) as usize,
            };
            if present != 0 && present != batch.size {
                self.violation(format!(
                    "batch {} of {} items has {present} in the database (ids {:?})",
                    batch.tag, batch.size, batch.ids
                ));
            }
        }
    }

    /// (3) Versions never go back, rows never vanish; (4) tombstones stay.
    fn check_history(&mut self, snapshot: &Snapshot) {
        for ((kind, id), before) in &self.model.db_versions {
            let table = if *kind == Kind::Item { &snapshot.items } else { &snapshot.circuits };
            match table.get(id) {
                Some(row) if row.version >= *before => {}
                Some(row) => self.violation(format!(
                    "{kind:?} {id} went back from version {before} to {} in the database",
                    row.version
                )),
                None => self.violation(format!("{kind:?} {id} (version {before}) vanished from the database")),
            }
        }
        for id in &self.model.db_deleted {
            if !snapshot.items[id].deleted {
                self.violation(format!("item {id} was deleted in the database and is live again"));
            }
        }
        for (kind, table) in [(Kind::Item, &snapshot.items), (Kind::Circuit, &snapshot.circuits)] {
            for (id, row) in table {
                self.model.db_versions.insert((kind, id.clone()), row.version);
                if kind == Kind::Item && row.deleted {
                    self.model.db_deleted.insert(id.clone());
                }
            }
        }
    }

    /// (5) Once drained, memory equals the database outside quarantined
    /// sets; with `strict`, no quarantined set may be left.
    async fn checkpoint(&mut self, strict: bool) {
        if !self.database_up() {
            return;
        }
        self.stats.checkpoints += 1;
        self.wait_drained().await;
        self.check().await;
        let letters = self.dead_letters().await;
        if strict && !letters.is_empty() {
            self.violation(format!("{} dead letters are left after resolving them all", letters.len()));
        }
        let quarantined: BTreeSet<(String, String)> = letters
            .iter()
            .filter_map(|l| Some((l["kind"].as_str()?.to_owned(), l["entity_id"].as_str()?.to_owned())))
            .collect();
        self.compare_items(&quarantined).await;
        self.compare_circuits(&quarantined).await;
        self.stats.full_compares += u64::from(quarantined.is_empty());
    }

    async fn wait_drained(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let status = self.call(Method::GET, "/api/outbox/status", None, false).await;
            if status.body["depth"] == 0 {
                return;
            }
            if Instant::now() > deadline {
                self.violation(format!(
                    "the outbox did not drain within {DRAIN_TIMEOUT:?} with the database up: {}",
                    status.body
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn memory_items(&mut self) -> BTreeMap<String, (i64, Value)> {
        let mut items = BTreeMap::new();
        let mut path = "/api/items?limit=1000".to_owned();
        loop {
            let page = self.call(Method::GET, &path, None, false).await;
            if page.status != 200 {
                self.violation(format!("listing items answered {}: {}", page.status, page.body));
            }
            for item in page.body["items"].as_array().cloned().unwrap_or_default() {
                let dfid = item["dfid"].as_str().unwrap_or_default().to_owned();
                items.insert(dfid, without_version(item));
            }
            match page.body["next"].as_str() {
                Some(next) => path = format!("/api/items?limit=1000&after={next}"),
                None => return items,
            }
        }
    }

    async fn database_rows(&mut self, table: &str) -> BTreeMap<String, (i64, Value)> {
        let sql = format!("SELECT id, version, data FROM {table} WHERE NOT deleted");
        let client = self.db().await;
        match tokio::time::timeout(DB_TIMEOUT, client.query(&sql, &[])).await {
            Ok(Ok(rows)) => rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect(),
            Ok(Err(e)) => self.violation(format!("reading {table} failed: {e}")),
            Err(_) => self.violation(format!("reading {table} timed out")),
        }
    }

    async fn compare_items(&mut self, quarantined: &BTreeSet<(String, String)>) {
        let memory = self.memory_items().await;
        let database = self.database_rows("items").await;
        let outside = |id: &String| !quarantined.contains(&("item".to_owned(), id.clone()));
        for id in &self.model.db_deleted {
            if memory.contains_key(id) {
                self.violation(format!("item {id} is deleted in the database but live in memory"));
            }
        }
        let ids: BTreeSet<&String> = memory.keys().chain(database.keys()).filter(|id| outside(id)).collect();
        for id in ids {
            match (memory.get(id), database.get(id)) {
                (Some(m), Some(d)) if m == d => {}
                (m, d) => self.violation(format!(
                    "after draining, memory and database differ for item {id}:\n  memory:   {m:?}\n  database: {d:?}"
                )),
            }
        }
        self.stats.items_compared += memory.len() as u64;
    }

    async fn compare_circuits(&mut self, quarantined: &BTreeSet<(String, String)>) {
        let database = self.database_rows("circuits").await;
        for id in self.model.circuits.clone() {
            if quarantined.contains(&("circuit".to_owned(), id.clone())) {
                continue;
            }
            let answer = self.call(Method::GET, &format!("/api/circuits/{id}"), None, false).await;
            let memory = (answer.status == 200).then(|| without_version(answer.body));
            if memory.as_ref() != database.get(&id) {
                self.violation(format!(
                    "after draining, memory and database differ for circuit {id}:\n  memory: {memory:?}\n  database: {:?}",
                    database.get(&id)
                ));
            }
        }
    }

    // -- the end --------------------------------------------------------------

    /// Leaves everything sane and checks once more, strictly: database up,
    /// constraint gone, every dead letter replayed (or discarded when the
    /// replay is refused), drained, memory equal to the database.
    async fn finish(&mut self) {
        self.step += 1;
        if !self.database_up() {
            let line = self.heal();
            self.note(format!("#{} end: {line}", self.step));
        }
        if self.constraint {
            let line = self.toggle_constraint().await;
            self.note(format!("#{} end: {line}", self.step));
            if self.constraint {
                self.violation("the poison constraint could not be dropped at the end");
            }
        }
        for _ in 0..200 {
            let letters = self.dead_letters().await;
            let Some(letter) = letters.first() else { break };
            let id = letter["id"].as_i64().unwrap_or_default();
            let answer = self.admin(Method::POST, &format!("/api/admin/dead-letters/{id}/replay")).await;
            let mut line = format!("end: replay dead letter {id} {}", Self::outcome(&answer));
            if !answer.ok() {
                let answer = self.admin(Method::DELETE, &format!("/api/admin/dead-letters/{id}")).await;
                line += &format!("; discard {}", Self::outcome(&answer));
                if answer.status == 409 {
                    // The set is being written again with a later change:
                    // its letters change when that write ends.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            self.note(format!("#{} {line}", self.step));
        }
        self.checkpoint(true).await;
    }

    fn summary(&self, elapsed: Duration) -> String {
        let operations: u64 = self.stats.operations.values().sum();
        let faults: u64 = self.stats.faults.values().sum();
        format!(
            "faults summary: seed={} steps={} elapsed={:.1}s operations={operations} {:?} faults={faults} {:?} \
             answers={:?} durable_acks={} (entities {}) checks={} acks_checked={} checkpoints={} \
             full_compares={} items_compared={} dead_letters_seen={} spilled_shutdowns={}",
            self.settings.seed,
            self.step,
            elapsed.as_secs_f64(),
            self.stats.operations,
            self.stats.faults,
            self.stats.answers,
            self.stats.durable_acks,
            self.model.acked.len() + self.model.durably_deleted.len(),
            self.stats.checks,
            self.stats.acks_checked,
            self.stats.checkpoints,
            self.stats.full_compares,
            self.stats.items_compared,
            self.stats.dead_letters_seen,
            self.stats.spilled_shutdowns,
        )
    }
}

/// An entity as the API shows it, split into its version and what the
/// database's `data` column holds.
fn without_version(mut entity: Value) -> (i64, Value) {
    let version = entity.as_object_mut().and_then(|o| o.remove("version")).and_then(|v| v.as_i64());
    (version.unwrap_or(-1), entity)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Reading the database
// ---------------------------------------------------------------------------

/// Every query in one read-only repeatable-read transaction: the tables are
/// seen at one instant, so a change set committed between two queries
/// cannot look half-written.
async fn read_snapshot(client: &mut tokio_postgres::Client) -> Result<Snapshot, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, Row> {
        rows.iter()
            .map(|r| {
                let row = Row { version: r.get(1), deleted: r.get(2), status: r.get(3), merged_into: r.get(4) };
                (r.get(0), row)
            })
            .collect()
    };
    let items =
        rows(tx.query("SELECT id, version, deleted, data->>'status', data->>'merged_into' FROM items", &[]).await?);
    let circuits = rows(tx.query("SELECT id, version, deleted, NULL::text, NULL::text FROM circuits", &[]).await?);
    let tags = tx
        .query(
            "SELECT data->'enriched_data'->>'batch', count(*) FROM items
             WHERE NOT deleted AND jsonb_exists(data::jsonb->'enriched_data', 'batch') GROUP BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut broken = Vec::new();
    // A live circuit lists only live items that list it back.
    for r in tx
        .query(
            "SELECT c.id, d.dfid FROM circuits c
             CROSS JOIN LATERAL jsonb_array_elements_text(coalesce(c.data::jsonb->'items', '[]')) AS d(dfid)
             LEFT JOIN items i ON i.id = d.dfid
             WHERE NOT c.deleted
               AND (i.id IS NULL OR i.deleted OR NOT coalesce(jsonb_exists(i.data::jsonb->'circuits', c.id), false))",
            &[],
        )
        .await?
    {
        broken.push(format!(
            "circuit {} lists item {}, which does not list it back",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ));
    }
    // A live item lists only live circuits that list it back.
    for r in tx
        .query(
            "SELECT i.id, m.cid FROM items i
             CROSS JOIN LATERAL jsonb_array_elements_text(coalesce(i.data::jsonb->'circuits', '[]')) AS m(cid)
             LEFT JOIN circuits c ON c.id = m.cid
             WHERE NOT i.deleted
               AND (c.id IS NULL OR c.deleted OR NOT coalesce(jsonb_exists(c.data::jsonb->'items', i.id), false))",
            &[],
        )
        .await?
    {
        broken.push(format!(
            "item {} lists circuit {}, which does not list it back",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ));
    }
    // A merged item's target exists and (while live) holds its identifiers:
    // identifiers are only ever added, and split is not used.
    for r in tx
        .query(
            "SELECT s.id, s.data->>'merged_into' FROM items s
             LEFT JOIN items t ON t.id = s.data->>'merged_into'
             WHERE NOT s.deleted AND s.data->>'status' = 'merged'
               AND (t.id IS NULL OR (NOT t.deleted AND NOT ((t.data::jsonb->'identifiers') @> (s.data::jsonb->'identifiers'))))",
            &[],
        )
        .await?
    {
        broken.push(format!(
            "merged item {} has target {:?} missing or without its identifiers",
            r.get::<_, String>(0),
            r.get::<_, Option<String>>(1)
        ));
    }
    tx.commit().await?;
    Ok(Snapshot { items, circuits, tags, broken })
}

// ---------------------------------------------------------------------------
// Freezing PostgreSQL
// ---------------------------------------------------------------------------

/// The processes whose parent is `parent`, from `/proc/*/stat`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent) {
            children.push(pid);
        }
    }
    children.sort_unstable();
    children
}

/// SIGSTOPs the postmaster first (so it forks no new child), then each of
/// its children; returns every process stopped.
fn freeze(postmaster: i32) -> Vec<i32> {
    let mut stopped = Vec::new();
    if kill(Pid::from_raw(postmaster), Signal::SIGSTOP).is_ok() {
        stopped.push(postmaster);
    }
    for child in children_of(postmaster) {
        if kill(Pid::from_raw(child), Signal::SIGSTOP).is_ok() {
            stopped.push(child);
        }
    }
    stopped
}

/// SIGCONTs exactly the processes `freeze` stopped (a stopped process
/// cannot exit, so none of these ids was reused meanwhile).
fn thaw(pids: &[i32]) {
    for pid in pids.iter().rev() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGCONT);
    }
}
