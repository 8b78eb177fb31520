//! The OpenAPI 3.1 document served at `/openapi.json`: every route's `#[utoipa::path]` annotation, plus
//! the conventions every endpoint shares (error answers, Retry-After, keys), added in one place.

use std::collections::HashMap;
use std::sync::OnceLock;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type};
use utoipa::{Modify, OpenApi};

use super::{adapters, drift, embed, feedback, openai, ops, predict, rollouts, tasks, tei, train};

/// The document; `ApiDoc::openapi()` builds it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flywheel",
        description = "Serve a transformer with hot-swapped LoRA adapters, learn from feedback, \
                       canary and promote new generations. Every error answers \
                       `{\"error\": \"sentence\", \"error_type\": \"snake_case_kind\"}`."
    ),
    paths(
        ops::health,
        ops::ready,
        ops::metrics,
        ops::openapi,
        embed::embed,
        predict::predict,
        tasks::create,
        tasks::list,
        tasks::get,
        feedback::post,
        feedback::list,
        train::submit,
        train::list,
        train::get,
        train::cancel,
        adapters::list,
        adapters::load,
        adapters::delete,
        adapters::set_alias,
        adapters::delete_alias,
        rollouts::start,
        rollouts::list,
        rollouts::get,
        rollouts::traffic,
        rollouts::promote,
        rollouts::rollback,
        drift::get,
        openai::embeddings,
        openai::models,
        openai::model,
        openai::classify,
        tei::embed,
        tei::predict,
        tei::tokenize,
        tei::info,
    ),
    components(schemas(super::error::ErrorBody, openai::OpenAiErrorBody)),
    modifiers(&Conventions),
    tags(
        (name = "inference", description = "Embeddings and classification"),
        (name = "tasks", description = "Tasks and their label sets"),
        (name = "feedback", description = "Corrections the trainer learns from"),
        (name = "training", description = "Training jobs (admin)"),
        (name = "adapters", description = "Adapter generations and aliases (admin)"),
        (name = "rollouts", description = "A/B rollouts of candidate generations (admin)"),
        (name = "drift", description = "Drift of a task's traffic"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "openai", description = "OpenAI-style embeddings, models and (vLLM's) classification; \
            errors in OpenAI's shape `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`"),
        (name = "tei", description = "Text Embeddings Inference's routes and shapes"),
    )
)]
pub struct ApiDoc;

/// Paths that answer as a documented one, for clients that expect them there: (the path, the documented
/// path, a suffix that keeps its operations' ids unique). vLLM posts classifications to `/classify`;
/// Hugging Face's `InferenceClient` posts embeddings to the server's root, as TEI serves them.
pub(super) const ALIASES: [(&str, &str, &str); 2] = [
    ("/classify", "/v1/classify", "vllm"),
    ("/", "/embed", "root"),
];

/// The schema of an input text: a non-blank character, as the handlers require, and bounded by
/// `[limits] max_text_bytes`.
pub(super) fn text(what: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("\\S"))
        .description(Some(format!(
            "{what}: not blank, at most `[limits] max_text_bytes` bytes"
        )))
}

/// The methods the document lists for a route pattern, as an `Allow` header value (`GET, POST`).
pub(super) fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static ALLOWED: OnceLock<HashMap<String, String>> = OnceLock::new();
    ALLOWED
        .get_or_init(|| {
            ApiDoc::openapi()
                .paths
                .paths
                .into_iter()
                .map(|(path, item)| {
                    let methods: Vec<&str> = [
                        ("GET", item.get.is_some()),
                        ("PUT", item.put.is_some()),
                        ("POST", item.post.is_some()),
                        ("DELETE", item.delete.is_some()),
                    ]
                    .into_iter()
                    .filter_map(|(method, present)| present.then_some(method))
                    .collect();
                    (path, methods.join(", "))
                })
                .collect()
        })
        .get(&plain_pattern(pattern))
        .map(String::as_str)
}

/// A route pattern as the document names it: a segment's constraint dropped (`{model:.+}` → `{model}`).
pub(super) fn plain_pattern(pattern: &str) -> String {
    let mut plain = String::with_capacity(pattern.len());
    let (mut segment, mut constraint) = (false, false);
    for c in pattern.chars() {
        match c {
            '{' if !constraint => {
                segment = true;
                plain.push(c);
            }
            ':' if segment => constraint = true,
            '}' => {
                (segment, constraint) = (false, false);
                plain.push(c);
            }
            _ if constraint => {}
            _ => plain.push(c),
        }
    }
    plain
}

