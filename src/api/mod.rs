//! The HTTP edge: one [`router`] for the reference service and its
//! operational routes (health, readiness, metrics).

pub mod error;
pub mod extract;
pub mod items;
pub mod model;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;

use crate::config::AckMode;
use crate::metrics as m;
use crate::store::{ChangeSet, Store};
use error::ApiError;

/// How long `/readyz` waits for the database to answer.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where start-up and shutdown stand, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Start-up is under way; the text says which step.
    Starting(String),
    /// Serving.
    Ready,
    /// Shutdown has begun.
    ShuttingDown,
}

/// Start-up progress shared by the server and `/readyz`.
#[derive(Debug)]
pub struct Readiness {
    /// `std::sync::Mutex`: held for a clone or an assignment, never across an
    /// await.
    phase: Mutex<Phase>,
}

impl Readiness {
    /// Starts in [`Phase::Starting`].
    pub fn new() -> Self {
        Self { phase: Mutex::new(Phase::Starting("starting".into())) }
    }

    /// Moves to `phase`.
    pub fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = phase;
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Start-up progress.
    pub readiness: Arc<Readiness>,
    /// The database pool (readiness checks).
    pub pool: Pool,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The entities.
    pub store: Store,
    /// The default acknowledgement (`OUTBOX_ACK`).
    pub ack: AckMode,
    /// Largest request body.
    pub body_limit: usize,
}

impl AppState {
    /// Refuses entity routes until start-up (hydration) is done: before
    /// that, memory does not hold the database's state yet.
    pub fn ensure_ready(&self) -> Result<(), ApiError> {
        match self.readiness.get() {
            Phase::Ready | Phase::ShuttingDown => Ok(()),
            Phase::Starting(step) => {
                Err(ApiError::unavailable(format!("the server is starting ({step})"), Duration::from_secs(1)))
            }
        }
    }

    /// Applies a change through the store; with `durable`, answers only
    /// once the change set is committed (I11).
    pub async fn change<T>(
        &self,
        durable: bool,
        change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.ensure_ready()?;
        if durable {
            let (value, ticket) = self.store.apply_durable(change)?;
            ticket.wait().await?;
            Ok(value)
        } else {
            Ok(self.store.apply(change)?)
        }
    }

    /// A JSON response, saying `Preference-Applied: durable` when the change
    /// was committed before answering.
    pub fn respond(&self, status: StatusCode, body: &impl Serialize, durable: bool) -> Response {
        let mut response = (status, axum::Json(body)).into_response();
        if durable {
            response.headers_mut().insert("preference-applied", HeaderValue::from_static("durable"));
        }
        response
    }
}

/// The reference service's store: items, circuits and local-id mappings.
pub fn store_builder() -> crate::store::StoreBuilder {
    Store::builder().kind::<model::Item>().kind::<model::Circuit>().kind::<model::LocalMapping>()
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/api/items", post(items::create))
        .route("/api/items/{dfid}", get(items::get))
        .layer(DefaultBodyLimit::max(state.body_limit))
        .route_layer(middleware::from_fn(track_http))
        .with_state(state)
}

/// 200 while the process runs.
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(json!({ "status": "ok" })))
}

/// 200 once start-up finished and the database answers; 503 with a JSON
/// reason otherwise.
async fn readyz(State(state): State<AppState>) -> Response {
    let unavailable = |status: &str, reason: String| {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": status, "reason": reason }))).into_response()
    };
    match state.readiness.get() {
        Phase::Starting(step) => return unavailable("starting", step),
        Phase::ShuttingDown => return unavailable("shutting_down", "the server is shutting down".into()),
        Phase::Ready => {}
    }
    match tokio::time::timeout(READY_CHECK_TIMEOUT, crate::pg::ping(&state.pool)).await {
        Ok(Ok(())) => (StatusCode::OK, axum::Json(json!({ "status": "ready" }))).into_response(),
        Ok(Err(e)) => unavailable("unavailable", format!("database: {e}")),
        Err(_) => unavailable("unavailable", format!("database: no answer within {READY_CHECK_TIMEOUT:?}")),
    }
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// Counts and times every request by method, route template (never the raw
/// path, whose ids would make labels unbounded) and status.
async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}
