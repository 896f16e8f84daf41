//! The OpenAPI document as the contract. The handlers' annotations give the
//! routes, bodies and their own answers; this completes the document with
//! what the code enforces everywhere (rule *Refuse bad input whole*): each
//! field's limits, taken from the validators' own constants, every status
//! an operation can answer, operation ids, examples for path parameters,
//! and links from each create to what can be done with what it created, so
//! that a client generated from the document sends only what the server
//! takes, and a stateful tester reaches real resources.

use serde_json::{Map, Value, json};

use super::idempotency;
use super::validate::{
    MAX_BATCH, MAX_ENRICHED_BYTES, MAX_ENRICHED_KEYS, MAX_ID_LEN, MAX_IDENTIFIERS, MAX_KEY_LEN, MAX_LOCAL_MERGE,
    MAX_NAME_LEN, MAX_PAGE, MAX_VALUE_LEN,
};

/// No control character (Unicode category Cc: U+0000–U+001F,
/// U+007F–U+009F), as `validate::text` checks.
pub const NO_CONTROL: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";

/// No NUL character, which PostgreSQL's text and jsonb cannot hold.
const NO_NUL: &str = "^[^\\u0000]*$";

/// A text field of `min..=max` characters without control characters.
fn text(min: usize, max: usize) -> Value {
    json!({"type": "string", "minLength": min, "maxLength": max, "pattern": NO_CONTROL})
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// Completes `document` (the handlers' OpenAPI document, as JSON).
pub fn complete(document: &mut Value) {
    constrain_schemas(document);
    let paths = document["paths"].as_object_mut().expect("the document has paths");
    for (path, item) in paths.iter_mut() {
        for (method, operation) in item.as_object_mut().expect("a path item").iter_mut() {
            complete_operation(path, method, operation);
        }
    }
    add_links(document);
}

/// Sets a property's schema, keeping its description.
fn set_property(document: &mut Value, schema: &str, property: &str, mut value: Value) {
    let slot = &mut document["components"]["schemas"][schema]["properties"][property];
    assert!(slot.is_object(), "the document has {schema}.{property}");
    if let Some(description) = slot.get("description").cloned() {
        value["description"] = description;
    }
    *slot = value;
}

fn constrain_schemas(document: &mut Value) {
    let schemas = document["components"]["schemas"].as_object_mut().expect("component schemas");
    schemas.insert(
        "JsonValue".into(),
        json!({
            "description": "Any JSON value whose strings and keys hold no NUL character.",
            "anyOf": [
                {"type": "string", "pattern": NO_NUL},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "array", "items": schema_ref("JsonValue")},
                {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": schema_ref("JsonValue")}
            ]
        }),
    );
    schemas.insert(
        "EnrichedData".into(),
        json!({
            "type": "object",
            "description": format!(
                "Free-form data: at most {MAX_ENRICHED_KEYS} keys of 1 to {MAX_KEY_LEN} characters without control \
                 characters, and at most {MAX_ENRICHED_BYTES} bytes serialized."
            ),
            "maxProperties": MAX_ENRICHED_KEYS,
            "propertyNames": text(1, MAX_KEY_LEN),
            "additionalProperties": schema_ref("JsonValue")
        }),
    );
    let optional = |value: Value| json!({"anyOf": [value, {"type": "null"}]});
    let identifiers = |min: usize| json!({"type": "array", "items": schema_ref("Identifier"), "minItems": min, "maxItems": MAX_IDENTIFIERS});
    let id = text(1, MAX_ID_LEN);
    set_property(document, "Identifier", "key", text(1, MAX_KEY_LEN));
    set_property(document, "Identifier", "value", text(1, MAX_VALUE_LEN));
    set_property(document, "CreateItem", "identifiers", identifiers(1));
    set_property(document, "CreateItem", "enriched_data", optional(schema_ref("EnrichedData")));
    set_property(document, "UpdateItem", "identifiers", optional(identifiers(0)));
    set_property(document, "UpdateItem", "enriched_data", optional(schema_ref("EnrichedData")));
    set_property(
        document,
        "BatchCreate",
        "items",
        json!({"type": "array", "items": schema_ref("CreateItem"), "minItems": 1, "maxItems": MAX_BATCH}),
    );
    set_property(document, "SplitItem", "identifiers", identifiers(1));
    set_property(document, "MergeItems", "source_dfid", id.clone());
    set_property(
        document,
        "LocalMergeRequest",
        "local_ids",
        json!({"type": "array", "items": id, "minItems": 2, "maxItems": MAX_LOCAL_MERGE, "uniqueItems": true}),
    );
    set_property(document, "LocalUnmergeRequest", "local_id", text(1, MAX_ID_LEN));
    set_property(document, "CreateCircuit", "name", text(1, MAX_NAME_LEN));
    set_property(document, "AddItem", "dfid", text(1, MAX_ID_LEN));
}

/// What each status means when the handler's annotation does not say.
fn generic_description(status: &str) -> &'static str {
    match status {
        "400" => {
            "Malformed request: a body that is not JSON, a bad query, a path that is not valid UTF-8, or a \
                  malformed `Idempotency-Key`"
        }
        "404" => "No such resource",
        "409" => "Conflicts with the current state, or a request with the same `Idempotency-Key` is in flight",
        "413" => "The body exceeds the size limit (`OUTBOX_BODY_LIMIT`)",
        "415" => "The body is not `Content-Type: application/json`",
        "422" => "Well-formed but breaks a constraint, or an `Idempotency-Key` reused with a different request",
        "500" => "Applied in memory but quarantined: the database refuses it (see the dead letters)",
        "503" => "Starting, a standby, the outbox is full, or the request timed out; retry after `Retry-After`",
        "504" => "`Prefer: durable`: applied in memory but not committed within the request timeout",
        _ => "Error",
    }
}

