//! OpenAI-style routes: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{model}` and vLLM's
//! `POST /v1/classify`, so the OpenAI SDKs, LangChain and LlamaIndex work unchanged. `model` selects what
//! answers (see [`crate::serving::Selected`]); errors come in OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`. Unknown fields are ignored, as client libraries add
//! their own.
//!
//! Past 500 lines as one concern: OpenAI's request and response shapes, its error shape and its routes.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use super::embed::{check_dimensions, prompted, shorten, validate_texts, Inputs};
use super::error::{json_error, ApiError, RETRY_AFTER_SECS};
use super::{timing_headers, AppState, RouteLabels};
use crate::serving::{ClassifyRequest, ModelCard, Selected, Services};

/// An [`ApiError`] answered in OpenAI's shape; 422 becomes 400, as OpenAI answers invalid parameters.
#[derive(Debug)]
pub struct OpenAiError {
    error: ApiError,
    param: Option<&'static str>,
}

impl OpenAiError {
    fn new(error: ApiError, param: &'static str) -> Self {
        Self {
            error,
            param: Some(param),
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(ApiError::invalid(message), param)
    }

    /// `error`, naming `param` when the fault is the request's value (not a state of the server).
    fn about(param: &'static str, error: impl Into<ApiError>) -> Self {
        let error = error.into();
        let param = (error.status == StatusCode::UNPROCESSABLE_ENTITY).then_some(param);
        Self { error, param }
    }

    fn unknown_model(model: &str) -> Self {
        Self::new(
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "the model {model:?} does not exist; GET /v1/models lists the base model, tasks, \
                     aliases and generations"
                ),
            ),
            "model",
        )
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self { error, param: None }
    }
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// The body of an error on these routes.
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiErrorDetail,
}

/// OpenAI's error object.
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// A sentence for humans.
    pub message: String,
    /// OpenAI's class of error: `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// Flywheel's snake_case kind (the `error_type` of its own routes), e.g. `model_not_found`.
    pub code: String,
}

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        match self.error.status {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        };
        let mut response = HttpResponse::build(status);
        if super::error::retry_helps(status, self.error.kind) {
            response.insert_header(("retry-after", RETRY_AFTER_SECS.to_string()));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.insert_header(super::error::CHALLENGE);
        }
        if let Some(labels) = &self.error.labels {
            response.extensions_mut().insert(labels.clone());
        }
        response.json(OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: super::error::bounded(&self.error.message),
                kind,
                param: self.param,
                code: self.error.kind.to_owned(),
            },
        })
    }
}

/// Body errors of the JSON extractor on these routes, in OpenAI's shape.
pub fn json_config(max_body: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(max_body)
        .error_handler(|e, _| OpenAiError::from(json_error(e)).into())
}

/// What `/v1/embeddings` embeds: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One sequence of token ids.
    Tokens(Vec<u32>),
    /// Several sequences of token ids.
    TokenLists(Vec<Vec<u32>>),
}

impl utoipa::PartialSchema for EmbeddingInput {
    fn schema() -> RefOr<Schema> {
        use super::openapi::text;
        let ids = || {
            ArrayBuilder::new()
                .items(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                )
                .min_items(Some(1))
        };
        OneOfBuilder::new()
            .item(text("A text"))
            .item(
                ArrayBuilder::new()
                    .items(text("A text"))
                    .min_items(Some(1))
                    .description(Some("Texts: at most `[limits] max_inputs`")),
            )
            .item(ids().description(Some(
                "Token ids of the model's vocabulary (as `POST /tokenize` gives them), used as given",
            )))
            .item(
                ArrayBuilder::new()
                    .items(ids())
                    .min_items(Some(1))
                    .description(Some("Several sequences of token ids")),
            )
            .description(Some("What to embed: text(s) or token id sequence(s)."))
            .into()
    }
}

impl ToSchema for EmbeddingInput {}

/// `float` (default) or `base64` (the vector's little-endian f32 bytes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    #[default]
    Float,
    /// Base64 of the little-endian f32 bytes (the OpenAI Python SDK's default).
    Base64,
}