/// Error answers every endpoint of a kind may give, each `(status, when)`: [`KEYED`] those that take a
/// key, [`EVERY_V1`] every API endpoint.
const KEYED: [(&str, &str); 2] = [
    (
        "401",
        "A key is required and missing or not valid (`unauthorized`)",
    ),
    (
        "403",
        "The key may not use this endpoint, or an admin endpoint was called from a non-loopback \
         client while no admin keys are configured (`forbidden`)",
    ),
];
const EVERY_V1: [(&str, &str); 1] = [(
    "503",
    "The model is loading (`not_ready`), the store is unavailable \
         (`storage_unavailable`), the server is stopping (`shutting_down`) or the model gave \
         no answer in time (`timeout`); retry after `Retry-After` seconds",
)];
const BODY_LATE: (&str, &str) = (
    "408",
    "The body did not arrive whole within `[server] body_timeout_secs` (`request_timeout`)",
);
const WITH_BODY: [(&str, &str); 5] = [
    ("400", "The body is not JSON (`malformed_request`)"),
    BODY_LATE,
    (
        "413",
        "The body exceeds `[limits] max_body_bytes` (`payload_too_large`)",
    ),
    (
        "415",
        "The body is not sent as `application/json` (`unsupported_media_type`)",
    ),
    (
        "422",
        "The JSON has the wrong shape or a value out of range (`invalid_request`)",
    ),
];
const OPENAI_WITH_BODY: [(&str, &str); 4] = [
    (
        "400",
        "The body is not JSON (`malformed_request`), or it has the wrong shape or a value out of range \
         (`invalid_request`)",
    ),
    BODY_LATE,
    (
        "413",
        "The body exceeds `[limits] max_body_bytes` (`payload_too_large`)",
    ),
    (
        "415",
        "The body is not sent as `application/json` (`unsupported_media_type`)",
    ),
];
const INFERENCE: (&str, &str) = (
    "429",
    "Overloaded: the queue is full, or the model's work ahead of the request plus its own is expected to \
     take longer than `[batching] max_expected_wait_ms` (`overloaded`); retry after `Retry-After` seconds",
);
const WITH_QUERY: (&str, &str) = (
    "422",
    "A query parameter is missing or out of range (`invalid_request`)",
);

/// Adds the shared error answers (429 on inference, `Retry-After` on every 429 and 503) and the two key
/// schemes, and makes operation ids unique.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        for (name, whose) in [
            ("api_key", "an inference key (`FLYWHEEL_API_KEYS`) or an admin key; needed only when API keys are configured"),
            ("admin_key", "an admin key (`FLYWHEEL_ADMIN_KEYS`); with none configured, admin endpoints answer loopback clients only"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(format!("`Authorization: Bearer <key>` with {whose}")))
                        .build(),
                ),
            );
        }
        for (path, item) in api.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                // Handlers share names across modules (`list`, `get`): the tag makes the ids unique.
                if let (Some(tag), Some(id)) = (
                    operation.tags.as_ref().and_then(|t| t.first()),
                    operation.operation_id.as_mut(),
                ) {
                    *id = format!("{tag}_{id}");
                }
                let tags = operation.tags.clone().unwrap_or_default();
                let tagged = |name: &str| tags.iter().any(|t| t == name);
                let (openai, tei) = (tagged("openai"), tagged("tei"));
                // OpenAI's shape on its routes, with 400 where Flywheel's own routes answer 422.
                let (body, schema) = if openai {
                    (&OPENAI_WITH_BODY[..], "OpenAiErrorBody")
                } else {
                    (&WITH_BODY[..], "ErrorBody")
                };
                if operation.security.is_some() {
                    add_errors(operation, &KEYED, schema);
                }
                if path.starts_with("/v1/") || tei {
                    add_errors(operation, &EVERY_V1, schema);
                }
                if operation.request_body.is_some() {
                    add_errors(operation, body, schema);
                }
                let has_query = operation
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| p.parameter_in == ParameterIn::Query);
                if has_query {
                    add_errors(operation, &[WITH_QUERY], schema);
                }
                let infers = tagged("inference")
                    || tei && operation.request_body.is_some()
                    || openai && operation.request_body.is_some();
                if infers {
                    add_errors(operation, &[INFERENCE], schema);
                }
                retry_after_on_429_and_503(operation);
            }
        }
        for (alias, documented, suffix) in ALIASES {
            let Some(mut item) = api.paths.paths.get(documented).cloned() else {
                continue;
            };
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                if let Some(id) = operation.operation_id.as_mut() {
                    *id = format!("{id}_{suffix}");
                }
                let same = format!("The same as `{documented}`.");
                operation.description = Some(match operation.description.take() {
                    Some(description) => format!("{description}\n\n{same}"),
                    None => same,
                });
            }
            api.paths.paths.insert(alias.to_owned(), item);
        }
    }
}

