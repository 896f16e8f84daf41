//! Router tests without a socket: every error case answers the
//! right status with problem details and changes nothing; the happy paths of
//! the reference service's semantics.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox::api::model::{Circuit, Item, LocalMapping};
use outbox::api::{AppState, Phase, Readiness, router, store_builder};
use outbox::config::AckMode;
use outbox::store::Store;
use serde_json::{Value, json};
use tower::ServiceExt;

const BODY_LIMIT: usize = 64 * 1024;

fn app_with(capacity: usize, phase: Phase, admin_token: Option<&str>) -> (Router, Store) {
    let (store, _receiver) = store_builder().capacity(capacity).build();
    // The receiver is dropped: these tests never write to a database.
    let readiness = Arc::new(Readiness::new());
    readiness.set(phase);
    // A pool that is never connected: nothing here needs the database.
    let pool = outbox::pg::pool(outbox::pg::parse_url("host=/nonexistent dbname=none").unwrap(), 1);
    let state = AppState {
        readiness,
        pool,
        metrics: outbox::metrics::install(),
        store: store.clone(),
        health: Default::default(),
        ack: AckMode::Memory,
        body_limit: BODY_LIMIT,
        request_timeout: Duration::from_secs(5),
        admin_token: admin_token.map(str::to_owned),
        idempotency_ttl: Duration::from_secs(60),
        in_flight: Default::default(),
    };
    (router(state), store)
}

fn app() -> (Router, Store) {
    app_with(1000, Phase::Ready, None)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty)).unwrap();
    send(app, request).await
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("the router answers");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Answer { status, headers, body }
}

/// Every entity with its version and value: equal before and after a
/// refused request means nothing changed.
fn fingerprint(store: &Store) -> Vec<String> {
    store.read(|view| {
        let mut all: Vec<String> = view
            .entries::<Item>()
            .map(|(id, v, item)| format!("item {id} {v} {}", serde_json::to_string(&item.as_deref()).unwrap()))
            .chain(
                view.entries::<Circuit>()
                    .map(|(id, v, c)| format!("circuit {id} {v} {}", serde_json::to_string(&c.as_deref()).unwrap())),
            )
            .chain(
                view.entries::<LocalMapping>()
                    .map(|(id, v, m)| format!("local {id} {v} {}", serde_json::to_string(&m.as_deref()).unwrap())),
            )
            .collect();
        all.sort();
        all
    })
}

/// Asserts a problem-details answer with `status`, and that the store did
/// not change.
async fn assert_refused(
    app: &Router,
    store: &Store,
    method: &str,
    uri: &str,
    body: Option<&str>,
    status: StatusCode,
) -> Value {
    let before = fingerprint(store);
    let answer = call(app, method, uri, body).await;
    assert_eq!(answer.status, status, "{method} {uri} {body:?}: {}", answer.body);
    assert_problem(&answer, status);
    assert_eq!(fingerprint(store), before, "{method} {uri} changed state while refused");
    answer.body
}