/// Body of `POST /v1/embeddings`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// What to embed.
    pub input: EmbeddingInput,
    /// The base model's name (or a hub path ending in it); omitted means the base model.
    #[serde(default)]
    pub model: Option<String>,
    /// `float` or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Keep the first `dimensions` values of each vector, re-normalised; at most the model's width.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub dimensions: Option<usize>,
    /// The caller's end user (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
}

/// An embedding as numbers or as base64.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingValue {
    /// Numbers.
    Float(Vec<f32>),
    /// Base64 of little-endian f32 bytes.
    Base64(String),
}

/// One input's embedding.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingObject {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position in the request.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingValue,
}

/// Token counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiUsage {
    /// Tokens read, special tokens included, after truncation.
    pub prompt_tokens: usize,
    /// The same: nothing is generated.
    pub total_tokens: usize,
}

/// Answer of `POST /v1/embeddings`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One embedding per input, in order.
    pub data: Vec<EmbeddingObject>,
    /// The model as the request named it (the base model's name when it named none).
    pub model: String,
    /// Token counts.
    pub usage: OpenAiUsage,
}

/// Base64 of the little-endian bytes of `vector`.
fn to_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Checks `model` names the base model: embeddings come from the base model only.
fn base_model(services: &Services, model: Option<&str>) -> Result<(), OpenAiError> {
    match model.map(|m| (m, services.select(m))) {
        None | Some((_, Some(Selected::Base))) => Ok(()),
        Some((m, Some(_))) => Err(OpenAiError::invalid(
            "model",
            format!(
                "{m:?} is a classifier (a task, alias or generation); embeddings come from the base model \
                 {:?}; classify with POST /v1/classify",
                services.infer.model_name()
            ),
        )),
        Some((m, None)) => Err(OpenAiError::unknown_model(m)),
    }
}

/// Embeds the input with the base model, as OpenAI's embeddings endpoint does: mean pooling, unit length.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingsRequest,
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "One embedding per input", body = EmbeddingsResponse),
        (status = 404, description = "`model` names nothing this server serves (`model_not_found`)",
            body = OpenAiErrorBody)))]
pub async fn embeddings(
    _: super::auth::Caller<OpenAiError>,
    state: web::Data<AppState>,
    body: web::Json<EmbeddingsRequest>,
) -> Result<HttpResponse, OpenAiError> {
    let services = state.services()?;
    let EmbeddingsRequest {
        input,
        model,
        encoding_format,
        dimensions,
        user: _,
    } = body.into_inner();
    base_model(services, model.as_deref())?;
    check_dimensions(dimensions, services.infer.dimensions())
        .map_err(|e| OpenAiError::new(e, "dimensions"))?;
    let out = match input {
        EmbeddingInput::Text(t) => embed_texts(&state, vec![t]).await?,
        EmbeddingInput::Texts(t) => embed_texts(&state, t).await?,
        EmbeddingInput::Tokens(ids) => embed_ids(&state, vec![ids]).await?,
        EmbeddingInput::TokenLists(ids) => embed_ids(&state, ids).await?,
    };
    let format = encoding_format.unwrap_or_default();
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = shorten(v, dimensions, true);
            EmbeddingObject {
                object: "embedding",
                index,
                embedding: match format {
                    EncodingFormat::Float => EmbeddingValue::Float(v),
                    EncodingFormat::Base64 => EmbeddingValue::Base64(to_base64(&v)),
                },
            }
        })
        .collect();
    let tokens = out.tokens.iter().sum();
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &out.timings);
    Ok(response.json(EmbeddingsResponse {
        object: "list",
        data,
        model: model.unwrap_or_else(|| services.infer.model_name().to_owned()),
        usage: OpenAiUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

async fn embed_texts(
    state: &AppState,
    texts: Vec<String>,
) -> Result<crate::infer::Outputs, OpenAiError> {
    validate_texts(&texts, state).map_err(|e| OpenAiError::about("input", e))?;
    let infer = &state.services()?.infer;
    // OpenAI's body names no prompt: the model's default one, if it has one, applies.
    let texts = prompted(infer, None, texts).map_err(|e| OpenAiError::about("input", e))?;
    infer
        .embed(&texts, true)
        .await
        .map_err(|e| OpenAiError::about("input", e))
}

async fn embed_ids(
    state: &AppState,
    ids: Vec<Vec<u32>>,
) -> Result<crate::infer::Outputs, OpenAiError> {
    let limit = state.config.limits.max_inputs;
    if ids.is_empty() || ids.len() > limit {
        return Err(OpenAiError::invalid(
            "input",
            format!(
                "input must hold between 1 and {limit} sequences; it holds {}",
                ids.len()
            ),
        ));
    }
    if let Some(i) = ids.iter().position(Vec::is_empty) {
        return Err(OpenAiError::invalid(
            "input",
            format!("input[{i}] is empty"),
        ));
    }
    let infer = &state.services()?.infer;
    infer
        .embed_tokens(ids, true)
        .await
        .map_err(|e| OpenAiError::about("input", e))
}

/// One model as OpenAI lists it, with vLLM's lineage fields and Flywheel's kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    /// The name to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds: when the base model loaded, the task was created, the generation registered.
    pub created: u64,
    /// Always `flywheel`.
    pub owned_by: &'static str,
    /// What it derives from: a generation's parent generation (or its task), an alias's generation, a
    /// task's base model; null for the base model.
    pub parent: Option<String>,
    /// The base model.
    pub root: String,
    /// `base` (embeddings), `task` (classification through its rollout), `alias` or `generation`
    /// (classification pinned to one generation).
    pub kind: &'static str,
    /// The task it classifies for; null for the base model.
    pub task: Option<String>,
}

impl From<ModelCard> for ModelObject {
    fn from(card: ModelCard) -> Self {
        Self {
            id: card.id,
            object: "model",
            created: card.created,
            owned_by: "flywheel",
            parent: card.parent,
            root: card.root,
            kind: card.kind,
            task: card.task,
        }
    }
}

/// Answer of `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The base model, then each task, alias and generation.
    pub data: Vec<ModelObject>,
}

/// Lists every name `model` accepts: the base model, tasks, aliases and generations, with lineage.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security((), ("api_key" = [])),
    responses((status = 200, description = "Every model name", body = ModelList)))]
