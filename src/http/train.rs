//! Training jobs (admin): `POST /v1/train`, `GET /v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::trainer::eval::Evaluation;
use crate::trainer::jobs::{JobRecord, JobState, Jobs};
use crate::trainer::train::{Method, TrainConfig, TrainError};

impl From<TrainError> for ApiError {
    fn from(e: TrainError) -> Self {
        let message = e.to_string();
        match e {
            TrainError::QueueFull(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            }
            TrainError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            TrainError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            TrainError::Storage(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                message,
            ),
            TrainError::Disabled => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "trainer_disabled", message)
            }
            _ => ApiError::invalid(message),
        }
    }
}

/// Queues a training job: `{"task", "method"?: "lora" | "full", ...hyperparameter overrides}` → 202 `{"job_id", ...}`.
#[utoipa::path(post, path = "/v1/train", tag = "training",
    request_body(content = TrainRequest, description = "The task and any hyperparameters to override"),
    security((), ("admin_key" = [])),
    responses(
        (status = 202, description = "Queued", body = JobSubmitted),
        (status = 404, description = "No such task (`not_found`)", body = ErrorBody),
        (status = 409, description = "A LoRA job with the adapter limit reached (`conflict`): it could not publish", body = ErrorBody),
        (status = 429, description = "The job queue is full (`queue_full`)", body = ErrorBody),
        (status = 503, description = "This replica does not train (`trainer_disabled`) or is shutting down (`shutting_down`)", body = ErrorBody)))]
pub async fn submit(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    let (task, config) = read_request(body.into_inner())?;
    let labels = services
        .registry
        .task(&task)
        .ok_or_else(|| ApiError::not_found(format!("no task {task:?}")))?
        .labels
        .len();
    config.class_weights.check_labels(labels)?;
    config.check_fits(
        state.config.adapters.max_rank,
        Some(services.registry.model().num_hidden_layers),
    )?;
    let jobs = services.jobs.clone();
    let status = web::block(move || jobs.submit(&task, config)).await??;
    Ok(HttpResponse::Accepted().json(JobSubmitted {
        job_id: status.id.clone(),
        job: JobStatus::from(&status),
    }))
}

/// Names the schema of `POST /v1/train`'s body: `task` plus any [`TrainConfig`] field. [`submit`] reads it
/// as a map so that an unknown hyperparameter is refused by name, hence no struct to derive the schema from.
pub struct TrainRequest;

impl utoipa::PartialSchema for TrainRequest {
    fn schema() -> RefOr<Schema> {
        let mut schema = match TrainConfig::schema() {
            RefOr::T(Schema::Object(object)) => object,
            _ => Object::new(),
        };
        let task = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("The task whose feedback to train on."));
        schema.properties.insert("task".to_owned(), task.into());
        schema.properties.move_index(schema.properties.len() - 1, 0);
        schema.required.insert(0, "task".to_owned());
        schema.description = Some(
            "The task, and hyperparameters to override; the rest keep their defaults.".to_owned(),
        );
        RefOr::T(Schema::Object(schema))
    }
}

impl ToSchema for TrainRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <TrainConfig as ToSchema>::schemas(schemas);
    }
}

/// Answer of `POST /v1/train`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobSubmitted {
    /// The new job's id.
    pub job_id: String,
    /// Its status.
    pub job: JobStatus,
}

/// Reads a `POST /v1/train` body: the `task`, and the other fields as hyperparameters over the defaults
/// (unchecked: [`TrainConfig::validate`] runs when the job is submitted).
pub fn read_request(
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> Result<(String, TrainConfig), ApiError> {
    let task = match fields.remove("task") {
        Some(serde_json::Value::String(t)) => t,
        _ => return Err(ApiError::invalid("task (a string) is required")),
    };
    let fields = fields.into_iter().map(|(k, v)| (k, integral(v))).collect();
    let config = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("invalid hyperparameters: {e}")))?;
    Ok((task, config))
}

/// JSON Schema counts `5.0` as an integer and so do many clients' encoders; serde does not. An integral,
/// non-negative number becomes an integer, so `"epochs": 5.0` means 5 (floats still read it as 5.0).
fn integral(value: serde_json::Value) -> serde_json::Value {
    match value.as_f64() {
        Some(x) if value.is_f64() && x.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&x) => {
            serde_json::Value::from(x as u64)
        }
        _ => value,
    }
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this task's jobs.
    #[serde(default)]
    pub task: Option<String>,
}

/// `GET /v1/jobs?task=T`, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "training", params(ListQuery),
    security((), ("admin_key" = [])),
    responses(
        (status = 200, description = "Jobs, newest first", body = Vec<JobStatus>),
        (status = 503, description = "The shared job queue cannot be read (`storage_unavailable`)", body = ErrorBody)))]
pub async fn list(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    // With a shared queue this reads PostgreSQL: off the async workers.
    let jobs = state.services()?.jobs.clone();
    let task = query.into_inner().task;
    let list = web::block(move || jobs.list(task.as_deref())).await??;
    Ok(HttpResponse::Ok().json(list.iter().map(JobStatus::from).collect::<Vec<_>>()))
}

/// `GET /v1/jobs/{id}`.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "training", security((), ("admin_key" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "No such job (`not_found`)", body = ErrorBody),
        (status = 503, description = "The shared job queue cannot be read (`storage_unavailable`)", body = ErrorBody)))]
