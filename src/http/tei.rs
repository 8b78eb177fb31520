//! Text Embeddings Inference's routes on the same server: `POST /embed`, `POST /predict`,
//! `POST /tokenize` and `GET /info`, in TEI's request and answer shapes, so TEI clients (and
//! `huggingface_hub`'s `InferenceClient` pointed at this server) work unchanged. Errors keep Flywheel's
//! `{"error", "error_type"}` body, which has TEI's keys.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use super::embed::{check_dimensions, prompted, shorten, validate_texts, Inputs};
use super::error::{ApiError, ErrorBody};
use super::openai::classifier;
use super::{timing_headers, AppState, RouteLabels};
use crate::serving::{ClassifyRequest, Services};

/// TEI's version whose API these routes follow.
const TEI_API_VERSION: &str = "1.8.0";

/// `Right` (the default) or `Left`, also lower-case as `huggingface_hub` spells them; Flywheel cuts long
/// inputs on the right only.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize, ToSchema)]
pub enum TruncationDirection {
    /// Keep the start of the text.
    #[default]
    #[serde(alias = "right")]
    Right,
    /// Keep the end of the text (not supported: answered 422).
    #[serde(alias = "left")]
    Left,
}

/// Truncation options every TEI body shares. Flywheel cuts long inputs by default (TEI's
/// `--auto-truncate`); `truncate: false` asks for a refusal instead, found by an extra tokenization on the
/// blocking pool.
async fn check_truncation(
    state: &AppState,
    texts: &[String],
    truncate: Option<bool>,
    direction: Option<TruncationDirection>,
) -> Result<(), ApiError> {
    if direction == Some(TruncationDirection::Left) {
        return Err(ApiError::invalid(
            "truncation_direction Left is not supported: Flywheel keeps the start of a long text",
        ));
    }
    if truncate != Some(false) {
        return Ok(());
    }
    let infer = &state.services()?.infer;
    infer.shed()?;
    let tokenizer = infer.tokenizer().clone();
    let owned = texts.to_vec();
    let max = tokenizer.max_length();
    let long = web::block(move || {
        owned
            .iter()
            .map(|t| tokenizer.overflows(t))
            .collect::<Result<Vec<bool>, _>>()
    })
    .await?
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    match long.iter().position(|&l| l) {
        Some(i) => Err(ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_long",
            format!("inputs[{i}] holds more than {max} tokens and truncate is false"),
        )),
        None => Ok(()),
    }
}

/// Body of TEI's `POST /embed`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TeiEmbedRequest {
    /// Text(s) to embed.
    pub inputs: Inputs,
    /// Unit-length vectors (default true).
    #[serde(default)]
    pub normalize: Option<bool>,
    /// Cut inputs longer than the model's maximum (the default); false refuses them with 413.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `Right` only.
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    /// One of the model's prompts (`config_sentence_transformers.json`, e.g. e5's `query` or `passage`),
    /// put before every input; the model's default prompt when absent.
    #[serde(default)]
    pub prompt_name: Option<String>,
    /// Keep the first `dimensions` values of each vector (re-normalised when `normalize`).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub dimensions: Option<usize>,
}

/// Embeds the inputs with the base model; answers a bare list of vectors.
#[utoipa::path(post, path = "/embed", tag = "tei", request_body = TeiEmbedRequest,
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "One vector per input", body = Vec<Vec<f32>>),
        (status = 413, description = "An input is too long and `truncate` is false (`input_too_long`), or \
            the body exceeds `[limits] max_body_bytes` (`payload_too_large`)", body = ErrorBody)))]
pub async fn embed(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<TeiEmbedRequest>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    let body = body.into_inner();
    let texts = body.inputs.into_vec();
    validate_texts(&texts, &state)?;
    let texts = prompted(&services.infer, body.prompt_name.as_deref(), texts)?;
    check_truncation(&state, &texts, body.truncate, body.truncation_direction).await?;
    check_dimensions(body.dimensions, services.infer.dimensions())?;
    let normalize = body.normalize.unwrap_or(true);
    let out = services.infer.embed(&texts, normalize).await?;
    let vectors: Vec<Vec<f32>> = out
        .vectors
        .into_iter()
        .map(|v| shorten(v, body.dimensions, normalize))
        .collect();
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &out.timings);
    Ok(response.json(vectors))
}