fn add_status(responses: &mut Map<String, Value>, status: &str) {
    responses.entry(status.to_owned()).or_insert_with(|| json!({"description": generic_description(status)}));
}

fn complete_operation(path: &str, method: &str, operation: &mut Value) {
    operation["operationId"] = Value::String(operation_id(method, path));
    let parameters: Vec<Value> = operation.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
    let mutating =
        matches!(method, "post" | "put" | "delete") && path.starts_with("/api/") && !path.contains("/admin/");
    let responses = operation["responses"].as_object_mut().expect("responses");
    if path.starts_with("/api/") {
        add_status(responses, "503");
        responses["503"]["headers"] = json!({
            "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
        });
    }
    if !parameters.is_empty() && parameters.iter().any(|p| p["in"] == "query" || p["in"] == "path") {
        add_status(responses, "400");
    }
    if parameters.iter().any(|p| p["in"] == "path") {
        add_status(responses, "404");
    }
    let has_body = operation.get("requestBody").is_some();
    let responses = operation["responses"].as_object_mut().expect("responses");
    if has_body {
        for status in ["400", "413", "415", "422"] {
            add_status(responses, status);
        }
    }
    if mutating {
        for status in ["400", "409", "422", "500", "504"] {
            add_status(responses, status);
        }
        let success = responses.keys().find(|s| s.starts_with('2')).cloned();
        if let Some(success) = success {
            let headers = responses[&success]["headers"].as_object_mut().map(std::mem::take).unwrap_or_default();
            let mut headers = headers;
            headers.insert(
                idempotency::REPLAYED_HEADER.into(),
                json!({"description": "`true` when this is the stored answer to an earlier request with the same \
                                       `Idempotency-Key`", "schema": {"type": "string", "enum": ["true"]}}),
            );
            responses[&success]["headers"] = Value::Object(headers);
        }
        let key = json!({
            "name": idempotency::KEY_HEADER,
            "in": "header",
            "required": false,
            "description": format!(
                "Makes a retry safe: the first answer to a request with this key is stored with its change and \
                 replayed (with `{}: true`) to a retry of the same request for {} s by default \
                 (`OUTBOX_IDEMPOTENCY_TTL_S`); the same key with a different request is refused (422), one in flight \
                 answers 409. 1 to {} visible ASCII characters.",
                idempotency::REPLAYED_HEADER, idempotency::DEFAULT_TTL.as_secs(), idempotency::MAX_KEY_LEN
            ),
            "schema": {"type": "string", "minLength": 1, "maxLength": idempotency::MAX_KEY_LEN, "pattern": "^[\\x21-\\x7E]+$"}
        });
        match operation.get_mut("parameters").and_then(Value::as_array_mut) {
            Some(list) => list.push(key),
            None => operation["parameters"] = json!([key]),
        }
    }
    if let Some(parameters) = operation.get_mut("parameters").and_then(Value::as_array_mut) {
        for parameter in parameters.iter_mut() {
            complete_parameter(parameter);
        }
        pair_key_and_value(parameters);
    }
}

