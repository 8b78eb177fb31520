//! `ApiError`: the one JSON error body and the table from error kind to HTTP status.

use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::adapters::RegistryError;
use crate::feedback::FeedbackError;
use crate::infer::InferError;
use crate::serving::ClassifyError;

/// Seconds a client is asked to wait after a 429.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error answered as `{"error": "...", "error_type": "..."}` with a fitting status.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case kind, also used as a metrics label.
    pub kind: &'static str,
    /// A sentence for humans.
    pub message: String,
    /// The task and arm of a request that failed once its arm was chosen: its latency is recorded under
    /// them, as a success's is, so a slow arm's timeouts show in its own histogram.
    pub(crate) labels: Option<super::RouteLabels>,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A sentence for humans.
    pub error: String,
    /// Stable snake_case kind, e.g. `invalid_request`.
    pub error_type: String,
}

impl ApiError {
    /// An error of any status and kind.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            labels: None,
        }
    }

    /// 400: the body is not valid JSON.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// 422: well-formed JSON with an invalid value.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 404: no such route or resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409: conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500: the server failed in a way that is its own bug (logged); a retry will not help.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// 503: a part the server needs has stopped working.
    pub fn unhealthy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", message)
    }

    /// 503: the model is still loading.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the model is still loading; retry shortly",
        )
    }
}

/// Work handed to the blocking pool fails only when it panics (the pool never refuses work): a bug, not a
/// reason to retry.
impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        tracing::error!("a handler's blocking work panicked");
        Self::internal("the server failed on this request (a bug, logged)")
    }
}

/// The longest error message sent, in bytes. Messages quote what the caller sent (a task name, a model, a
/// request id), and a body may be megabytes: the answer must not echo it all.
const MAX_MESSAGE_BYTES: usize = 2048;

/// `message` cut to [`MAX_MESSAGE_BYTES`] at a character boundary, marked with "…" when cut.
pub fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// What a 401 names as the way to authenticate (RFC 9110 §11.6.1 asks every 401 for one).
pub const CHALLENGE: (header::HeaderName, &str) = (header::WWW_AUTHENTICATE, "Bearer");

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if retry_helps(self.status, self.kind) {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header(CHALLENGE);
        }
        if let Some(labels) = &self.labels {
            response.extensions_mut().insert(labels.clone());
        }
        response.json(ErrorBody {
            error: bounded(&self.message),
            error_type: self.kind.to_owned(),
        })
    }
}

/// Errors that stay until an operator acts (no trainer on this replica, a dead model thread): no
/// `Retry-After`, which would have clients retry them every second.
const LASTING: [&str; 2] = ["trainer_disabled", "unhealthy"];

/// Whether an answer asks the client to retry shortly (`Retry-After`): an overload or a passing outage.
pub(super) fn retry_helps(status: StatusCode, kind: &str) -> bool {
    (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
        && !LASTING.contains(&kind)
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let message = e.to_string();
        match e {
            InferError::Overloaded(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            }
            InferError::Invalid(_) => Self::invalid(message),
            InferError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            InferError::TimedOut(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
            }
            InferError::Model(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", message)
            }
        }
    }
}

impl From<ClassifyError> for ApiError {
    fn from(e: ClassifyError) -> Self {
        let message = e.to_string();
        match e {
            ClassifyError::UnknownTask(_) | ClassifyError::UnknownAdapter(_) => {
                Self::not_found(message)
            }
            ClassifyError::NoGeneration(_) | ClassifyError::NotReady(_) => Self::conflict(message),
            ClassifyError::WrongTask { .. } => Self::invalid(message),
            ClassifyError::Infer(e) => e.into(),
            // A refusal (429, a bad input) says nothing of the arm; its instant answer would pull the
            // arm's latency down.
            ClassifyError::Served { error, .. } if error.is_not_the_models() => error.into(),
            ClassifyError::Served { task, arm, error } => Self {
                labels: Some(super::RouteLabels { task, arm }),
                ..error.into()
            },
        }
    }
}

impl From<FeedbackError> for ApiError {
    fn from(e: FeedbackError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::NotFound(_) => Self::not_found(message),
            RegistryError::Conflict(_) => Self::conflict(message),
            RegistryError::Invalid(_) => Self::invalid(message),
            RegistryError::Forbidden(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "path_outside_adapter_root",
                message,
            ),
            RegistryError::Storage(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                message,
            ),
        }
    }
}

/// Maps actix's JSON extractor failures to `ApiError`s: 413 for oversized bodies, 400 for broken JSON,
/// 415 for a wrong content type, 422 for JSON of the wrong shape.
pub fn json_error(err: JsonPayloadError) -> ApiError {
    match &err {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body exceeds {limit} bytes"),
        ),
        JsonPayloadError::Payload(PayloadError::Overflow) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        ),
        JsonPayloadError::Payload(PayloadError::Io(e))
            if e.kind() == std::io::ErrorKind::TimedOut =>
        {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                e.to_string(),
            )
        }
        JsonPayloadError::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => {
            ApiError::invalid(format!("invalid request: {e}"))
        }
        JsonPayloadError::Deserialize(e) => ApiError::malformed(format!("malformed JSON: {e}")),
        other => ApiError::malformed(format!("unreadable request body: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passing_conditions_ask_for_a_retry() {
        assert!(retry_helps(StatusCode::TOO_MANY_REQUESTS, "overloaded"));
        assert!(retry_helps(StatusCode::SERVICE_UNAVAILABLE, "not_ready"));
        assert!(retry_helps(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable"
        ));
        assert!(!retry_helps(
            StatusCode::SERVICE_UNAVAILABLE,
            "trainer_disabled"
        ));
        assert!(!retry_helps(StatusCode::SERVICE_UNAVAILABLE, "unhealthy"));
        assert!(!retry_helps(StatusCode::CONFLICT, "conflict"));
    }

    #[test]
    fn a_request_that_failed_on_its_arm_keeps_the_arms_labels() {
        let failed = ClassifyError::Served {
            task: "spam".into(),
            arm: "candidate".into(),
            error: InferError::TimedOut(std::time::Duration::from_secs(30)),
        };
        let response = ApiError::from(failed).error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let labels = response
            .extensions()
            .get::<super::super::RouteLabels>()
            .cloned();
        assert_eq!(
            labels.map(|l| (l.task, l.arm)),
            Some(("spam".to_owned(), "candidate".to_owned()))
        );
        let refused = ApiError::from(ClassifyError::UnknownTask("x".into())).error_response();
        assert!(refused
            .extensions()
            .get::<super::super::RouteLabels>()
            .is_none());
    }
}