/// TEI's classification input: one text, or a batch of one-text lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PredictInputs {
    /// One text: answered with one list of scores.
    One(String),
    /// Texts as `[["a"], ["b"]]` (or `["a", "b", "c"]`): answered with a list per text. TEI reads a list of
    /// exactly two texts as a sentence pair, which a Flywheel classifier does not take.
    Batch(Vec<TextOrList>),
}

/// An element of a batch: a text, or a list holding one text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextOrList {
    /// A text.
    Text(String),
    /// `[text]`; two texts would be a sentence pair.
    List(Vec<String>),
}

impl utoipa::PartialSchema for PredictInputs {
    fn schema() -> RefOr<Schema> {
        use super::openapi::text;
        OneOfBuilder::new()
            .item(text("A single text"))
            .item(
                ArrayBuilder::new()
                    .items(
                        ArrayBuilder::new()
                            .items(text("A text"))
                            .min_items(Some(1))
                            .max_items(Some(1)),
                    )
                    .min_items(Some(1))
                    .description(Some(
                        "A batch, one text per inner list: at most `[limits] max_inputs`",
                    )),
            )
            .description(Some(
                "One text, or a batch as TEI writes it (`[[\"a\"], [\"b\"]]`); sentence pairs are not \
                 supported",
            ))
            .into()
    }
}

impl ToSchema for PredictInputs {}

impl PredictInputs {
    /// The texts, and whether the answer is a batch.
    fn into_texts(self) -> Result<(Vec<String>, bool), ApiError> {
        let items = match self {
            PredictInputs::One(t) => return Ok((vec![t], false)),
            PredictInputs::Batch(items) => items,
        };
        if items.len() == 2 && items.iter().all(|i| matches!(i, TextOrList::Text(_))) {
            return Err(ApiError::invalid(
                "a list of two texts is a sentence pair in TEI's API, which a Flywheel classifier does not \
                 take; send [[\"first\"], [\"second\"]] to classify two texts",
            ));
        }
        let texts = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                TextOrList::Text(t) => Ok(t),
                TextOrList::List(mut l) if l.len() == 1 => Ok(l.remove(0)),
                TextOrList::List(_) => Err(ApiError::invalid(format!(
                    "inputs[{i}] must hold one text: sentence pairs are not supported"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok((texts, true))
    }
}

/// Body of TEI's `POST /predict`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TeiPredictRequest {
    /// Text(s) to classify.
    pub inputs: PredictInputs,
    /// Answer the head's logits instead of probabilities.
    #[serde(default)]
    pub raw_scores: bool,
    /// Cut inputs longer than the model's maximum (the default); false refuses them with 413.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `Right` only.
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    /// Flywheel's addition: a task, alias or generation; default `[server] tei_predict_model`, or the only
    /// task.
    #[serde(default)]
    pub model: Option<String>,
}

/// One label's score.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeiPrediction {
    /// Probability, or logit with `raw_scores`.
    pub score: f32,
    /// The label.
    pub label: String,
}

/// `/predict`'s answer: for one text, its labels' scores; for a batch, a list of them per text.
pub struct TeiPredictResponse;

impl utoipa::PartialSchema for TeiPredictResponse {
    fn schema() -> RefOr<Schema> {
        let scores = || {
            ArrayBuilder::new()
                .items(<TeiPrediction as utoipa::PartialSchema>::schema())
                .description(Some("Each label's score, highest first"))
        };
        OneOfBuilder::new()
            .item(scores())
            .item(
                ArrayBuilder::new()
                    .items(scores())
                    .description(Some("A batch: one list per text, in order")),
            )
            .into()
    }
}

impl ToSchema for TeiPredictResponse {}

/// The model TEI's `/predict` (and vLLM's `/classify`) uses when the body names none.
pub(super) fn default_classifier(
    state: &AppState,
    services: &Services,
) -> Result<String, ApiError> {
    let configured = &state.config.server.tei_predict_model;
    if !configured.is_empty() {
        return Ok(configured.clone());
    }
    match services.registry.tasks().as_slice() {
        [only] => Ok(only.name.clone()),
        tasks => Err(ApiError::invalid(format!(
            "name the task in \"model\" or set [server] tei_predict_model: this server has {} tasks{}",
            tasks.len(),
            if tasks.is_empty() { "" } else { " (GET /v1/models)" }
        ))),
    }
}

/// Classifies the inputs with the task `[server] tei_predict_model` (or the only task) names; answers
/// each input's labels by score, highest first.
#[utoipa::path(post, path = "/predict", tag = "tei", request_body = TeiPredictRequest,
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "For one text, its labels by score; for a batch, a list per text",
            body = TeiPredictResponse),
        (status = 404, description = "`model` names nothing this server serves (`model_not_found`)",
            body = ErrorBody),
        (status = 409, description = "The task has no servable generation (`conflict`)", body = ErrorBody),
        (status = 413, description = "An input is too long and `truncate` is false (`input_too_long`), or \
            the body exceeds `[limits] max_body_bytes` (`payload_too_large`)", body = ErrorBody)))]
