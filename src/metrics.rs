//! Every metric name, its description, its buckets, and the
//! Prometheus exporter set-up. Names are part of the product's contract
//! (alert rules and the dashboard query them), so they live here and nowhere
//! else; the rest of the crate refers to these constants.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Changes recorded, by entity kind.
pub const MUTATIONS_TOTAL: &str = "outbox_mutations_total";
/// Changes absorbed by an already pending record, by entity kind.
pub const COALESCED_TOTAL: &str = "outbox_coalesced_total";
/// Changes refused, by reason.
pub const REJECTED_TOTAL: &str = "outbox_rejected_total";
/// Distinct entities pending.
pub const QUEUE_DEPTH: &str = "outbox_queue_depth";
/// The queue's bound.
pub const QUEUE_CAPACITY: &str = "outbox_queue_capacity";
/// Unix time of the oldest uncommitted change (now when none).
pub const OLDEST_PENDING_TIMESTAMP: &str = "outbox_oldest_pending_timestamp_seconds";
/// Now minus the oldest uncommitted change, 0 when empty.
pub const LAG_SECONDS: &str = "outbox_lag_seconds";
/// Unix time of the last committed batch.
pub const LAST_SUCCESS_TIMESTAMP: &str = "outbox_last_success_timestamp_seconds";
/// Rows committed, by entity kind.
pub const PERSISTED_TOTAL: &str = "outbox_persisted_total";
/// Flush attempts, by result.
pub const BATCHES_TOTAL: &str = "outbox_batches_total";
/// Rows per batch.
pub const BATCH_ROWS: &str = "outbox_batch_rows";
/// Duration of one batch transaction.
pub const FLUSH_DURATION: &str = "outbox_flush_duration_seconds";
/// Time from a change being applied to its commit.
pub const PERSIST_LATENCY: &str = "outbox_persist_latency_seconds";
/// Failed flush attempts, by error type.
pub const PERSIST_FAILURES_TOTAL: &str = "outbox_persist_failures_total";
/// Retries scheduled.
pub const RETRIES_TOTAL: &str = "outbox_retries_total";
/// Records quarantined, by entity kind.
pub const DEAD_LETTERS_TOTAL: &str = "outbox_dead_letters_total";
/// Unresolved dead letters.
pub const DEAD_LETTERS: &str = "outbox_dead_letters";
/// Rows left unwritten because the database held an equal or newer version
/// this process did not write, by entity kind.
pub const CONFLICTS_TOTAL: &str = "outbox_conflicts_total";
/// Batch writes whose `COPY` of new rows met a row already in the table
/// and were written again with upserts.
pub const COPY_FALLBACKS_TOTAL: &str = "outbox_copy_fallbacks_total";
/// 1 on the lease holder, 0 on a standby or a fenced process.
pub const LEADER: &str = "outbox_leader";
/// When the held lease expires unless renewed (0 when not held).
pub const LEASE_EXPIRES_TIMESTAMP: &str = "outbox_lease_expires_timestamp_seconds";
/// Times this process took the lease.
pub const LEASE_TAKEOVERS_TOTAL: &str = "outbox_lease_takeovers_total";
/// 1 when the last attempt reached the database.
pub const DB_UP: &str = "outbox_db_up";
/// Records written to the spill file.
pub const SPILLED_TOTAL: &str = "outbox_spilled_total";
/// Entities loaded at start-up, by entity kind.
pub const HYDRATED_ENTITIES: &str = "outbox_hydrated_entities";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "outbox_build_info";
/// HTTP requests answered, by method, route template and status.
pub const HTTP_REQUESTS_TOTAL: &str = "outbox_http_requests_total";
/// HTTP request duration, by method, route template and status.
pub const HTTP_REQUEST_DURATION: &str = "outbox_http_request_duration_seconds";
/// Retried requests answered with the stored answer of their
/// `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "outbox_idempotent_replays_total";
/// HTTP connections open now.
pub const HTTP_CONNECTIONS: &str = "outbox_http_connections";
/// HTTP connections closed by the server, by reason: `limit` (more than
/// `OUTBOX_MAX_CONNECTIONS` open), `header_timeout` (headers not complete
/// within `OUTBOX_HEADER_TIMEOUT_S`).
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "outbox_http_connections_refused_total";

/// Values of the `reason` label of [`HTTP_CONNECTIONS_REFUSED_TOTAL`].
pub const CONNECTION_REFUSALS: [&str; 2] = ["limit", "header_timeout"];

