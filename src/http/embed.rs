//! `POST /v1/embed`: sentence embeddings.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use super::error::ApiError;
use super::{timing_headers, AppState};
use crate::infer::Infer;

/// One text or a list of texts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Inputs {
    /// A single text.
    One(String),
    /// Several texts, answered in order.
    Many(Vec<String>),
}

/// Written by hand: a derived schema cannot say that each text needs a non-blank character.
impl utoipa::PartialSchema for Inputs {
    fn schema() -> RefOr<Schema> {
        use super::openapi::text;

        OneOfBuilder::new()
            .item(text("A single text"))
            .item(
                ArrayBuilder::new()
                    .items(text("A text"))
                    .min_items(Some(1))
                    .description(Some(
                        "Several texts, answered in order: at most `[limits] max_inputs`",
                    )),
            )
            .description(Some("One text or a list of texts."))
            .into()
    }
}

impl ToSchema for Inputs {}

impl Inputs {
    /// The texts, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Inputs::One(t) => vec![t],
            Inputs::Many(v) => v,
        }
    }
}

/// Body of `POST /v1/embed`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    /// Text(s) to embed.
    pub inputs: Inputs,
    /// L2-normalise each vector (sentence-transformers' default for this model).
    #[serde(default = "default_normalize")]
    pub normalize: bool,
    /// One of the model's prompts (`config_sentence_transformers.json`: multilingual-e5-small's `query` and
    /// `passage`), put before every input; the model's default prompt, if it names one, when absent.
    #[serde(default)]
    pub prompt_name: Option<String>,
}

fn default_normalize() -> bool {
    true
}

/// Token counts of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens processed, special tokens included, after truncation.
    pub tokens: usize,
}

/// Answer of `POST /v1/embed`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbedResponse {
    /// One vector per input, in order.
    pub embeddings: Vec<Vec<f32>>,
    /// The model that produced them.
    pub model: String,
    /// Work done.
    pub usage: Usage,
}

/// Checks a requested `dimensions` (Matryoshka-style truncation) against the model's `width`.
pub(super) fn check_dimensions(dimensions: Option<usize>, width: usize) -> Result<(), ApiError> {
    match dimensions {
        Some(d) if d == 0 || d > width => Err(ApiError::invalid(format!(
            "dimensions must be between 1 and the model's {width}; it is {d}"
        ))),
        _ => Ok(()),
    }
}

/// The first `dimensions` values of `vector` (all of them without), made unit length again when
/// `normalize`.
pub(super) fn shorten(
    mut vector: Vec<f32>,
    dimensions: Option<usize>,
    normalize: bool,
) -> Vec<f32> {
    if let Some(d) = dimensions.filter(|&d| d < vector.len()) {
        vector.truncate(d);
        if normalize {
            crate::model::pooling::l2_normalize(&mut vector);
        }
    }
    vector
}

/// `texts` with the model's prompt `name` (or its default prompt) put before each; an unknown name is refused (422; 400 on OpenAI's route).
pub(super) fn prompted(
    infer: &Infer,
    name: Option<&str>,
    texts: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    infer
        .prompts()
        .apply(name, texts)
        .map_err(ApiError::invalid)
}

/// Checks a request's texts against the configured limits.
pub(super) fn validate_texts(texts: &[String], state: &AppState) -> Result<(), ApiError> {
    let limits = &state.config.limits;
    if texts.is_empty() {
        return Err(ApiError::invalid("inputs must hold at least one text"));
    }
    if texts.len() > limits.max_inputs {
        return Err(ApiError::invalid(format!(
            "inputs holds {} texts; at most {} are allowed per request",
            texts.len(),
            limits.max_inputs
        )));
    }
    for (i, t) in texts.iter().enumerate() {
        // Only the empty string: a text of white space is a text (a chunker's blank chunk), which the
        // model reads as its special tokens alone, as sentence-transformers and TEI do.
        if t.is_empty() {
            return Err(ApiError::invalid(format!("inputs[{i}] is empty")));
        }
        if t.len() > limits.max_text_bytes {
            return Err(ApiError::invalid(format!(
                "inputs[{i}] is {} bytes; at most {} are allowed",
                t.len(),
                limits.max_text_bytes
            )));
        }
    }
    Ok(())
}

/// Embeds the inputs with mean pooling (and L2 normalisation unless `normalize` is false).
#[utoipa::path(post, path = "/v1/embed", tag = "inference", request_body = EmbedRequest,
    security((), ("api_key" = [])),
    responses((status = 200, description = "One vector per input", body = EmbedResponse, headers(
        ("x-request-id" = String, description = "The request's id"),
        ("x-queue-time-ms" = String, description = "Milliseconds waiting for the model thread")))))]
pub async fn embed(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<EmbedRequest>,
) -> Result<HttpResponse, ApiError> {
    let infer = state.infer().ok_or_else(ApiError::not_ready)?;
    let EmbedRequest {
        inputs,
        normalize,
        prompt_name,
    } = body.into_inner();
    let texts = inputs.into_vec();
    validate_texts(&texts, &state)?;
    let texts = prompted(infer, prompt_name.as_deref(), texts)?;
    let out = infer.embed(&texts, normalize).await?;
    let mut response = HttpResponse::Ok();
    timing_headers(&mut response, &out.timings);
    Ok(response.json(EmbedResponse {
        embeddings: out.vectors,
        model: infer.model_name().to_owned(),
        usage: Usage {
            tokens: out.tokens.iter().sum(),
        },
    }))
}