pub async fn get(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    job_answer(&state, id.into_inner(), |jobs, id| jobs.get(id)).await
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job and returns its status.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "training", security((), ("admin_key" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, cancelled unless it had finished", body = JobStatus),
        (status = 404, description = "No such job (`not_found`)", body = ErrorBody),
        (status = 503, description = "The shared job queue cannot be written (`storage_unavailable`)", body = ErrorBody)))]
pub async fn cancel(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    job_answer(&state, id.into_inner(), |jobs, id| jobs.cancel(id)).await
}

/// Admin check, then `act` on job `id` off the async workers (it writes the job list, or reads and writes
/// PostgreSQL): its status, or 404.
async fn job_answer(
    state: &AppState,
    id: String,
    act: impl FnOnce(&Jobs, &str) -> Result<Option<JobRecord>, TrainError> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    let jobs = state.services()?.jobs.clone();
    let job = web::block(move || act(&jobs, &id).map(|job| job.ok_or(id)))
        .await??
        .map_err(|id| ApiError::not_found(format!("no job {id:?}")))?;
    Ok(HttpResponse::Ok().json(JobStatus::from(&job)))
}

/// A job as `GET /v1/jobs/{id}` shows it: the trainer's [`JobRecord`], which `jobs.json` stores, in the
/// API's shape (the two may change apart).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// The task trained.
    pub task: String,
    /// `lora` or `full`.
    pub method: Method,
    /// Lifecycle state.
    pub state: JobState,
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Current epoch.
    pub epoch: usize,
    /// Mean training loss of the current epoch.
    pub train_loss: Option<f64>,
    /// Mean gradient norm before clipping over the current epoch's steps; `None` with clipping off.
    pub grad_norm: Option<f64>,
    /// Latest (or, when done, best) validation scores.
    pub val: Option<Evaluation>,
    /// The stable generation's scores on the same validation split, when the task had one.
    pub stable_val: Option<Evaluation>,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// Trainable values.
    pub trainable_params: Option<usize>,
    /// Seconds spent so far.
    pub wall_seconds: f64,
    /// Of those, seconds spent waiting for inference to finish.
    pub yielded_seconds: f64,
    /// The published generation (LoRA).
    pub adapter: Option<String>,
    /// The written checkpoint, relative to the data directory (full fine-tuning).
    pub output: Option<String>,
    /// Examples in the training split.
    pub train_examples: Option<usize>,
    /// How many of the job's examples were replayed from before the parent generation.
    pub replayed_examples: Option<usize>,
    /// Why the job trained without a validation split, when it did: the validation split would have held
    /// fewer than `min_val_per_label` examples of some label, so it trained on every example for `epochs`
    /// and kept the last epoch (`val` and `stable_val` are then null).
    pub validation_note: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Hyperparameters.
    pub config: TrainConfig,
    /// Whether a shutdown or a crash stopped it (it then failed, and the next start re-runs it).
    pub interrupted: bool,
    /// Whether that was a crash: a re-run a crash stops is not re-run again.
    pub crashed: bool,
    /// Whether a caller asked to cancel it (it then ends `cancelled` and is never re-run).
    pub cancel_requested: bool,
    /// The job the next start queued to repeat this interrupted one.
    pub rerun_as: Option<String>,
    /// The interrupted job this one repeats.
    pub rerun_of: Option<String>,
    /// The replica that claimed it from the shared queue (several replicas on PostgreSQL).
    pub worker: Option<String>,
    /// How many times a worker claimed it from the shared queue: 2 after a re-run for a worker that died.
    pub attempts: u32,
}

impl From<&JobRecord> for JobStatus {
    fn from(j: &JobRecord) -> Self {
        Self {
            id: j.id.clone(),
            task: j.task.clone(),
            method: j.method,
            state: j.state,
            step: j.step,
            total_steps: j.total_steps,
            epoch: j.epoch,
            train_loss: j.train_loss,
            grad_norm: j.grad_norm,
            val: j.val.clone(),
            stable_val: j.stable_val.clone(),
            eta_seconds: j.eta_seconds,
            trainable_params: j.trainable_params,
            wall_seconds: j.wall_seconds,
            yielded_seconds: j.yielded_seconds,
            adapter: j.adapter.clone(),
            output: j.output.clone(),
            train_examples: j.train_examples,
            replayed_examples: j.replayed_examples,
            validation_note: j.validation_note.clone(),
            error: j.error.clone(),
            created_at: j.created_at,
            config: j.config.clone(),
            interrupted: j.interrupted,
            crashed: j.crashed,
            cancel_requested: j.cancel_requested,
            rerun_as: j.rerun_as.clone(),
            rerun_of: j.rerun_of.clone(),
            worker: j.worker.clone(),
            attempts: j.attempts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(body: serde_json::Value) -> Result<(String, TrainConfig), ApiError> {
        match body {
            serde_json::Value::Object(fields) => read_request(fields),
            _ => unreachable!("the tests pass objects"),
        }
    }

    #[test]
    fn a_train_body_takes_integral_numbers_for_integers_and_refuses_the_rest() {
        let (task, config) =
            read(json!({"task": "spam", "epochs": 3.0, "alpha": 16, "rank": 4})).unwrap();
        assert_eq!(task, "spam");
        assert_eq!((config.epochs(), config.rank, config.alpha), (3, 4, 16.0));
        for bad in [
            json!({"task": "spam", "epochs": 2.5}),
            json!({"task": "spam", "epochs": -1.0}),
            json!({"task": "spam", "learning_rat": 0.01}),
            json!({"epochs": 3}),
        ] {
            let err = read(bad.clone()).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {err}");
        }
    }
}
