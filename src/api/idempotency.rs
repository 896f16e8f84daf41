//! `Idempotency-Key` (rule *Idempotent requests*): a mutation carrying a key
//! is applied at most once per key. The first successful answer is stored
//! as an entity (`idempotency_keys`) in the same change set as the mutation,
//! so it is persisted, hydrated and failed over with it; a retry of the same
//! request (same method, path and body) gets that answer again with
//! `Idempotent-Replayed: true`, another request with the key gets 422, and a
//! retry while the first is still being answered gets 409. An error answer
//! changes nothing and is not stored: a retry runs again. Records expire
//! after the time to live, as tombstones written in batches like any
//! change.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::{AppState, Shared};
use crate::store::{Entity, Store, StoreError};

/// The request header.
pub const KEY_HEADER: &str = "Idempotency-Key";
/// The response header of a replayed answer.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// How long a key's record is kept by default (`OUTBOX_IDEMPOTENCY_TTL_S`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Most records expired in one change set.
const EXPIRE_BATCH: usize = 1000;

/// The first answer to a request with a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The key.
    pub key: String,
    /// SHA-256 of the request's method, path and body, hex.
    pub fingerprint: String,
    /// The answer's status.
    pub status: u16,
    /// The answer's body (JSON text; empty for 204).
    pub body: String,
    /// When the answer was given.
    pub created_at: DateTime<Utc>,
    /// When the record stops counting.
    pub expires_at: DateTime<Utc>,
}

impl Entity for IdempotencyRecord {
    const KIND: &'static str = "idempotency_key";
    const TABLE: &'static str = "idempotency_keys";
    fn id(&self) -> &str {
        &self.key
    }
}

/// Keys whose first request is being answered now.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<String>>);

/// A key held in flight until dropped.
struct Claim<'a> {
    in_flight: &'a InFlight,
    key: String,
}

impl InFlight {
    fn claim(&self, key: &str) -> Option<Claim<'_>> {
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        keys.insert(key.to_owned()).then(|| Claim { in_flight: self, key: key.to_owned() })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// What a mutation answering under a key stores with its change.
#[derive(Clone)]
pub struct Pending {
    key: String,
    fingerprint: String,
    ttl: Duration,
}

impl Pending {
    /// The record of `status` and `body`, to stage in the change set.
    pub fn record(&self, status: StatusCode, body: &[u8]) -> IdempotencyRecord {
        let now = Utc::now();
        IdempotencyRecord {
            key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(body).into_owned(),
            created_at: now,
            expires_at: now + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX),
        }
    }
}

tokio::task_local! {
    /// The key of the request being answered, for [`AppState::answer`].
    static PENDING: Pending;
}

/// The pending record of the request being answered, if it has a key.
pub fn pending() -> Option<Pending> {
    PENDING.try_with(Pending::clone).ok()
}

/// A key as the request gives it: 1 to 255 visible ASCII characters.
fn parse_key(value: &HeaderValue) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ApiError::bad_request(format!(
            "{KEY_HEADER}: 1 to {MAX_KEY_LEN} visible ASCII characters, without spaces or control characters"
        )));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn fingerprint(method: &Method, uri: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b"\n");
    hash.update(uri.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether requests to this route may carry a key.
fn applies(method: &Method, path: &str) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::DELETE | Method::PATCH)
        && path.starts_with("/api/")
        && !path.starts_with("/api/admin/")
}

/// The middleware: replays, refuses, or answers the request with its key
/// pending.
pub async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(value) = request.headers().get(KEY_HEADER).cloned() else {
        return next.run(request).await;
    };
    if !applies(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    match keyed(&state, value, request, next).await {
        Ok(response) | Err(response) => response,
    }
}

