//! `GET /v1/drift/{task}`: the task's drift report, or what the monitor still waits for.

use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;
use super::AppState;

/// The task's drift report (200), or its warm-up status (202: not enough predictions yet).
pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    task: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    super::auth::caller(&req, &state.config.auth)?;
    let services = state.services()?;
    if services.registry.task(&task).is_none() {
        return Err(ApiError::not_found(format!("no task {task:?}")));
    }
    let drift = services.drift.clone();
    let name = task.clone();
    // The permutation tests take a few hundred milliseconds: off the async workers.
    let report = web::block(move || drift.report(&name))
        .await
        .map_err(|_| ApiError::busy())?;
    Ok(match report {
        Some(Ok(report)) => HttpResponse::Ok().json(report),
        Some(Err(warming)) => HttpResponse::Accepted().json(warming),
        None => HttpResponse::Accepted().json(serde_json::json!({
            "task": task.as_str(),
            "status": "no prediction of the stable generation seen yet",
        })),
    })
}
