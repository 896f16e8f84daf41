//! The HTTP edge: one [`router`] for the reference items/circuits service
//! and its operational routes. Handlers change state only through
//! the store; errors are RFC 9457 problem details; the OpenAPI document is
//! generated from the handlers' annotations, so it cannot drift from the
//! routes.

pub mod admin;
pub mod circuits;
pub mod contract;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod index;
pub mod items;
pub mod local;
pub mod model;
pub mod ops;
pub mod schema;
pub mod validate;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::metrics as m;
use crate::store::{ChangeSet, Store};
use crate::worker::health::Health;
use error::ApiError;

/// When a change is acknowledged to the HTTP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckMode {
    /// Answer after the in-memory change (write-behind); a `Prefer: durable`
    /// request still waits for its commit.
    Memory,
    /// Answer every change only after the batch carrying it has committed.
    Durable,
}

/// Where start-up and shutdown stand, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Start-up is under way; the text says which step.
    Starting(String),
    /// Another process holds the lease: this one is a hot standby, ready
    /// to take over; the text names the holder.
    Standby(String),
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

/// What every handler can reach (as [`Shared`]).
pub struct AppState {
    /// Start-up progress.
    pub readiness: Arc<Readiness>,
    /// The database pool (readiness checks, admin queries).
    pub pool: Pool,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The entities.
    pub store: Store,
    /// What the engine last saw of the database (readiness, status).
    pub health: Arc<Health>,
    /// The default acknowledgement (`OUTBOX_ACK`).
    pub ack: AckMode,
    /// Largest request body.
    pub body_limit: usize,
    /// Longest a request may take (`OUTBOX_REQUEST_TIMEOUT_S`).
    pub request_timeout: Duration,
    /// The admin bearer token; `None` turns the admin routes off.
    pub admin_token: Option<String>,
    /// How long an `Idempotency-Key`'s answer is kept
    /// (`OUTBOX_IDEMPOTENCY_TTL_S`).
    pub idempotency_ttl: Duration,
    /// Keys whose first request is being answered.
    pub in_flight: Arc<idempotency::InFlight>,
}

/// The state handlers and middleware take.
pub type Shared = Arc<AppState>;

impl AppState {
    /// Refuses entity routes until start-up (hydration) is done: before
    /// that, memory does not hold the database's state yet.
    pub fn ensure_ready(&self) -> Result<(), ApiError> {
        match self.readiness.get() {
            Phase::Ready | Phase::ShuttingDown => Ok(()),
            Phase::Standby(holder) => Err(ApiError::unavailable(
                format!("this instance is a standby; the lease holder ({holder}) serves"),
                Duration::from_secs(1),
            )),
            Phase::Starting(step) => {
                Err(ApiError::unavailable(format!("the server is starting ({step})"), Duration::from_secs(1)))
            }
        }
    }

