//! A/B rollouts: per task at most one active rollout puts a candidate generation in front of a share of
//! traffic (`split`) or beside it (`shadow`), gathers per-arm evidence, and advances, promotes or rolls
//! back by the guardrail analysis or by hand.
//!
//! Rollouts are kept in a [`store::RolloutStore`]: `rollouts.json` for one process, PostgreSQL for replicas
//! that share them. Every change is made to the newest stored rollouts under the store's lock and installed
//! here once stored, so replicas deciding at once decide one after the other. Evidence is counted in memory
//! per replica ([`Evidence`]); with a shared store each replica publishes its own and adds up the others'
//! ([`Rollouts::exchange`]), so the figures and the analysis cover all traffic. What a rollout is lives in
//! `record.rs`.

pub mod analysis;
mod record;
pub mod router;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::adapters::registry::{Registry, RegistryError, State};
use crate::clock::unix_seconds;
use crate::config::RolloutConfig;
use crate::metrics::Metrics;
use analysis::{analyse, Looks, Verdict};
pub use record::{
    Arm, ArmSummary, Arms, Decision, Mode, Phase, Rollout, Route, StartRequest, Summary,
};
use store::{Evidence, Persisted, RolloutStore, Stored};

/// Finished rollouts kept per task for `GET /v1/rollouts/{task}`.
const HISTORY: usize = 10;
/// Judged predictions the online-accuracy gauge averages over, per task and arm.
const ACCURACY_WINDOW: usize = 1000;
/// Judgements an arm needs before its online accuracy is exported: one disagreeing first judgement would
/// read 0.0 and raise the alert.
const ACCURACY_MIN_JUDGEMENTS: usize = 20;

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
    /// The rollouts could not be stored or read.
    #[error("rollout storage: {0}")]
    Storage(String),
}

/// What is known of an active rollout's traffic.
#[derive(Default)]
struct Live {
    /// What this replica counted.
    mine: Evidence,
    /// What the other replicas counted, as of the last exchange.
    others: Vec<Evidence>,
    /// The latest analysis.
    analysis: Option<Verdict>,
    /// The step and this process's accuracy looks in it (`analysis::Looks`). In memory: after a restart or
    /// a change of leader the look the evidence has reached is taken once more.
    looks: (usize, Looks),
}

impl Live {
    /// Every replica's evidence of the current step, and of the whole rollout.
    fn merged(&self) -> (Arms, Arms) {
        let (mut arms, mut totals) = (self.mine.arms.clone(), self.mine.totals.clone());
        for other in &self.others {
            if other.step == self.mine.step {
                arms.merge(&other.arms);
            }
            totals.merge(&other.totals);
        }
        (arms, totals)
    }
}

struct Inner {
    /// The rollouts as stored.
    state: Persisted,
    /// Their version in the store.
    version: i64,
    /// Evidence of the active rollouts, by rollout id.
    live: HashMap<String, Live>,
    /// Recent judgements per (task, arm label), with the generation last judged, for the online-accuracy
    /// gauge. A new candidate behind the candidate or shadow label starts a new window.
    accuracy: HashMap<(String, String), (String, VecDeque<bool>)>,
}

impl Inner {
    /// The active rollout of `task`.
    fn active(&self, task: &str) -> Option<&Rollout> {
        self.state
            .rollouts
            .get(task)?
            .last()
            .filter(|r| r.phase == Phase::Active)
    }

    /// The evidence of the active rollout `id` of `task`.
    fn live_mut(&mut self, task: &str, id: &str) -> Option<(&Rollout, &mut Live)> {
        let r = self
            .state
            .rollouts
            .get(task)?
            .last()
            .filter(|r| r.phase == Phase::Active && r.id == id)?;
        Some((r, self.live.get_mut(id)?))
    }

    /// `r` with the figures of its traffic so far, when active.
    fn fill(&self, r: &mut Rollout) {
        if let Some(live) = self.live.get(&r.id).filter(|_| r.phase == Phase::Active) {
            (r.arms, r.totals) = live.merged();
            if live.analysis.is_some() {
                r.analysis = live.analysis.clone();
            }
        }
    }
}

