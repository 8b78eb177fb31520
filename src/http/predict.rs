//! `POST /v1/predict`: classification with a task's adapter generation.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::embed::{validate_texts, Inputs};
use super::error::{ApiError, ErrorBody};
use super::{timing_headers, AppState, RouteLabels};
use crate::adapters::registry::{Generation, State};
use crate::feedback::recent::{RecentRequest, ShadowPrediction};
use crate::infer::InferError;
use crate::model::lora::Adapter;

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

/// The label index with the highest probability, and that probability.
fn best(probs: &[f32]) -> (usize, f32) {
    probs.iter().enumerate().fold(
        (0, f32::NEG_INFINITY),
        |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
    )
}

/// The ready weights of `generation`, or 409.
fn weights(generation: &Generation) -> Result<Arc<Adapter>, ApiError> {
    match (&generation.state, &generation.adapter) {
        (State::Ready, Some(w)) => Ok(w.clone()),
        _ => Err(ApiError::conflict(format!(
            "adapter {} is not ready",
            generation.id
        ))),
    }
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
    let request_id = uuid::Uuid::new_v4().to_string();
    let route = match &adapter {
        Some(_) => None,
        None => services
            .rollouts
            .route(&task, routing_key.as_deref(), &request_id),
    };
    let (reference, arm) = match (&adapter, &route) {
        (Some(a), _) => (a.clone(), "pinned"),
        (None, Some(r)) => (r.generation.clone(), r.arm.as_str()),
        (None, None) => (task.clone(), "stable"),
    };
    // The lease: this Arc keeps the generation's weights alive until the response is built.
    let generation = services
        .registry
        .resolve(&reference)
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
    let started = Instant::now();
    // Drift watches what the stable generation serves (in shadow mode, stable answers every request).
    let watched = adapter.is_none() && arm == "stable" && state.config.drift.enabled;
    let result = services
        .infer
        .classify(&texts, weights(&generation)?, watched)
        .await;
    if let Some(rollout) = route.as_ref().and_then(|r| r.rollout.as_deref()) {
        if !result.as_ref().is_err_and(InferError::is_not_the_models) {
            services.rollouts.observe(
                &task,
                rollout,
                &generation.id,
                started.elapsed().as_secs_f64(),
                result.is_ok(),
            );
        }
    }
    let out = result?;
    if watched {
        for (probs, features) in out.vectors.iter().zip(&out.features) {
            services
                .drift
                .observe(&task, &generation.id, probs, features);
        }
    }
    let mut predicted = Vec::with_capacity(out.vectors.len());
    let predictions = out
        .vectors
        .iter()
        .map(|probs| {
            let (best, score) = best(probs);
            predicted.push(task_def.labels[best].clone());
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
    if let Some((shadow, rollout)) = route
        .as_ref()
        .and_then(|r| Some((r.shadow.clone()?, r.rollout.clone()?)))
    {
        run_shadow(
            services,
            &task_def.labels,
            &task,
            &rollout,
            &shadow,
            &request_id,
            texts.clone(),
        );
    }
    services.recent.insert(
        request_id.clone(),
        RecentRequest {
            task: task.clone(),
            judged: vec![None; texts.len()],
            texts,
            adapter: generation.id.clone(),
            arm: arm.to_owned(),
            rollout: route.as_ref().and_then(|r| r.rollout.clone()),
            predicted,
            shadow: None,
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

/// Runs the shadow candidate on the same inputs after the answer has gone, and records its latency and
/// predictions (feedback on the request then judges both arms).
fn run_shadow(
    services: &super::Services,
    labels: &[String],
    task: &str,
    rollout: &str,
    shadow: &str,
    request_id: &str,
    texts: Vec<String>,
) {
    let Some(generation) = services.registry.resolve(shadow) else {
        return;
    };
    let Ok(w) = weights(&generation) else {
        return;
    };
    let (infer, rollouts, recent) = (
        services.infer.clone(),
        services.rollouts.clone(),
        services.recent.clone(),
    );
    let (labels, task, rollout, id) = (
        labels.to_vec(),
        task.to_owned(),
        rollout.to_owned(),
        request_id.to_owned(),
    );
    actix_web::rt::spawn(async move {
        let started = Instant::now();
        let result = infer.classify(&texts, w, false).await;
        if result.as_ref().is_err_and(InferError::is_not_the_models) {
            return;
        }
        rollouts.observe(
            &task,
            &rollout,
            &generation.id,
            started.elapsed().as_secs_f64(),
            result.is_ok(),
        );
        if let Ok(out) = result {
            let predicted = out
                .vectors
                .iter()
                .map(|p| labels[best(p).0].clone())
                .collect();
            let verdicts = recent.attach_shadow(
                &id,
                ShadowPrediction {
                    adapter: generation.id.clone(),
                    predicted,
                },
            );
            // Feedback that arrived before the shadow answered judges it now.
            for correct in verdicts {
                rollouts.judge(&task, &generation.id, "shadow", Some(&rollout), correct);
            }
        }
    });
}