pub async fn models(
    _: super::auth::Caller<OpenAiError>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, OpenAiError> {
    let services = state.services()?;
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list",
        data: services
            .model_cards()
            .into_iter()
            .map(ModelObject::from)
            .collect(),
    }))
}

/// One model by name.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "openai", security((), ("api_key" = [])),
    params(("model" = String, Path, description = "A name from `GET /v1/models`")),
    responses(
        (status = 200, description = "The model", body = ModelObject),
        (status = 404, description = "No such model (`model_not_found`)", body = OpenAiErrorBody)))]
pub async fn model(
    _: super::auth::Caller<OpenAiError>,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, OpenAiError> {
    let services = state.services()?;
    let base = services.is_base_model(&name);
    let card = services
        .model_cards()
        .into_iter()
        .find(|c| c.id == *name || base && c.kind == "base")
        .ok_or_else(|| OpenAiError::unknown_model(&name))?;
    Ok(HttpResponse::Ok().json(ModelObject::from(card)))
}

/// Body of `POST /v1/classify` and `POST /classify` (vLLM's shape, with Flywheel's sticky routing key).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ClassifyBody {
    /// A task (its rollout picks the generation), an alias or a generation id (pinned); default
    /// `[server] tei_predict_model`, or the only task.
    #[serde(default)]
    pub model: Option<String>,
    /// Text(s) to classify.
    pub input: Inputs,
    /// Sticky routing key: one key always sees the same arm of a rollout.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// The caller's end user (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM's switch: false answers the head's logits in `probs` instead of probabilities.
    #[serde(default)]
    pub use_activation: Option<bool>,
}

/// One input's classification.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyData {
    /// The input's position in the request.
    pub index: usize,
    /// The most probable label.
    pub label: String,
    /// Every label's probability (logit with `use_activation: false`), in the task's label order.
    pub probs: Vec<f32>,
    /// How many labels the task has.
    pub num_classes: usize,
}

