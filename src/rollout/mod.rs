//! A/B rollouts: per task at most one active rollout puts a candidate generation in front of a share of
//! traffic (`split`) or beside it (`shadow`), gathers per-arm evidence, and advances, promotes or rolls
//! back by the guardrail analysis or by hand. Rollouts and their decision logs persist in
//! `<data-dir>/rollouts.json` at every change, with the evidence counts as they were then.
//!
//! What a rollout is lives in `record.rs`; past 500 lines as one concern here: every operation of the state
//! machine works under the same two locks and writes through one persistence path.

pub mod analysis;
mod record;
pub mod router;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::adapters::registry::{Registry, State};
use crate::clock::unix_seconds;
use crate::config::RolloutConfig;
use crate::durable::SnapshotFile;
use crate::metrics::Metrics;
use analysis::{analyse, Verdict};
pub use record::{
    Arm, ArmSummary, Arms, Decision, Mode, Phase, Rollout, Route, StartRequest, Summary,
};

/// Finished rollouts kept per task for `GET /v1/rollouts/{task}`.
const HISTORY: usize = 10;
/// Judged predictions the online-accuracy gauge averages over, per task and arm.
const ACCURACY_WINDOW: usize = 1000;

/// Why a rollout operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// No such task, generation or rollout.
    #[error("{0}")]
    NotFound(String),
    /// The state forbids it (a rollout is active, none is, …).
    #[error("{0}")]
    Conflict(String),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    rollouts: BTreeMap<String, Vec<Rollout>>,
}

struct Inner {
    /// Per task, oldest first; the last may be active.
    by_task: BTreeMap<String, Vec<Rollout>>,
    /// Recent judgements per (task, arm label) for the online-accuracy gauge.
    accuracy: HashMap<(String, String), VecDeque<bool>>,
}

/// The rollout manager; share it behind an `Arc`.
pub struct Rollouts {
    /// The state every request reads (routing) and writes (evidence); held briefly, never across I/O.
    inner: Mutex<Inner>,
    /// Serialises the changes that decide (start, traffic, promote, rollback, the analysis's actions), so
    /// a promotion's two writes — the alias, then the rollout — are never interleaved with another change.
    decisions: Mutex<()>,
    file: SnapshotFile,
    registry: Arc<Registry>,
    metrics: Metrics,
    policy: RolloutConfig,
}

fn check_share(share: f64) -> Result<f64, RolloutError> {
    if share > 0.0 && share <= 1.0 {
        Ok(share)
    } else {
        Err(RolloutError::Invalid(format!(
            "traffic share {share} must be in (0, 1]"
        )))
    }
}