fn assert_problem(answer: &Answer, status: StatusCode) {
    assert_eq!(
        answer.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "problem content type for {status}"
    );
    assert_eq!(answer.body["status"], status.as_u16());
    assert!(answer.body["type"].as_str().is_some_and(|t| t.starts_with("urn:outbox:problem:")), "{}", answer.body);
    assert!(answer.body["title"].is_string());
    assert!(answer.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

async fn create(app: &Router, identifiers: &[(&str, &str)]) -> Value {
    let ids: Vec<Value> = identifiers.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
    let answer = call(app, "POST", "/api/items", Some(&json!({"identifiers": ids}).to_string())).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    answer.body
}

#[tokio::test]
async fn malformed_and_ill_typed_bodies_are_refused() {
    let (app, store) = app();
    create(&app, &[("gtin", "1")]).await;
    let post = |body: &'static str, status| {
        let (app, store) = (app.clone(), store.clone());
        async move { assert_refused(&app, &store, "POST", "/api/items", Some(body), status).await }
    };
    post("{not json", StatusCode::BAD_REQUEST).await;
    post(r#"{"identifiers": "gtin"}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": [{"key": "gtin", "value": 1}]}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": [{"key": "a", "value": "b"}], "colour": "red"}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": [{"key": "a", "value": "b", "extra": 1}]}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": []}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": [{"key": "", "value": "b"}]}"#, StatusCode::UNPROCESSABLE_ENTITY).await;
    post(r#"{"identifiers": [{"key": "a", "value": "b"}], "enriched_data": [1]}"#, StatusCode::UNPROCESSABLE_ENTITY)
        .await;

    // No content type.
    let before = fingerprint(&store);
    let request = Request::post("/api/items").body(Body::from(r#"{"identifiers": []}"#)).unwrap();
    let answer = send(&app, request).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_problem(&answer, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(fingerprint(&store), before);
}

#[tokio::test]
async fn size_limits_are_enforced() {
    let (app, store) = app();
    // Body over the limit (by length header, and streamed without one).
    let big = format!(r#"{{"identifiers": [{{"key": "a", "value": "{}"}}]}}"#, "x".repeat(BODY_LIMIT));
    assert_refused(&app, &store, "POST", "/api/items", Some(&big), StatusCode::PAYLOAD_TOO_LARGE).await;
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.clone().into_bytes())]);
    let request = Request::post("/api/items")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let answer = send(&app, request).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&answer, StatusCode::PAYLOAD_TOO_LARGE);

    // Too many identifiers, too long strings, too much enriched data.
    let many: Vec<Value> = (0..101).map(|i| json!({"key": "k", "value": i.to_string()})).collect();
    let body = json!({"identifiers": many}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"identifiers": [{"key": "k".repeat(129), "value": "v"}]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"identifiers": [{"key": "k", "value": "v".repeat(513)}]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"identifiers": [{"key": "k", "value": "line\nbreak"}]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body =
        json!({"identifiers": [{"key": "k", "value": "v"}], "enriched_data": {"a": {"b": ["x\u{0}y"]}}}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let keys: serde_json::Map<String, Value> = (0..257).map(|i| (format!("k{i}"), json!(i))).collect();
    let body = json!({"identifiers": [{"key": "k", "value": "v"}], "enriched_data": keys}).to_string();
    assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fingerprint(&store), Vec::<String>::new());
}

#[tokio::test]
async fn batch_create_is_all_or_nothing() {
    let (app, store) = app();
    let good = json!({"identifiers": [{"key": "k", "value": "v"}]});
    let bad = json!({"identifiers": []});
    let body = json!({"items": [good, good, bad]}).to_string();
    let problem =
        assert_refused(&app, &store, "POST", "/api/items/batch", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(problem["detail"].as_str().unwrap().contains("items[2]"), "the detail names the item: {problem}");
    let body = json!({"items": []}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/batch", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"items": vec![good.clone(); 1001]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/batch", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;

    let body = json!({"items": vec![good; 3]}).to_string();
    let answer = call(&app, "POST", "/api/items/batch", Some(&body)).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let items = answer.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["version"] == 1 && i["status"] == "active"));
}

/// The raw body of an answer.
async fn raw(app: &Router, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty)).unwrap();
    let response = app.clone().oneshot(request).await.expect("the router answers");
    let status = response.status();
    (status, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec())
}

/// An answer to a change renders the item from the JSON the worker writes
/// for it, with the version added: byte for byte what `GET` answers (which
/// serializes the item with its version), for each kind of change.
#[tokio::test]
async fn answers_to_changes_render_items_as_get_does() {
    let (app, _store) = app();
    let same_as_get = |(status, body): (StatusCode, Vec<u8>)| {
        let app = app.clone();
        async move {
            assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
            let item: Value = serde_json::from_slice(&body).unwrap();
            let uri = format!("/api/items/{}", item["dfid"].as_str().unwrap());
            let (status, shown) = raw(&app, "GET", &uri, None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(String::from_utf8(body).unwrap(), String::from_utf8(shown).unwrap());
            item
        }
    };
    let create = r#"{"identifiers": [{"key": "gtin", "value": "1"}], "enriched_data": {"note": "a \"quoted\" é", "n": [1, 2.5, null]}}"#;
    let a = same_as_get(raw(&app, "POST", "/api/items", Some(create)).await).await;
    assert_eq!(a["version"], 1);
    let a_uri = format!("/api/items/{}", a["dfid"].as_str().unwrap());
    let updated = raw(&app, "PUT", &a_uri, Some(r#"{"enriched_data": {"colour": "red"}}"#)).await;
    assert_eq!(same_as_get(updated).await["version"], 2);
    let b =
        same_as_get(raw(&app, "POST", "/api/items", Some(r#"{"identifiers": [{"key": "sku", "value": "b"}]}"#)).await)
            .await;
    let merge = format!(r#"{{"source_dfid": "{}"}}"#, b["dfid"].as_str().unwrap());
    let merged = same_as_get(raw(&app, "POST", &format!("{a_uri}/merge"), Some(&merge)).await).await;
    assert_eq!(merged["identifiers"].as_array().unwrap().len(), 2);
    let c =
        same_as_get(raw(&app, "POST", "/api/items", Some(r#"{"identifiers": [{"key": "sku", "value": "c"}]}"#)).await)
            .await;
    let deprecated = raw(&app, "PUT", &format!("/api/items/{}/deprecate", c["dfid"].as_str().unwrap()), None).await;
    assert_eq!(same_as_get(deprecated).await["status"], "deprecated");
}

#[tokio::test]
async fn item_lifecycle_semantics() {
    let (app, store) = app();
    let a = create(&app, &[("gtin", "1"), ("gtin", "1")]).await;
    assert_eq!(a["version"], 1);
    assert_eq!(a["identifiers"].as_array().unwrap().len(), 1, "duplicates are dropped");
    let dfid = a["dfid"].as_str().unwrap().to_owned();

    // Update merges enriched data by top-level key and adds identifiers.
    let uri = format!("/api/items/{dfid}");
    let answer = call(&app, "PUT", &uri, Some(r#"{"enriched_data": {"colour": "red", "size": 1}}"#)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = call(
        &app,
        "PUT",
        &uri,
        Some(r#"{"enriched_data": {"size": 2, "colour": null}, "identifiers": [{"key": "gtin", "value": "1"}, {"key": "sku", "value": "s"}]}"#),
    )
    .await;
    assert_eq!(answer.body["enriched_data"], json!({"size": 2}));
    assert_eq!(answer.body["identifiers"], json!([{"key": "gtin", "value": "1"}, {"key": "sku", "value": "s"}]));
    assert_eq!(answer.body["version"], 3);
    // An empty update changes nothing and answers the item as it is.
    let same = call(&app, "PUT", &uri, Some("{}")).await;
    assert_eq!((same.status, &same.body["version"]), (StatusCode::OK, &json!(3)));
    assert_refused(
        &app,
        &store,
        "PUT",
        "/api/items/DFID-missing",
        Some(r#"{"identifiers": []}"#),
        StatusCode::NOT_FOUND,
    )
    .await;

    // Deprecate is idempotent.
    let b = create(&app, &[("gtin", "2")]).await;
    let b_uri = format!("/api/items/{}/deprecate", b["dfid"].as_str().unwrap());
    let first = call(&app, "PUT", &b_uri, None).await;
    assert_eq!(
        (first.status, first.body["status"].clone(), first.body["version"].clone()),
        (StatusCode::OK, json!("deprecated"), json!(2))
    );
    let before = fingerprint(&store);
    let second = call(&app, "PUT", &b_uri, None).await;
    assert_eq!(second.body, first.body, "deprecating again changes nothing");
    assert_eq!(fingerprint(&store), before);

    // Delete leaves a tombstone: later GETs are 404, a second delete too.
    let answer = call(&app, "DELETE", &uri, None).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert_refused(&app, &store, "GET", &uri, None, StatusCode::NOT_FOUND).await;
    assert_refused(&app, &store, "DELETE", &uri, None, StatusCode::NOT_FOUND).await;
    assert_eq!(store.read(|v| v.version::<Item>(&dfid)), 4, "the tombstone is versioned");
}

#[tokio::test]
async fn merge_rules() {
    let (app, store) = app();
    let target = create(&app, &[("gtin", "1")]).await;
    let source = create(&app, &[("gtin", "2"), ("gtin", "1")]).await;
    let (t, s) = (target["dfid"].as_str().unwrap(), source["dfid"].as_str().unwrap());
    let merge = |into: &str, from: &str| (format!("/api/items/{into}/merge"), json!({"source_dfid": from}).to_string());

    let (uri, body) = merge(t, t);
    let problem = assert_refused(&app, &store, "POST", &uri, Some(&body), StatusCode::CONFLICT).await;
    assert!(problem["detail"].as_str().unwrap().contains("itself"));
    let (uri, body) = merge(t, "DFID-missing");
    assert_refused(&app, &store, "POST", &uri, Some(&body), StatusCode::NOT_FOUND).await;
    let (uri, body) = merge("DFID-missing", s);
    assert_refused(&app, &store, "POST", &uri, Some(&body), StatusCode::NOT_FOUND).await;

    let (uri, body) = merge(t, s);
    let answer = call(&app, "POST", &uri, Some(&body)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["identifiers"], json!([{"key": "gtin", "value": "1"}, {"key": "gtin", "value": "2"}]));
    let merged = call(&app, "GET", &format!("/api/items/{s}"), None).await.body;
    assert_eq!((merged["status"].clone(), merged["merged_into"].clone()), (json!("merged"), json!(t)));

    // A merged item can be neither merged again nor merged into.
    let third = create(&app, &[("gtin", "3")]).await;
    let x = third["dfid"].as_str().unwrap();
    let (uri, body) = merge(x, s);
    assert_refused(&app, &store, "POST", &uri, Some(&body), StatusCode::CONFLICT).await;
    let (uri, body) = merge(s, x);
    assert_refused(&app, &store, "POST", &uri, Some(&body), StatusCode::CONFLICT).await;
    assert_refused(
        &app,
        &store,
        "PUT",
        &format!("/api/items/{s}"),
        Some(r#"{"identifiers": []}"#),
        StatusCode::CONFLICT,
    )
    .await;

    // Lookups follow the merge.
    let page = call(&app, "GET", "/api/items?key=gtin&value=2", None).await.body;
    let dfids: Vec<&str> = page["items"].as_array().unwrap().iter().map(|i| i["dfid"].as_str().unwrap()).collect();
    assert_eq!(dfids.len(), 2, "target and merged source both carry gtin=2");
    let page = call(&app, "GET", "/api/items?status=merged", None).await.body;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["dfid"], s);
}

#[tokio::test]
async fn split_rules() {
    let (app, store) = app();
    let item = create(&app, &[("a", "1"), ("b", "2"), ("c", "3")]).await;
    let uri = format!("/api/items/{}/split", item["dfid"].as_str().unwrap());
    let problem = assert_refused(
        &app,
        &store,
        "POST",
        &uri,
        Some(r#"{"identifiers": [{"key": "a", "value": "1"}, {"key": "z", "value": "9"}]}"#),
        StatusCode::CONFLICT,
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("z=9"), "{problem}");
    let all =
        r#"{"identifiers": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}, {"key": "c", "value": "3"}]}"#;
    assert_refused(&app, &store, "POST", &uri, Some(all), StatusCode::CONFLICT).await;
    assert_refused(&app, &store, "POST", &uri, Some(r#"{"identifiers": []}"#), StatusCode::UNPROCESSABLE_ENTITY).await;

    let answer = call(&app, "POST", &uri, Some(r#"{"identifiers": [{"key": "b", "value": "2"}]}"#)).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.body["original"]["identifiers"], json!([{"key": "a", "value": "1"}, {"key": "c", "value": "3"}]));
    assert_eq!(answer.body["created"]["identifiers"], json!([{"key": "b", "value": "2"}]));
    assert_eq!(answer.body["original"]["version"], 2);
    assert_eq!(answer.body["created"]["version"], 1);
}

#[tokio::test]
async fn local_merge_and_unmerge_restore_exactly() {
    let (app, store) = app();
    let create_local = |ids: Value| {
        let app = app.clone();
        async move {
            let answer = call(&app, "POST", "/api/items/local", Some(&json!({"identifiers": ids}).to_string())).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
            answer.body
        }
    };
    let first = create_local(json!([{"key": "a", "value": "1"}, {"key": "shared", "value": "x"}])).await;
    let second = create_local(json!([{"key": "b", "value": "2"}, {"key": "shared", "value": "x"}])).await;
    let (l1, l2) = (first["local_id"].as_str().unwrap(), second["local_id"].as_str().unwrap());
    assert_eq!(first["item"]["local_id"], l1);
    let get = |dfid: &Value| {
        let app = app.clone();
        let uri = format!("/api/items/{}", dfid.as_str().unwrap());
        async move { call(&app, "GET", &uri, None).await.body }
    };
    let before_target = get(&first["item"]["dfid"]).await;
    let before_source = get(&second["item"]["dfid"]).await;

    let body = json!({"local_ids": [l1, l1]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/local/merge", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"local_ids": [l1]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/local/merge", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let body = json!({"local_ids": [l1, "no-such-lid"]}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/local/merge", Some(&body), StatusCode::NOT_FOUND).await;
    let body = json!({"local_id": l2}).to_string();
    assert_refused(&app, &store, "POST", "/api/items/local/unmerge", Some(&body), StatusCode::CONFLICT).await;

    let body = json!({"local_ids": [l1, l2]}).to_string();
    let merged = call(&app, "POST", "/api/items/local/merge", Some(&body)).await;
    assert_eq!(merged.status, StatusCode::OK, "{}", merged.body);
    assert_eq!(
        merged.body["target"]["identifiers"],
        json!([{"key": "a", "value": "1"}, {"key": "shared", "value": "x"}, {"key": "b", "value": "2"}])
    );
    assert_eq!(merged.body["merged"][0]["status"], "merged");
    assert_refused(&app, &store, "POST", "/api/items/local/merge", Some(&body), StatusCode::CONFLICT).await;

    let body = json!({"local_id": l2}).to_string();
    let unmerged = call(&app, "POST", "/api/items/local/unmerge", Some(&body)).await;
    assert_eq!(unmerged.status, StatusCode::OK, "{}", unmerged.body);
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("version");
        v.as_object_mut().unwrap().remove("updated_at");
        v
    };
    let after_target = get(&first["item"]["dfid"]).await;
    let after_source = get(&second["item"]["dfid"]).await;
    assert_eq!(strip(after_target.clone()), strip(before_target), "the target is as before the merge");
    assert_eq!(strip(after_source.clone()), strip(before_source), "the source is as before the merge");
    assert!(after_target["version"].as_u64() > Some(1), "versions only grow");
    assert_refused(&app, &store, "POST", "/api/items/local/unmerge", Some(&body), StatusCode::CONFLICT).await;
}

#[tokio::test]
async fn circuits_and_items_change_together() {
    let (app, store) = app();
    let body = json!({"name": "n".repeat(201)}).to_string();
    assert_refused(&app, &store, "POST", "/api/circuits", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    let circuit = call(&app, "POST", "/api/circuits", Some(r#"{"name": "north"}"#)).await;
    assert_eq!(circuit.status, StatusCode::CREATED);
    let id = circuit.body["id"].as_str().unwrap();
    let item = create(&app, &[("gtin", "1")]).await;
    let dfid = item["dfid"].as_str().unwrap();
    let uri = format!("/api/circuits/{id}/items");
    assert_refused(&app, &store, "POST", &uri, Some(r#"{"dfid": "DFID-missing"}"#), StatusCode::NOT_FOUND).await;
    assert_refused(
        &app,
        &store,
        "POST",
        "/api/circuits/none/items",
        Some(&json!({"dfid": dfid}).to_string()),
        StatusCode::NOT_FOUND,
    )
    .await;
    let added = call(&app, "POST", &uri, Some(&json!({"dfid": dfid}).to_string())).await;
    assert_eq!(added.status, StatusCode::OK);
    assert_eq!(added.body["items"], json!([dfid]));
    assert_eq!(added.body["version"], 2);
    let item = call(&app, "GET", &format!("/api/items/{dfid}"), None).await.body;
    assert_eq!(item["circuits"], json!([id]));
    // Adding again changes nothing.
    let before = fingerprint(&store);
    let again = call(&app, "POST", &uri, Some(&json!({"dfid": dfid}).to_string())).await;
    assert_eq!((again.status, again.body["version"].clone()), (StatusCode::OK, json!(2)));
    assert_eq!(fingerprint(&store), before);
    // Deleting the item takes it out of the circuit in the same change set.
    call(&app, "DELETE", &format!("/api/items/{dfid}"), None).await;
    let circuit = call(&app, "GET", &format!("/api/circuits/{id}"), None).await.body;
    assert_eq!(circuit["items"], json!([]));
    assert_refused(&app, &store, "GET", "/api/circuits/none", None, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn listing_pages_with_a_stable_cursor_and_rejects_bad_queries() {
    let (app, store) = app();
    for i in 0..25 {
        create(&app, &[("n", &i.to_string())]).await;
    }
    let mut seen = Vec::new();
    let mut uri = "/api/items?limit=10".to_owned();
    loop {
        let page = call(&app, "GET", &uri, None).await.body;
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| i["dfid"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => uri = format!("/api/items?limit=10&after={next}"),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "pages come in DFID order without repeats");
    assert_eq!(seen.len(), 25);
    for uri in [
        "/api/items?key=n",
        "/api/items?value=1",
        "/api/items?limit=0",
        "/api/items?limit=1001",
        "/api/items?colour=red",
        "/api/items?status=gone",
    ] {
        assert_refused(&app, &store, "GET", uri, None, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let (app, store) = app();
    assert_refused(&app, &store, "GET", "/api/nothing", None, StatusCode::NOT_FOUND).await;
    let answer = call(&app, "PATCH", "/api/items/x", None).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_problem(&answer, StatusCode::METHOD_NOT_ALLOWED);
    assert!(answer.headers.contains_key(header::ALLOW));
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after_and_changes_nothing() {
    let (app, store) = app_with(1, Phase::Ready, None);
    create(&app, &[("a", "1")]).await;
    let body = json!({"identifiers": [{"key": "b", "value": "2"}]}).to_string();
    let before = fingerprint(&store);
    let answer = call(&app, "POST", "/api/items", Some(&body)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_problem(&answer, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.get(header::RETRY_AFTER).is_some_and(|v| v.to_str().unwrap().parse::<u64>().unwrap() >= 1));
    assert_eq!(fingerprint(&store), before);

    // A change set that could never fit is a client error, not a retry.
    let (app, store) = app_with(2, Phase::Ready, None);
    let item = json!({"identifiers": [{"key": "k", "value": "v"}]});
    let body = json!({"items": [item, item, item]}).to_string();
    let problem =
        assert_refused(&app, &store, "POST", "/api/items/batch", Some(&body), StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(problem["detail"].as_str().unwrap().contains("at most 2"), "{problem}");
}

#[tokio::test]
async fn entity_routes_wait_for_start_up() {
    let (app, store) = app_with(10, Phase::Starting("hydrating".into()), None);
    let body = json!({"identifiers": [{"key": "b", "value": "2"}]}).to_string();
    let problem =
        assert_refused(&app, &store, "POST", "/api/items", Some(&body), StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(problem["detail"].as_str().unwrap().contains("hydrating"));
    assert_refused(&app, &store, "GET", "/api/items", None, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(call(&app, "GET", "/healthz", None).await.status, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/readyz", None).await.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn admin_routes_need_the_token_and_are_absent_without_one() {
    let (app, _) = app();
    assert_eq!(call(&app, "GET", "/api/admin/dead-letters", None).await.status, StatusCode::NOT_FOUND);
    let (app, _) = app_with(10, Phase::Ready, Some("s3cret"));
    let answer = call(&app, "GET", "/api/admin/dead-letters", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_problem(&answer, StatusCode::UNAUTHORIZED);
    for token in ["Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "s3cret", "Basic s3cret"] {
        let request =
            Request::get("/api/admin/dead-letters").header(header::AUTHORIZATION, token).body(Body::empty()).unwrap();
        assert_eq!(send(&app, request).await.status, StatusCode::UNAUTHORIZED, "{token}");
    }
}

#[tokio::test]
async fn openapi_document_validates_and_lists_every_route() {
    let (app, _) = app_with(10, Phase::Ready, Some("token"));
    let answer = call(&app, "GET", "/openapi.json", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.body.to_string();
    let spec = oas3::from_json(&text).expect("the document parses as OpenAPI 3.1");
    spec.validate_version().expect("a supported OpenAPI version");

    let mut operations: Vec<(String, String)> =
        spec.operations().map(|(path, method, _)| (method.to_string().to_uppercase(), path)).collect();
    operations.sort();
    for (method, path) in [
        ("POST", "/api/items"),
        ("GET", "/api/items"),
        ("POST", "/api/items/batch"),
        ("GET", "/api/items/{dfid}"),
        ("PUT", "/api/items/{dfid}"),
        ("DELETE", "/api/items/{dfid}"),
        ("POST", "/api/items/{dfid}/merge"),
        ("POST", "/api/items/{dfid}/split"),
        ("PUT", "/api/items/{dfid}/deprecate"),
        ("POST", "/api/items/local"),
        ("POST", "/api/items/local/merge"),
        ("POST", "/api/items/local/unmerge"),
        ("POST", "/api/circuits"),
        ("GET", "/api/circuits/{id}"),
        ("POST", "/api/circuits/{id}/items"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/api/outbox/status"),
        ("GET", "/api/admin/dead-letters"),
    ] {
        assert!(
            operations.contains(&(method.to_owned(), path.to_owned())),
            "{method} {path} is documented: {operations:?}"
        );
    }

    // Every reference resolves to a component schema.
    let schemas = answer.body["components"]["schemas"].as_object().expect("component schemas");
    let mut refs = Vec::new();
    collect_refs(&answer.body, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let name =
            reference.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected $ref {reference}"));
        assert!(schemas.contains_key(name), "$ref {reference} resolves");
    }
    // Every error answer is documented as problem details.
    for (path, item) in answer.body["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                // (`/readyz` answers its own health body, 503 included.)
                if (status.starts_with('4') || status.starts_with('5')) && path != "/readyz" {
                    let schema = &response["content"]["application/problem+json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/Problem", "{method} {path} {status}");
                }
            }
        }
    }
    // Every path parameter is declared.
    for (path, item) in answer.body["paths"].as_object().unwrap() {
        for (_, operation) in item.as_object().unwrap() {
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(['{', '}']);
                let declared = operation["parameters"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in"] == "path"));
                assert!(declared, "{path} declares its parameter {name}");
            }
        }
    }
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "$ref" {
                    out.push(value.as_str().unwrap_or_default().to_owned());
                } else {
                    collect_refs(value, out);
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn an_item_is_in_a_bounded_number_of_circuits_and_can_always_be_deleted() {
    let (app, store) = app_with(200, Phase::Ready, None);
    let item = create(&app, &[("gtin", "many")]).await;
    let dfid = item["dfid"].as_str().unwrap();
    let limit = outbox::api::validate::MAX_ITEM_CIRCUITS;
    let mut circuits = Vec::new();
    for n in 0..=limit {
        let circuit = call(&app, "POST", "/api/circuits", Some(&json!({"name": format!("c{n}")}).to_string())).await;
        circuits.push(circuit.body["id"].as_str().unwrap().to_owned());
    }
    for circuit in &circuits[..limit] {
        let added =
            call(&app, "POST", &format!("/api/circuits/{circuit}/items"), Some(&json!({"dfid": dfid}).to_string()))
                .await;
        assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    }
    let uri = format!("/api/circuits/{}/items", circuits[limit]);
    assert_refused(&app, &store, "POST", &uri, Some(&json!({"dfid": dfid}).to_string()), StatusCode::CONFLICT).await;
    // Deleting changes the item and all its circuits in one change set,
    // which fits the outbox.
    let deleted = call(&app, "DELETE", &format!("/api/items/{dfid}"), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
}

#[tokio::test]
async fn unmerging_never_brings_back_a_deleted_item() {
    let (app, store) = app();
    let local = |ids: Value| {
        let app = app.clone();
        async move { call(&app, "POST", "/api/items/local", Some(&json!({"identifiers": ids}).to_string())).await.body }
    };
    let first = local(json!([{"key": "a", "value": "1"}])).await;
    let second = local(json!([{"key": "b", "value": "2"}])).await;
    let (l1, l2) = (first["local_id"].as_str().unwrap(), second["local_id"].as_str().unwrap());
    let merged = call(&app, "POST", "/api/items/local/merge", Some(&json!({"local_ids": [l1, l2]}).to_string())).await;
    assert_eq!(merged.status, StatusCode::OK);
    let source = second["item"]["dfid"].as_str().unwrap();
    assert_eq!(call(&app, "DELETE", &format!("/api/items/{source}"), None).await.status, StatusCode::NO_CONTENT);
    let body = json!({"local_id": l2}).to_string();
    let problem =
        assert_refused(&app, &store, "POST", "/api/items/local/unmerge", Some(&body), StatusCode::CONFLICT).await;
    assert!(problem["detail"].as_str().unwrap().contains("deleted"), "{problem}");
    assert_eq!(call(&app, "GET", &format!("/api/items/{source}"), None).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_methods_share_one_metric_label() {
    let (app, _) = app();
    for method in ["FOO1", "FOO2", "BREW"] {
        let request = Request::builder().method(method).uri("/healthz").body(Body::empty()).unwrap();
        send(&app, request).await;
    }
    let metrics = String::from_utf8(
        axum::body::to_bytes(
            app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap().into_body(),
            usize::MAX,
        )
        .await
        .unwrap()
        .to_vec(),
    )
    .unwrap();
    assert!(!metrics.contains("FOO1") && !metrics.contains("BREW"), "a client's method is never a label");
    assert!(
        metrics.lines().any(|l| l.starts_with("outbox_http_requests_total") && l.contains("method=\"other\"")),
        "they count as other"
    );
}

/// A limit as the document states it.
fn limit(document: &Value, pointer: &str) -> usize {
    document.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("the document states {pointer}"))
        as usize
}

#[tokio::test]
async fn the_document_states_the_limits_the_validators_enforce() {
    let (app, store) = app_with(10_000, Phase::Ready, None);
    let document = call(&app, "GET", "/openapi.json", None).await.body;
    let schemas = "/components/schemas";
    let max_key = limit(&document, &format!("{schemas}/Identifier/properties/key/maxLength"));
    let max_value = limit(&document, &format!("{schemas}/Identifier/properties/value/maxLength"));
    let max_identifiers = limit(&document, &format!("{schemas}/CreateItem/properties/identifiers/maxItems"));
    let max_batch = limit(&document, &format!("{schemas}/BatchCreate/properties/items/maxItems"));
    let max_name = limit(&document, &format!("{schemas}/CreateCircuit/properties/name/maxLength"));
    let max_keys = limit(&document, &format!("{schemas}/EnrichedData/maxProperties"));
    assert_eq!(
        document.pointer(&format!("{schemas}/Identifier/properties/key/pattern")),
        Some(&json!(outbox::api::contract::NO_CONTROL))
    );

    // Each limit is where the server draws the line: at it accepted, past
    // it refused (lengths count characters, as JSON Schema does).
    let accepted = |body: Value, path: &'static str| {
        let app = app.clone();
        async move {
            let answer = call(&app, "POST", path, Some(&body.to_string())).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{path} {body}: {}", answer.body);
        }
    };
    let refused = |body: Value, path: &'static str| {
        let (app, store) = (app.clone(), store.clone());
        async move {
            assert_refused(&app, &store, "POST", path, Some(&body.to_string()), StatusCode::UNPROCESSABLE_ENTITY).await
        }
    };
    let identifier = |key: String, value: String| json!({"identifiers": [{"key": key, "value": value}]});
    accepted(identifier("é".repeat(max_key), "€".repeat(max_value)), "/api/items").await;
    refused(identifier("é".repeat(max_key + 1), "v".into()), "/api/items").await;
    refused(identifier("k".into(), "€".repeat(max_value + 1)), "/api/items").await;
    refused(identifier("bell\u{7}".into(), "v".into()), "/api/items").await;
    refused(identifier("k".into(), "c1\u{85}".into()), "/api/items").await;
    let many = |n: usize| (0..n).map(|i| json!({"key": "sku", "value": format!("v{i}")})).collect::<Vec<_>>();
    accepted(json!({"identifiers": many(max_identifiers)}), "/api/items").await;
    refused(json!({"identifiers": many(max_identifiers + 1)}), "/api/items").await;
    let batch = |n: usize| json!({"items": (0..n).map(|i| identifier("b".into(), i.to_string())).collect::<Vec<_>>()});
    accepted(batch(max_batch), "/api/items/batch").await;
    refused(batch(max_batch + 1), "/api/items/batch").await;
    accepted(json!({"name": "ñ".repeat(max_name)}), "/api/circuits").await;
    refused(json!({"name": "ñ".repeat(max_name + 1)}), "/api/circuits").await;
    let data = |n: usize| (0..n).map(|i| (format!("k{i}"), json!(i))).collect::<serde_json::Map<_, _>>();
    accepted(json!({"identifiers": many(1), "enriched_data": data(max_keys)}), "/api/items").await;
    refused(json!({"identifiers": many(1), "enriched_data": data(max_keys + 1)}), "/api/items").await;

    let page = document["paths"]["/api/items"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .map(|p| p["schema"]["maximum"].as_u64().unwrap())
        .unwrap();
    assert_eq!(call(&app, "GET", &format!("/api/items?limit={page}"), None).await.status, StatusCode::OK);
    for bad in [format!("/api/items?limit={}", page + 1), "/api/items?limit=0".into(), "/api/items?key=k".into()] {
        assert_eq!(call(&app, "GET", &bad, None).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }

    // Every operation with a body answers malformed JSON 400 and a wrong
    // content type 415, and says so.
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if operation.get("requestBody").is_none() {
                continue;
            }
            let uri = path.replace("{dfid}", "DFID-x").replace("{id}", "x");
            let method_upper = method.to_uppercase();
            let malformed = call(&app, &method_upper, &uri, Some("{")).await.status;
            let request = Request::builder()
                .method(method_upper.as_str())
                .uri(&uri)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("{}"))
                .unwrap();
            let wrong_type = send(&app, request).await.status;
            for status in [malformed, wrong_type] {
                assert!(
                    operation["responses"].get(status.as_str()).is_some(),
                    "{method} {path} answers {status}, which its document lists"
                );
            }
            assert_eq!(
                (malformed, wrong_type),
                (StatusCode::BAD_REQUEST, StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{method} {path}"
            );
        }
    }
}
