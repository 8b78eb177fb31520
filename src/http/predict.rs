//! `POST /v1/predict`: classification with a task's adapter generation.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::embed::{validate_texts, Inputs};
use super::error::{ApiError, ErrorBody};
use super::{timing_headers, AppState, RouteLabels};
use crate::model::pooling::best;
use crate::serving::{Classified, ClassifyRequest};

/// Longest accepted `routing_key`.
const MAX_ROUTING_KEY_BYTES: usize = 256;

/// Body of `POST /v1/predict`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// The task to classify for.
    pub task: String,
    /// Text(s) to classify.
    pub inputs: Inputs,
    /// Sticky routing key: one key always sees the same arm of a rollout.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Pin a generation by id or alias, bypassing any rollout.
    #[serde(default)]
    pub adapter: Option<String>,
}

/// One input's prediction.
#[derive(Debug, Serialize, ToSchema)]
pub struct Prediction {
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub score: f32,
    /// Every label's probability.
    #[schema(value_type = std::collections::HashMap<String, f32>)]
    pub scores: serde_json::Map<String, serde_json::Value>,
}

/// Answer of `POST /v1/predict`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PredictResponse {
    /// Also in the `x-request-id` header; feedback may name it.
    pub request_id: String,
    /// The task.
    pub task: String,
    /// The generation that served the request.
    pub adapter: String,
    /// `stable` or `candidate` (the rollout's arm), or `pinned` when the request named its adapter.
    pub arm: String,
    /// One prediction per input, in order.
    pub predictions: Vec<Prediction>,
}

/// Classifies the inputs with the generation the task's rollout picks (stable when none is active), or
/// with the pinned one.
#[utoipa::path(post, path = "/v1/predict", tag = "inference", request_body = PredictRequest,
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "One prediction per input", body = PredictResponse, headers(
            ("x-request-id" = String, description = "The request's id, also in the body"))),
        (status = 404, description = "Unknown task or adapter (`not_found`)", body = ErrorBody),
        (status = 409, description = "The task has no servable generation (`conflict`)", body = ErrorBody)))]
pub async fn predict(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<PredictRequest>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    let PredictRequest {
        task,
        inputs,
        routing_key,
        adapter,
    } = body.into_inner();
    check_routing_key(routing_key.as_deref())?;
    let texts = inputs.into_vec();
    validate_texts(&texts, &state)?;
    let answer = services
        .classify(ClassifyRequest {
            task,
            pinned: adapter,
            routing_key,
            texts,
        })
        .await?;
    let predictions = predictions(&answer);
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &answer.out.timings);
    response.insert_header(("x-request-id", answer.request_id.clone()));
    response.extensions_mut().insert(RouteLabels {
        task: answer.task.name.clone(),
        arm: answer.arm.clone(),
    });
    Ok(response.json(PredictResponse {
        request_id: answer.request_id,
        task: answer.task.name,
        adapter: answer.generation.id.clone(),
        arm: answer.arm,
        predictions,
    }))
}

/// Refuses a routing key over [`MAX_ROUTING_KEY_BYTES`].
pub(super) fn check_routing_key(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some(k) if k.len() > MAX_ROUTING_KEY_BYTES => Err(ApiError::invalid(format!(
            "routing_key is over {MAX_ROUTING_KEY_BYTES} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Each input's best label and every label's probability.
pub(super) fn predictions(answer: &Classified) -> Vec<Prediction> {
    let labels = &answer.task.labels;
    answer
        .out
        .vectors
        .iter()
        .map(|probs| {
            let (best, score) = best(probs);
            Prediction {
                label: labels[best].clone(),
                score,
                scores: labels
                    .iter()
                    .zip(probs)
                    .map(|(l, &p)| (l.clone(), serde_json::json!(p)))
                    .collect(),
            }
        })
        .collect()
}
