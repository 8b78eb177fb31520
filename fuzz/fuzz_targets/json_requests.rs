//! Fuzzes the HTTP API's request bodies and query strings as the handlers read them: every input is parsed
//! as each endpoint's body type (and, as text, as each query string); what parses runs through the pure
//! checks the handlers apply, and what does not is mapped to the error answer the server would send
//! (`http::error::json_error` → `ApiError::error_response`). Refusals are expected; a panic is a bug.

#![no_main]

use actix_web::error::JsonPayloadError;
use actix_web::web::Query;
use actix_web::ResponseError;
use flywheel::adapters::registry::valid_name;
use flywheel::http::error::{json_error, ApiError};
use flywheel::http::{adapters, embed, feedback, predict, rollouts, tasks, train};
use flywheel::rollout::router::to_candidate;
use flywheel::rollout::StartRequest;
use flywheel::trainer::train::TrainConfig;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// Checks the answer the server gives for `err`: its status, and an error status at that.
fn respond(err: &ApiError) {
    let response = err.error_response();
    assert_eq!(response.status(), err.status);
    assert!(
        response.status().is_client_error() || response.status().is_server_error(),
        "an error answered {}",
        response.status()
    );
}

/// Parses `data` as a JSON body of type `T` as actix's extractor would; a refusal is answered.
fn body<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data)
        .map_err(|e| respond(&json_error(JsonPayloadError::Deserialize(e))))
        .ok()
}

fn names(names: &[&str]) {
    for name in names {
        let _ = valid_name(name);
    }
}

fn check_train_config(config: &TrainConfig) {
    match config.validate() {
        Ok(()) => {
            let lr = config.lr();
            assert!(lr > 0.0 && lr < 1.0, "validate accepted learning rate {lr}");
        }
        Err(e) => respond(&ApiError::from(e)),
    }
    for labels in 1..=8 {
        if let Err(e) = config.class_weights.check_labels(labels) {
            respond(&ApiError::from(e));
        }
    }
    // A config the server accepted is stored with the job and shown back; it must read back.
    let json = serde_json::to_string(config).expect("TrainConfig serialises");
    serde_json::from_str::<TrainConfig>(&json)
        .unwrap_or_else(|e| panic!("TrainConfig written as {json} does not parse back: {e}"));
}

fn bodies(data: &[u8]) {
    if let Some(req) = body::<embed::EmbedRequest>(data) {
        let _ = req.inputs.into_vec();
    }
    if let Some(req) = body::<predict::PredictRequest>(data) {
        names(&[&req.task]);
        let _ = req.inputs.into_vec();
    }
    if let Some(req) = body::<feedback::FeedbackRequest>(data) {
        let items = match req {
            feedback::FeedbackRequest::Batch { items } => items,
            feedback::FeedbackRequest::One(item) => vec![item],
        };
        for item in items {
            names(&[item.task.as_deref().unwrap_or(""), &item.label]);
        }
    }
    if let Some(req) = body::<tasks::CreateTask>(data) {
        names(&[&req.name]);
    }
    if let Some(req) = body::<adapters::LoadAdapter>(data) {
        names(&[&req.task, req.alias.as_deref().unwrap_or("")]);
    }
    if let Some(req) = body::<adapters::SetAlias>(data) {
        names(&[&req.adapter]);
    }
    if let Some(req) = body::<rollouts::Traffic>(data) {
        let _ = to_candidate("key", "salt", req.traffic);
    }
    if let Some(req) = body::<StartRequest>(data) {
        names(&[&req.task, &req.candidate]);
        for share in req.traffic.into_iter().chain(req.steps.iter().flatten().copied()) {
            let _ = to_candidate(&req.candidate, &req.task, share);
        }
    }
    // `POST /v1/train` reads an object, then the task and the hyperparameters, as the handler does.
    if let Some(fields) = body::<serde_json::Map<String, serde_json::Value>>(data) {
        match train::read_request(fields) {
            Ok((task, config)) => {
                names(&[&task]);
                check_train_config(&config);
            }
            Err(e) => respond(&e),
        }
    }
}

/// The query strings of `GET /v1/feedback` and `GET /v1/jobs`, through actix's extractor.
fn queries(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = Query::<feedback::ListQuery>::from_query(query) {
        names(&[&q.task]);
    }
    let _ = Query::<train::ListQuery>::from_query(query);
}

fuzz_target!(|data: &[u8]| {
    bodies(data);
    queries(data);
});
