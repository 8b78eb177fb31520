//! Rollouts (admin): `POST /v1/rollouts`, `GET /v1/rollouts`, `GET /v1/rollouts/{task}`,
//! `PUT /v1/rollouts/{task}/traffic`, `POST /v1/rollouts/{task}/promote`, `POST /v1/rollouts/{task}/rollback`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::rollout::{RolloutError, StartRequest};

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::NotFound(m) => ApiError::not_found(m),
            RolloutError::Conflict(m) => ApiError::conflict(m),
            RolloutError::Invalid(m) => ApiError::invalid(m),
        }
    }
}

/// Starts a rollout: `{"task", "candidate", "traffic"?, "steps"?, "mode"?, "automatic"?}` → 201.
pub async fn start(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<StartRequest>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let rollout = state
        .services()?
        .rollouts
        .start(body.into_inner(), "manual", false)?;
    Ok(HttpResponse::Created().json(rollout))
}

/// Every task's latest rollout.
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    Ok(HttpResponse::Ok().json(state.services()?.rollouts.list()))
}

/// The task's active (or latest) rollout: arms, shares, counts, accuracies, P99, decision log.
pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let rollout = state
        .services()?
        .rollouts
        .get(&task)
        .ok_or_else(|| ApiError::not_found(format!("task {task:?} has had no rollout")))?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Body of `PUT /v1/rollouts/{task}/traffic`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// The candidate's new share, in (0, 1].
    pub traffic: f64,
}

/// Changes the candidate's share of the active rollout.
pub async fn traffic(
    req: HttpRequest,
    state: web::Data<AppState>,
    task: web::Path<String>,
    body: web::Json<Traffic>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let rollout = state
        .services()?
        .rollouts
        .set_traffic(&task, body.traffic, "manual")?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Promotes the candidate: the task's stable alias moves to it.
pub async fn promote(
    req: HttpRequest,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let rollout = state.services()?.rollouts.promote(
        &task,
        "manual",
        "promoted by an operator".to_owned(),
    )?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Rolls back: all traffic returns to stable.
pub async fn rollback(
    req: HttpRequest,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    super::auth::admin(&req, &state.config.auth)?;
    let rollout = state.services()?.rollouts.rollback(
        &task,
        "manual",
        "rolled back by an operator".to_owned(),
    )?;
    Ok(HttpResponse::Ok().json(rollout))
}
