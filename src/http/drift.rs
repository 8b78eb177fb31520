//! `GET /v1/drift/{task}`: the task's drift report, or what the monitor still waits for.

use actix_web::{web, HttpResponse};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::drift::{DriftReport, Warming};

/// The task's drift report (200), or its warm-up status (202: not enough predictions yet).
#[utoipa::path(get, path = "/v1/drift/{task}", tag = "drift", security((), ("api_key" = [])),
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "The drift report", body = DriftReport),
        (status = 202, description = "Still warming up: not enough predictions yet", body = Warming),
        (status = 404, description = "No such task (`not_found`)", body = ErrorBody)))]
pub async fn get(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    if services.registry.task(&task).is_none() {
        return Err(ApiError::not_found(format!("no task {task:?}")));
    }
    let drift = services.drift.clone();
    let name = task.clone();
    // The permutation tests take a few hundred milliseconds: off the async workers.
    let report = web::block(move || drift.report(&name)).await?;
    Ok(match report {
        Some(Ok(report)) => HttpResponse::Ok().json(report),
        Some(Err(warming)) => HttpResponse::Accepted().json(warming),
        None => HttpResponse::Accepted().json(Warming {
            task: task.into_inner(),
            generation: None,
            reference: None,
            reference_size: 0,
            window_size: 0,
            embedding_window_size: 0,
            status: "no prediction of the stable generation seen yet".to_owned(),
        }),
    })
}
