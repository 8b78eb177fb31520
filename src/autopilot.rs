//! The autopilot: one background thread that closes the loop by policy. Every tick it runs the rollout
//! analysis (advance, promote, roll back) and starts training jobs for tasks whose feedback grew enough since
//! their last job, or whose inputs drifted. Where processes share PostgreSQL, each runs the analysis (for its
//! figures) but only the elected one acts and starts jobs, so no decision and no job is made twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::adapters::Registry;
use crate::config::TrainerConfig;
use crate::drift::DriftMonitor;
use crate::feedback::FeedbackStore;
use crate::metrics::Metrics;
use crate::postgres::election::Election;
use crate::rollout::Rollouts;
use crate::trainer::jobs::Jobs;
use crate::trainer::train::TrainConfig;

/// How often drift reports are recomputed under steady traffic (each costs a few hundred ms of one core).
const DRIFT_EVERY: Duration = Duration::from_secs(10);

/// What the autopilot drives.
pub struct Autopilot {
    /// Tasks.
    pub registry: Arc<Registry>,
    /// Feedback counts.
    pub feedback: Arc<dyn FeedbackStore>,
    /// The job queue.
    pub jobs: Arc<Jobs>,
    /// The rollouts.
    pub rollouts: Arc<Rollouts>,
    /// Drift reports (refreshed every tick, at most every 10 s per task).
    pub drift: Arc<DriftMonitor>,
    /// The training policy.
    pub policy: TrainerConfig,
    /// Hyperparameters of the jobs it starts.
    pub job: TrainConfig,
    /// The tick.
    pub every: Duration,
    /// The election among processes sharing PostgreSQL; `None` alone, when this process always leads.
    pub election: Option<Arc<Election>>,
    /// Where leadership is shown.
    pub metrics: Metrics,
}

/// Per task: feedback count when its last automatic job was submitted, and when.
struct Last {
    count: u64,
    at: Instant,
}

impl Autopilot {
    /// Runs on a new thread until `stop` is set.
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("flywheel-autopilot".to_owned())
            .spawn(move || {
                let mut last: HashMap<String, Last> = HashMap::new();
                let mut leading = self.election.is_none();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(self.every);
                    let lead = self.election.as_ref().is_none_or(|e| e.lead());
                    self.metrics.autopilot_leader.set(i64::from(lead));
                    if lead != leading {
                        leading = lead;
                        tracing::info!(leading, "autopilot leadership changed");
                        // A new leader counts feedback growth from what it sees now.
                        last.clear();
                    }
                    for (task, action) in self.rollouts.evaluate(lead) {
                        tracing::info!(task, action, "rollout analysis acted");
                    }
                    self.drift.refresh(DRIFT_EVERY);
                    if lead {
                        self.maybe_train(&mut last);
                    }
                }
            })
    }

    /// Unloads the task's oldest generation that no alias and no active rollout uses, so an automatic job
    /// can publish at the adapter limit: the loop runs on for as long as the server does. Its files stay
    /// (`POST /v1/adapters` loads it again). Returns whether one was retired.
    fn retire_oldest(&self, task: &str) -> bool {
        let mut free: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|(g, aliases)| {
                g.task == task
                    && aliases.is_empty()
                    && g.state == crate::adapters::registry::State::Ready
            })
            .map(|(g, _)| g)
            .collect();
        free.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        free.iter().any(|g| {
            let retired = self
                .rollouts
                .unless_in_use(&g.id, || self.registry.delete(&g.id));
            let done = matches!(retired, Ok(Ok(())));
            if done {
                tracing::info!(task, adapter = %g.id, "retired the task's oldest free generation: the adapter limit is reached");
            }
            done
        })
    }

    fn maybe_train(&self, last: &mut HashMap<String, Last>) {
        let by_count = self.policy.auto_every_feedback > 0;
        // With a shared queue any process queues jobs, for the workers to run.
        if !(self.policy.enabled || self.jobs.shared()) || (!by_count && !self.policy.auto_on_drift)
        {
            return;
        }
        let interval = Duration::from_secs(self.policy.auto_min_interval_secs);
        for task in self.registry.tasks() {
            let Ok(count) = self.feedback.count(&task.name) else {
                continue;
            };
            // The first look at a task sets its baseline: only feedback that arrives while this process
            // runs triggers training.
            let seen = last.entry(task.name.clone()).or_insert(Last {
                count,
                at: Instant::now()
                    .checked_sub(interval)
                    .unwrap_or_else(Instant::now),
            });
            if seen.at.elapsed() < interval
                || self.jobs.busy(&task.name)
                || self
                    .rollouts
                    .get(&task.name)
                    .is_some_and(|r| r.phase == crate::rollout::Phase::Active)
            {
                continue;
            }
            let grown = count.saturating_sub(seen.count);
            let reason = if by_count && grown >= self.policy.auto_every_feedback {
                format!("{grown} new feedback items")
            } else if self.policy.auto_on_drift
                && grown > 0
                && self
                    .registry
                    .resolve(&task.name)
                    .is_some_and(|stable| self.drift.detected(&task.name, &stable.id))
            {
                "drift detected".to_owned()
            } else {
                continue;
            };
            let publishes = self.job.method == crate::trainer::train::Method::Lora;
            if publishes && self.registry.is_full() && !self.retire_oldest(&task.name) {
                tracing::warn!(task = %task.name, "automatic training skipped: the adapter limit is reached and \
                    every generation of the task is aliased or in a rollout");
                continue;
            }
            match self.jobs.submit(&task.name, self.job.clone()) {
                Ok(job) => {
                    tracing::info!(task = %task.name, job = %job.id, reason, "automatic training started");
                    *seen = Last {
                        count,
                        at: Instant::now(),
                    };
                }
                Err(e) => {
                    tracing::warn!(task = %task.name, error = %e, "automatic training refused")
                }
            }
        }
    }
}