async fn keyed(state: &AppState, value: HeaderValue, request: Request, next: Next) -> Result<Response, Response> {
    let key = parse_key(&value).map_err(IntoResponse::into_response)?;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, state.body_limit).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", "the request body exceeds the size limit")
            .into_response()
    })?;
    let uri = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let fingerprint = fingerprint(&parts.method, &uri, &body);
    state.ensure_ready().map_err(IntoResponse::into_response)?;
    let Some(_claim) = state.in_flight.claim(&key) else {
        return Err(ApiError::conflict(format!(
            "a request with {KEY_HEADER} {key} is being answered; retry once it has been"
        ))
        .into_response());
    };
    let stored = state.store.get::<IdempotencyRecord>(&key).filter(|r| r.value.expires_at > Utc::now());
    if let Some(stored) = stored {
        if stored.value.fingerprint != fingerprint {
            return Err(ApiError::unprocessable(format!(
                "{KEY_HEADER} {key} was used for a different request (method, path or body); use a new key"
            ))
            .into_response());
        }
        crate::metrics::idempotent_replay();
        let durable = super::extract::wants_durable(&parts.headers, state.ack);
        // A durable retry is answered once the record is committed.
        state
            .change(durable, |set| {
                set.watch::<IdempotencyRecord>(&key);
                Ok(())
            })
            .await
            .map_err(IntoResponse::into_response)?;
        return Ok(replay(&stored.value, durable));
    }
    let pending = Pending { key, fingerprint, ttl: state.idempotency_ttl };
    let request = Request::from_parts(parts, Body::from(body));
    Ok(PENDING.scope(pending, next.run(request)).await)
}

/// The stored answer, said to be replayed.
fn replay(record: &IdempotencyRecord, durable: bool) -> Response {
    let status = StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK);
    let mut response = if record.body.is_empty() {
        status.into_response()
    } else {
        (status, [(header::CONTENT_TYPE, "application/json")], record.body.clone()).into_response()
    };
    response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    if durable {
        response.headers_mut().insert("preference-applied", HeaderValue::from_static("durable"));
    }
    response
}

/// Expires records past their time: deletes them (tombstones, written like
/// any change) in change sets of up to [`EXPIRE_BATCH`]. Returns how many.
pub fn expire(store: &Store, now: DateTime<Utc>) -> usize {
    let mut expired_total = 0;
    loop {
        let expired: Vec<String> = store.read(|view| {
            view.iter::<IdempotencyRecord>()
                .filter(|r| r.value.expires_at <= now)
                .take(EXPIRE_BATCH)
                .map(|r| r.value.key.clone())
                .collect()
        });
        if expired.is_empty() {
            return expired_total;
        }
        let applied = store.apply(|set| -> Result<(), StoreError> {
            for key in &expired {
                set.delete::<IdempotencyRecord>(key)?;
            }
            Ok(())
        });
        match applied {
            Ok(()) => expired_total += expired.len(),
            Err(e) => {
                // Full queue or shutting down: the next round tries again.
                tracing::warn!(error = %e, keys = expired.len(), "idempotency keys not expired yet");
                return expired_total;
            }
        }
        if expired.len() < EXPIRE_BATCH {
            return expired_total;
        }
    }
}

/// Expires records every `every` until `shutdown`.
pub async fn expire_periodically(store: Store, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
        let expired = expire(&store, Utc::now());
        if expired > 0 {
            tracing::debug!(expired, "idempotency keys expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(parse_key(&HeaderValue::from_static("8e03978e-40d5-43e8-bc93-6894a57f9324")).is_ok());
        assert!(parse_key(&HeaderValue::from_static("\"quoted\"")).is_ok());
        assert!(parse_key(&HeaderValue::from_static("")).is_err());
        assert!(parse_key(&HeaderValue::from_static("has space")).is_err());
        assert!(parse_key(&HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN)).unwrap()).is_ok());
        assert!(parse_key(&HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN + 1)).unwrap()).is_err());
        assert!(parse_key(&HeaderValue::from_bytes(b"tab\there").unwrap()).is_err());
        assert!(parse_key(&HeaderValue::from_bytes("ünï".as_bytes()).unwrap()).is_err());
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let a = fingerprint(&Method::POST, "/api/items", b"{}");
        assert_eq!(a, fingerprint(&Method::POST, "/api/items", b"{}"));
        assert_ne!(a, fingerprint(&Method::PUT, "/api/items", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/api/items/batch", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/api/items", b"{ }"));
    }
}
