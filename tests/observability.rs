//! Observability against the real server: every metric the
//! alert rules and the dashboard use is exported with the labels they use;
//! metric values follow what happens; and a real Prometheus scraping the
//! server fires and resolves the alerts while PostgreSQL goes away and comes
//! back, and answers every dashboard query.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ServerProcess, dedicated_postgres, fresh_db, http, poll_until, scratch_dir};
use serde::Deserialize;
use serde_json::{Value, json};

fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(dashboards().join("alerts.yml")).expect("read alerts.yml");
    let file: RuleFile = yaml_serde::from_str(&text).expect("alerts.yml parses");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

/// Every PromQL expression of the dashboard's panels.
fn panel_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboards().join("outbox.json")).expect("read outbox.json");
    let dashboard: Value = serde_json::from_str(&text).expect("outbox.json parses");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push((panel["title"].as_str().unwrap().to_owned(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// Exported series: metric name → every label name seen on it.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let labels = out.entry(name.to_owned()).or_default();
        if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split('}').next()) {
            for pair in inner.split(',').filter(|p| !p.is_empty()) {
                labels.insert(pair.split('=').next().unwrap().trim().to_owned());
            }
        }
    }
    out
}

/// What a PromQL expression uses: metric names with the label names of
/// their selectors, and the labels of `by (...)` clauses.
struct Uses {
    selectors: Vec<(String, BTreeSet<String>)>,
    grouping: BTreeSet<String>,
}

fn uses(expr: &str) -> Uses {
    let mut selectors = Vec::new();
    let mut grouping = BTreeSet::new();
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if is_ident(bytes[i]) && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            if (word == "by" || word == "on") && rest.starts_with('(') {
                let inner = &rest[1..rest.find(')').unwrap()];
                if word == "by" {
                    grouping.extend(inner.split(',').map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()));
                }
                i = expr.len() - rest.len() + rest.find(')').unwrap() + 1;
                continue;
            }
            if word.starts_with("outbox_") || word == "up" {
                let mut labels = BTreeSet::new();
                if rest.starts_with('{') {
                    let inner = &rest[1..rest.find('}').unwrap()];
                    for matcher in inner.split(',').filter(|m| !m.trim().is_empty()) {
                        let name = matcher.split(['=', '!']).next().unwrap().trim();
                        labels.insert(name.to_owned());
                    }
                    i = expr.len() - rest.len() + rest.find('}').unwrap() + 1;
                }
                selectors.push((word.to_owned(), labels));
            }
            continue;
        }
        i += 1;
    }
    Uses { selectors, grouping }
}

/// Labels Prometheus adds (or the histogram format has) rather than the
/// server.
fn added_by_prometheus(label: &str) -> bool {
    matches!(label, "job" | "instance" | "le")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_of_the_rules_and_the_dashboard_is_exported_with_its_labels() {
    let db = fresh_db("exported").await;
    let server = ServerProcess::start(
        &[],
        &[("DATABASE_URL", db.url()), ("OUTBOX_DATA_DIR", scratch_dir("exported").display().to_string())],
    );
    server.wait_ready(Duration::from_secs(30)).await;
    // Straight after start, before any traffic: every series already exists.
    let at_start = exported(&http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap());
    for item in 0..5 {
        http()
            .post(server.url("/api/items"))
            .json(&json!({"identifiers": [{"key": "n", "value": item.to_string()}]}))
            .send()
            .await
            .unwrap();
    }
    let text = http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let series = exported(&text);

    for name in [
        "outbox_mutations_total",
        "outbox_coalesced_total",
        "outbox_rejected_total",
        "outbox_queue_depth",
        "outbox_queue_capacity",
        "outbox_oldest_pending_timestamp_seconds",
        "outbox_lag_seconds",
        "outbox_last_success_timestamp_seconds",
        "outbox_persisted_total",
        "outbox_batches_total",
        "outbox_batch_rows_bucket",
        "outbox_flush_duration_seconds_bucket",
        "outbox_persist_latency_seconds_bucket",
        "outbox_persist_failures_total",
        "outbox_retries_total",
        "outbox_dead_letters_total",
        "outbox_dead_letters",
        "outbox_db_up",
        "outbox_spilled_total",
        "outbox_hydrated_entities",
        "outbox_build_info",
    ] {
        assert!(at_start.contains_key(name), "{name} is exported from the first scrape");
    }
    for error_type in ["connection", "timeout", "conflict", "constraint", "data", "schema", "other"] {
        assert!(
            text.contains(&format!("outbox_persist_failures_total{{error_type=\"{error_type}\"}}")),
            "failures of type {error_type} start at zero"
        );
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "{name} is described");
    }

    let mut checked = 0;
    let expressions = rules()
        .into_iter()
        .map(|r| (format!("alert {}", r.alert), r.expr))
        .chain(panel_queries().into_iter().map(|(title, expr)| (format!("panel {title}"), expr)));
    for (origin, expr) in expressions {
        let used = uses(&expr);
        assert!(!used.selectors.is_empty(), "{origin}: no metric found in {expr}");
        let mut available = BTreeSet::new();
        for (name, labels) in &used.selectors {
            if name == "up" {
                continue; // made by Prometheus itself
            }
            let exported_labels = series.get(name).unwrap_or_else(|| panic!("{origin}: {name} is not exported"));
            for label in labels.iter().filter(|l| !added_by_prometheus(l)) {
                assert!(
                    exported_labels.contains(label),
                    "{origin}: {name} has no label {label} (it has {exported_labels:?})"
                );
            }
            available.extend(exported_labels.iter().cloned());
            checked += 1;
        }
        for label in used.grouping.iter().filter(|l| !added_by_prometheus(l)) {
            assert!(available.contains(label), "{origin}: grouping by {label}, which its metrics do not have");
        }
    }
    assert!(checked > 25, "every rule and panel query was checked ({checked} selectors)");
}