/// The rollout manager; share it behind an `Arc`.
pub struct Rollouts {
    /// The state every request reads (routing) and writes (evidence); held briefly, never across I/O.
    inner: Mutex<Inner>,
    /// Serialises this process's changes, so a promotion's two writes — the alias, then the rollout — are
    /// never interleaved with another change (the store's lock does the same across processes).
    decisions: Mutex<()>,
    store: Box<dyn RolloutStore>,
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

/// A split gives stable `1 − share` of the traffic, and the guardrails compare the candidate with what stable
/// serves: at a share of 1 stable serves nothing, no verdict could ever be reached, and a failing candidate
/// would keep every request. Promotion is how a candidate gets all of it.
fn check_split_share(share: f64, mode: Mode) -> Result<f64, RolloutError> {
    if mode == Mode::Split && share >= 1.0 {
        return Err(RolloutError::Invalid(format!(
            "a split's candidate share {share} must stay below 1, so that stable serves the traffic the \
             guardrails compare it with; passing the last step promotes the candidate (or POST \
             /v1/rollouts/{{task}}/promote)"
        )));
    }
    Ok(share)
}

/// The task's active rollout in `state`.
fn active_mut<'a>(state: &'a mut Persisted, task: &str) -> Result<&'a mut Rollout, RolloutError> {
    state
        .rollouts
        .get_mut(task)
        .and_then(|l| l.last_mut())
        .filter(|r| r.phase == Phase::Active)
        .ok_or_else(|| RolloutError::NotFound(format!("task {task:?} has no active rollout")))
}

impl Rollouts {
    /// Restores the rollouts in `store`: an active rollout whose generations are gone is rolled back, and one
    /// whose promotion was cut short is completed. Fails only when a shared store cannot be read.
    pub fn open_in(
        store: Box<dyn RolloutStore>,
        registry: Arc<Registry>,
        metrics: Metrics,
        policy: RolloutConfig,
    ) -> Result<Self, RolloutError> {
        // A file that cannot be read at all stops the start: starting empty would overwrite it at the next
        // change (one that cannot be parsed is set aside by the store).
        let stored = store.newer_than(-1)?;
        let rollouts = Self {
            inner: Mutex::new(Inner {
                state: Persisted::default(),
                version: -1,
                live: HashMap::new(),
                accuracy: HashMap::new(),
            }),
            decisions: Mutex::new(()),
            store,
            registry,
            metrics,
            policy,
        };
        if let Some(stored) = stored {
            let mut inner = rollouts.lock();
            rollouts.install(&mut inner, stored);
            if !rollouts.store.shared() {
                // One process: the evidence stored with the last change is where counting resumes. Shared,
                // it is in the replicas' evidence rows already.
                let restored: Vec<(String, Evidence)> = inner
                    .state
                    .active()
                    .map(|r| {
                        let (arms, totals) = (r.arms.clone(), r.totals.clone());
                        (
                            r.id.clone(),
                            Evidence {
                                step: r.step,
                                arms,
                                totals,
                            },
                        )
                    })
                    .collect();
                for (id, evidence) in restored {
                    inner.live.entry(id).or_default().mine = evidence;
                }
            }
        }
        let mut copy = rollouts.lock().state.clone();
        let due = !rollouts.reconcile(&mut copy, "restart").is_empty();
        if due {
            let _deciding = rollouts.deciding();
            match rollouts.decide(|state| Ok(rollouts.reconcile(state, "restart"))) {
                Ok(ended) => {
                    for (task, action) in ended {
                        rollouts.event(&task, action);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not store the rollouts reconciled at start")
                }
            }
        }
        Ok(rollouts)
    }

    /// Ends the active rollouts that cannot go on: one whose promotion moved the alias but was not recorded
    /// is completed, one whose generations are gone is rolled back. Returns each as (task, action).
    /// Promoting again after a promotion whose record failed (a `503`) completes it too.
    fn reconcile(&self, state: &mut Persisted, by: &str) -> Vec<(String, &'static str)> {
        let mut ended = Vec::new();
        for r in state.rollouts.values_mut().filter_map(|l| l.last_mut()) {
            if r.phase != Phase::Active {
                continue;
            }
            // A promotion moves the alias first and records the rollout second: a crash between the two
            // leaves the alias on the candidate, and the promotion is completed here.
            if self
                .registry
                .resolve(&r.task)
                .is_some_and(|g| g.id == r.candidate)
            {
                ended.push((r.task.clone(), "promote"));
                r.finish(
                    Phase::Promoted,
                    "promote",
                    by,
                    "the stable alias had moved to the candidate but the promotion was not recorded \
                     (a crash or a failed write between the two); the promotion is completed"
                        .to_owned(),
                );
                continue;
            }
            // Shared, a generation that failed to load on this replica only (its files not fetched yet) still
            // serves on the others, and one another replica just published may not have reached this one's
            // registry: only one gone from the shared index ends the rollout.
            let shared = self.store.shared();
            let usable = |id: &str| match self.registry.resolve(id) {
                Some(g) => shared || (g.state == State::Ready && g.adapter.is_some()),
                None => shared && self.registry.listed(id),
            };
            if !usable(&r.candidate) || !usable(&r.stable) {
                ended.push((r.task.clone(), "rollback"));
                r.finish(
                    Phase::RolledBack,
                    "rollback",
                    by,
                    "a generation of the rollout is no longer loaded".to_owned(),
                );
            }
        }
        ended
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("rollouts lock poisoned; this is a bug")
    }

    /// Held by every change (see the field).
    fn deciding(&self) -> MutexGuard<'_, ()> {
        self.decisions
            .lock()
            .expect("rollout decisions lock poisoned; this is a bug")
    }