impl Rollouts {
    /// Restores `<data_dir>/rollouts.json`; an active rollout whose generations are gone is rolled back.
    pub fn open(
        data_dir: &Path,
        registry: Arc<Registry>,
        metrics: Metrics,
        policy: RolloutConfig,
    ) -> Self {
        let path = data_dir.join("rollouts.json");
        let persisted: Persisted = std::fs::read(&path)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "rollouts.json is unreadable; starting without rollouts");
                    None
                }
            })
            .unwrap_or_default();
        let mut by_task = persisted.rollouts;
        let mut reconciled = false;
        for list in by_task.values_mut() {
            if let Some(r) = list.last_mut().filter(|r| r.phase == Phase::Active) {
                // A promotion moves the alias first and records the rollout second: a crash between the
                // two leaves the alias on the candidate, and the promotion is completed here.
                if registry
                    .resolve(&r.task)
                    .is_some_and(|g| g.id == r.candidate)
                {
                    metrics
                        .rollout_events
                        .with_label_values(&[r.task.as_str(), "promote"])
                        .inc();
                    r.finish(
                        Phase::Promoted,
                        "promote",
                        "restart",
                        "the stable alias had moved to the candidate when the server stopped; the \
                         promotion is completed"
                            .to_owned(),
                    );
                    reconciled = true;
                    continue;
                }
                let ready = |id: &str| {
                    registry
                        .resolve(id)
                        .is_some_and(|g| g.state == State::Ready && g.adapter.is_some())
                };
                if !ready(&r.candidate) || !ready(&r.stable) {
                    metrics
                        .rollout_events
                        .with_label_values(&[r.task.as_str(), "rollback"])
                        .inc();
                    r.finish(
                        Phase::RolledBack,
                        "rollback",
                        "restart",
                        "a generation of the rollout is no longer loaded".to_owned(),
                    );
                    reconciled = true;
                }
            }
        }
        let rollouts = Self {
            inner: Mutex::new(Inner {
                by_task,
                accuracy: HashMap::new(),
            }),
            decisions: Mutex::new(()),
            file: SnapshotFile::new(path),
            registry,
            metrics,
            policy,
        };
        {
            let inner = rollouts.lock();
            for list in inner.by_task.values() {
                if let Some(r) = list.last() {
                    rollouts.export_traffic(r);
                }
            }
            if reconciled {
                rollouts.persist(inner);
            }
        }
        rollouts
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("rollouts lock poisoned; this is a bug")
    }

    /// Held by every change that decides (see the field).
    fn deciding(&self) -> MutexGuard<'_, ()> {
        self.decisions
            .lock()
            .expect("rollout decisions lock poisoned; this is a bug")
    }

    /// Snapshots the state under `inner`, releases it, then writes the snapshot: requests routed meanwhile
    /// never wait for the disk. A failed write is logged; the next change writes the whole state again.
    fn persist(&self, inner: MutexGuard<'_, Inner>) {
        let version = self.file.next_version();
        let bytes = serde_json::to_vec_pretty(&Persisted {
            rollouts: inner.by_task.clone(),
        });
        drop(inner);
        match bytes {
            Ok(bytes) => {
                if let Err(e) = self.file.write(version, &bytes) {
                    tracing::warn!(error = %e, "could not persist rollouts");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialise rollouts"),
        }
    }

    fn export_traffic(&self, r: &Rollout) {
        let share = if r.phase == Phase::Active {
            r.traffic
        } else {
            0.0
        };
        let t = &self.metrics.rollout_traffic;
        t.with_label_values(&[r.task.as_str(), "candidate"])
            .set(share);
        t.with_label_values(&[r.task.as_str(), "stable"])
            .set(1.0 - share);
    }

    fn event(&self, task: &str, decision: &str) {
        self.metrics
            .rollout_events
            .with_label_values(&[task, decision])
            .inc();
    }

    fn ready_generation(&self, task: &str, reference: &str) -> Result<String, RolloutError> {
        let g = self
            .registry
            .resolve(reference)
            .ok_or_else(|| RolloutError::NotFound(format!("no adapter or alias {reference:?}")))?;
        if g.task != task {
            return Err(RolloutError::Invalid(format!(
                "adapter {} belongs to task {:?}, not {task:?}",
                g.id, g.task
            )));
        }
        if g.state != State::Ready || g.adapter.is_none() {
            return Err(RolloutError::Conflict(format!(
                "adapter {} is not ready",
                g.id
            )));
        }
        Ok(g.id.clone())
    }

    /// Starts a rollout. With `supersede`, an active one is ended first (the trainer's canaries);
    /// otherwise an active one is a conflict.
    pub fn start(
        &self,
        request: StartRequest,
        by: &str,
        supersede: bool,
    ) -> Result<Rollout, RolloutError> {
        let task = request.task.clone();
        if self.registry.task(&task).is_none() {
            return Err(RolloutError::NotFound(format!("no task {task:?}")));
        }
        let stable = self
            .registry
            .resolve(&task)
            .filter(|g| g.task == task)
            .ok_or_else(|| {
                RolloutError::Conflict(format!(
                    "task {task:?} has no stable generation to compare against"
                ))
            })?;
        let stable = self.ready_generation(&task, &stable.id)?;
        let candidate = self.ready_generation(&task, &request.candidate)?;
        if candidate == stable {
            return Err(RolloutError::Conflict(format!(
                "{candidate} is already the stable generation of {task:?}"
            )));
        }
        let steps = match (&request.steps, request.traffic) {
            (Some(s), _) => s.clone(),
            (None, Some(first)) => std::iter::once(first)
                .chain(self.policy.steps.iter().copied().filter(|s| *s > first))
                .collect(),
            (None, None) => self.policy.steps.clone(),
        };
        if steps.is_empty() || steps.len() > 10 {
            return Err(RolloutError::Invalid("give 1 to 10 steps".to_owned()));
        }
        for s in &steps {
            check_share(*s)?;
        }
        let mode = request.mode.unwrap_or(if self.policy.mode == "shadow" {
            Mode::Shadow
        } else {
            Mode::Split
        });
        let mut rollout = Rollout {
            id: format!("r-{}", uuid::Uuid::new_v4().simple()),
            task: task.clone(),
            stable,
            candidate,
            mode,
            traffic: steps[0],
            steps,
            step: 0,
            phase: Phase::Active,
            automatic: request.automatic.unwrap_or(true),
            started_at: unix_seconds(),
            ended_at: None,
            arms: Arms::default(),
            totals: Arms::default(),
            analysis: None,
            decisions: Vec::new(),
        };
        let _deciding = self.deciding();
        let mut inner = self.lock();
        let list = inner.by_task.entry(task.clone()).or_default();
        if let Some(active) = list.last_mut().filter(|r| r.phase == Phase::Active) {
            if !supersede {
                return Err(RolloutError::Conflict(format!(
                    "task {task:?} already has an active rollout ({}); promote or roll it back first",
                    active.id
                )));
            }
            active.finish(
                Phase::Superseded,
                "supersede",
                by,
                format!("replaced by a rollout of {}", rollout.candidate),
            );
            self.event(&task, "supersede");
        }
        rollout.log(
            "start",
            by,
            format!(
                "{} of traffic to {} ({:?} mode)",
                rollout.traffic, rollout.candidate, rollout.mode
            ),
        );
        list.push(rollout.clone());
        if list.len() > HISTORY {
            list.remove(0);
        }
        self.export_traffic(&rollout);
        self.event(&task, "start");
        self.persist(inner);
        tracing::info!(task, rollout = %rollout.id, candidate = %rollout.candidate, "rollout started");
        Ok(rollout)
    }

    /// The task's active rollout, or else its latest.
    pub fn get(&self, task: &str) -> Option<Rollout> {
        self.lock()
            .by_task
            .get(task)
            .and_then(|l| l.last())
            .cloned()
    }

    /// Every task's latest rollout.
    pub fn list(&self) -> Vec<Rollout> {
        self.lock()
            .by_task
            .values()
            .filter_map(|l| l.last())
            .cloned()
            .collect()
    }

    /// Whether an active rollout uses generation `id`.
    pub fn uses(&self, id: &str) -> bool {
        self.lock().by_task.values().any(|l| {
            l.last()
                .is_some_and(|r| r.phase == Phase::Active && (r.candidate == id || r.stable == id))
        })
    }

    /// Applies `f` to the task's active rollout and persists the result; the caller holds [`Self::deciding`].
    fn with_active<T>(
        &self,
        task: &str,
        f: impl FnOnce(&mut Rollout) -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let mut inner = self.lock();
        let r = inner
            .by_task
            .get_mut(task)
            .and_then(|l| l.last_mut())
            .filter(|r| r.phase == Phase::Active)
            .ok_or_else(|| {
                RolloutError::NotFound(format!("task {task:?} has no active rollout"))
            })?;
        let out = f(r)?;
        self.export_traffic(r);
        self.persist(inner);
        Ok(out)
    }

    /// Sets the candidate's share of the active rollout (keys only move from stable to candidate when it
    /// grows).
    pub fn set_traffic(&self, task: &str, share: f64, by: &str) -> Result<Rollout, RolloutError> {
        let share = check_share(share)?;
        let _deciding = self.deciding();
        self.with_active(task, |r| {
            r.traffic = share;
            r.log("traffic", by, format!("candidate share set to {share}"));
            Ok(r.clone())
        })
    }

    /// Makes the candidate the stable generation (the task's alias moves atomically).
    pub fn promote(&self, task: &str, by: &str, reason: String) -> Result<Rollout, RolloutError> {
        self.promote_rollout(task, None, by, reason)
    }

    /// Promotes the task's active rollout, only if it is still `expected` when one is given: the analysis
    /// decides under the decisions lock, then promotes after releasing it, and a new rollout may have
    /// superseded the analysed one in between.
    fn promote_rollout(
        &self,
        task: &str,
        expected: Option<&str>,
        by: &str,
        reason: String,
    ) -> Result<Rollout, RolloutError> {
        let _deciding = self.deciding();
        let (id, candidate) =
            self.with_active_unchanged(task, |r| (r.id.clone(), r.candidate.clone()))?;
        if expected.is_some_and(|e| e != id) {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} replaced the analysed one before its promotion"
            )));
        }
        // The alias first, durably and without the rollouts lock (requests keep being routed); then the
        // rollout. A crash between the two writes leaves the alias on the candidate, and the next start
        // completes the promotion (see `open`), so the two always agree.
        self.registry
            .set_alias(task, &candidate)
            .map_err(|e| RolloutError::Conflict(format!("cannot move the alias: {e}")))?;
        if let Some(pause) = crate::faults::get().pause_after_alias {
            std::thread::sleep(pause);
        }
        let out = self.with_active(task, |r| {
            r.finish(Phase::Promoted, "promote", by, reason);
            Ok(r.clone())
        })?;
        self.event(task, "promote");
        tracing::info!(task, candidate = %out.candidate, by, "rollout promoted");
        Ok(out)
    }

    /// Reads the task's active rollout without changing or persisting it.
    fn with_active_unchanged<T>(
        &self,
        task: &str,
        f: impl FnOnce(&Rollout) -> T,
    ) -> Result<T, RolloutError> {
        self.lock()
            .by_task
            .get(task)
            .and_then(|l| l.last())
            .filter(|r| r.phase == Phase::Active)
            .map(f)
            .ok_or_else(|| RolloutError::NotFound(format!("task {task:?} has no active rollout")))
    }

    /// Sends all traffic back to stable.
    pub fn rollback(&self, task: &str, by: &str, reason: String) -> Result<Rollout, RolloutError> {
        let _deciding = self.deciding();
        let out = self.with_active(task, |r| {
            r.finish(Phase::RolledBack, "rollback", by, reason);
            Ok(r.clone())
        })?;
        self.event(task, "rollback");
        tracing::warn!(task, candidate = %out.candidate, by, "rollout rolled back");
        Ok(out)
    }

    /// Where a request for `task` goes: `None` when no rollout is active (the stable alias serves).
    /// With a `routing_key` the arm is sticky for the rollout's life; without, `request_id` decides.
    pub fn route(&self, task: &str, routing_key: Option<&str>, request_id: &str) -> Option<Route> {
        let inner = self.lock();
        let r = inner
            .by_task
            .get(task)?
            .last()
            .filter(|r| r.phase == Phase::Active)?;
        let chosen = router::to_candidate(&r.id, routing_key.unwrap_or(request_id), r.traffic);
        Some(match (r.mode, chosen) {
            (Mode::Split, true) => Route {
                arm: Arm::Candidate,
                generation: r.candidate.clone(),
                shadow: None,
                rollout: Some(r.id.clone()),
            },
            (Mode::Shadow, true) => Route {
                arm: Arm::Stable,
                generation: r.stable.clone(),
                shadow: Some(r.candidate.clone()),
                rollout: Some(r.id.clone()),
            },
            (_, false) => Route {
                arm: Arm::Stable,
                generation: r.stable.clone(),
                shadow: None,
                rollout: Some(r.id.clone()),
            },
        })
    }

    /// Records a request `generation` served for `task` within rollout `rollout`.
    pub fn observe(&self, task: &str, rollout: &str, generation: &str, seconds: f64, ok: bool) {
        let mut inner = self.lock();
        if let Some(r) = inner
            .by_task
            .get_mut(task)
            .and_then(|l| l.last_mut())
            .filter(|r| r.phase == Phase::Active && r.id == rollout)
        {
            if let Some(arm) = r.arm_of(generation) {
                r.arms.get_mut(arm).observe(seconds, ok);
                r.totals.get_mut(arm).observe(seconds, ok);
            }
        }
    }

    /// Records feedback on a prediction `generation` made (served as `arm_label`, routed by `rollout`):
    /// whether it agreed with the label given. Feeds the online-accuracy gauge and, when the prediction was
    /// routed by the task's active rollout, that arm's evidence (pinned requests and predictions from before
    /// the rollout never count).
    pub fn judge(
        &self,
        task: &str,
        generation: &str,
        arm_label: &str,
        rollout: Option<&str>,
        correct: bool,
    ) {
        let mut inner = self.lock();
        let window = inner
            .accuracy
            .entry((task.to_owned(), arm_label.to_owned()))
            .or_default();
        if window.len() >= ACCURACY_WINDOW {
            window.pop_front();
        }
        window.push_back(correct);
        let accuracy = window.iter().filter(|c| **c).count() as f64 / window.len() as f64;
        self.metrics
            .online_accuracy
            .with_label_values(&[task, arm_label])
            .set(accuracy);
        if let Some(r) = inner
            .by_task
            .get_mut(task)
            .and_then(|l| l.last_mut())
            .filter(|r| r.phase == Phase::Active && rollout == Some(r.id.as_str()))
        {
            if let Some(arm) = r.arm_of(generation) {
                r.arms.get_mut(arm).judge(correct);
                r.totals.get_mut(arm).judge(correct);
            }
        }
    }

    /// Runs the analysis of every active rollout and, where automatic, acts on it. Returns the decisions
    /// taken as `(task, action)`.
    pub fn evaluate(&self) -> Vec<(String, String)> {
        let mut acted = Vec::new();
        let mut promote = Vec::new();
        {
            let _deciding = self.deciding();
            let mut inner = self.lock();
            let active = inner
                .by_task
                .values()
                .any(|l| l.last().is_some_and(|r| r.phase == Phase::Active));
            if !active {
                return acted;
            }
            for r in inner.by_task.values_mut().filter_map(|l| l.last_mut()) {
                if r.phase != Phase::Active {
                    continue;
                }
                let verdict = analyse(&r.arms.stable, &r.arms.candidate, &self.policy);
                r.analysis = Some(verdict.clone());
                if !r.automatic {
                    continue;
                }
                match verdict {
                    Verdict::Hold(_) => {}
                    Verdict::Rollback(reason) => {
                        r.finish(Phase::RolledBack, "rollback", "analysis", reason);
                        self.export_traffic(r);
                        acted.push((r.task.clone(), "rollback".to_owned()));
                    }
                    Verdict::Pass(reason) if r.step + 1 < r.steps.len() => {
                        r.step += 1;
                        r.traffic = r.steps[r.step];
                        r.log("advance", "analysis", reason);
                        r.arms = Arms::default();
                        self.export_traffic(r);
                        acted.push((r.task.clone(), "advance".to_owned()));
                    }
                    Verdict::Pass(reason) => promote.push((r.task.clone(), r.id.clone(), reason)),
                }
            }
            self.persist(inner);
        }
        for (task, action) in &acted {
            self.event(task, action);
        }
        for (task, id, reason) in promote {
            match self.promote_rollout(&task, Some(&id), "analysis", reason) {
                Ok(_) => acted.push((task, "promote".to_owned())),
                Err(e) => tracing::warn!(task, error = %e, "automatic promotion failed"),
            }
        }
        acted
    }
}

#[cfg(test)]
mod tests;
