//! The serving service between the HTTP dialects and the parts: what exists once the model has loaded
//! ([`Services`]), and the request chains every dialect shares — which generation a `model` name selects,
//! and classification through a task's rollout with its evidence, drift and recent-request memory. The
//! routes of Flywheel's own API, the OpenAI-style and the TEI-style ones call these; none repeats them.

pub mod classify;
mod select;

use std::sync::Arc;

pub use classify::{Classified, ClassifyError, ClassifyRequest};
pub use select::{ModelCard, Selected};

use crate::adapters::Registry;
use crate::drift::DriftMonitor;
use crate::feedback::recent::RecentRequests;
use crate::feedback::FeedbackStore;
use crate::infer::Infer;
use crate::rollout::Rollouts;
use crate::trainer::jobs::Jobs;

/// What exists once the model has loaded.
pub struct Services {
    /// The model thread's handle.
    pub infer: Infer,
    /// Tasks, adapter generations and aliases.
    pub registry: Arc<Registry>,
    /// Durable feedback.
    pub feedback: Arc<dyn FeedbackStore>,
    /// What recent predictions served, for feedback that names a request id.
    pub recent: Arc<RecentRequests>,
    /// Training jobs.
    pub jobs: Arc<Jobs>,
    /// A/B rollouts and online accuracy.
    pub rollouts: Arc<Rollouts>,
    /// Drift of each task's traffic.
    pub drift: Arc<DriftMonitor>,
    /// Whether drift monitoring is on (`[drift] enabled`).
    pub watch_drift: bool,
    /// Unix seconds when the model finished loading: the base model card's `created`.
    pub loaded_at: u64,
    /// With PostgreSQL, the election of the process whose autopilot acts.
    pub election: Option<Arc<crate::postgres::election::Election>>,
}
