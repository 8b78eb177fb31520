//! Classification through a task: the rollout picks the arm (or the caller pins a generation), the
//! generation is leased for the forward pass, and the answer feeds the rollout's evidence, the drift
//! monitor, the shadow arm and the memory of recent requests that feedback refers to.

use std::sync::Arc;
use std::time::Instant;

use super::Services;
use crate::adapters::registry::{Generation, State, Task};
use crate::feedback::recent::{RecentRequest, ShadowPrediction};
use crate::infer::{InferError, Outputs};
use crate::model::adapter::Adapter;
use crate::model::pooling::best;

/// What to classify, and with what.
#[derive(Debug, Clone)]
pub struct ClassifyRequest {
    /// The task whose labels answer.
    pub task: String,
    /// A generation id or alias to use instead of the task's rollout.
    pub pinned: Option<String>,
    /// Sticky routing key: one key always sees the same arm of a rollout.
    pub routing_key: Option<String>,
    /// The inputs, already checked against the request limits.
    pub texts: Vec<String>,
}

/// A classification's answer.
#[derive(Debug)]
pub struct Classified {
    /// The request's id; feedback may name it.
    pub request_id: String,
    /// The task, with its labels (output `i` is label `i`).
    pub task: Task,
    /// The generation that served (leased until this is dropped).
    pub generation: Arc<Generation>,
    /// `stable` or the rollout's arm, or `pinned`.
    pub arm: String,
    /// Probabilities (in `vectors`), logits, tokens and timings per input.
    pub out: Outputs,
}

/// Why a classification was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// No task of that name.
    #[error("no task {0:?}")]
    UnknownTask(String),
    /// The pinned id or alias names no generation.
    #[error("no adapter or alias {0:?}")]
    UnknownAdapter(String),
    /// The task has no generation to serve yet.
    #[error("task {0:?} has no adapter generation yet; load or train one")]
    NoGeneration(String),
    /// The pinned generation belongs to another task.
    #[error("adapter {id} belongs to task {owner:?}, not {task:?}")]
    WrongTask {
        /// The generation.
        id: String,
        /// Its task.
        owner: String,
        /// The task asked for.
        task: String,
    },
    /// The generation could not be restored and never serves.
    #[error("adapter {0} is not ready")]
    NotReady(String),
    /// The model refused or failed.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The model refused or failed on the arm chosen to serve the request: the labels of its latency.
    #[error("{error}")]
    Served {
        /// The task.
        task: String,
        /// The arm that was to serve it.
        arm: String,
        /// What went wrong.
        #[source]
        error: InferError,
    },
}

/// The ready weights of `generation`.
fn weights(generation: &Generation) -> Result<Arc<Adapter>, ClassifyError> {
    match (&generation.state, &generation.adapter) {
        (State::Ready, Some(w)) => Ok(w.clone()),
        _ => Err(ClassifyError::NotReady(generation.id.clone())),
    }
}

