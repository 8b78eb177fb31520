//! What a rollout is, as the API shows it and its store keeps it: its arms and their evidence, its phase
//! and decision log, and the request that starts one.

use serde::{Deserialize, Serialize};

use super::analysis::{ArmStats, Verdict};
use crate::clock::unix_seconds;

/// How the candidate meets traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The candidate answers its share of requests.
    Split,
    /// The candidate also runs on its share, but stable's answer is returned.
    Shadow,
}

/// Lifecycle of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Routing traffic.
    Active,
    /// The candidate became stable.
    Promoted,
    /// Traffic went back to stable.
    RolledBack,
    /// A newer candidate replaced this one.
    Superseded,
}

/// One of the two arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The stable generation.
    Stable,
    /// The candidate.
    Candidate,
}

impl Arm {
    /// The label value used in responses and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Stable => "stable",
            Arm::Candidate => "candidate",
        }
    }
}

/// Evidence of both arms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Arms {
    /// The stable arm.
    pub stable: ArmStats,
    /// The candidate arm.
    pub candidate: ArmStats,
}

impl Arms {
    /// Adds `other`'s evidence to both arms.
    pub fn merge(&mut self, other: &Arms) {
        self.stable.merge(&other.stable);
        self.candidate.merge(&other.candidate);
    }

    pub(super) fn get_mut(&mut self, arm: Arm) -> &mut ArmStats {
        match arm {
            Arm::Stable => &mut self.stable,
            Arm::Candidate => &mut self.candidate,
        }
    }
}

/// Figures of one arm at a decision.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmSummary {
    /// Requests served in the step.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Judged predictions.
    pub judged: u64,
    /// Online accuracy.
    pub accuracy: Option<f64>,
    /// P99 latency in ms.
    pub p99_ms: Option<f64>,
}

impl From<&ArmStats> for ArmSummary {
    fn from(a: &ArmStats) -> Self {
        Self {
            requests: a.requests,
            errors: a.errors,
            judged: a.judged,
            accuracy: a.accuracy(),
            p99_ms: a.p99_ms(),
        }
    }
}

/// Both arms' figures, for the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// Stable, this step.
    pub stable: ArmSummary,
    /// The candidate, this step.
    pub candidate: ArmSummary,
    /// Stable, over the whole rollout.
    pub stable_total: ArmSummary,
    /// The candidate, over the whole rollout.
    pub candidate_total: ArmSummary,
}

impl Summary {
    /// `rollout`'s figures now.
    pub fn of(rollout: &Rollout) -> Self {
        Self {
            stable: (&rollout.arms.stable).into(),
            candidate: (&rollout.arms.candidate).into(),
            stable_total: (&rollout.totals.stable).into(),
            candidate_total: (&rollout.totals.candidate).into(),
        }
    }
}

/// One entry of the decision log.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// Unix seconds.
    pub at: u64,
    /// `start`, `advance`, `promote`, `rollback`, `supersede` or `traffic`.
    pub action: String,
    /// `analysis`, `manual`, `trainer` or `restart`.
    pub by: String,
    /// Why, with the numbers.
    pub reason: String,
    /// Candidate share after the decision.
    pub traffic: f64,
    /// Stable's figures when decided.
    pub stable: ArmSummary,
    /// The candidate's figures when decided.
    pub candidate: ArmSummary,
}

/// A rollout, in memory and in `rollouts.json` (the HTTP layer shows it in a body of its own, with each
/// arm's figures computed when shown).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Rollout id (also the routing salt).
    pub id: String,
    /// The task.
    pub task: String,
    /// The stable generation when the rollout started.
    pub stable: String,
    /// The candidate generation.
    pub candidate: String,
    /// Split or shadow.
    pub mode: Mode,
    /// Candidate shares, in order.
    pub steps: Vec<f64>,
    /// Index of the current step.
    pub step: usize,
    /// The candidate's current share.
    pub traffic: f64,
    /// Lifecycle.
    pub phase: Phase,
    /// Whether the analysis acts on its own (advance, promote, rollback).
    pub automatic: bool,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds, once finished.
    pub ended_at: Option<u64>,
    /// Evidence of the current step.
    pub arms: Arms,
    /// Evidence over the whole rollout.
    pub totals: Arms,
    /// The latest analysis.
    pub analysis: Option<Verdict>,
    /// The decisions, oldest first: the first (`start`) and the latest [`MAX_DECISIONS`] − 1.
    pub decisions: Vec<Decision>,
}

/// Most decisions a rollout keeps. Only an operator's `PUT …/traffic` can repeat without end, and the whole
/// log is rewritten with every change and shown by every read.
pub const MAX_DECISIONS: usize = 100;

impl Rollout {
    pub(super) fn log(&mut self, action: &str, by: &str, reason: String) {
        if self.decisions.len() >= MAX_DECISIONS {
            // The start says what the rollout set out to do; the oldest decision after it goes.
            self.decisions.remove(1);
        }
        self.decisions.push(Decision {
            at: unix_seconds(),
            action: action.to_owned(),
            by: by.to_owned(),
            reason,
            traffic: self.traffic,
            stable: (&self.arms.stable).into(),
            candidate: (&self.arms.candidate).into(),
        });
    }

    pub(super) fn arm_of(&self, generation: &str) -> Option<Arm> {
        if generation == self.candidate {
            Some(Arm::Candidate)
        } else if generation == self.stable {
            Some(Arm::Stable)
        } else {
            None
        }
    }

    pub(super) fn finish(&mut self, phase: Phase, action: &str, by: &str, reason: String) {
        self.phase = phase;
        self.traffic = if phase == Phase::Promoted { 1.0 } else { 0.0 };
        self.ended_at = Some(unix_seconds());
        self.log(action, by, reason);
    }
}

/// How to start a rollout.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The task.
    pub task: String,
    /// Candidate generation id or alias.
    pub candidate: String,
    /// First candidate share; later steps are the configured ones above it.
    #[serde(default)]
    pub traffic: Option<f64>,
    /// All candidate shares (overrides `traffic` and the configured steps).
    #[serde(default)]
    pub steps: Option<Vec<f64>>,
    /// `split` or `shadow`; defaults to the configured mode.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Whether the analysis acts on its own; default true.
    #[serde(default)]
    pub automatic: Option<bool>,
}

/// Where one request goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The arm that answers.
    pub arm: Arm,
    /// The generation that answers.
    pub generation: String,
    /// A generation to run in shadow (its answer is recorded, not returned).
    pub shadow: Option<String>,
    /// The rollout, when one routed the request.
    pub rollout: Option<String>,
}
