//! Operational routes: health, readiness, metrics, the OpenAPI document and
//! the outbox status. Readiness and status answer from memory (what the
//! writers and the health check last saw), never with a pooled connection:
//! a flood of them cannot starve the writers, and they answer at once when
//! the database hangs.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Phase, Shared};

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthBody {
    /// `ok`, `ready`, `starting`, `unavailable` or `shutting_down`.
    pub status: String,
    /// Why it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /healthz`: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process runs", body = HealthBody)))]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(HealthBody { status: "ok".into(), reason: None })
}

/// `GET /readyz`: 200 once start-up (migrations, hydration) is done and the
/// database answered the last attempt or health check; 503 with the reason
/// otherwise.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthBody),
        (status = 503, description = "Starting, shutting down, or the database does not answer", body = HealthBody),
    ))]
pub async fn readyz(State(state): State<Shared>) -> Response {
    let unavailable = |status: &str, reason: String| {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(HealthBody { status: status.into(), reason: Some(reason) }))
            .into_response()
    };
    match state.readiness.get() {
        Phase::Starting(step) => return unavailable("starting", step),
        Phase::Standby(holder) => {
            return unavailable("standby", format!("following the lease holder {holder}; ready to take over"));
        }
        Phase::ShuttingDown => return unavailable("shutting_down", "the server is shutting down".into()),
        Phase::Ready => {}
    }
    let health = state.health.snapshot();
    if health.db_up == Some(false) {
        let reason = health.last_error.map_or_else(|| "the database does not answer".to_owned(), |e| e.message);
        return unavailable("unavailable", format!("database: {reason}"));
    }
    axum::Json(HealthBody { status: "ready".into(), reason: None }).into_response()
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// The OpenAPI document, rendered once when the router is built.
#[derive(Clone)]
pub struct OpenApiJson(pub Arc<String>);

/// `GET /openapi.json`: the OpenAPI document of every route, generated from
/// the code.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi(Extension(document): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document.0.as_str().to_owned())
}

/// The last persistence error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LastErrorBody {
    /// `transient`, `permanent` or `schema`.
    pub class: String,
    /// The `error_type` label it was counted under.
    pub error_type: String,
    /// SQLSTATE, when the database sent one.
    pub sqlstate: Option<String>,
    /// The error's message.
    pub message: String,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// Body of `GET /api/outbox/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxStatus {
    /// Distinct entities waiting to be written.
    pub depth: usize,
    /// The queue's bound (`OUTBOX_QUEUE_CAPACITY`).
    pub capacity: usize,
    /// Age of the oldest unwritten change, in seconds (0 when none).
    pub lag_seconds: f64,
    /// Whether the last write attempt reached the database (absent before
    /// the first).
    pub db_up: Option<bool>,
    /// When the last batch committed.
    pub last_success: Option<DateTime<Utc>>,
    /// The last write failure.
    pub last_error: Option<LastErrorBody>,
    /// Unresolved dead letters, as last counted in the database (absent
    /// before the first count).
    pub dead_letters: Option<i64>,
    /// Entities this process holds in quarantined change sets.
    pub quarantined: usize,
    /// This process in the single-writer lease: `leader`, `standby`,
    /// `fenced` (it lost the lease) or `starting`.
    pub role: String,
    /// The lease's epoch (this process's when it leads).
    pub epoch: Option<u64>,
    /// Who holds the lease.
    pub holder: Option<String>,
    /// When the lease expires unless renewed, by the database's clock.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The lease is held but was not renewed in time: no commits (and no
    /// durable changes taken) until it is.
    pub lease_lapsed: bool,
}

fn utc(time: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(time)
}

/// `GET /api/outbox/status`: how far persistence is behind, and why.
#[utoipa::path(get, path = "/api/outbox/status", tag = "operations",
    responses((status = 200, description = "Outbox status", body = OutboxStatus)))]
pub async fn status(State(state): State<Shared>) -> impl IntoResponse {
    let outbox = state.store.outbox();
    let health = state.health.snapshot();
    let lease = state.health.lease();
    axum::Json(OutboxStatus {
        depth: outbox.depth,
        capacity: outbox.capacity,
        lag_seconds: outbox.lag.as_secs_f64(),
        db_up: health.db_up,
        last_success: health.last_success.map(utc),
        last_error: health.last_error.map(|e| LastErrorBody {
            class: e.class.into(),
            error_type: e.error_type.into(),
            sqlstate: e.sqlstate,
            message: e.message,
            at: utc(e.at),
        }),
        dead_letters: health.dead_letters,
        quarantined: state.store.quarantined(),
        role: lease.role.as_str().to_owned(),
        epoch: lease.epoch,
        holder: lease.holder,
        lease_expires_at: lease.expires_at.map(utc),
        lease_lapsed: lease.lapsed,
    })
}