#[test]
fn rules_and_dashboard_are_complete() {
    let rules = rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for alert in [
        "OutboxWritesFailing",
        "OutboxLagHigh",
        "OutboxStalled",
        "OutboxDeadLetters",
        "OutboxConflicts",
        "OutboxNoLeader",
        "OutboxRejectingWrites",
        "OutboxQueueNearFull",
        "OutboxDatabaseDown",
        "OutboxTargetDown",
    ] {
        assert!(names.contains(alert), "alerts.yml has {alert}");
    }
    let runbook = std::fs::read_to_string(dashboards().join("RUNBOOK.md")).unwrap();
    for rule in &rules {
        assert!(
            matches!(rule.labels.get("severity").map(String::as_str), Some("page" | "ticket")),
            "{} has a severity",
            rule.alert
        );
        for annotation in ["summary", "description", "runbook_url"] {
            assert!(rule.annotations.get(annotation).is_some_and(|a| !a.is_empty()), "{} has {annotation}", rule.alert);
        }
        let anchor = rule.annotations["runbook_url"].rsplit('#').next().unwrap().to_owned();
        assert_eq!(anchor, rule.alert.to_lowercase(), "{}'s runbook link names it", rule.alert);
        assert!(runbook.contains(&format!("## {}\n", rule.alert)), "RUNBOOK.md has a section for {}", rule.alert);
        assert!(rule.for_.is_some(), "{} waits before paging", rule.alert);
    }

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboards().join("outbox.json")).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "outbox", "a fixed uid");
    assert!(dashboard.get("__inputs").is_none(), "provisionable: no __inputs");
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(variables, ["datasource", "job", "instance"]);
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(panel["description"].as_str().is_some_and(|d| d.len() > 20), "{title} has a description");
        assert!(panel["fieldConfig"]["defaults"]["unit"].is_string(), "{title} has a unit");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title} uses the datasource variable");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("job=\"$job\"") && expr.contains("instance=~\"$instance\""), "{title}: {expr}");
            if expr.contains("rate(") {
                assert!(expr.contains("[$__rate_interval]"), "{title} uses $__rate_interval: {expr}");
            }
        }
    }
    let stats: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "stat")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(stats, ["Lag", "Pending", "Last success", "Dead letters"]);
}

async fn scrape(server: &ServerProcess) -> String {
    http().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} is exported"))
}

async fn drained(server: &ServerProcess) {
    let ok = poll_until(Duration::from_secs(20), || async {
        let status: Value = http().get(server.url("/api/outbox/status")).send().await.unwrap().json().await.unwrap();
        status["depth"] == 0
    })
    .await;
    assert!(ok, "the outbox drained");
}