/// Values of the `error_type` label of [`PERSIST_FAILURES_TOTAL`].
pub const ERROR_TYPES: [&str; 7] = ["connection", "timeout", "conflict", "constraint", "data", "schema", "other"];

/// Values of the `result` label of [`BATCHES_TOTAL`].
pub const BATCH_RESULTS: [&str; 2] = ["ok", "error"];

/// Values of the `reason` label of [`REJECTED_TOTAL`].
pub const REJECT_REASONS: [&str; 1] = ["queue_full"];

/// Rows per batch: 1 up to the largest sensible `OUTBOX_BATCH_MAX`.
const BATCH_ROWS_BUCKETS: [f64; 13] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
/// One transaction: sub-millisecond for a row on a local socket, seconds
/// for a large batch on a loaded database.
const FLUSH_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Change to commit: the linger plus a flush when healthy, up to minutes
/// during an outage.
const PERSIST_LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// HTTP handlers answer from memory in microseconds; durable ones wait for
/// a commit.
const HTTP_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// Every histogram with its buckets, for whichever exporter a process
/// installs.
pub const HISTOGRAM_BUCKETS: [(&str, &[f64]); 4] = [
    (BATCH_ROWS, &BATCH_ROWS_BUCKETS),
    (FLUSH_DURATION, &FLUSH_BUCKETS),
    (PERSIST_LATENCY, &PERSIST_LATENCY_BUCKETS),
    (HTTP_REQUEST_DURATION, &HTTP_BUCKETS),
];

/// Describes every metric and creates the series whose labels are known at
/// start, so that they exist from the first scrape. Call it once the
/// process's recorder is installed (the reference server's `install`
/// does).
pub fn describe_all() {
    describe();
    register_series();
}

/// Installs the Prometheus recorder as the process's global recorder (once;
/// later calls return the same handle), with the buckets of
/// [`HISTOGRAM_BUCKETS`], and describes every metric.
#[cfg(feature = "server")]
pub fn install() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in HISTOGRAM_BUCKETS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("bucket lists are non-empty constants");
            }
            let handle = builder.install_recorder().expect("no other metrics recorder is installed in this process");
            describe_all();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        IDEMPOTENT_REPLAYS_TOTAL,
        "Retried requests answered with the stored answer of their Idempotency-Key."
    );
    describe_gauge!(HTTP_CONNECTIONS, "HTTP connections open now.");
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED_TOTAL,
        "HTTP connections closed by the server: reason=limit (over OUTBOX_MAX_CONNECTIONS), reason=header_timeout \
         (headers not complete within OUTBOX_HEADER_TIMEOUT_S)."
    );
    describe_counter!(MUTATIONS_TOTAL, "Changes recorded through the store.");
    describe_counter!(COALESCED_TOTAL, "Changes absorbed by an already pending record of the same entity.");
    describe_counter!(REJECTED_TOTAL, "Changes refused; reason=queue_full means the outbox was full (HTTP 503).");
    describe_gauge!(QUEUE_DEPTH, "Distinct entities waiting to be written.");
    describe_gauge!(QUEUE_CAPACITY, "Most distinct entities that may wait (OUTBOX_QUEUE_CAPACITY).");
    describe_gauge!(
        OLDEST_PENDING_TIMESTAMP,
        Unit::Seconds,
        "Unix time of the oldest change not yet committed (now when none is pending)."
    );
    describe_gauge!(LAG_SECONDS, Unit::Seconds, "Age of the oldest change not yet committed; 0 when none.");
    describe_gauge!(LAST_SUCCESS_TIMESTAMP, Unit::Seconds, "Unix time of the last committed batch.");
    describe_counter!(PERSISTED_TOTAL, "Rows committed to PostgreSQL.");
    describe_counter!(BATCHES_TOTAL, "Batch flush attempts, by result.");
    describe_histogram!(BATCH_ROWS, "Rows per batch flush attempt.");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Duration of one batch transaction.");
    describe_histogram!(PERSIST_LATENCY, Unit::Seconds, "Time from a change being applied to its commit.");
    describe_counter!(PERSIST_FAILURES_TOTAL, "Failed batch flush attempts, by error type.");
    describe_counter!(RETRIES_TOTAL, "Retries of failed batches scheduled.");
    describe_counter!(
        COPY_FALLBACKS_TOTAL,
        "Batch writes whose COPY of new rows met a row already in the table, written again with upserts."
    );
    describe_counter!(DEAD_LETTERS_TOTAL, "Records quarantined in outbox_dead_letters.");
    describe_gauge!(DEAD_LETTERS, "Unresolved dead letters.");
    describe_gauge!(LEADER, "1 on the lease holder, 0 on a standby or a process that lost the lease.");
    describe_gauge!(
        LEASE_EXPIRES_TIMESTAMP,
        Unit::Seconds,
        "Unix time the held lease expires unless renewed (0 when this process does not hold it)."
    );
    describe_counter!(LEASE_TAKEOVERS_TOTAL, "Times this process took the single-writer lease.");
    describe_counter!(
        CONFLICTS_TOTAL,
        "Rows not written because the database held an equal or newer version this process did not write; quarantined as conflicts."
    );
    describe_gauge!(DB_UP, "1 when the last attempt reached the database, 0 otherwise.");
    describe_counter!(SPILLED_TOTAL, "Records written to the spill file at shutdown.");
    describe_gauge!(HYDRATED_ENTITIES, "Entities loaded from PostgreSQL at start-up.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells the running build.");
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered, by method, route template and status.");
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration, by method, route template and status."
    );
}

