//! Admin endpoints for adapters and aliases.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::adapters::registry::State;
use crate::adapters::Generation;

/// A generation as `GET /v1/adapters` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdapterView {
    /// Content-hash id.
    pub id: String,
    /// Owning task.
    pub task: String,
    /// Aliases pointing at it.
    pub aliases: Vec<String>,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Targeted modules.
    pub target_modules: Vec<&'static str>,
    /// `ready` or `failed`.
    pub state: &'static str,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The generation it was trained from.
    pub parent: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Recorded evaluation metrics.
    #[schema(value_type = Object)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Trainable values.
    pub trainable_params: usize,
    /// Size of the weights file.
    pub bytes: u64,
    /// Directory relative to the adapter root.
    pub path: String,
}

fn view(g: &Generation, aliases: Vec<String>) -> AdapterView {
    let (state, error) = match &g.state {
        State::Ready => ("ready", None),
        State::Failed(reason) => ("failed", Some(reason.clone())),
    };
    AdapterView {
        id: g.id.clone(),
        task: g.task.clone(),
        aliases,
        rank: g.config.r,
        alpha: g.config.lora_alpha,
        target_modules: g.targets(),
        state,
        error,
        parent: g.sidecar.parent.clone(),
        created_at: g.created_at,
        metrics: g.sidecar.metrics.clone(),
        trainable_params: g.trainable_params(),
        bytes: g.bytes,
        path: g.path.clone(),
    }
}

/// `GET /v1/adapters`.
#[utoipa::path(get, path = "/v1/adapters", tag = "adapters", security((), ("admin_key" = [])),
    responses((status = 200, description = "Every generation", body = Vec<AdapterView>)))]
pub async fn list(
    _: super::auth::Admin,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let registry = &state.services()?.registry;
    let all: Vec<AdapterView> = registry
        .list()
        .iter()
        .map(|(g, a)| view(g, a.clone()))
        .collect();
    Ok(HttpResponse::Ok().json(all))
}

/// Body of `POST /v1/adapters`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapter {
    /// PEFT directory relative to the adapter root.
    pub path: String,
    /// The task it serves.
    pub task: String,
    /// An alias to point at it: 1–64 of `A-Z a-z 0-9 _ . -`, not starting with `g-`.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$", nullable)]
    pub alias: Option<String>,
}

/// `POST /v1/adapters` → 201 with the generation (200 if the same content was already loaded).
#[utoipa::path(post, path = "/v1/adapters", tag = "adapters", request_body = LoadAdapter,
    security((), ("admin_key" = [])),
    responses(
        (status = 201, description = "Loaded", body = AdapterView),
        (status = 200, description = "The same content was already loaded", body = AdapterView),
        (status = 404, description = "No such directory or task (`not_found`)", body = ErrorBody),
        (status = 409, description = "Conflicts with a loaded generation or alias (`conflict`)", body = ErrorBody)))]
pub async fn load(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    body: web::Json<LoadAdapter>,
) -> Result<HttpResponse, ApiError> {
    let registry = state.services()?.registry.clone();
    let LoadAdapter { path, task, alias } = body.into_inner();
    let started = Instant::now();
    let reg = registry.clone();
    let (generation, new) = web::block(move || reg.load(&path, &task, alias.as_deref())).await??;
    state
        .metrics
        .adapter_load_duration
        .observe(started.elapsed().as_secs_f64());
    let aliases = aliases_of(&registry, &generation);
    let body = view(&generation, aliases);
    Ok(if new {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

fn aliases_of(registry: &crate::adapters::Registry, g: &Arc<Generation>) -> Vec<String> {
    registry
        .list()
        .into_iter()
        .find(|(x, _)| x.id == g.id)
        .map(|(_, a)| a)
        .unwrap_or_default()
}

/// `DELETE /v1/adapters/{id}` → 204; 409 while an alias uses it.
#[utoipa::path(delete, path = "/v1/adapters/{id}", tag = "adapters", security((), ("admin_key" = [])),
    params(("id" = String, Path, description = "Generation id or alias")),
    responses(
        (status = 204, description = "Unloaded"),
        (status = 404, description = "No such generation (`not_found`)", body = ErrorBody),
        (status = 409, description = "An alias or an active rollout uses it (`conflict`)", body = ErrorBody)))]
pub async fn delete(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    // An alias names its generation, which that alias then keeps (409), rather than nothing (404).
    let id = match services.registry.resolve(&id) {
        Some(g) => g.id.clone(),
        None => id.into_inner(),
    };
    let (registry, rollouts) = (services.registry.clone(), services.rollouts.clone());
    web::block(move || rollouts.unless_in_use(&id, || registry.delete(&id))).await???;
    Ok(HttpResponse::NoContent().finish())
}

/// Body of `PUT /v1/aliases/{alias}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    /// The generation id to point at.
    pub adapter: String,
}

/// `PUT /v1/aliases/{alias}`: moves the alias atomically.
#[utoipa::path(put, path = "/v1/aliases/{alias}", tag = "adapters", request_body = SetAlias,
    security((), ("admin_key" = [])),
    params(("alias" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$",
        description = "Alias name: 1–64 of `A-Z a-z 0-9 _ . -`, not starting with `g-`")),
    responses(
        (status = 200, description = "The alias now points at the generation", body = AliasView),
        (status = 404, description = "No such generation (`not_found`)", body = ErrorBody),
        (status = 409, description = "The generation belongs to another task, the name is another task's, or the alias limit is reached (`conflict`)", body = ErrorBody)))]
pub async fn set_alias(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    alias: web::Path<String>,
    body: web::Json<SetAlias>,
) -> Result<HttpResponse, ApiError> {
    let registry = state.services()?.registry.clone();
    let alias = alias.into_inner();
    let name = alias.clone();
    let generation = web::block(move || registry.set_alias(&name, &body.adapter)).await??;
    Ok(HttpResponse::Ok().json(AliasView {
        alias,
        adapter: generation.id.clone(),
        task: generation.task.clone(),
    }))
}

/// `DELETE /v1/aliases/{alias}`: removes the alias; the generation it named stays. A task's stable alias
/// can be moved, not removed.
#[utoipa::path(delete, path = "/v1/aliases/{alias}", tag = "adapters",
    security((), ("admin_key" = [])),
    params(("alias" = String, Path, description = "Alias name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such alias (`not_found`)", body = ErrorBody),
        (status = 409, description = "It is a task's stable alias (`conflict`)", body = ErrorBody)))]
pub async fn delete_alias(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    alias: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let registry = state.services()?.registry.clone();
    web::block(move || registry.delete_alias(&alias)).await??;
    Ok(HttpResponse::NoContent().finish())
}

/// Answer of `PUT /v1/aliases/{alias}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AliasView {
    /// The alias.
    pub alias: String,
    /// The generation it points at now.
    pub adapter: String,
    /// That generation's task.
    pub task: String,
}
