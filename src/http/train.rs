//! Training jobs (admin): `POST /v1/train`, `GET /v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::trainer::jobs::{JobStatus, Jobs};
use crate::trainer::train::{TrainConfig, TrainError};

impl From<TrainError> for ApiError {
    fn from(e: TrainError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// Queues a training job: `{"task", "method"?: "lora" | "full", ...hyperparameter overrides}` → 202 `{"job_id", ...}`.
pub async fn submit(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let services = state.services()?;
    let mut fields = body.into_inner();
    let task = match fields.remove("task") {
        Some(serde_json::Value::String(t)) => t,
        _ => return Err(ApiError::invalid("task (a string) is required")),
    };
    let labels = services
        .registry
        .task(&task)
        .ok_or_else(|| ApiError::not_found(format!("no task {task:?}")))?
        .labels
        .len();
    let config: TrainConfig = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("invalid hyperparameters: {e}")))?;
    config.class_weights.check_labels(labels)?;
    let status = services.jobs.submit(&task, config)?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({"job_id": status.id, "job": status})))
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this task's jobs.
    #[serde(default)]
    pub task: Option<String>,
}

/// `GET /v1/jobs?task=T`, newest first.
pub async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    Ok(HttpResponse::Ok().json(state.services()?.jobs.list(query.task.as_deref())))
}

/// `GET /v1/jobs/{id}`.
pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    job_answer(&req, &state, &id, |jobs, id| jobs.get(id))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job and returns its status.
pub async fn cancel(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    job_answer(&req, &state, &id, |jobs, id| jobs.cancel(id))
}

/// Admin check, then `act` on job `id`: its status, or 404.
fn job_answer(
    req: &HttpRequest,
    state: &AppState,
    id: &str,
    act: impl FnOnce(&Jobs, &str) -> Option<JobStatus>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(req, &state.config.auth)?;
    let job = act(&state.services()?.jobs, id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))?;
    Ok(HttpResponse::Ok().json(job))
}
