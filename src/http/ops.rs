//! Operational endpoints: `/health`, `/ready`, `/metrics`, `/openapi.json`.

use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::openapi::ApiDoc;
use super::AppState;

/// Answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// Answer of `GET /ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: &'static str,
    /// The base model's name.
    pub model: String,
    /// Embedding dimensions.
    pub dimensions: usize,
    /// The serving path's number format: `float32`, or `int8` where `model.precision` quantised it.
    pub dtype: &'static str,
}

/// `GET /health`: 200 while the process lives.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// `GET /ready`: 200 once the model is loaded and while its threads run, 503 before or once one has ended.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "The model is loaded and its threads run", body = Ready),
        (status = 503, description = "The model is still loading (`not_ready`), or the model or trainer \
            thread has ended (`unhealthy`)", body = ErrorBody)))]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let services = state.services().map_err(|_| ApiError::not_ready())?;
    let infer = &services.infer;
    for (alive, what) in [
        (infer.is_alive(), "the model thread"),
        (services.jobs.is_alive(), "the trainer thread"),
    ] {
        if !alive {
            return Err(ApiError::unhealthy(format!(
                "{what} has ended; restart the server (see the log for why)"
            )));
        }
    }
    Ok(HttpResponse::Ok().json(Ready {
        status: "ready",
        model: infer.model_name().to_owned(),
        dimensions: infer.dimensions(),
        dtype: infer.dtype(),
    }))
}

/// `GET /metrics`: Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String,
        content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Ok(services) = state.services() {
        router_info(&state, services);
        // Read at the scrape: generations arrive from the HTTP routes, the trainer and other replicas.
        state
            .metrics
            .adapters_loaded
            .set(services.registry.ready_count() as i64);
        // What /ready says: a replica whose model or trainer thread has ended serves nothing.
        let serving = services.infer.is_alive() && services.jobs.is_alive();
        state.metrics.model_ready.set(i64::from(serving));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// `GET /openapi.json`: the OpenAPI 3.1 document of every endpoint, generated from the handlers.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("an OpenAPI document of string-keyed maps always serialises; this is a bug")
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.as_str())
}

/// Sets `flywheel_lora_requests_info`, which LoRA-aware routers read: every adapter model name (task,
/// alias, generation) that resolves to a generation ready to serve; all are resident, none waits to load.
fn router_info(state: &AppState, services: &crate::serving::Services) {
    let ready = |name: &str| {
        services
            .registry
            .resolve(name)
            .is_some_and(|g| g.state == crate::adapters::registry::State::Ready)
    };
    let names: Vec<String> = services
        .model_cards()
        .into_iter()
        .filter(|c| c.kind != "base" && ready(&c.id))
        .map(|c| c.id)
        .collect();
    let info = &state.metrics.lora_requests_info;
    info.reset();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    info.with_label_values(&[
        state.config.adapters.max_adapters.to_string().as_str(),
        names.join(",").as_str(),
        "",
    ])
    .set(now);
}
