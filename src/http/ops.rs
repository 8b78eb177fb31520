//! Operational endpoints: `/health`, `/ready`, `/metrics`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// `GET /health`: 200 while the process lives.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 once the model is loaded, 503 before.
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let infer = state.infer().ok_or_else(ApiError::not_ready)?;
    Ok(HttpResponse::Ok().json(
        json!({"status": "ready", "model": infer.model_name(), "dimensions": infer.dimensions()}),
    ))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