    /// Makes `stored` the rollouts requests see, keeping the evidence of those still active (a step that
    /// advanced starts its evidence afresh).
    fn install(&self, inner: &mut Inner, stored: Stored) {
        inner.state = stored.state;
        inner.version = stored.version;
        let active: Vec<(String, usize)> = inner
            .state
            .active()
            .map(|r| (r.id.clone(), r.step))
            .collect();
        inner
            .live
            .retain(|id, _| active.iter().any(|(a, _)| a == id));
        for (id, step) in active {
            let live = inner.live.entry(id).or_default();
            if live.mine.step != step {
                live.mine.step = step;
                live.mine.arms = Arms::default();
                live.analysis = None;
            }
        }
        for r in inner.state.rollouts.values().filter_map(|l| l.last()) {
            self.export_traffic(r);
        }
        // A candidate (or shadow) arm whose rollout has ended, or whose generation is no longer the active
        // rollout's candidate, serves nothing: its accuracy must not stand (and alert) until a restart.
        let ended: Vec<(String, String)> = inner
            .accuracy
            .iter()
            .filter(|((task, arm), (generation, _))| {
                (arm == "candidate" || arm == "shadow")
                    && inner
                        .active(task)
                        .is_none_or(|r| r.candidate != *generation)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in ended {
            inner.accuracy.remove(&key);
            let _ = self
                .metrics
                .online_accuracy
                .remove_label_values(&[key.0.as_str(), key.1.as_str()]);
        }
    }

    /// Applies `change` to the newest stored rollouts, whose active ones carry their figures so far, stores
    /// the result and installs it. The caller holds [`Self::deciding`]. Nothing changes when `change` or
    /// the store fails.
    fn decide<T>(
        &self,
        change: impl FnOnce(&mut Persisted) -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let write = self.store.begin()?;
        let newer = write.newer_than(self.lock().version)?;
        let mut state = {
            let mut inner = self.lock();
            if let Some(stored) = newer {
                self.install(&mut inner, stored);
            }
            let mut state = inner.state.clone();
            for r in state.rollouts.values_mut().filter_map(|l| l.last_mut()) {
                inner.fill(r);
            }
            state
        };
        let out = change(&mut state)?;
        let version = write.commit(&state)?;
        let mut inner = self.lock();
        // The follower may have installed a newer version, committed by another replica since this one.
        if version > inner.version || !self.store.shared() {
            self.install(&mut inner, Stored { version, state });
        }
        Ok(out)
    }

    /// Takes in what other replicas changed in a shared store; returns whether anything changed. A no-op
    /// for a store no one else writes.
    pub fn sync(&self) -> Result<bool, RolloutError> {
        if !self.store.shared() {
            return Ok(false);
        }
        let seen = self.lock().version;
        let Some(stored) = self.store.newer_than(seen)? else {
            return Ok(false);
        };
        let mut inner = self.lock();
        if stored.version <= inner.version {
            return Ok(false);
        }
        self.install(&mut inner, stored);
        Ok(true)
    }

    /// Publishes this replica's evidence of the active rollouts to a shared store and takes in the other
    /// replicas'. A no-op for a store no one else writes.
    pub fn exchange(&self) -> Result<(), RolloutError> {
        if !self.store.shared() {
            return Ok(());
        }
        let mine: Vec<(String, Evidence)> = self
            .lock()
            .live
            .iter()
            .map(|(id, live)| (id.clone(), live.mine.clone()))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = mine.iter().map(|(id, _)| id.clone()).collect();
        let others = self.store.exchange(&mine, &ids)?;
        let mut inner = self.lock();
        for live in inner.live.values_mut() {
            live.others.clear();
        }
        for (id, evidence) in others {
            if let Some(live) = inner.live.get_mut(&id) {
                live.others.push(evidence);
            }
        }
        Ok(())
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
        if steps.windows(2).any(|w| w[1] <= w[0]) {
            return Err(RolloutError::Invalid(format!(
                "steps {steps:?} must rise: each step gives the candidate a larger share"
            )));
        }
        let mode = request.mode.unwrap_or(if self.policy.mode == "shadow" {
            Mode::Shadow
        } else {
            Mode::Split
        });
        for s in &steps {
            check_split_share(*s, mode)?;
        }
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
        rollout.log(
            "start",
            by,
            format!(
                "{} of traffic to {} ({:?} mode)",
                rollout.traffic, rollout.candidate, rollout.mode
            ),
        );
        let _deciding = self.deciding();
        // Deletions wait for the decision lock (`unless_in_use`): one may have come between the checks above
        // and now.
        for id in [&rollout.candidate, &rollout.stable] {
            if !self.registry.listed(id) {
                return Err(RolloutError::NotFound(format!(
                    "generation {id} was deleted meanwhile"
                )));
            }
        }
        let superseded = self.decide(|state| {
            // A promotion (here, or on another replica) may have moved the stable alias since it was read
            // above: the stable share would then be served by the generation it just retired.
            let now = self.stable_now(&task)?;
            if now.as_deref() != Some(rollout.stable.as_str()) {
                return Err(RolloutError::Conflict(format!(
                    "the stable generation of {task:?} changed to {} meanwhile; start the rollout again",
                    now.as_deref().unwrap_or("none")
                )));
            }
            let list = state.rollouts.entry(task.clone()).or_default();
            let mut superseded = false;
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
                superseded = true;
            }
            list.push(rollout.clone());
            if list.len() > HISTORY {
                list.remove(0);
            }
            Ok(superseded)
        })?;
        if superseded {
            self.event(&task, "supersede");
        }
        self.event(&task, "start");
        tracing::info!(task, rollout = %rollout.id, candidate = %rollout.candidate, "rollout started");
        Ok(rollout)
    }

    /// The task's active rollout, or else its latest.
    pub fn get(&self, task: &str) -> Option<Rollout> {
        let inner = self.lock();
        let mut r = inner.state.rollouts.get(task)?.last()?.clone();
        inner.fill(&mut r);
        Some(r)
    }

    /// Every task's latest rollout.
    pub fn list(&self) -> Vec<Rollout> {
        let inner = self.lock();
        inner
            .state
            .rollouts
            .values()
            .filter_map(|l| l.last())
            .map(|r| {
                let mut r = r.clone();
                inner.fill(&mut r);
                r
            })
            .collect()
    }

    /// Runs `change` (a deletion of generation `id`) unless an active rollout uses `id`, with no rollout
    /// starting meanwhile in this process.
    pub fn unless_in_use<T>(
        &self,
        id: &str,
        change: impl FnOnce() -> T,
    ) -> Result<T, RolloutError> {
        let _deciding = self.deciding();
        if self.uses(id) {
            return Err(RolloutError::Conflict(format!(
                "adapter {id} is an arm of an active rollout; promote or roll it back first"
            )));
        }
        Ok(change())
    }

    /// Whether an active rollout uses generation `id`.
    pub fn uses(&self, id: &str) -> bool {
        self.lock().state.rollouts.values().any(|l| {
            l.last()
                .is_some_and(|r| r.phase == Phase::Active && (r.candidate == id || r.stable == id))
        })
    }

    /// Sets the candidate's share of the active rollout (keys only move from stable to candidate when it
    /// grows).
    pub fn set_traffic(&self, task: &str, share: f64, by: &str) -> Result<Rollout, RolloutError> {
        let share = check_share(share)?;
        let _deciding = self.deciding();
        self.decide(|state| {
            let r = active_mut(state, task)?;
            r.traffic = check_split_share(share, r.mode)?;
            r.log("traffic", by, format!("candidate share set to {share}"));
            Ok(r.clone())
        })
    }

    /// Makes the candidate the stable generation (the task's alias moves atomically).
    pub fn promote(&self, task: &str, by: &str, reason: String) -> Result<Rollout, RolloutError> {
        let _deciding = self.deciding();
        let out = self.decide(|state| {
            let r = active_mut(state, task)?;
            self.promote_in(r, by, reason)?;
            Ok(r.clone())
        })?;
        self.event(task, "promote");
        tracing::info!(task, candidate = %out.candidate, by, "rollout promoted");
        Ok(out)
    }

    /// Moves `r`'s task alias to its candidate and records the promotion. The alias first, durably, while
    /// the store's lock is held; then the rollout, stored when the change commits. A crash between the two
    /// leaves the alias on the candidate, and the next start completes the promotion (see
    /// [`Self::reconcile`]), so the two always agree.
    fn promote_in(&self, r: &mut Rollout, by: &str, reason: String) -> Result<(), RolloutError> {
        self.move_alias(&r.task, &r.candidate)?;
        if let Some(pause) = crate::faults::get().pause_after_alias {
            std::thread::sleep(pause);
        }
        r.finish(Phase::Promoted, "promote", by, reason);
        Ok(())
    }

    /// The generation the task's stable alias names now, as the shared index has it.
    fn stable_now(&self, task: &str) -> Result<Option<String>, RolloutError> {
        self.registry
            .sync()
            .map_err(|e| RolloutError::Storage(e.to_string()))?;
        Ok(self.registry.resolve(task).map(|g| g.id.clone()))
    }

    fn move_alias(&self, task: &str, to: &str) -> Result<(), RolloutError> {
        self.registry
            .set_alias(task, to)
            .map(drop)
            .map_err(|e| match e {
                RegistryError::Storage(_) => RolloutError::Storage(e.to_string()),
                e => RolloutError::Conflict(format!("cannot move the alias: {e}")),
            })
    }

    /// Sends all traffic back to stable.
    pub fn rollback(&self, task: &str, by: &str, reason: String) -> Result<Rollout, RolloutError> {
        let _deciding = self.deciding();
        let out = self.decide(|state| {
            let r = active_mut(state, task)?;
            // A promotion whose record failed after the alias moved (it answered 503) left the candidate
            // serving everything as stable: a rollback then moves the alias back too, or it would end the
            // rollout with the candidate still serving.
            let mut reason = reason;
            if self.stable_now(task)?.as_deref() == Some(r.candidate.as_str()) {
                self.move_alias(task, &r.stable)?;
                reason.push_str(&format!(
                    " (a promotion cut short had moved the stable alias to the candidate; it is back on {})",
                    r.stable
                ));
            }
            r.finish(Phase::RolledBack, "rollback", by, reason);
            Ok(r.clone())
        })?;
        self.event(task, "rollback");
        tracing::warn!(task, candidate = %out.candidate, by, "rollout rolled back");
        Ok(out)
    }

    /// Where a request for `task` goes: `None` when no rollout is active (the stable alias serves).
    /// With a `routing_key` the arm is sticky for the rollout's life, on every replica alike; without,
    /// `request_id` decides.
    pub fn route(&self, task: &str, routing_key: Option<&str>, request_id: &str) -> Option<Route> {
        let (id, mode, stable, candidate, chosen) = {
            let inner = self.lock();
            let r = inner.active(task)?;
            let chosen = router::to_candidate(&r.id, routing_key.unwrap_or(request_id), r.traffic);
            (
                r.id.clone(),
                r.mode,
                r.stable.clone(),
                r.candidate.clone(),
                chosen,
            )
        };
        // A candidate another replica published may not be loaded here yet (its files still on the way):
        // its share is served by stable meanwhile, outside the rollout's evidence.
        let loaded = || {
            self.registry
                .resolve(&candidate)
                .is_some_and(|g| g.state == State::Ready && g.adapter.is_some())
        };
        Some(match (mode, chosen) {
            (Mode::Split, true) if loaded() => Route {
                arm: Arm::Candidate,
                generation: candidate,
                shadow: None,
                rollout: Some(id),
            },
            (Mode::Split, true) => Route {
                arm: Arm::Stable,
                generation: stable,
                shadow: None,
                rollout: None,
            },
            (Mode::Shadow, true) => Route {
                arm: Arm::Stable,
                generation: stable,
                shadow: loaded().then_some(candidate),
                rollout: Some(id),
            },
            (_, false) => Route {
                arm: Arm::Stable,
                generation: stable,
                shadow: None,
                rollout: Some(id),
            },
        })
    }

    /// Records a request `generation` served for `task` within rollout `rollout`.
    pub fn observe(&self, task: &str, rollout: &str, generation: &str, seconds: f64, ok: bool) {
        let mut inner = self.lock();
        if let Some((r, live)) = inner.live_mut(task, rollout) {
            if let Some(arm) = r.arm_of(generation) {
                live.mine.arms.get_mut(arm).observe(seconds, ok);
                live.mine.totals.get_mut(arm).observe(seconds, ok);
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
        // The candidate and shadow labels describe the active rollout's candidate only: a late label on a
        // prediction of an ended rollout's candidate is counted below but does not bring its figure back.
        let rollout_arm = arm_label == "candidate" || arm_label == "shadow";
        let current = !rollout_arm
            || inner
                .active(task)
                .is_some_and(|r| r.candidate == generation);
        if current {
            let (judged, window) = inner
                .accuracy
                .entry((task.to_owned(), arm_label.to_owned()))
                .or_default();
            if rollout_arm && judged != generation {
                // The next candidate: its predecessor's record says nothing of it. (The stable and pinned
                // labels keep one mixed window: after a promotion the old stable generation's late labels
                // and the new one's interleave, and 1000 judgements roll it over.)
                window.clear();
            }
            judged.clear();
            judged.push_str(generation);
            if window.len() >= ACCURACY_WINDOW {
                window.pop_front();
            }
            window.push_back(correct);
            if window.len() >= ACCURACY_MIN_JUDGEMENTS {
                let accuracy = window.iter().filter(|c| **c).count() as f64 / window.len() as f64;
                self.metrics
                    .online_accuracy
                    .with_label_values(&[task, arm_label])
                    .set(accuracy);
            }
        }
        let outcome = if correct { "agreed" } else { "disagreed" };
        self.metrics
            .online_judgements
            .with_label_values(&[task, arm_label, outcome])
            .inc();
        if let Some((r, live)) = rollout.and_then(|id| inner.live_mut(task, id)) {
            if let Some(arm) = r.arm_of(generation) {
                live.mine.arms.get_mut(arm).judge(correct);
                live.mine.totals.get_mut(arm).judge(correct);
            }
        }
    }

    /// Runs the analysis of every active rollout over all replicas' evidence and, where automatic and when
    /// `act` (the replica that leads), acts on it. Returns the decisions taken as `(task, action)`.
    pub fn evaluate(&self, act: bool) -> Vec<(String, String)> {
        let _deciding = self.deciding();
        // (task, rollout id, step, verdict) of the automatic rollouts the analysis would move.
        let mut due = Vec::new();
        {
            let mut inner = self.lock();
            let active: Vec<(String, String, usize, bool)> = inner
                .state
                .active()
                .map(|r| (r.task.clone(), r.id.clone(), r.step, r.automatic))
                .collect();
            if active.is_empty() {
                return Vec::new();
            }
            for (task, id, step, automatic) in active {
                let Some(live) = inner.live.get_mut(&id) else {
                    continue;
                };
                let (arms, _) = live.merged();
                if live.looks.0 != step {
                    live.looks = (step, Looks::default());
                }
                let verdict = analyse(
                    &arms.stable,
                    &arms.candidate,
                    &self.policy,
                    &mut live.looks.1,
                );
                live.analysis = Some(verdict.clone());
                if automatic && !matches!(verdict, Verdict::Hold(_)) {
                    due.push((task, id, step, verdict));
                }
            }
        }
        // A promotion whose record failed after the alias moved, or a generation deleted from under a
        // rollout: the leader ends such rollouts, as a start would.
        let stuck = act && {
            let mut copy = self.lock().state.clone();
            !self.reconcile(&mut copy, "analysis").is_empty()
        };
        // One process checkpoints its evidence at every analysis, so a restart resumes from it; replicas
        // keep theirs in their evidence rows and store the rollouts only to act.
        if !act || (due.is_empty() && !stuck && self.store.shared()) {
            return Vec::new();
        }
        let acted = self.decide(|state| {
            let mut acted: Vec<(String, String)> = self
                .reconcile(state, "analysis")
                .into_iter()
                .map(|(task, action)| (task, action.to_owned()))
                .collect();
            for (task, id, step, verdict) in due {
                // Another replica may have moved the rollout since this analysis: act only on what it saw.
                let Some(r) = state
                    .rollouts
                    .get_mut(&task)
                    .and_then(|l| l.last_mut())
                    .filter(|r| r.phase == Phase::Active && r.id == id && r.step == step)
                else {
                    continue;
                };
                r.analysis = Some(verdict.clone());
                let action = match verdict {
                    Verdict::Hold(_) => continue,
                    Verdict::Rollback(reason) => {
                        r.finish(Phase::RolledBack, "rollback", "analysis", reason);
                        "rollback"
                    }
                    // A split step of 1 (a rollout stored before such steps were refused) would leave
                    // stable nothing to compare with: the pass promotes instead.
                    Verdict::Pass(reason)
                        if r.step + 1 < r.steps.len()
                            && check_split_share(r.steps[r.step + 1], r.mode).is_ok() =>
                    {
                        r.step += 1;
                        // A larger share set by hand stays: lowering it would send keys that saw the
                        // candidate back to stable.
                        r.traffic = r.steps[r.step].max(r.traffic);
                        r.log("advance", "analysis", reason);
                        r.arms = Arms::default();
                        "advance"
                    }
                    Verdict::Pass(reason) => match self.promote_in(r, "analysis", reason) {
                        Ok(()) => "promote",
                        Err(e) => {
                            tracing::warn!(task, error = %e, "automatic promotion failed");
                            continue;
                        }
                    },
                };
                acted.push((task, action.to_owned()));
            }
            Ok(acted)
        });
        match acted {
            Ok(acted) => {
                for (task, action) in &acted {
                    self.event(task, action);
                }
                acted
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not store the analysis' decisions");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
