//! `POST /v1/feedback` (durable before 202) and `GET /v1/feedback` (admin listing).

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::feedback::{Feedback, NewFeedback};

/// One feedback item: `{task, text, label}` or `{request_id, label, index?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The task (required with `text`).
    #[serde(default)]
    pub task: Option<String>,
    /// The text (or name a `request_id`).
    #[serde(default)]
    pub text: Option<String>,
    /// A recent `/v1/predict` request whose input this labels.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Which input of that request (default 0).
    #[serde(default)]
    pub index: Option<usize>,
    /// The right label.
    pub label: String,
}

/// Written by hand: the item is one struct here, so that a wrong mix of fields gets a precise error, but
/// callers see its two shapes.
impl utoipa::PartialSchema for Item {
    fn schema() -> RefOr<Schema> {
        let string = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .description(Some(description))
        };
        let label = || string("The right label: one of the task's labels");
        let by_text = ObjectBuilder::new()
            .property("task", string("The task"))
            .property("text", super::openapi::text("The text"))
            .property("label", label())
            .required("task")
            .required("text")
            .required("label")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .description(Some("A text and its right label"));
        let by_request = ObjectBuilder::new()
            .property(
                "request_id",
                string("A recent `/v1/predict` request whose input this labels"),
            )
            .property(
                "index",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .description(Some("Which input of that request (default 0)")),
            )
            .property("task", string("The request's task (checked when given)"))
            .property("label", label())
            .required("request_id")
            .required("label")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .description(Some("A recent request's input and its right label"));
        OneOfBuilder::new().item(by_text).item(by_request).into()
    }
}

impl ToSchema for Item {}

/// Body of `POST /v1/feedback`: one item, or `{"items": [...]}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum FeedbackRequest {
    /// Several items, stored in one transaction.
    Batch {
        /// The items.
        items: Vec<Item>,
    },
    /// One item.
    One(Item),
}

/// [`FeedbackRequest`] as the handler reads it: the shape is told by the `items` key, so a bad item is
/// named with serde's own words (`items[3]: missing field \`label\``) rather than "did not match any
/// variant", which an untagged enum says of any error in either shape.
pub struct FeedbackBody(FeedbackRequest);

impl<'de> Deserialize<'de> for FeedbackBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(d)?;
        let Some(items) = value.as_object_mut().and_then(|o| o.remove("items")) else {
            return serde_json::from_value(value)
                .map(|item| FeedbackBody(FeedbackRequest::One(item)))
                .map_err(D::Error::custom);
        };
        if let Some(other) = value.as_object().and_then(|o| o.keys().next()) {
            return Err(D::Error::custom(format!(
                "unknown field `{other}` beside `items`"
            )));
        }
        let serde_json::Value::Array(items) = items else {
            return Err(D::Error::custom("`items` must be a list of feedback items"));
        };
        let items = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item)
                    .map_err(|e| D::Error::custom(format!("items[{i}]: {e}")))
            })
            .collect::<Result<Vec<Item>, _>>()?;
        Ok(FeedbackBody(FeedbackRequest::Batch { items }))
    }
}

/// What one feedback item on a remembered request judges: the request id, the input index and the label
/// given. The verdicts are settled when the judgement is claimed, after the row is stored.
type Claim = Option<(String, usize, String)>;

fn resolve(state: &AppState, i: usize, item: Item) -> Result<(NewFeedback, Claim), ApiError> {
    let services = state.services()?;
    let at = |m: String| ApiError::invalid(format!("items[{i}]: {m}"));
    let row = match (&item.request_id, &item.text) {
        (Some(id), None) => {
            let recent = services.recent.get(id).ok_or_else(|| {
                ApiError::not_found(format!(
                    "items[{i}]: request_id {id:?} is unknown or no longer remembered"
                ))
            })?;
            if item.task.as_ref().is_some_and(|t| *t != recent.task) {
                return Err(at(format!("request {id:?} was for task {:?}", recent.task)));
            }
            let index = item.index.unwrap_or(0);
            let text = recent.texts.get(index).ok_or_else(|| {
                at(format!(
                    "request {id:?} has {} inputs; index {index} is out of range",
                    recent.texts.len()
                ))
            })?;
            let judged = (id.clone(), index, item.label.clone());
            (
                NewFeedback {
                    task: recent.task.clone(),
                    text: text.clone(),
                    label: item.label,
                    request_id: Some(id.clone()),
                    adapter: Some(recent.adapter.clone()),
                    arm: Some(recent.arm.clone()),
                },
                Some(judged),
            )
        }
        (None, Some(text)) => {
            let task = item
                .task
                .ok_or_else(|| at("a text needs its task".to_owned()))?;
            if text.trim().is_empty() || text.len() > state.config.limits.max_text_bytes {
                return Err(at(format!(
                    "text must be 1 to {} bytes",
                    state.config.limits.max_text_bytes
                )));
            }
            (
                NewFeedback {
                    task,
                    text: text.clone(),
                    label: item.label,
                    request_id: None,
                    adapter: None,
                    arm: None,
                },
                None,
            )
        }
        _ => return Err(at("give either text (with task) or request_id".to_owned())),
    };
    // PostgreSQL's text cannot hold NUL, so neither store takes it: a replica would otherwise fail the post.
    if row.0.text.contains('\0') {
        return Err(at("the text contains a NUL character (U+0000)".to_owned()));
    }
    let task = services
        .registry
        .task(&row.0.task)
        .ok_or_else(|| ApiError::not_found(format!("items[{i}]: unknown task {:?}", row.0.task)))?;
    if !task.labels.contains(&row.0.label) {
        return Err(at(format!(
            "label {:?} is not one of task {:?}'s labels {:?}",
            row.0.label, task.name, task.labels
        )));
    }
    Ok(row)
}