pub async fn predict(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<TeiPredictRequest>,
) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    let body = body.into_inner();
    let (texts, batch) = body.inputs.into_texts()?;
    validate_texts(&texts, &state)?;
    check_truncation(&state, &texts, body.truncate, body.truncation_direction).await?;
    let model = match body.model {
        Some(m) => m,
        None => default_classifier(&state, services)?,
    };
    let (task, pinned) = classifier(services, &model)?;
    let answer = services
        .classify(ClassifyRequest {
            task,
            pinned,
            routing_key: None,
            texts,
        })
        .await?;
    let scores = if body.raw_scores {
        &answer.out.logits
    } else {
        &answer.out.vectors
    };
    let mut lists: Vec<Vec<TeiPrediction>> = scores
        .iter()
        .map(|row| {
            let mut list: Vec<TeiPrediction> = row
                .iter()
                .zip(&answer.task.labels)
                .map(|(&score, label)| TeiPrediction {
                    score,
                    label: label.clone(),
                })
                .collect();
            list.sort_by(|a, b| b.score.total_cmp(&a.score));
            list
        })
        .collect();
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &answer.out.timings);
    response.insert_header(("x-request-id", answer.request_id.clone()));
    response.extensions_mut().insert(RouteLabels {
        task: answer.task.name.clone(),
        arm: answer.arm.clone(),
    });
    Ok(if batch {
        response.json(lists)
    } else {
        response.json(lists.swap_remove(0))
    })
}

/// Body of TEI's `POST /tokenize`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TeiTokenizeRequest {
    /// Text(s) to tokenize.
    pub inputs: Inputs,
    /// Add `[CLS]` and `[SEP]` (default true).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// One of the model's prompts, put before every input (as `/embed` does).
    #[serde(default)]
    pub prompt_name: Option<String>,
}

/// One token as TEI describes it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SimpleToken {
    /// Its vocabulary id.
    pub id: u32,
    /// The input text it covers, or its vocabulary entry for a special token.
    pub text: String,
    /// Whether the tokenizer added it.
    pub special: bool,
    /// Byte offset of its start in the input; null for special tokens.
    pub start: Option<usize>,
    /// Byte offset of its end; null for special tokens.
    pub stop: Option<usize>,
}

/// Tokenizes the inputs as the model does (truncated at its maximum length).
#[utoipa::path(post, path = "/tokenize", tag = "tei", request_body = TeiTokenizeRequest,
    security((), ("api_key" = [])),
    responses((status = 200, description = "A list of tokens per input", body = Vec<Vec<SimpleToken>>)))]
