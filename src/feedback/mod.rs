//! Feedback: the labels callers post for texts, stored durably before they are acknowledged.
//!
//! [`FeedbackStore`] is the seam between the engines: [`sqlite::SqliteStore`] is the embedded default,
//! [`postgres::PostgresStore`] the one several replicas share. [`recent::RecentRequests`] remembers what recent predictions served, so feedback may name a
//! `request_id` instead of repeating the text.

pub mod postgres;
pub mod recent;
pub mod sqlite;
#[cfg(test)]
mod tests;

use serde::Serialize;

/// Why a feedback operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// The storage engine failed; nothing was acknowledged.
    #[error("feedback storage: {0}")]
    Storage(String),
}

/// A row to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFeedback {
    /// The task.
    pub task: String,
    /// The text that was (or would be) classified.
    pub text: String,
    /// Its right label.
    pub label: String,
    /// The prediction request it corrects, if any.
    pub request_id: Option<String>,
    /// The generation that served that request, if known.
    pub adapter: Option<String>,
    /// The arm that served that request, if known.
    pub arm: Option<String>,
}

/// A stored row.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Feedback {
    /// Monotonic id.
    pub id: i64,
    /// The task.
    pub task: String,
    /// The text.
    pub text: String,
    /// The right label.
    pub label: String,
    /// The request it corrects, if any.
    pub request_id: Option<String>,
    /// The generation that served that request.
    pub adapter: Option<String>,
    /// The arm that served that request.
    pub arm: Option<String>,
    /// How many times this (task, text, label) was posted.
    pub count: i64,
    /// Unix seconds of the first posting.
    pub created_at: i64,
}

/// Where a posted row goes, given the rows already stored for its (task, text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// No stored row gives the text this label: a new row.
    Insert,
    /// This row gives the text this label and is the text's newest: its count goes up.
    Count(i64),
    /// This row gives the text this label, but a later row gives it another. The row moves to a new id
    /// (its count up), so the label posted last is the text's newest row again: a training job keeps the
    /// newest row's label, and counting in place would leave the earlier correction standing.
    Move(i64),
}

/// Points each answer of a batch at the row's id after the whole batch: a later item of the batch may have
/// moved a row an earlier one was answered with (`moved`: old id to new).
pub(crate) fn follow_moves(out: &mut [Appended], moved: &std::collections::HashMap<i64, i64>) {
    for appended in out {
        while let Some(&to) = moved.get(&appended.id) {
            appended.id = to;
        }
    }
}

/// Where a row labelled `label` goes, given the `(id, label)` rows stored for its text.
pub(crate) fn placement(stored: &[(i64, String)], label: &str) -> Placement {
    let newest = stored.iter().map(|(id, _)| *id).max();
    match stored.iter().find(|(_, l)| l == label) {
        None => Placement::Insert,
        Some(&(id, _)) if Some(id) == newest => Placement::Count(id),
        Some(&(id, _)) => Placement::Move(id),
    }
}

/// The outcome of storing one row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Appended {
    /// The row's id: an existing row's for a duplicate, or a new one where a duplicate re-asserts a label
    /// after a later row gave the text another (the row moves, so that it is the text's newest again).
    pub id: i64,
    /// Whether the same (task, text, label) was already stored; its count went up instead.
    pub duplicate: bool,
}

/// Durable feedback storage.
pub trait FeedbackStore: Send + Sync {
    /// Stores `rows` in one transaction and returns only once it is durable.
    fn append(&self, rows: &[NewFeedback]) -> Result<Vec<Appended>, FeedbackError>;
    /// Rows of `task` with id > `after_id`, in id order, at most `limit`.
    fn list(&self, task: &str, after_id: i64, limit: usize)
        -> Result<Vec<Feedback>, FeedbackError>;
    /// The newest `limit` rows of `task`, in id order, each text cut to its first `max_chars` characters:
    /// what a training job reads, all at once, of which the tokenizer keeps only the start.
    fn latest(
        &self,
        task: &str,
        limit: usize,
        max_chars: usize,
    ) -> Result<Vec<Feedback>, FeedbackError>;
    /// Distinct rows stored for `task`.
    fn count(&self, task: &str) -> Result<u64, FeedbackError>;
}