/// Stores the feedback durably, then answers 202 `{"accepted", "ids", "duplicates"}`.
#[utoipa::path(post, path = "/v1/feedback", tag = "feedback", request_body = FeedbackRequest,
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Stored durably", body = FeedbackAccepted),
        (status = 404, description = "An item names an unknown task, or a request that is unknown or forgotten (`not_found`)", body = ErrorBody)))]
pub async fn post(
    _: super::auth::Caller,
    state: web::Data<AppState>,
    body: web::Json<FeedbackBody>,
) -> Result<HttpResponse, ApiError> {
    let items = match body.into_inner() {
        FeedbackBody(FeedbackRequest::Batch { items }) => items,
        FeedbackBody(FeedbackRequest::One(item)) => vec![item],
    };
    let max = state.config.limits.max_feedback_items;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::invalid(format!(
            "send 1 to {max} feedback items per request"
        )));
    }
    let (rows, claims): (Vec<NewFeedback>, Vec<Claim>) = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| resolve(&state, i, item))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let services = state.services()?;
    let store = services.feedback.clone();
    let tasks: Vec<String> = rows.iter().map(|r| r.task.clone()).collect();
    let appended = web::block(move || store.append(&rows)).await??;
    for (task, claim) in tasks.iter().zip(claims) {
        state
            .metrics
            .feedback
            .with_label_values(&[task.as_str()])
            .inc();
        // Each served prediction is judged once, however often its feedback is posted.
        if let Some((id, index, label)) = claim {
            if let Some(judgement) = services.recent.claim_judgement(&id, index, &label) {
                let (rollouts, rollout) = (&services.rollouts, judgement.rollout);
                if let Some((generation, arm, correct)) = judgement.served {
                    rollouts.judge(task, &generation, &arm, rollout.as_deref(), correct);
                }
                if let Some((shadow, correct)) = judgement.shadow {
                    rollouts.judge(task, &shadow, "shadow", rollout.as_deref(), correct);
                }
            }
        }
    }
    Ok(HttpResponse::Accepted().json(FeedbackAccepted {
        accepted: appended.len(),
        ids: appended.iter().map(|a| a.id).collect(),
        duplicates: appended.iter().filter(|a| a.duplicate).count(),
    }))
}

/// Answer of `POST /v1/feedback`, sent once the rows are durable.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackAccepted {
    /// Items stored (duplicates included).
    pub accepted: usize,
    /// Each item's row id, in order: a duplicate's is the existing row's, unless the duplicate re-asserts a
    /// label after a later row gave the text another, which moves the row to a new id (this one).
    pub ids: Vec<i64>,
    /// Items already stored with the same task, text and label; their count went up instead.
    pub duplicates: usize,
}

/// Query of `GET /v1/feedback`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The task.
    pub task: String,
    /// Rows with a larger id.
    #[serde(default)]
    pub after_id: i64,
    /// At most this many (≤ 10,000; default 1,000).
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: usize,
}

fn default_limit() -> usize {
    1000
}

/// Lists stored feedback of a task in id order (admin).
#[utoipa::path(get, path = "/v1/feedback", tag = "feedback", params(ListQuery),
    security((), ("admin_key" = [])),
    responses(
        (status = 200, description = "Stored rows in id order", body = Vec<Feedback>),
        (status = 404, description = "No such task (`not_found`)", body = ErrorBody)))]
pub async fn list(
    _: super::auth::Admin,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let ListQuery {
        task,
        after_id,
        limit,
    } = query.into_inner();
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 10000"));
    }
    let services = state.services()?;
    if services.registry.task(&task).is_none() {
        return Err(ApiError::not_found(format!("no task {task:?}")));
    }
    // Read a batch at a time, so that a page of long texts is not held whole. The first batch is read
    // before answering: a store that is down is a 503, not a cut answer.
    let batch = limit.min(LIST_BATCH);
    let store = services.feedback.clone();
    let first = {
        let (store, task) = (store.clone(), task.clone());
        web::block(move || store.list(&task, after_id, batch)).await??
    };
    if first.len() < batch || first.len() == limit {
        return Ok(HttpResponse::Ok().json(first));
    }
    let mut left = limit - first.len();
    let more = move |previous: &[Feedback]| {
        let after = previous.last().map_or(after_id, |row| row.id);
        // A short batch was the last there is.
        if left == 0 || previous.len() < batch {
            return Ok(Vec::new());
        }
        let rows = store
            .list(&task, after, left.min(batch))
            .map_err(|e| e.to_string())?;
        left -= rows.len();
        Ok(rows)
    };
    super::stream::json_array(first, more)
        .map_err(|e| ApiError::unhealthy(format!("cannot start the listing's thread: {e}")))
}

/// Feedback rows `GET /v1/feedback` reads per query: texts are up to `[limits] max_text_bytes` long, so a
/// page of 10,000 is read and written out in pieces.
const LIST_BATCH: usize = 100;
