//! `POST/GET /v1/tasks`: tasks and their label sets.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{AppState, Services};
use crate::adapters::Task;

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// Task name (also its stable alias): 1–64 of `A-Z a-z 0-9 _ . -`, not starting with `g-`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub name: String,
    /// Labels in classifier-output order: 2 to `[adapters] max_labels`, distinct, each 1–128 bytes, not blank,
    /// without control characters.
    #[schema(schema_with = label_list)]
    pub labels: Vec<String>,
}

/// A label: a character that is neither blank nor a control character (Unicode's Cc, as `char::is_control`
/// has it), among others that are not control characters.
const LABEL_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$";

fn label_list() -> ArrayBuilder {
    let label = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(LABEL_PATTERN))
        .max_length(Some(128))
        .description(Some("A label: not blank, no control characters"));
    ArrayBuilder::new()
        .items(label)
        .min_items(Some(2))
        .unique_items(true)
        .description(Some(
            "Labels in classifier-output order: 2 to `[adapters] max_labels`, distinct, each 1–128 bytes, not \
             blank, without control characters",
        ))
}

/// A task as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
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
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = CreateTask,
    security((), ("api_key" = [])),
    responses(
        (status = 201, description = "Created", body = TaskView),
        (status = 200, description = "It already existed with the same labels", body = TaskView),
        (status = 409, description = "It exists with other labels (`conflict`)", body = ErrorBody)))]
pub async fn create(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<CreateTask>,
) -> Result<HttpResponse, ApiError> {
    let registry = state.services()?.registry.clone();
    let CreateTask { name, labels } = body.into_inner();
    let existed = registry.task(&name).is_some();
    let task = web::block(move || registry.create_task(&name, labels)).await??;
    let body = web::block(move || view(task, state.services()?)).await??;
    Ok(if existed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}

/// `GET /v1/tasks`.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", security((), ("api_key" = [])),
    responses((status = 200, description = "Every task", body = Vec<TaskView>)))]
pub async fn list(
    _: super::auth::Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
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
    .await??;
    Ok(HttpResponse::Ok().json(tasks))
}

/// `GET /v1/tasks/{name}`.
#[utoipa::path(get, path = "/v1/tasks/{name}", tag = "tasks", security((), ("api_key" = [])),
    params(("name" = String, Path, description = "Task name")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 404, description = "No such task (`not_found`)", body = ErrorBody)))]
pub async fn get(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let body = web::block(move || {
        let services = state.services()?;
        let task = services
            .registry
            .task(&name)
            .ok_or_else(|| ApiError::not_found(format!("no task {:?}", name.as_str())))?;
        view(task, services)
    })
    .await??;
    Ok(HttpResponse::Ok().json(body))
}
