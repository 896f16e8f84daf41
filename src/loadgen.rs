//! A load generator for the reference API (`outbox loadgen`): creates items
//! through `POST /api/items`, at a fixed rate or as fast as it can, for a
//! bounded time, and reports throughput, latency percentiles and the
//! server's persistence lag sampled while it runs.
//!
//! At a fixed rate, each request is scheduled ahead of time and its latency
//! is measured from when it was due, not from when it was sent, so a server
//! that stalls is charged for the requests it delayed (no coordinated
//! omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Requests per second; `None`: as fast as the connections allow.
    pub rate: Option<u64>,
    /// How long to send.
    pub duration: Duration,
    /// Requests in flight at once (one connection each).
    pub connections: usize,
    /// Ask for durable acknowledgements (`Prefer: durable`).
    pub durable: bool,
    /// How often to sample the server's lag from `/api/outbox/status`
    /// (`None`: not sampled).
    pub lag_every: Option<Duration>,
    /// Show a progress bar on standard error (when it is a terminal).
    pub progress: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        // Recorded in microseconds.
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            count: histogram.len(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests refused with 503 (queue full).
    pub refused: u64,
    /// Other answers and transport errors.
    pub errors: u64,
    /// Seconds the run took.
    pub seconds: f64,
    /// 2xx answers per second.
    pub throughput: f64,
    /// Latency of 2xx answers (ms).
    pub latency: Percentiles,
    /// The server's lag while the run went (ms), when sampled.
    pub lag: Option<Percentiles>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

struct Shared {
    ok: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    next: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    first_error: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load and reports. Requests stop being sent at the deadline;
/// those in flight are waited for.
pub async fn run(config: &LoadConfig) -> Result<LoadReport, reqwest::Error> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/api/items", config.target.trim_end_matches('/'));
    let shared = Arc::new(Shared {
        ok: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        next: AtomicU64::new(0),
        latency: Mutex::new(histogram()),
        first_error: Mutex::new(None),
    });
    let started = Instant::now();
    let deadline = started + config.duration;
    let progress = config.progress.then(|| show_progress(config.duration, shared.clone(), started, deadline));
    let lag = config.lag_every.map(|every| {
        let status = format!("{}/api/outbox/status", config.target.trim_end_matches('/'));
        tokio::spawn(sample_lag(client.clone(), status, every, deadline))
    });
    let plan = Plan { client, url, started, deadline, rate: config.rate, durable: config.durable };
    let workers: Vec<_> = (0..config.connections)
        .map(|worker| tokio::spawn(send_requests(plan.clone(), shared.clone(), worker)))
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let lag = match lag {
        Some(task) => task.await.ok().map(|h| Percentiles::of(&h)),
        None => None,
    };
    let ok = shared.ok.load(Ordering::Relaxed);
    let latency = Percentiles::of(&*shared.latency.lock().await);
    let first_error = shared.first_error.lock().await.clone();
    Ok(LoadReport {
        ok,
        refused: shared.refused.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        seconds,
        throughput: ok as f64 / seconds,
        latency,
        lag,
        first_error,
    })
}

/// What every connection sends, and when.
#[derive(Clone)]
struct Plan {
    client: reqwest::Client,
    url: String,
    started: Instant,
    deadline: Instant,
    rate: Option<u64>,
    durable: bool,
}

/// One connection: sends its next request when the last is answered (or
/// when the fixed rate schedules it), until the deadline.
async fn send_requests(plan: Plan, shared: Arc<Shared>, worker: usize) {
    let mut local = histogram();
    loop {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let due = match plan.rate {
            Some(rate) => plan.started + Duration::from_secs_f64(n as f64 / rate as f64),
            None => Instant::now(),
        };
        if due >= plan.deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let body = serde_json::json!({
            "identifiers": [{"key": "load", "value": format!("{worker}-{n}")}],
            "enriched_data": {"n": n, "source": "loadgen"}
        });
        let mut request = plan.client.post(&plan.url).json(&body);
        if plan.durable {
            request = request.header("Prefer", "durable");
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                let _ = local.record((due.elapsed().as_micros() as u64).max(1));
                shared.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                let text = format!("{}: {}", response.status(), response.text().await.unwrap_or_default());
                shared.first_error.lock().await.get_or_insert(text);
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                shared.first_error.lock().await.get_or_insert(e.to_string());
            }
        }
    }
    shared.latency.lock().await.add(&local).expect("histograms of equal bounds add");
}

/// Samples the server's lag every `every` until the deadline.
async fn sample_lag(client: reqwest::Client, status: String, every: Duration, deadline: Instant) -> Histogram<u64> {
    let mut lag = histogram();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < deadline {
        tick.tick().await;
        let Ok(response) = client.get(&status).send().await else { continue };
        let Ok(body) = response.json::<serde_json::Value>().await else { continue };
        if let Some(seconds) = body["lag_seconds"].as_f64() {
            let _ = lag.record(((seconds * 1_000_000.0) as u64).max(1));
        }
    }
    lag
}

/// A progress bar on the terminal, updated four times a second.
fn show_progress(
    duration: Duration,
    shared: Arc<Shared>,
    started: Instant,
    deadline: Instant,
) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s {msg}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    let updated = bar.clone();
    tokio::spawn(async move {
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let elapsed = started.elapsed();
            updated.set_position(elapsed.as_secs());
            let ok = shared.ok.load(Ordering::Relaxed);
            updated.set_message(format!(
                "{:.0} req/s, {} refused",
                ok as f64 / elapsed.as_secs_f64(),
                shared.refused.load(Ordering::Relaxed)
            ));
        }
    });
    bar
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} ok, {} refused (503), {} errors in {:.1} s",
            self.ok, self.refused, self.errors, self.seconds
        )?;
        writeln!(f, "throughput: {:.0} req/s", self.throughput)?;
        let l = &self.latency;
        writeln!(f, "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}", l.p50, l.p90, l.p99, l.max)?;
        if let Some(lag) = &self.lag {
            writeln!(
                f,
                "lag ms ({} samples): p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                lag.count, lag.p50, lag.p90, lag.p99, lag.max
            )?;
        }
        if let Some(error) = &self.first_error {
            writeln!(f, "first error: {error}")?;
        }
        Ok(())
    }
}
