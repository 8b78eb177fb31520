//! `POST/GET /v1/tasks`: tasks and their label sets.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{AppState, Services};
use crate::adapters::Task;

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// Task name (also its stable alias).
    pub name: String,
    /// Labels in classifier-output order.
    pub labels: Vec<String>,
}

/// A task as the API shows it.
#[derive(Debug, Serialize)]
pub struct TaskView {
    /// Name.
    pub name: String,
    /// Labels in classifier-output order.
    pub labels: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Feedback rows stored for the task.
    pub feedback_count: u64,
    /// The generation the task's stable alias points at, if any.
    pub stable: Option<String>,
}

fn view(task: Task, services: &Services) -> Result<TaskView, ApiError> {
    let stable = services.registry.resolve(&task.name).map(|g| g.id.clone());
    let feedback_count = services.feedback.count(&task.name)?;
    Ok(TaskView {
        name: task.name,
        labels: task.labels,
        created_at: task.created_at,
        feedback_count,
        stable,
    })
}

/// `POST /v1/tasks` → 201 (200 when it already exists with the same labels).
pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateTask>,
) -> Result<HttpResponse, ApiError> {
    super::auth::caller(&req, &state.config.auth)?;
    let registry = state.services()?.registry.clone();
    let CreateTask { name, labels } = body.into_inner();
    let existed = registry.task(&name).is_some();
    let task = web::block(move || registry.create_task(&name, labels))
        .await
        .map_err(|_| ApiError::busy())??;
    let body = web::block(move || view(task, state.services()?))
        .await
        .map_err(|_| ApiError::busy())??;
    Ok(if existed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}

/// `GET /v1/tasks`.
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    super::auth::caller(&req, &state.config.auth)?;
    // Counting feedback is a store query: keep it off the async workers.
    let tasks = web::block(move || {
        let services = state.services()?;
        services
            .registry
            .tasks()
            .into_iter()
            .map(|t| view(t, services))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| ApiError::busy())??;
    Ok(HttpResponse::Ok().json(tasks))
}

/// `GET /v1/tasks/{name}`.
pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    super::auth::caller(&req, &state.config.auth)?;
    let body = web::block(move || {
        let services = state.services()?;
        let task = services
            .registry
            .task(&name)
            .ok_or_else(|| ApiError::not_found(format!("no task {:?}", name.as_str())))?;
        view(task, services)
    })
    .await
    .map_err(|_| ApiError::busy())??;
    Ok(HttpResponse::Ok().json(body))
}
