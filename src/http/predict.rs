//! `POST /v1/predict`: classification with a task's adapter generation.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::embed::{validate_texts, Inputs};
use super::error::ApiError;
use super::{timing_headers, AppState, RouteLabels};
use crate::adapters::registry::State;
use crate::feedback::recent::RecentRequest;

/// Longest accepted `routing_key`.
const MAX_ROUTING_KEY_BYTES: usize = 256;

/// Body of `POST /v1/predict`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// The task to classify for.
    pub task: String,
    /// Text(s) to classify.
    pub inputs: Inputs,
    /// Sticky routing key for rollouts (accepted now; rollouts will use it).
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Pin a generation by id or alias, bypassing any rollout.
    #[serde(default)]
    pub adapter: Option<String>,
}

/// One input's prediction.
#[derive(Debug, Serialize)]
pub struct Prediction {
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub score: f32,
    /// Every label's probability.
    pub scores: serde_json::Map<String, serde_json::Value>,
}

/// Answer of `POST /v1/predict`.
#[derive(Debug, Serialize)]
pub struct PredictResponse {
    /// Also in the `x-request-id` header; feedback may name it.
    pub request_id: String,
    /// The task.
    pub task: String,
    /// The generation that served the request.
    pub adapter: String,
    /// `stable`, or `pinned` when the request named its adapter.
    pub arm: String,
    /// One prediction per input, in order.
    pub predictions: Vec<Prediction>,
}

/// Classifies the inputs with the task's stable generation (or the pinned one).
pub async fn predict(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<PredictRequest>,
) -> Result<HttpResponse, ApiError> {
    super::auth::caller(&req, &state.config.auth)?;
    let services = state.services()?;
    let PredictRequest {
        task,
        inputs,
        routing_key,
        adapter,
    } = body.into_inner();
    if routing_key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_ROUTING_KEY_BYTES)
    {
        return Err(ApiError::invalid(format!(
            "routing_key is over {MAX_ROUTING_KEY_BYTES} bytes"
        )));
    }
    let texts = inputs.into_vec();
    validate_texts(&texts, &state)?;
    let task_def = services
        .registry
        .task(&task)
        .ok_or_else(|| ApiError::not_found(format!("no task {task:?}")))?;
    let (reference, arm) = match &adapter {
        Some(a) => (a.as_str(), "pinned"),
        None => (task.as_str(), "stable"),
    };
    // The lease: this Arc keeps the generation's weights alive until the response is built.
    let generation = services
        .registry
        .resolve(reference)
        .ok_or_else(|| match &adapter {
            Some(a) => ApiError::not_found(format!("no adapter or alias {a:?}")),
            None => ApiError::conflict(format!(
                "task {task:?} has no adapter generation yet; load or train one"
            )),
        })?;
    if generation.task != task {
        return Err(ApiError::invalid(format!(
            "adapter {} belongs to task {:?}, not {task:?}",
            generation.id, generation.task
        )));
    }
    let weights = match (&generation.state, &generation.adapter) {
        (State::Ready, Some(w)) => w.clone(),
        _ => {
            return Err(ApiError::conflict(format!(
                "adapter {} is not ready",
                generation.id
            )))
        }
    };
    let out = services.infer.classify(&texts, weights).await?;
    let predictions = out
        .vectors
        .iter()
        .map(|probs| {
            let (best, score) =
                probs
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
                    );
            let scores = task_def
                .labels
                .iter()
                .zip(probs)
                .map(|(l, &p)| (l.clone(), serde_json::json!(p)))
                .collect();
            Prediction {
                label: task_def.labels[best].clone(),
                score,
                scores,
            }
        })
        .collect();
    let request_id = uuid::Uuid::new_v4().to_string();
    services.recent.insert(
        request_id.clone(),
        RecentRequest {
            task: task.clone(),
            texts,
            adapter: generation.id.clone(),
            arm: arm.to_owned(),
        },
    );
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &out.timings);
    response.insert_header(("x-request-id", request_id.clone()));
    response.extensions_mut().insert(RouteLabels {
        task: task.clone(),
        arm: arm.to_owned(),
    });
    Ok(response.json(PredictResponse {
        request_id,
        task,
        adapter: generation.id.clone(),
        arm: arm.to_owned(),
        predictions,
    }))
}