    /// Applies a change through the store; with `durable`, answers only
    /// once the change set is committed (I11), within the request timeout.
    pub async fn change<T>(
        &self,
        durable: bool,
        change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.ensure_ready()?;
        if !durable {
            return Ok(self.store.apply(change)?);
        }
        // A durable change is taken only when it can be committed: not
        // while the lease has lapsed (the database is away, or this process
        // woke from a freeze and may have been replaced), so that a client
        // told to retry elsewhere was not also taken in here.
        if !self.health.may_commit() {
            return Err(ApiError::unavailable(
                "this instance cannot commit now: its single-writer lease has lapsed (the database is away, or \
                 another instance is taking over); retry",
                Duration::from_secs(1),
            ));
        }
        let (value, ticket) = self.store.apply_durable(change)?;
        // Leave a moment of the request's budget to answer in.
        let wait = self.request_timeout.saturating_sub(Duration::from_millis(500)).max(Duration::from_millis(100));
        match tokio::time::timeout(wait, ticket.wait()).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "not-yet-durable",
                    format!(
                        "the change was applied in memory but not committed within {} s (is the database down?); \
                         it will be written when the database answers",
                        wait.as_secs()
                    ),
                ));
            }
        }
        Ok(value)
    }

    /// Applies `change` through the store and answers `status` with
    /// `render` of its outcome (JSON; no body for 204). A request with an
    /// `Idempotency-Key` stores that answer in the same change set, so it is
    /// persisted with the change (rule *Idempotent requests*).
    pub async fn answer<T, B: AnswerBody>(
        &self,
        durable: bool,
        status: StatusCode,
        change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, ApiError>,
        render: impl FnOnce(T) -> B,
    ) -> Result<Response, ApiError> {
        let pending = idempotency::pending();
        let encode = |body: B| -> Result<Vec<u8>, ApiError> {
            if status == StatusCode::NO_CONTENT {
                return Ok(Vec::new());
            }
            body.into_json().map_err(|e| ApiError::internal(&e))
        };
        let mut render = Some(render);
        // Only a keyed request's answer is made inside the change set (it is
        // stored with it); any other is made after the store's lock is let go.
        let outcome = self
            .change(durable, |set| {
                let outcome = change(set)?;
                let Some(pending) = &pending else { return Ok(Err(outcome)) };
                let body = encode(render.take().expect("rendered once")(outcome))?;
                set.upsert(pending.record(status, &body))?;
                Ok(Ok(body))
            })
            .await?;
        let body = match outcome {
            Ok(body) => body,
            Err(outcome) => encode(render.take().expect("rendered once")(outcome))?,
        };
        let mut response = if body.is_empty() {
            status.into_response()
        } else {
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        };
        if durable {
            response.headers_mut().insert("preference-applied", HeaderValue::from_static("durable"));
        }
        Ok(response)
    }
}

/// What an answer's body is made from: anything serializable, or an
/// [`ItemBody`](items::ItemBody), which reuses the item's JSON.
pub trait AnswerBody {
    /// The body's JSON.
    fn into_json(self) -> Result<Vec<u8>, serde_json::Error>;
}

impl<T: Serialize> AnswerBody for T {
    fn into_json(self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "outbox reference service",
        description = "Items, local items and circuits kept in memory and persisted to PostgreSQL through an \
                       outbox. Every mutation accepts `Prefer: durable` to be answered only after its commit. \
                       Errors are RFC 9457 problem details (`application/problem+json`)."
    ),
    tags(
        (name = "items", description = "Items"),
        (name = "local items", description = "Local items and local merges"),
        (name = "circuits", description = "Circuits"),
        (name = "operations", description = "Health, readiness, metrics, status"),
        (name = "admin", description = "Quarantined change sets; needs the admin bearer token"),
    ),
    components(schemas(error::Problem)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The reference service's store: items (with their indexes), circuits and
/// local-id mappings.
pub fn store_builder() -> crate::store::StoreBuilder {
    Store::builder()
        .kind::<model::Item>()
        .kind::<model::Circuit>()
        .kind::<model::LocalMapping>()
        .kind::<idempotency::IdempotencyRecord>()
        .index::<model::Item, _>(index::ItemIndex::default())
}

/// Every route and its documentation. The admin routes are included only
/// when a token is configured.
fn routes(admin: bool) -> OpenApiRouter<Shared> {
    let router = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(items::create, items::list))
        .routes(routes!(items::create_batch))
        .routes(routes!(items::get, items::update, items::delete))
        .routes(routes!(items::merge))
        .routes(routes!(items::split))
        .routes(routes!(items::deprecate))
        .routes(routes!(local::create))
        .routes(routes!(local::merge))
        .routes(routes!(local::unmerge))
        .routes(routes!(circuits::create))
        .routes(routes!(circuits::get))
        .routes(routes!(circuits::add_item))
        .routes(routes!(ops::status))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi));
    if !admin {
        return router;
    }
    router.merge(
        OpenApiRouter::new()
            .routes(routes!(admin::list))
            .routes(routes!(admin::replay))
            .routes(routes!(admin::discard)),
    )
}