#[tokio::test(flavor = "multi_thread")]
async fn metric_values_follow_what_happens() {
    let postgres = dedicated_postgres("metric-values");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", postgres.connection_string("app")),
            ("OUTBOX_DATA_DIR", scratch_dir("metric-values").display().to_string()),
            ("OUTBOX_LINGER_MS", "400".into()),
            ("OUTBOX_RETRY_MAX_DELAY_MS", "300".into()),
        ],
    );
    server.wait_ready(Duration::from_secs(30)).await;
    let before = scrape(&server).await;
    let persisted = "outbox_persisted_total{entity=\"item\"}";
    let mutations = "outbox_mutations_total{entity=\"item\"}";
    let coalesced = "outbox_coalesced_total{entity=\"item\"}";

    // N creates: N rows persisted.
    const N: usize = 37;
    let mut dfids = Vec::new();
    for i in 0..N {
        let item: Value = server
            .send_json(
                reqwest::Method::POST,
                "/api/items",
                &json!({"identifiers": [{"key": "n", "value": i.to_string()}]}),
            )
            .await;
        dfids.push(item["dfid"].as_str().unwrap().to_owned());
    }
    drained(&server).await;
    let after = scrape(&server).await;
    assert_eq!(value(&after, persisted) - value(&before, persisted), N as f64, "N creates, N rows persisted");
    assert_eq!(value(&after, mutations) - value(&before, mutations), N as f64);

    // A create and five updates within one linger: six changes, one row.
    let item: Value = server
        .send_json(reqwest::Method::POST, "/api/items", &json!({"identifiers": [{"key": "hot", "value": "1"}]}))
        .await;
    let hot = item["dfid"].as_str().unwrap();
    for n in 0..5 {
        http()
            .put(server.url(&format!("/api/items/{hot}")))
            .json(&json!({"enriched_data": {"n": n}}))
            .send()
            .await
            .unwrap();
    }
    drained(&server).await;
    let coalescing = scrape(&server).await;
    assert_eq!(value(&coalescing, coalesced) - value(&after, coalesced), 5.0, "five changes were absorbed");
    assert_eq!(value(&coalescing, persisted) - value(&after, persisted), 1.0, "one row for six changes");

    // A quarantined record moves both dead-letter metrics.
    let client = outbox::pg::connect(&postgres.config("app")).await.unwrap();
    client
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no_poison CHECK (coalesce(data->'enriched_data'->>'poison', '') <> 'yes')")
        .await
        .unwrap();
    http()
        .post(server.url("/api/items"))
        .json(&json!({"identifiers": [{"key": "p", "value": "1"}], "enriched_data": {"poison": "yes"}}))
        .send()
        .await
        .unwrap();
    drained(&server).await;
    let quarantined = scrape(&server).await;
    assert_eq!(value(&quarantined, "outbox_dead_letters_total{entity=\"item\"}"), 1.0);
    assert_eq!(value(&quarantined, "outbox_dead_letters"), 1.0);
    assert!(value(&quarantined, "outbox_persist_failures_total{error_type=\"constraint\"}") >= 1.0);

    // Lag rises while PostgreSQL is stopped and returns to ~0 after.
    assert!(value(&quarantined, "outbox_lag_seconds") < 0.5);
    std::thread::scope(|s| s.spawn(|| postgres.stop()).join().unwrap()).expect("stop PostgreSQL");
    http()
        .put(server.url(&format!("/api/items/{}", dfids[0])))
        .json(&json!({"enriched_data": {"late": true}}))
        .send()
        .await
        .unwrap();
    let rising =
        poll_until(Duration::from_secs(15), || async { value(&scrape(&server).await, "outbox_lag_seconds") >= 2.0 })
            .await;
    assert!(rising, "lag rises while the database is away");
    let down = scrape(&server).await;
    assert_eq!(value(&down, "outbox_db_up"), 0.0);
    assert!(value(&down, "outbox_queue_depth") >= 1.0);
    assert!(
        value(&down, "outbox_oldest_pending_timestamp_seconds")
            < value(&before, "outbox_oldest_pending_timestamp_seconds") + 3600.0
    );
    std::thread::scope(|s| s.spawn(|| postgres.restart()).join().unwrap()).expect("start PostgreSQL");
    let recovered =
        poll_until(Duration::from_secs(20), || async { value(&scrape(&server).await, "outbox_lag_seconds") < 0.5 })
            .await;
    assert!(recovered, "lag returns to ~0 once the database is back");
    assert_eq!(value(&scrape(&server).await, "outbox_db_up"), 1.0);
}