/// `key` and `value` go together: described as one object parameter that
/// is serialized as `key=...&value=...` (form style, exploded), both of its
/// properties required.
fn pair_key_and_value(parameters: &mut Vec<Value>) {
    let (Some(key), Some(value)) = (
        parameters.iter().position(|p| p["in"] == "query" && p["name"] == "key"),
        parameters.iter().position(|p| p["in"] == "query" && p["name"] == "value"),
    ) else {
        return;
    };
    let (key_schema, value_schema) = (parameters[key]["schema"].clone(), parameters[value]["schema"].clone());
    parameters.retain(|p| !(p["in"] == "query" && (p["name"] == "key" || p["name"] == "value")));
    parameters.push(json!({
        "name": "identifier",
        "in": "query",
        "required": false,
        "style": "form",
        "explode": true,
        "description": "Only items with this identifier: `key=...&value=...`, both or neither.",
        "schema": {
            "type": "object",
            "properties": {"key": key_schema, "value": value_schema},
            "required": ["key", "value"],
            "additionalProperties": false
        }
    }));
}

fn complete_parameter(parameter: &mut Value) {
    match (parameter["in"].as_str(), parameter["name"].as_str()) {
        (Some("path"), Some("dfid")) => parameter["example"] = json!("DFID-7b0c0a8d5c1e4f6a9d2b3c4e5f607182"),
        (Some("path"), Some("id")) if parameter["schema"]["type"] == "integer" => {
            parameter["schema"]["minimum"] = json!(1);
            parameter["schema"]["maximum"] = json!(i64::MAX);
            parameter["example"] = json!(1);
        }
        (Some("path"), Some("id")) => parameter["example"] = json!("0b6f8a50-3f1e-4c59-9a7d-2f0c6a1e9b34"),
        (Some("query"), Some("limit")) => {
            parameter["schema"] = json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE});
        }
        (Some("query"), Some("key")) => parameter["schema"] = text(1, MAX_KEY_LEN),
        (Some("query"), Some("value")) => parameter["schema"] = text(1, MAX_VALUE_LEN),
        (Some("query"), Some("after")) => parameter["schema"] = json!({"type": "string"}),
        _ => {}
    }
}

/// `post /api/items/{dfid}/merge` → `post_items_dfid_merge`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_owned();
    for segment in path.split('/').filter(|s| !s.is_empty() && *s != "api") {
        id.push('_');
        id.extend(
            segment.chars().filter(|c| !matches!(c, '{' | '}')).map(|c| if c.is_alphanumeric() { c } else { '_' }),
        );
    }
    id
}

/// Links from each create to what can be done with what it created.
fn add_links(document: &mut Value) {
    let item = |at: &str| json!({"dfid": format!("$response.body#{at}")});
    let item_links = |at: &str| {
        json!({
            "GetItem": {"operationId": "get_items_dfid", "parameters": item(at)},
            "UpdateItem": {"operationId": "put_items_dfid", "parameters": item(at)},
            "DeleteItem": {"operationId": "delete_items_dfid", "parameters": item(at)},
            "MergeIntoItem": {"operationId": "post_items_dfid_merge", "parameters": item(at)},
            "SplitItem": {"operationId": "post_items_dfid_split", "parameters": item(at)},
            "DeprecateItem": {"operationId": "put_items_dfid_deprecate", "parameters": item(at)},
        })
    };
    let circuit = json!({"id": "$response.body#/id"});
    let links = [
        ("/api/items", "post", "201", item_links("/dfid")),
        ("/api/items/batch", "post", "201", item_links("/items/0/dfid")),
        ("/api/items/{dfid}/split", "post", "201", item_links("/created/dfid")),
        ("/api/items/local", "post", "201", {
            let mut links = item_links("/item/dfid");
            links["UnmergeLocal"] = json!({
                "operationId": "post_items_local_unmerge",
                "requestBody": {"local_id": "$response.body#/local_id"}
            });
            links
        }),
        (
            "/api/circuits",
            "post",
            "201",
            json!({
                "GetCircuit": {"operationId": "get_circuits_id", "parameters": circuit},
                "AddItemToCircuit": {"operationId": "post_circuits_id_items", "parameters": circuit},
            }),
        ),
    ];
    for (path, method, status, links) in links {
        let response = &mut document["paths"][path][method]["responses"][status];
        assert!(response.is_object(), "{method} {path} answers {status}");
        response["links"] = links;
    }
}