/// Every error answer is problem details: the document says so once, for
/// every 4xx and 5xx response, instead of on each.
fn with_problem_details(document: &mut serde_json::Value) {
    let problem = serde_json::json!({"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}});
    for item in document["paths"].as_object_mut().expect("paths").values_mut() {
        for operation in item.as_object_mut().expect("a path item").values_mut() {
            for (status, response) in operation["responses"].as_object_mut().expect("responses").iter_mut() {
                if (status.starts_with('4') || status.starts_with('5')) && response.get("content").is_none() {
                    response["content"] = problem.clone();
                }
            }
        }
    }
}

/// The router and its OpenAPI document (as JSON), admin routes included or
/// not.
fn router_and_document(admin: bool) -> (Router<Shared>, serde_json::Value) {
    let (router, document) = routes(admin).split_for_parts();
    let mut document = serde_json::to_value(&document).expect("the OpenAPI document serializes");
    contract::complete(&mut document);
    with_problem_details(&mut document);
    (router, document)
}

/// The OpenAPI document of the service (with the admin routes).
pub fn openapi() -> serde_json::Value {
    router_and_document(true).1
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    // Shared by reference: every extractor and middleware clones the state
    // of every request, which is then one reference count.
    let state: Shared = Arc::new(state);
    let admin = state.admin_token.is_some();
    let (router, document) = router_and_document(admin);
    let document = ops::OpenApiJson(Arc::new(document.to_string()));
    let router =
        if admin { router.route_layer(middleware::from_fn_with_state(state.clone(), admin_gate)) } else { router };
    router
        .fallback(|| async { ApiError::not_found("no such route") })
        .route_layer(middleware::from_fn_with_state(state.clone(), idempotency::guard))
        .route_layer(middleware::from_fn(track_http))
        .layer(Extension(document))
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, state.request_timeout))
        .layer(middleware::from_fn(problem_for_bare_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Most of an over-limit body read and discarded before answering 413, and
/// for how long: a client that sends its whole body before reading gets
/// the answer instead of a connection reset (a lingering close).
const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;
const LINGER_MAX_TIME: Duration = Duration::from_secs(5);

/// Reads the body whole, up to the limit (`OUTBOX_BODY_LIMIT`); a larger
/// one is read on and discarded (up to [`LINGER_MAX_BYTES`]) and answered
/// 413, closing the connection.
async fn limit_body(State(state): State<Shared>, request: Request, next: Next) -> Response {
    use http_body_util::BodyExt;
    let (parts, mut body) = request.into_parts();
    let mut kept = Vec::new();
    let mut total = 0usize;
    let read = tokio::time::timeout(LINGER_MAX_TIME, async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            total += data.len();
            if total <= state.body_limit {
                kept.extend_from_slice(&data);
            } else if total > LINGER_MAX_BYTES {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    })
    .await;
    if total > state.body_limit {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the request body exceeds the size limit of {} bytes (OUTBOX_BODY_LIMIT)", state.body_limit),
        )
        .into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    match read {
        Ok(Ok(())) => next.run(Request::from_parts(parts, Body::from(kept))).await,
        Ok(Err(e)) => ApiError::bad_request(format!("the request body could not be read: {e}")).into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {} s", LINGER_MAX_TIME.as_secs()),
        )
        .into_response(),
    }
}

/// Applies the admin token check to `/api/admin/*` only.
async fn admin_gate(
    axum::extract::State(state): axum::extract::State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with("/api/admin/") {
        admin::require_token(axum::extract::State(state), request, next).await
    } else {
        next.run(request).await
    }
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
    m::http_request(&method, &route, response.status().as_u16(), started.elapsed());
    response
}

/// Error answers produced outside the handlers (unknown method, body over
/// the limit, timeout) come without a body; give them problem details too.
async fn problem_for_bare_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/problem+json") || content_type.starts_with("application/json") {
        return response;
    }
    let (kind, detail) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "this route does not accept that method".to_owned()),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("too-large", "the request body exceeds the size limit (OUTBOX_BODY_LIMIT)".to_owned())
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            ("timeout", "the request took longer than the request timeout (OUTBOX_REQUEST_TIMEOUT_S)".to_owned())
        }
        StatusCode::NOT_FOUND => ("not-found", "no such route".to_owned()),
        _ => ("error", status.canonical_reason().unwrap_or("error").to_owned()),
    };
    let mut problem = ApiError::new(status, kind, detail).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = response.headers().get(&name) {
            problem.headers_mut().insert(name, value.clone());
        }
    }
    problem
}
