//! Rollouts (admin): `POST /v1/rollouts`, `GET /v1/rollouts`, `GET /v1/rollouts/{task}`,
//! `PUT /v1/rollouts/{task}/traffic`, `POST /v1/rollouts/{task}/promote`, `POST /v1/rollouts/{task}/rollback`.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::rollout::analysis::Verdict;
use crate::rollout::{
    Arms, Decision, Mode, Phase, Rollout, RolloutError, Rollouts, StartRequest, Summary,
};

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::NotFound(m) => ApiError::not_found(m),
            RolloutError::Conflict(m) => ApiError::conflict(m),
            RolloutError::Invalid(m) => ApiError::invalid(m),
            e @ RolloutError::Storage(_) => ApiError::new(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                e.to_string(),
            ),
        }
    }
}

/// Starts a rollout: `{"task", "candidate", "traffic"?, "steps"?, "mode"?, "automatic"?}` → 201.
#[utoipa::path(post, path = "/v1/rollouts", tag = "rollouts", request_body = StartRequest,
    security((), ("admin_key" = [])),
    responses(
        (status = 201, description = "Started", body = RolloutView),
        (status = 404, description = "No such task or candidate (`not_found`)", body = ErrorBody),
        (status = 409, description = "The candidate cannot be canaried now (`conflict`)", body = ErrorBody),
        (status = 503, description = "The shared rollout store cannot be reached (`storage_unavailable`)", body = ErrorBody)))]
pub async fn start(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    body: web::Json<StartRequest>,
) -> Result<HttpResponse, ApiError> {
    let rollout = decide(&state, move |r| r.start(body.into_inner(), "manual", false)).await?;
    Ok(HttpResponse::Created().json(rollout))
}

/// Every task's latest rollout.
#[utoipa::path(get, path = "/v1/rollouts", tag = "rollouts", security((), ("admin_key" = [])),
    responses((status = 200, description = "Each task's latest rollout", body = Vec<RolloutView>)))]
pub async fn list(
    _: super::auth::Admin,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let rollouts = state.services()?.rollouts.list();
    Ok(HttpResponse::Ok().json(rollouts.iter().map(RolloutView::from).collect::<Vec<_>>()))
}

/// The task's active (or latest) rollout: arms, shares, counts, accuracies, P99, decision log.
#[utoipa::path(get, path = "/v1/rollouts/{task}", tag = "rollouts", security((), ("admin_key" = [])),
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "The rollout", body = RolloutView),
        (status = 404, description = "The task has had no rollout (`not_found`)", body = ErrorBody)))]
pub async fn get(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rollout = state
        .services()?
        .rollouts
        .get(&task)
        .ok_or_else(|| ApiError::not_found(format!("task {task:?} has had no rollout")))?;
    Ok(HttpResponse::Ok().json(RolloutView::from(&rollout)))
}

/// Body of `PUT /v1/rollouts/{task}/traffic`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// The candidate's new share, in (0, 1].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub traffic: f64,
}

/// Changes the candidate's share of the active rollout.
#[utoipa::path(put, path = "/v1/rollouts/{task}/traffic", tag = "rollouts", request_body = Traffic,
    security((), ("admin_key" = [])),
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "The rollout with its new share", body = RolloutView),
        (status = 404, description = "No active rollout (`not_found`)", body = ErrorBody),
        (status = 409, description = "The rollout has finished (`conflict`)", body = ErrorBody),
        (status = 503, description = "The shared rollout store cannot be reached (`storage_unavailable`)", body = ErrorBody)))]
pub async fn traffic(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    task: web::Path<String>,
    body: web::Json<Traffic>,
) -> Result<HttpResponse, ApiError> {
    let rollout = decide(&state, move |r| {
        r.set_traffic(&task, body.traffic, "manual")
    })
    .await?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Promotes the candidate: the task's stable alias moves to it.
#[utoipa::path(post, path = "/v1/rollouts/{task}/promote", tag = "rollouts",
    security((), ("admin_key" = [])),
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "Promoted", body = RolloutView),
        (status = 404, description = "No active rollout (`not_found`)", body = ErrorBody),
        (status = 409, description = "The rollout has finished (`conflict`)", body = ErrorBody),
        (status = 503, description = "The shared rollout store cannot be reached (`storage_unavailable`)", body = ErrorBody)))]
pub async fn promote(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rollout = decide(&state, move |r| {
        r.promote(&task, "manual", "promoted by an operator".to_owned())
    })
    .await?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Rolls back: all traffic returns to stable.
#[utoipa::path(post, path = "/v1/rollouts/{task}/rollback", tag = "rollouts",
    security((), ("admin_key" = [])),
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "Rolled back", body = RolloutView),
        (status = 404, description = "No active rollout (`not_found`)", body = ErrorBody),
        (status = 409, description = "The rollout has finished (`conflict`)", body = ErrorBody),
        (status = 503, description = "The shared rollout store cannot be reached (`storage_unavailable`)", body = ErrorBody)))]
pub async fn rollback(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rollout = decide(&state, move |r| {
        r.rollback(&task, "manual", "rolled back by an operator".to_owned())
    })
    .await?;
    Ok(HttpResponse::Ok().json(rollout))
}

/// Runs an operator's decision on a rollout (admin only) off the async workers: it writes the rollout, and
/// a promotion the alias, durably.
async fn decide(
    state: &AppState,
    decision: impl FnOnce(&Rollouts) -> Result<Rollout, RolloutError> + Send + 'static,
) -> Result<RolloutView, ApiError> {
    let rollouts = state.services()?.rollouts.clone();
    let rollout = web::block(move || decision(&rollouts)).await??;
    Ok(RolloutView::from(&rollout))
}

/// A rollout as the API shows it: the record its store keeps, and each arm's figures now.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Rollout)]
pub struct RolloutView {
    /// Rollout id (also the routing salt).
    pub id: String,
    /// The task.
    pub task: String,
    /// The stable generation when the rollout started.
    pub stable: String,
    /// The candidate generation.
    pub candidate: String,
    /// Split or shadow.
    pub mode: Mode,
    /// Candidate shares, in order.
    pub steps: Vec<f64>,
    /// Index of the current step.
    pub step: usize,
    /// The candidate's current share.
    pub traffic: f64,
    /// Lifecycle.
    pub phase: Phase,
    /// Whether the analysis acts on its own (advance, promote, rollback).
    pub automatic: bool,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds, once finished.
    pub ended_at: Option<u64>,
    /// Evidence of the current step.
    pub arms: Arms,
    /// Evidence over the whole rollout.
    pub totals: Arms,
    /// The latest analysis.
    pub analysis: Option<Verdict>,
    /// Each arm's figures now (accuracy, P99), this step and overall.
    pub summary: Summary,
    /// The decisions, oldest first: the first (`start`) and the latest 99.
    pub decisions: Vec<Decision>,
}

impl From<&Rollout> for RolloutView {
    fn from(r: &Rollout) -> Self {
        Self {
            id: r.id.clone(),
            task: r.task.clone(),
            stable: r.stable.clone(),
            candidate: r.candidate.clone(),
            mode: r.mode,
            steps: r.steps.clone(),
            step: r.step,
            traffic: r.traffic,
            phase: r.phase,
            automatic: r.automatic,
            started_at: r.started_at,
            ended_at: r.ended_at,
            arms: r.arms.clone(),
            totals: r.totals.clone(),
            analysis: r.analysis.clone(),
            summary: Summary::of(r),
            decisions: r.decisions.clone(),
        }
    }
}