/// Creates every series whose labels are known at start, at zero (or its
/// starting value), so each exists from the first scrape and rules see
/// `0`, not an absent series. Per-kind series are created when a store
/// registers its kinds.
fn register_series() {
    metrics::counter!(IDEMPOTENT_REPLAYS_TOTAL).increment(0);
    for reason in CONNECTION_REFUSALS {
        metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for result in BATCH_RESULTS {
        metrics::counter!(BATCHES_TOTAL, "result" => result).increment(0);
    }
    for error_type in ERROR_TYPES {
        metrics::counter!(PERSIST_FAILURES_TOTAL, "error_type" => error_type).increment(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(REJECTED_TOTAL, "reason" => reason).increment(0);
    }
    metrics::counter!(RETRIES_TOTAL).increment(0);
    metrics::counter!(COPY_FALLBACKS_TOTAL).increment(0);
    metrics::counter!(LEASE_TAKEOVERS_TOTAL).increment(0);
    metrics::gauge!(LEADER).set(0.0);
    metrics::gauge!(LEASE_EXPIRES_TIMESTAMP).set(0.0);
    metrics::counter!(SPILLED_TOTAL).increment(0);
    metrics::gauge!(QUEUE_DEPTH).set(0.0);
    metrics::gauge!(LAG_SECONDS).set(0.0);
    let now = unix_seconds(SystemTime::now());
    metrics::gauge!(OLDEST_PENDING_TIMESTAMP).set(now);
    // Nothing is pending at start: count the start as the last time the
    // outbox was known to be in step with the database.
    metrics::gauge!(LAST_SUCCESS_TIMESTAMP).set(now);
    metrics::gauge!(DEAD_LETTERS).set(0.0);
    // Unknown until the first attempt: not up.
    metrics::gauge!(DB_UP).set(0.0);
    for histogram in [BATCH_ROWS, FLUSH_DURATION, PERSIST_LATENCY] {
        let _ = metrics::histogram!(histogram);
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

// Events: each fact the product reports is counted here, in one place.

/// A batch (or part of one) was taken for writing.
pub(crate) fn batch_taken(rows: usize) {
    metrics::histogram!(BATCH_ROWS).record(rows as f64);
}

/// A batch transaction committed.
pub(crate) fn flush_committed(elapsed: Duration) {
    metrics::counter!(BATCHES_TOTAL, "result" => "ok").increment(1);
    metrics::histogram!(FLUSH_DURATION).record(elapsed.as_secs_f64());
    metrics::gauge!(DB_UP).set(1.0);
    metrics::gauge!(LAST_SUCCESS_TIMESTAMP).set(unix_seconds(SystemTime::now()));
}

/// A batch transaction failed; `error_type` is one of [`ERROR_TYPES`].
pub(crate) fn flush_failed(elapsed: Duration, error_type: &'static str, reached_database: bool) {
    metrics::counter!(BATCHES_TOTAL, "result" => "error").increment(1);
    metrics::counter!(PERSIST_FAILURES_TOTAL, "error_type" => error_type).increment(1);
    metrics::histogram!(FLUSH_DURATION).record(elapsed.as_secs_f64());
    metrics::gauge!(DB_UP).set(if reached_database { 1.0 } else { 0.0 });
}

/// A batch transaction found the lease taken and did not commit.
pub(crate) fn flush_fenced(elapsed: Duration) {
    metrics::counter!(BATCHES_TOTAL, "result" => "error").increment(1);
    metrics::histogram!(FLUSH_DURATION).record(elapsed.as_secs_f64());
}

/// A batch's `COPY` of new rows met a row already there; it is written
/// again with upserts.
pub(crate) fn copy_fell_back() {
    metrics::counter!(COPY_FALLBACKS_TOTAL).increment(1);
}

/// A retry of a failed batch was scheduled.
pub(crate) fn retry_scheduled() {
    metrics::counter!(RETRIES_TOTAL).increment(1);
}

/// A health check reached the database, or did not.
pub(crate) fn database_reachable(up: bool) {
    metrics::gauge!(DB_UP).set(if up { 1.0 } else { 0.0 });
}

/// The engine started in step with the database.
pub(crate) fn engine_started() {
    database_reachable(true);
    metrics::gauge!(LAST_SUCCESS_TIMESTAMP).set(unix_seconds(SystemTime::now()));
}

/// The number of unresolved dead letters, as the database holds it.
pub(crate) fn dead_letters_unresolved(count: i64) {
    metrics::gauge!(DEAD_LETTERS).set(count as f64);
}

/// This process took the lease.
pub(crate) fn lease_taken(expires_at: SystemTime) {
    metrics::counter!(LEASE_TAKEOVERS_TOTAL).increment(1);
    metrics::gauge!(LEADER).set(1.0);
    metrics::gauge!(LEASE_EXPIRES_TIMESTAMP).set(unix_seconds(expires_at));
}

/// The held lease was renewed.
pub(crate) fn lease_renewed(expires_at: SystemTime) {
    metrics::gauge!(LEADER).set(1.0);
    metrics::gauge!(LEASE_EXPIRES_TIMESTAMP).set(unix_seconds(expires_at));
}

/// The held lease was not renewed in time: this process does not write
/// until it is (it may have been taken over meanwhile).
pub(crate) fn lease_lapsed() {
    metrics::gauge!(LEADER).set(0.0);
}

/// The lease was lost (expired or taken): this process writes no more.
pub(crate) fn lease_lost() {
    metrics::gauge!(LEADER).set(0.0);
    metrics::gauge!(LEASE_EXPIRES_TIMESTAMP).set(0.0);
}

/// The lease was given up at shutdown.
pub(crate) fn lease_released() {
    lease_lost();
}

/// Records were written to a spill file.
pub(crate) fn spilled(records: usize) {
    metrics::counter!(SPILLED_TOTAL).increment(records as u64);
}

/// The `method` label of an HTTP request: the standard methods by name,
/// anything else `other`, so that a client cannot create series at will.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// An HTTP request was answered.
#[cfg(feature = "server")]
pub(crate) fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let labels =
        [("method", method_label(method).to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
    metrics::counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
}

/// A retried request was answered with its key's stored answer.
#[cfg(feature = "server")]
pub(crate) fn idempotent_replay() {
    metrics::counter!(IDEMPOTENT_REPLAYS_TOTAL).increment(1);
}

/// HTTP connections open now.
#[cfg(feature = "server")]
pub(crate) fn http_connections(open: usize) {
    metrics::gauge!(HTTP_CONNECTIONS).set(open as f64);
}

/// An HTTP connection was closed by the server; `reason` is one of
/// [`CONNECTION_REFUSALS`].
#[cfg(feature = "server")]
pub(crate) fn http_connection_refused(reason: &'static str) {
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// The outbox gauges: depth, lag, oldest pending change.
pub(crate) struct OutboxGauges {
    depth: metrics::Gauge,
    lag: metrics::Gauge,
    oldest: metrics::Gauge,
}

impl OutboxGauges {
    pub(crate) fn new() -> Self {
        Self {
            depth: metrics::gauge!(QUEUE_DEPTH),
            lag: metrics::gauge!(LAG_SECONDS),
            oldest: metrics::gauge!(OLDEST_PENDING_TIMESTAMP),
        }
    }

    /// Distinct entities pending, the age of the oldest unwritten change,
    /// and when it was made.
    pub(crate) fn refresh(&self, depth: usize, lag: Duration, oldest_pending: SystemTime) {
        self.depth.set(depth as f64);
        self.lag.set(lag.as_secs_f64());
        self.oldest.set(unix_seconds(oldest_pending));
    }
}