impl Services {
    /// Classifies `request.texts` with the generation the task's rollout picks (stable when none is
    /// active), or with the pinned one.
    pub async fn classify(&self, request: ClassifyRequest) -> Result<Classified, ClassifyError> {
        let ClassifyRequest {
            task,
            pinned,
            routing_key,
            texts,
        } = request;
        let task_def = self
            .registry
            .task(&task)
            .ok_or_else(|| ClassifyError::UnknownTask(task.clone()))?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let route = match &pinned {
            Some(_) => None,
            None => self
                .rollouts
                .route(&task, routing_key.as_deref(), &request_id),
        };
        let (reference, arm) = match (&pinned, &route) {
            (Some(a), _) => (a.clone(), "pinned"),
            (None, Some(r)) => (r.generation.clone(), r.arm.as_str()),
            (None, None) => (task.clone(), "stable"),
        };
        // The lease: this Arc keeps the generation's weights alive until the answer is dropped.
        let generation = self
            .registry
            .resolve(&reference)
            .ok_or_else(|| match &pinned {
                Some(a) => ClassifyError::UnknownAdapter(a.clone()),
                None => ClassifyError::NoGeneration(task.clone()),
            })?;
        if generation.task != task {
            return Err(ClassifyError::WrongTask {
                id: generation.id.clone(),
                owner: generation.task.clone(),
                task,
            });
        }
        let started = Instant::now();
        // Drift watches what the stable generation serves (in shadow mode, stable answers every request).
        let watched = pinned.is_none() && arm == "stable" && self.watch_drift;
        let weights = weights(&generation)?;
        let rollout = route.as_ref().and_then(|r| r.rollout.as_deref());
        let unanswered = rollout.map(|rollout| Unanswered {
            rollouts: &self.rollouts,
            task: &task,
            rollout,
            generation: &generation.id,
            started,
        });
        let result = self.infer.classify(&texts, weights).await;
        // Answered, or failed: the observation below records it.
        std::mem::forget(unanswered);
        if let Some(rollout) = rollout {
            if !result.as_ref().is_err_and(InferError::is_not_the_models) {
                self.rollouts.observe(
                    &task,
                    rollout,
                    &generation.id,
                    started.elapsed().as_secs_f64(),
                    result.is_ok(),
                );
            }
        }
        let out = result.map_err(|error| ClassifyError::Served {
            task: task.clone(),
            arm: arm.to_owned(),
            error,
        })?;
        if watched {
            for (probs, text) in out.vectors.iter().zip(&texts) {
                self.drift.observe(
                    &task,
                    &generation.id,
                    generation.reference.as_ref(),
                    probs,
                    text,
                );
            }
        }
        let predicted = out
            .vectors
            .iter()
            .map(|p| task_def.labels[best(p).0].clone())
            .collect();
        if let Some((shadow, rollout)) = route
            .as_ref()
            .and_then(|r| Some((r.shadow.clone()?, r.rollout.clone()?)))
        {
            self.run_shadow(&task_def, &rollout, &shadow, &request_id, texts.clone());
        }
        self.recent.insert(
            request_id.clone(),
            RecentRequest {
                task: task.clone(),
                judged: vec![None; texts.len()],
                texts,
                adapter: generation.id.clone(),
                arm: arm.to_owned(),
                rollout: route.as_ref().and_then(|r| r.rollout.clone()),
                predicted,
                shadow: None,
            },
        );
        Ok(Classified {
            request_id,
            task: task_def,
            arm: arm.to_owned(),
            generation,
            out,
        })
    }

    /// Runs the shadow candidate on the same inputs after the answer has gone, and records its latency and
    /// predictions (feedback on the request then judges both arms).
    fn run_shadow(
        &self,
        task: &Task,
        rollout: &str,
        shadow: &str,
        request_id: &str,
        texts: Vec<String>,
    ) {
        let Some(generation) = self.registry.resolve(shadow) else {
            return;
        };
        let Ok(w) = weights(&generation) else {
            return;
        };
        let (infer, rollouts, recent) = (
            self.infer.clone(),
            self.rollouts.clone(),
            self.recent.clone(),
        );
        let (labels, task, rollout, id) = (
            task.labels.clone(),
            task.name.clone(),
            rollout.to_owned(),
            request_id.to_owned(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let result = infer.classify_background(&texts, w).await;
            if result.as_ref().is_err_and(InferError::is_not_the_models) {
                return;
            }
            rollouts.observe(
                &task,
                &rollout,
                &generation.id,
                started.elapsed().as_secs_f64(),
                result.is_ok(),
            );
            if let Ok(out) = result {
                let predicted = out
                    .vectors
                    .iter()
                    .map(|p| labels[best(p).0].clone())
                    .collect();
                let verdicts = recent.attach_shadow(
                    &id,
                    ShadowPrediction {
                        adapter: generation.id.clone(),
                        predicted,
                    },
                );
                // Feedback that arrived before the shadow answered judges it now.
                for correct in verdicts {
                    rollouts.judge(&task, &generation.id, "shadow", Some(&rollout), correct);
                }
            }
        });
    }
}

/// A routed request whose caller went away before its answer: dropped with the request's future, it records
/// the wait so far as a failure of the arm that was serving it. A slow arm's slowest requests are the ones
/// given up on, and leaving them out would measure its latency on the requests fast enough to wait for.
struct Unanswered<'a> {
    rollouts: &'a crate::rollout::Rollouts,
    task: &'a str,
    rollout: &'a str,
    generation: &'a str,
    started: Instant,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.rollouts.observe(
            self.task,
            self.rollout,
            self.generation,
            self.started.elapsed().as_secs_f64(),
            false,
        );
    }
}