pub async fn tokenize(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<TeiTokenizeRequest>,
) -> Result<HttpResponse, ApiError> {
    let infer = &state.services()?.infer;
    let tokenizer = infer.tokenizer().clone();
    let body = body.into_inner();
    let texts = body.inputs.into_vec();
    validate_texts(&texts, &state)?;
    // Tokenizing takes the cores the model needs; an overloaded server sheds it like any request.
    infer.shed()?;
    let texts = prompted(infer, body.prompt_name.as_deref(), texts)?;
    let special = body.add_special_tokens.unwrap_or(true);
    let lists = web::block(move || {
        texts
            .iter()
            .map(|t| tokenizer.tokens(t, special))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    let lists: Vec<Vec<SimpleToken>> = lists
        .into_iter()
        .map(|tokens| {
            tokens
                .into_iter()
                .map(|t| SimpleToken {
                    id: t.id,
                    text: t.text,
                    special: t.special,
                    start: t.span.map(|s| s.0),
                    stop: t.span.map(|s| s.1),
                })
                .collect()
        })
        .collect();
    Ok(HttpResponse::Ok().json(lists))
}

/// What kind of model answers, as TEI's `/info` says it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeiModelType {
    /// The base model embeds.
    pub embedding: TeiPooling,
}

/// The pooling an embedding model uses.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeiPooling {
    /// Always `mean`.
    pub pooling: &'static str,
}

/// Answer of TEI's `GET /info`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeiInfo {
    /// The base model's name.
    pub model_id: String,
    /// Not tracked: null.
    pub model_sha: Option<String>,
    /// TEI's build's revision: null.
    pub sha: Option<String>,
    /// TEI's image label: null.
    pub docker_label: Option<String>,
    /// The serving path's number format: `float32`, or `int8` where `model.precision` quantised
    /// projections.
    pub model_dtype: &'static str,
    /// What the model does.
    pub model_type: TeiModelType,
    /// Sequences the inference queue holds (`[batching] queue_capacity`).
    pub max_concurrent_requests: usize,
    /// Tokens per input, special tokens included (`[model] max_length`).
    pub max_input_length: usize,
    /// Tokens per forward pass (`[batching] max_batch_tokens`).
    pub max_batch_tokens: usize,
    /// Sequences per forward pass (`[batching] max_batch_size`).
    pub max_batch_requests: usize,
    /// Inputs per request (`[limits] max_inputs`).
    pub max_client_batch_size: usize,
    /// Always true: long inputs are cut unless a request sets `truncate: false`.
    pub auto_truncate: bool,
    /// HTTP workers, which tokenize (`[server] workers`).
    pub tokenization_workers: usize,
    /// The TEI API version these routes follow.
    pub version: &'static str,
    /// Flywheel's version.
    pub flywheel_version: &'static str,
}

/// Describes the served model and the server's limits, as TEI does.
#[utoipa::path(get, path = "/info", tag = "tei",
    responses((status = 200, description = "The model and the limits", body = TeiInfo)))]
pub async fn info(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let services = state.services()?;
    let config = &state.config;
    Ok(HttpResponse::Ok().json(TeiInfo {
        model_id: services.infer.model_name().to_owned(),
        model_sha: None,
        sha: None,
        docker_label: None,
        model_dtype: services.infer.dtype(),
        model_type: TeiModelType {
            embedding: TeiPooling { pooling: "mean" },
        },
        max_concurrent_requests: config.batching.queue_capacity,
        max_input_length: services.infer.tokenizer().max_length(),
        max_batch_tokens: config.batching.max_batch_tokens,
        max_batch_requests: config.batching.max_batch_size,
        max_client_batch_size: config.limits.max_inputs,
        auto_truncate: true,
        tokenization_workers: config.server.workers,
        version: TEI_API_VERSION,
        flywheel_version: env!("CARGO_PKG_VERSION"),
    }))
}