/// Answer of `POST /v1/classify`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    /// The request's id (also `x-request-id`); feedback may name it.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// One classification per input, in order.
    pub data: Vec<ClassifyData>,
    /// The task's labels: `probs[i]` is `labels[i]`'s.
    pub labels: Vec<String>,
    /// The generation that answered.
    pub adapter: String,
    /// `stable` or the rollout's arm, or `pinned`.
    pub arm: String,
    /// Token counts.
    pub usage: OpenAiUsage,
}

/// What a classification `model` name selects: the task, and the generation when pinned.
pub(super) fn classifier(
    services: &Services,
    model: &str,
) -> Result<(String, Option<String>), ApiError> {
    match services.select(model) {
        Some(Selected::Task(task)) => Ok((task, None)),
        Some(Selected::Pinned { task, reference }) => Ok((task, Some(reference))),
        Some(Selected::Base) => Err(ApiError::invalid(format!(
            "{model:?} is the base model, which has no classification head; name a task, alias or \
             generation (GET /v1/models)"
        ))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model {model:?} does not exist; GET /v1/models lists what does"),
        )),
    }
}

/// Classifies the input with the task, alias or generation `model` names.
#[utoipa::path(post, path = "/v1/classify", tag = "openai", request_body = ClassifyBody,
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "One classification per input", body = ClassifyResponse, headers(
            ("x-request-id" = String, description = "The request's id, also in the body"))),
        (status = 404, description = "`model` names nothing this server serves (`model_not_found`)",
            body = OpenAiErrorBody),
        (status = 409, description = "The task has no servable generation (`conflict`)",
            body = OpenAiErrorBody)))]
pub async fn classify(
    _: super::auth::Caller<OpenAiError>,
    state: web::Data<AppState>,
    body: web::Json<ClassifyBody>,
) -> Result<HttpResponse, OpenAiError> {
    let services = state.services()?;
    let ClassifyBody {
        model,
        input,
        routing_key,
        user: _,
        use_activation,
    } = body.into_inner();
    let model = match model {
        Some(model) => model,
        None => super::tei::default_classifier(&state, services)
            .map_err(|e| OpenAiError::about("model", e))?,
    };
    let (task, pinned) = classifier(services, &model).map_err(|e| OpenAiError::new(e, "model"))?;
    super::predict::check_routing_key(routing_key.as_deref())?;
    let texts = input.into_vec();
    validate_texts(&texts, &state).map_err(|e| OpenAiError::about("input", e))?;
    let answer = services
        .classify(ClassifyRequest {
            task,
            pinned,
            routing_key,
            texts,
        })
        .await
        .map_err(ApiError::from)?;
    let num_classes = answer.task.labels.len();
    let scores = if use_activation == Some(false) {
        &answer.out.logits
    } else {
        &answer.out.vectors
    };
    let data = scores
        .iter()
        .enumerate()
        .map(|(index, scores)| ClassifyData {
            index,
            // Softmax keeps the order, so the best logit is the best probability.
            label: answer.task.labels[crate::model::pooling::best(scores).0].clone(),
            probs: scores.clone(),
            num_classes,
        })
        .collect();
    let tokens = answer.out.tokens.iter().sum();
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &answer.out.timings);
    response.insert_header(("x-request-id", answer.request_id.clone()));
    response.extensions_mut().insert(RouteLabels {
        task: answer.task.name.clone(),
        arm: answer.arm.clone(),
    });
    Ok(response.json(ClassifyResponse {
        id: answer.request_id,
        object: "list",
        created: crate::clock::unix_seconds(),
        model,
        data,
        labels: answer.task.labels,
        adapter: answer.generation.id.clone(),
        arm: answer.arm,
        usage: OpenAiUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_holds_the_little_endian_f32_bytes() {
        let v = [1.0f32, -2.5, 0.0];
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(to_base64(&v))
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, v);
    }

    #[test]
    fn shortened_vectors_are_unit_length_and_keep_their_direction() {
        let v = shorten(vec![3.0, 4.0, 12.0], Some(2), true);
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn errors_take_openais_shape_and_invalid_values_answer_400() {
        let e = OpenAiError::invalid("dimensions", "too many");
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        let body = e.error_response().into_body();
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(actix_web::body::to_bytes(body))
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "dimensions");
        assert_eq!(json["error"]["code"], "invalid_request");
        assert_eq!(json["error"]["message"], "too many");
    }
}