/// A Prometheus server on loopback, stopped (by its PID) when dropped.
struct Prometheus {
    child: Child,
    base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn query(&self, expr: &str) -> Vec<Value> {
        let response: Value = http()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(response["status"], "success", "{expr}: {response}");
        response["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    async fn firing(&self) -> BTreeSet<String> {
        let response: Value =
            http().get(format!("{}/api/v1/alerts", self.base)).send().await.unwrap().json().await.unwrap();
        response["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// The rules with every duration shortened (a minute becomes 5 s), so the
/// test sees alerts fire and resolve in seconds.
fn shortened_rules() -> String {
    let text = std::fs::read_to_string(dashboards().join("alerts.yml")).unwrap();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        let after = &tail[digits.len()..];
        let boundary = head.chars().last().is_none_or(|c| !c.is_ascii_alphanumeric() && c != '.');
        if boundary && after.starts_with('m') && !after[1..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
            out.push_str(&format!("{}s", digits.parse::<u32>().unwrap() * 5));
            rest = &after[1..];
        } else {
            out.push_str(&digits);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_fires_and_resolves_the_alerts_and_answers_every_panel() {
    let Some(prometheus_bin) =
        ["prometheus", "/usr/bin/prometheus"].into_iter().find(|p| Command::new(p).arg("--version").output().is_ok())
    else {
        panic!("the Prometheus server is needed: install Debian's prometheus package (scripts/test does)");
    };
    let postgres = dedicated_postgres("prometheus");
    outbox::pg::create_database_if_missing(&postgres.config("postgres"), "app").await.unwrap();
    let server = ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", postgres.connection_string("app")),
            ("OUTBOX_DATA_DIR", scratch_dir("prometheus-outbox").display().to_string()),
            ("OUTBOX_RETRY_MAX_DELAY_MS", "300".into()),
        ],
    );
    server.wait_ready(Duration::from_secs(30)).await;

    let dir = scratch_dir("prometheus");
    std::fs::write(dir.join("rules.yml"), shortened_rules()).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n  - job_name: outbox\n    static_configs:\n      - targets: ['{}']\n",
            server.addr
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(prometheus_bin)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("start Prometheus");
    let prometheus = Prometheus { child, base: format!("http://127.0.0.1:{port}") };
    let ready = poll_until(Duration::from_secs(30), || async {
        matches!(http().get(format!("{}/-/ready", prometheus.base)).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(ready, "Prometheus started: {}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default());

    // Some traffic, then wait until Prometheus has scraped it.
    for i in 0..20 {
        http()
            .post(server.url("/api/items"))
            .json(&json!({"identifiers": [{"key": "n", "value": i.to_string()}]}))
            .send()
            .await
            .unwrap();
    }
    let scraped = poll_until(Duration::from_secs(30), || async {
        !prometheus.query("outbox_persisted_total{entity=\"item\"} > 0").await.is_empty()
    })
    .await;
    assert!(scraped, "Prometheus scrapes the server");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(prometheus.firing().await.is_empty(), "a healthy server does not page: {:?}", prometheus.firing().await);

    // Every dashboard query, with its variables filled in, returns data.
    for (title, expr) in panel_queries() {
        let expr = expr.replace("$job", "outbox").replace("$instance", ".*").replace("$__rate_interval", "20s");
        let result = prometheus.query(&expr).await;
        assert!(!result.is_empty(), "panel {title}: {expr} returns data");
    }

    // The database goes away under steady writes: the alerts fire.
    std::thread::scope(|s| s.spawn(|| postgres.stop()).join().unwrap()).expect("stop PostgreSQL");
    let writer = {
        let url = server.url("/api/items");
        tokio::spawn(async move {
            for i in 0..1200 {
                let _ = http()
                    .post(&url)
                    .json(&json!({"identifiers": [{"key": "w", "value": i.to_string()}]}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let fired = poll_until(Duration::from_secs(90), || async {
        let firing = prometheus.firing().await;
        firing.contains("OutboxDatabaseDown") && firing.contains("OutboxWritesFailing")
    })
    .await;
    assert!(fired, "OutboxDatabaseDown and OutboxWritesFailing fire: {:?}", prometheus.firing().await);

    // It comes back: they resolve.
    std::thread::scope(|s| s.spawn(|| postgres.restart()).join().unwrap()).expect("start PostgreSQL");
    let resolved = poll_until(Duration::from_secs(90), || async {
        let firing = prometheus.firing().await;
        !firing.contains("OutboxDatabaseDown") && !firing.contains("OutboxWritesFailing")
    })
    .await;
    writer.abort();
    assert!(resolved, "the alerts resolve once the database is back: {:?}", prometheus.firing().await);
}