/// Adds each `(status, when)` answer the operation does not document itself, with the body `schema`.
fn add_errors(operation: &mut Operation, errors: &[(&str, &str)], schema: &str) {
    for &(status, when) in errors {
        let responses = &mut operation.responses.responses;
        if responses.contains_key(status) {
            continue;
        }
        let response = ResponseBuilder::new().description(when).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        );
        responses.insert(status.to_owned(), RefOr::T(response.build()));
    }
}

/// Every 429 and 503 answer carries `Retry-After`, whether a handler or [`add_errors`] documented it.
fn retry_after_on_429_and_503(operation: &mut Operation) {
    for (status, response) in operation.responses.responses.iter_mut() {
        if let (true, RefOr::T(response)) = (status == "429" || status == "503", response) {
            response
                .headers
                .entry("Retry-After".to_owned())
                .or_insert_with(|| {
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer))
                        .description(Some("Seconds to wait before retrying"))
                        .build()
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_v1_operation_documents_its_success_and_the_shared_errors() {
        let doc = ApiDoc::openapi();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.put, &item.post, &item.delete]
                .into_iter()
                .flatten()
            {
                operations += 1;
                let statuses: Vec<&String> = op.responses.responses.keys().collect();
                assert!(
                    statuses.iter().any(|s| s.starts_with('2')),
                    "{path}: no success answer in {statuses:?}"
                );
                for (status, answer) in &op.responses.responses {
                    if let (true, RefOr::T(answer)) = (status == "429" || status == "503", answer) {
                        assert!(
                            answer.headers.contains_key("Retry-After"),
                            "{path} {status} lacks Retry-After"
                        );
                    }
                }
                let inference = ["inference", "openai", "tei"]
                    .iter()
                    .any(|tag| op.tags.iter().flatten().any(|t| t == tag));
                if inference && op.request_body.is_some() {
                    assert!(
                        op.responses.responses.contains_key("429"),
                        "{path} lacks 429"
                    );
                }
                if path.starts_with("/v1/") {
                    for status in ["401", "403", "503"] {
                        assert!(
                            op.responses.responses.contains_key(status),
                            "{path} lacks {status}"
                        );
                    }
                }
                let openai = op.tags.iter().flatten().any(|t| t == "openai");
                if op.request_body.is_some() {
                    let statuses: &[&str] = if openai {
                        &["400", "413", "415"]
                    } else {
                        &["400", "413", "415", "422"]
                    };
                    for &status in statuses {
                        assert!(
                            op.responses.responses.contains_key(status),
                            "{path} lacks {status}"
                        );
                    }
                }
            }
        }
        assert_eq!(operations, 37, "every route, /openapi.json included");
        let mut ids: Vec<_> = doc
            .paths
            .paths
            .values()
            .flat_map(|i| [&i.get, &i.put, &i.post, &i.delete])
            .flatten()
            .map(|op| op.operation_id.clone().unwrap())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), operations, "operation ids are unique");
    }

    #[test]
    fn allowed_methods_come_from_the_document() {
        assert_eq!(allowed_methods("/v1/tasks"), Some("GET, POST"));
        assert_eq!(allowed_methods("/v1/jobs/{id}"), Some("GET, DELETE"));
        assert_eq!(allowed_methods("/v1/nothing"), None);
        assert_eq!(allowed_methods("/v1/models/{model:.+}"), Some("GET"));
        assert_eq!(allowed_methods("/"), Some("POST"));
        assert_eq!(plain_pattern("/a/{b:[0-9]+}/c/{d}"), "/a/{b}/c/{d}");
    }

    #[test]
    fn the_document_names_its_schemas_and_key_schemes() {
        let json: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3."));
        let schemas = &json["components"]["schemas"];
        for name in [
            "ErrorBody",
            "EmbedRequest",
            "PredictResponse",
            "FeedbackRequest",
            "JobStatus",
            "TrainConfig",
            "TrainRequest",
            "Rollout",
            "DriftReport",
        ] {
            assert!(schemas.get(name).is_some(), "no schema {name}");
        }
        let schemes = &json["components"]["securitySchemes"];
        assert_eq!(schemes["admin_key"]["scheme"], "bearer");
        assert_eq!(schemes["api_key"]["scheme"], "bearer");
        // TEI's /predict answers a list for one text and a list of lists for a batch: a client generated
        // from the document must accept both.
        let answer = &json["paths"]["/predict"]["post"]["responses"]["200"]["content"]
            ["application/json"]["schema"];
        assert_eq!(answer["$ref"], "#/components/schemas/TeiPredictResponse");
        let answer = &schemas["TeiPredictResponse"];
        let shapes = answer["oneOf"].as_array().expect("oneOf");
        assert_eq!(shapes[0]["type"], "array");
        assert_eq!(shapes[1]["items"]["type"], "array", "{answer}");
    }
}
