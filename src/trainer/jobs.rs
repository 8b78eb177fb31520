//! Training jobs: a queue served by one trainer thread (so one job runs at a time, and serving keeps the
//! cores its thread share leaves), job status for the API, cancellation, persistence of finished jobs, and
//! publishing the result as a new adapter generation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::data::{stratified_split_by, truncate, Example};
use super::eval::{evaluate, Evaluation};
use super::full::write_checkpoint;
use super::reference::drift_reference;
use super::train::{
    predict, train_full, train_lora, Method, Progress, TrainConfig, TrainError, TrainReport,
};
use crate::adapters::peft;
use crate::adapters::reference::REFERENCE_FILE;
use crate::adapters::registry::{Registry, Sidecar, SIDECAR_FILE};
use crate::clock::unix_seconds;
use crate::config::TrainerConfig;
use crate::durable::write_atomically;
use crate::feedback::FeedbackStore;
use crate::model::{Bert, Model};
use crate::pressure::ServingPressure;
use crate::supervise::Alive;

/// Most feedback rows one job reads: the newest, so a long-lived task keeps learning from what arrives.
const MAX_ROWS: usize = 200_000;

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for the trainer thread.
    Queued,
    /// Training.
    Running,
    /// Published a generation.
    Succeeded,
    /// Stopped by an error (or a restart).
    Failed,
    /// Stopped on request.
    Cancelled,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// The task trained.
    pub task: String,
    /// `lora` or `full`.
    pub method: Method,
    /// Lifecycle state.
    pub state: JobState,
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Current epoch.
    pub epoch: usize,
    /// Mean training loss of the current epoch.
    pub train_loss: Option<f64>,
    /// Latest (or, when done, best) validation scores.
    pub val: Option<Evaluation>,
    /// The stable generation's scores on the same validation split, when the task had one.
    pub stable_val: Option<Evaluation>,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// Trainable values.
    pub trainable_params: Option<usize>,
    /// Seconds spent so far.
    pub wall_seconds: f64,
    /// Of those, seconds spent waiting for inference to finish (see [`crate::pressure`]).
    #[serde(default)]
    pub yielded_seconds: f64,
    /// The published generation (LoRA).
    pub adapter: Option<String>,
    /// The written checkpoint, relative to the data directory (full fine-tuning).
    #[serde(default)]
    pub output: Option<String>,
    /// Examples in the training split.
    #[serde(default)]
    pub train_examples: Option<usize>,
    /// How many of the job's examples were replayed from before the parent generation.
    #[serde(default)]
    pub replayed_examples: Option<usize>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Hyperparameters.
    pub config: TrainConfig,
    /// Whether a shutdown or a crash stopped it (it then failed, and the next start re-runs it).
    #[serde(default)]
    pub interrupted: bool,
    /// Whether that was a crash (the server died with the job live): a re-run a crash stops is not re-run
    /// again, so a job that kills the server runs twice, not forever.
    #[serde(default)]
    pub crashed: bool,
    /// Whether a caller asked to cancel it: a job cancelled while running ends `cancelled` even when a
    /// shutdown or crash stops it first, and is never re-run.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The job the next start queued to repeat this interrupted one.
    pub rerun_as: Option<String>,
    /// The interrupted job this one repeats.
    pub rerun_of: Option<String>,
}

impl JobStatus {
    /// A new job of `task`, queued now under a fresh id.
    fn queued(task: &str, config: TrainConfig) -> Self {
        Self {
            id: format!("job-{}", uuid::Uuid::new_v4().simple()),
            task: task.to_owned(),
            method: config.method,
            state: JobState::Queued,
            step: 0,
            total_steps: 0,
            epoch: 0,
            train_loss: None,
            val: None,
            stable_val: None,
            eta_seconds: None,
            trainable_params: None,
            wall_seconds: 0.0,
            yielded_seconds: 0.0,
            adapter: None,
            output: None,
            train_examples: None,
            replayed_examples: None,
            error: None,
            created_at: unix_seconds(),
            config,
            interrupted: false,
            crashed: false,
            cancel_requested: false,
            rerun_as: None,
            rerun_of: None,
        }
    }

    /// Marks the job stopped because the server stopped under it: failed and interrupted, or cancelled
    /// when a caller had asked for that.
    fn interrupt(&mut self, by: Interruption) {
        if self.cancel_requested {
            self.state = JobState::Cancelled;
            return;
        }
        self.state = JobState::Failed;
        self.interrupted = true;
        self.crashed = matches!(by, Interruption::Crash);
        self.error = Some(
            match by {
                Interruption::Shutdown => "interrupted by a shutdown",
                Interruption::Crash => "interrupted by a restart",
            }
            .to_owned(),
        );
    }

    /// Whether the next start should queue it again: interrupted, not cancelled, not yet re-run, and not a
    /// re-run that a crash stopped (a job that keeps killing the server runs twice, not forever; one that
    /// only meets graceful restarts keeps being re-run).
    fn wants_rerun(&self) -> bool {
        self.interrupted
            && !self.cancel_requested
            && self.rerun_as.is_none()
            && !(self.crashed && self.rerun_of.is_some())
    }
}

/// What the trainer needs from the rest of the server.
pub struct TrainerDeps {
    /// The base model (shared with the serving thread).
    pub model: Arc<Model>,
    /// The base encoder on the training device (`trainer.device`): the model's own where that is its
    /// device, a copy otherwise.
    pub bert: Arc<Bert>,
    /// Tasks and generations.
    pub registry: Arc<Registry>,
    /// The feedback to learn from.
    pub feedback: Arc<dyn FeedbackStore>,
    /// Threads the trainer may use.
    pub threads: usize,
    /// Niceness of the trainer's threads (0 to 19).
    pub nice: i32,
    /// Inference in flight, which training yields to, and the longest wait per yield point (zero: never).
    pub yield_to: (Arc<ServingPressure>, Duration),
    /// The base model's directory (full fine-tuning copies its config and tokenizer).
    pub model_dir: std::path::PathBuf,
    /// Where full fine-tuning writes checkpoints (`<data-dir>/models`).
    pub models_dir: std::path::PathBuf,
    /// Training metrics.
    pub metrics: crate::metrics::Metrics,
    /// Embeddings a published generation's drift reference holds at most (`[drift] reference_size`; 0:
    /// publish none).
    pub reference_size: usize,
}

/// A job's wall time and the part of it spent yielding to serving, from one starting point.
struct JobClock<'a> {
    started: Instant,
    pressure: &'a ServingPressure,
    yielded_before: Duration,
}

impl<'a> JobClock<'a> {
    fn start(pressure: &'a ServingPressure) -> Self {
        Self {
            started: Instant::now(),
            pressure,
            yielded_before: pressure.yielded(),
        }
    }

    /// Seconds since the start, and seconds of those spent yielding.
    fn read(&self) -> (f64, f64) {
        (
            self.started.elapsed().as_secs_f64(),
            (self.pressure.yielded() - self.yielded_before).as_secs_f64(),
        )
    }
}

/// What stopped a job under it.
#[derive(Clone, Copy)]
enum Interruption {
    /// A graceful shutdown (SIGTERM, SIGINT).
    Shutdown,
    /// A crash or kill: the next start found the job still live.
    Crash,
}

/// Called on the trainer thread with the task and generation id after a LoRA job published.
pub type PublishHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

struct Shared {
    jobs: Mutex<BTreeMap<String, JobStatus>>,
    /// Set once the server stops: a job that ends now was interrupted, not cancelled.
    shutting_down: AtomicBool,
    metrics: crate::metrics::Metrics,
    hook: Mutex<Option<PublishHook>>,
    cancel: Mutex<BTreeMap<String, Arc<AtomicBool>>>,
    path: std::path::PathBuf,
    /// Most finished jobs remembered; older ones are forgotten, oldest first.
    keep_finished: usize,
    /// Held across a snapshot and its write, so the last write holds the latest snapshot.
    persisting: Mutex<()>,
}

/// The job queue handle.
pub struct Jobs {
    shared: Arc<Shared>,
    tx: Mutex<mpsc::Sender<String>>,
    max_queued: usize,
    alive: Alive,
}

impl Shared {
    fn update(&self, id: &str, f: impl FnOnce(&mut JobStatus)) {
        let mut jobs = self.jobs.lock().expect("jobs lock poisoned; this is a bug");
        if let Some(job) = jobs.get_mut(id) {
            f(job);
        }
    }

    /// Forgets the oldest finished jobs beyond the retention limit, then writes the list.
    fn persist(&self) {
        let _writing = self
            .persisting
            .lock()
            .expect("persist lock poisoned; this is a bug");
        let jobs = {
            let mut jobs = self.jobs.lock().expect("jobs lock poisoned; this is a bug");
            forget_oldest_finished(&mut jobs, self.keep_finished);
            jobs.values().cloned().collect::<Vec<_>>()
        };
        match serde_json::to_vec_pretty(&jobs) {
            Ok(bytes) => {
                if let Err(e) = write_atomically(&self.path, &bytes) {
                    tracing::warn!(error = %e, "could not persist the job list");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialise the job list"),
        }
    }
}

/// The saved job list; empty when there is none. A list this build cannot read (another version's, or
/// damaged) is moved aside, not overwritten, and the move logged.
fn read_job_list(path: &Path) -> Vec<JobStatus> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    match serde_json::from_slice(&bytes) {
        Ok(list) => list,
        Err(e) => {
            let aside = path.with_extension(format!("json.unreadable-{}", unix_seconds()));
            match std::fs::rename(path, &aside) {
                Ok(()) => {
                    tracing::error!(error = %e, kept = %aside.display(), "could not read the job list; starting a new one")
                }
                Err(m) => {
                    tracing::error!(error = %e, move_error = %m, "could not read the job list nor move it aside")
                }
            }
            Vec::new()
        }
    }
}

/// Removes the oldest finished (succeeded, failed or cancelled) jobs until at most `keep` remain; jobs still
/// waiting to be re-run stay.
fn forget_oldest_finished(jobs: &mut BTreeMap<String, JobStatus>, keep: usize) {
    let mut finished: Vec<(u64, String)> = jobs
        .values()
        .filter(|j| !matches!(j.state, JobState::Queued | JobState::Running) && !j.wants_rerun())
        .map(|j| (j.created_at, j.id.clone()))
        .collect();
    if finished.len() <= keep {
        return;
    }
    finished.sort_unstable();
    for (_, id) in &finished[..finished.len() - keep] {
        jobs.remove(id);
    }
}

impl Jobs {
    /// Restores the job list from `data_dir/jobs.json` (jobs a restart interrupted are marked failed) and
    /// starts the trainer thread.
    /// `limits` gives the queue's length and how many finished jobs are remembered.
    pub fn start(
        data_dir: &Path,
        deps: TrainerDeps,
        limits: &TrainerConfig,
    ) -> std::io::Result<Self> {
        let path = data_dir.join("jobs.json");
        let mut jobs: BTreeMap<String, JobStatus> = read_job_list(&path)
            .into_iter()
            .map(|j| (j.id.clone(), j))
            .collect();
        for job in jobs.values_mut() {
            if matches!(job.state, JobState::Queued | JobState::Running) {
                job.interrupt(Interruption::Crash);
            }
        }
        let shared = Arc::new(Shared {
            jobs: Mutex::new(jobs),
            shutting_down: AtomicBool::new(false),
            metrics: deps.metrics.clone(),
            hook: Mutex::new(None),
            cancel: Mutex::new(BTreeMap::new()),
            path,
            keep_finished: limits.keep_finished_jobs,
            persisting: Mutex::new(()),
        });
        shared.persist();
        let (tx, rx) = mpsc::channel::<String>();
        let worker = shared.clone();
        let (alive, guard) = Alive::new();
        std::thread::Builder::new()
            .name("flywheel-trainer".to_owned())
            .spawn(move || {
                let _alive = guard;
                lower_priority(deps.nice);
                let nice = deps.nice;
                let yield_to = deps.yield_to.clone();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(deps.threads.max(1))
                    .start_handler(move |_| {
                        lower_priority(nice);
                        crate::pressure::yield_on_this_thread(Some(yield_to.clone()));
                    })
                    .build();
                let pool = match pool {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the trainer's thread pool");
                        return;
                    }
                };
                for id in rx {
                    pool.install(|| run_job(&worker, &deps, &id));
                }
            })?;
        Ok(Self {
            shared,
            tx: Mutex::new(tx),
            max_queued: limits.max_queued_jobs,
            alive,
        })
    }

    /// Whether the trainer thread still runs (a panic in a job is caught; this turns false only if the
    /// thread itself has ended).
    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// Queues again, oldest first, each job a shutdown or crash interrupted that was not re-run yet (called
    /// at start-up once the publish hook is in place, when `[trainer] rerun_interrupted`).
    pub fn rerun_interrupted(&self) {
        let mut waiting: Vec<JobStatus> = self
            .shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .values()
            .filter(|j| j.wants_rerun())
            .cloned()
            .collect();
        waiting.sort_by_key(|j| j.created_at);
        for old in waiting {
            match self.queue(&old.task, old.config.clone(), Some(old.id.clone())) {
                Ok(new) => {
                    tracing::info!(job = %old.id, rerun = %new.id, task = %old.task, "re-running an interrupted job");
                }
                // Left as it is: the next start tries again.
                Err(e) => {
                    tracing::warn!(job = %old.id, error = %e, "could not re-run an interrupted job now");
                }
            }
        }
    }

    /// Sets the function called after each LoRA job publishes a generation (the rollout layer starts
    /// canaries from it).
    pub fn on_published(&self, hook: PublishHook) {
        *self
            .shared
            .hook
            .lock()
            .expect("hook lock poisoned; this is a bug") = Some(hook);
    }

    /// Whether `task` has a job queued or running.
    pub fn busy(&self, task: &str) -> bool {
        self.shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .values()
            .any(|j| j.task == task && matches!(j.state, JobState::Queued | JobState::Running))
    }

    /// Queues a job for `task`.
    pub fn submit(&self, task: &str, config: TrainConfig) -> Result<JobStatus, TrainError> {
        self.queue(task, config, None)
    }

    /// Queues a job for `task`, a re-run of `rerun_of` when given.
    fn queue(
        &self,
        task: &str,
        config: TrainConfig,
        rerun_of: Option<String>,
    ) -> Result<JobStatus, TrainError> {
        config.validate()?;
        let queued = {
            let jobs = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug");
            jobs.values()
                .filter(|j| matches!(j.state, JobState::Queued | JobState::Running))
                .count()
        };
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(TrainError::ShuttingDown);
        }
        if queued >= self.max_queued {
            return Err(TrainError::QueueFull(format!(
                "{queued} jobs are waiting; at most {} may",
                self.max_queued
            )));
        }
        let status = JobStatus {
            rerun_of: rerun_of.clone(),
            ..JobStatus::queued(task, config)
        };
        {
            // A re-run and its link from the job it repeats land in one write, so a crash between them
            // cannot make the next start re-run the job again.
            let mut jobs = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug");
            if let Some(old) = rerun_of.and_then(|id| jobs.get_mut(&id)) {
                old.error = Some(format!(
                    "{}; re-run as {}",
                    old.error.as_deref().unwrap_or("interrupted"),
                    status.id
                ));
                old.rerun_as = Some(status.id.clone());
            }
            jobs.insert(status.id.clone(), status.clone());
        }
        self.shared
            .cancel
            .lock()
            .expect("cancel lock poisoned; this is a bug")
            .insert(status.id.clone(), Arc::new(AtomicBool::new(false)));
        self.shared.persist();
        self.tx
            .lock()
            .expect("job sender lock poisoned; this is a bug")
            .send(status.id.clone())
            .map_err(|_| TrainError::Invalid("the trainer has stopped".to_owned()))?;
        Ok(status)
    }

    /// A job's status.
    pub fn get(&self, id: &str) -> Option<JobStatus> {
        self.shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .get(id)
            .cloned()
    }

    /// Every job, optionally of one task, newest first.
    pub fn list(&self, task: Option<&str>) -> Vec<JobStatus> {
        let jobs = self
            .shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug");
        let mut out: Vec<JobStatus> = jobs
            .values()
            .filter(|j| task.is_none_or(|t| j.task == t))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        out
    }

    /// Stops the trainer for a shutdown: queued jobs and the running one are marked failed ("interrupted by a
    /// shutdown"), the running one stops at its next micro-batch, and the list is persisted. Waits at most
    /// `deadline` for the running job to stop; returns whether it did.
    pub fn shutdown(&self, deadline: Duration) -> bool {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        for flag in self
            .shared
            .cancel
            .lock()
            .expect("cancel lock poisoned; this is a bug")
            .values()
        {
            flag.store(true, Ordering::Relaxed);
        }
        {
            let mut jobs = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug");
            for job in jobs.values_mut().filter(|j| j.state == JobState::Queued) {
                job.interrupt(Interruption::Shutdown);
            }
        }
        self.shared.persist();
        let until = Instant::now() + deadline;
        loop {
            let running = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug")
                .values()
                .any(|j| j.state == JobState::Running);
            if !running {
                // The trainer thread may still be writing the stopped job's state; this write waits for it
                // and leaves the latest state on disk before the process exits.
                self.shared.persist();
                return true;
            }
            if Instant::now() >= until {
                // The restart will mark it interrupted instead.
                tracing::warn!(
                    "the running training job did not stop before the shutdown deadline"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks a queued or running job to stop; returns its status, or `None` if unknown.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        if let Some(flag) = self
            .shared
            .cancel
            .lock()
            .expect("cancel lock poisoned; this is a bug")
            .get(id)
        {
            flag.store(true, Ordering::Relaxed);
        }
        let mut task = None;
        self.shared.update(id, |j| {
            if matches!(j.state, JobState::Queued | JobState::Running) {
                j.cancel_requested = true;
            }
            if j.state == JobState::Queued {
                j.state = JobState::Cancelled;
                task = Some(j.task.clone());
            }
        });
        if let Some(task) = task {
            self.shared
                .metrics
                .training_jobs
                .with_label_values(&[task.as_str(), "cancelled"])
                .inc();
        }
        self.shared.persist();
        self.get(id)
    }
}

/// Lowers the calling thread's scheduling priority by `nice` (Linux: per thread), so training yields the
/// cores to serving whenever both want them.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id changes only its niceness.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) != 0 {
            tracing::warn!(nice, "could not lower the trainer's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

fn run_job(shared: &Shared, deps: &TrainerDeps, id: &str) {
    let Some(job) = shared
        .jobs
        .lock()
        .expect("jobs lock poisoned; this is a bug")
        .get(id)
        .cloned()
    else {
        return;
    };
    if job.state != JobState::Queued {
        return;
    }
    let cancel = shared
        .cancel
        .lock()
        .expect("cancel lock poisoned; this is a bug")
        .get(id)
        .cloned()
        .unwrap_or_default();
    shared.update(id, |j| j.state = JobState::Running);
    shared.persist();
    let clock = JobClock::start(&deps.yield_to.0);
    // A panic fails this job, not the trainer: the job reads `failed` with the panic's message.
    let result = crate::supervise::catch(&deps.metrics, "trainer", || {
        if crate::faults::job_should_panic(&job.task) {
            panic!("injected fault: the first job of FLYWHEEL_FAULTS' panic_in_job task");
        }
        train_and_publish(shared, deps, &job, &cancel, &clock)
    })
    .unwrap_or_else(|message| Err(TrainError::Panicked(message)));
    let (wall, yielded) = clock.read();
    deps.metrics
        .training_yield_seconds
        .with_label_values(&[job.task.as_str()])
        .inc_by(yielded);
    let mut published = None;
    shared.update(id, |j| {
        j.wall_seconds = wall;
        j.yielded_seconds = yielded;
        j.eta_seconds = None;
        match result {
            Ok(Output::Adapter(adapter)) => {
                j.state = JobState::Succeeded;
                published = Some(adapter.clone());
                j.adapter = Some(adapter);
            }
            Ok(Output::Checkpoint(dir)) => {
                j.state = JobState::Succeeded;
                j.output = Some(dir);
            }
            Err(TrainError::Cancelled) if shared.shutting_down.load(Ordering::Relaxed) => {
                j.interrupt(Interruption::Shutdown);
            }
            Err(TrainError::Cancelled) => j.state = JobState::Cancelled,
            Err(e) => {
                j.state = JobState::Failed;
                j.error = Some(e.to_string());
            }
        }
    });
    shared.persist();
    let state = shared
        .jobs
        .lock()
        .expect("jobs lock poisoned; this is a bug")
        .get(id)
        .map(|j| j.state);
    if let Some(state) = state {
        let state = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        deps.metrics
            .training_jobs
            .with_label_values(&[job.task.as_str(), state.as_str()])
            .inc();
        deps.metrics.training_duration.observe(wall);
    }
    // The gauges describe the running job only.
    let _ = deps
        .metrics
        .training_loss
        .remove_label_values(&[job.task.as_str()]);
    let _ = deps
        .metrics
        .training_samples_per_second
        .remove_label_values(&[job.task.as_str()]);
    if let Some(generation) = published {
        let hook = shared
            .hook
            .lock()
            .expect("hook lock poisoned; this is a bug")
            .clone();
        if let Some(hook) = hook {
            hook(&job.task, &generation);
        }
    }
    shared
        .cancel
        .lock()
        .expect("cancel lock poisoned; this is a bug")
        .remove(id);
}

/// Whether training can continue from `adapter`: a head pooling as the job asks (a pooler of its own, if
/// any, trains on) of the task's width.
fn warm_startable(
    adapter: &crate::model::lora::Adapter,
    labels: usize,
    pooling: crate::model::lora::Pooling,
) -> bool {
    adapter
        .head
        .as_ref()
        .is_some_and(|h| h.pooling == pooling && h.classifier.out_features == labels)
        && adapter.deltas().next().is_some()
}

/// The examples a job trains and validates on, and where they came from.
struct Dataset {
    examples: Vec<Example>,
    /// Each example's token ids as serving makes them (not cut at the job's `max_length`).
    serving_ids: Vec<Vec<u32>>,
    snapshot_id: i64,
    new_rows: usize,
    replayed_rows: usize,
}

/// Reads the task's feedback. With a parent snapshot and a replay ratio, takes the rows newer than the
/// snapshot and an even sample of `replay` older rows per new one; otherwise every row.
fn select_data(
    deps: &TrainerDeps,
    task: &crate::adapters::registry::Task,
    config: &TrainConfig,
    parent_snapshot: Option<i64>,
) -> Result<Dataset, TrainError> {
    let rows = deps
        .feedback
        .latest(&task.name, MAX_ROWS)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let snapshot_id = rows.last().map_or(0, |r| r.id);
    let (mut chosen, new_rows, replayed_rows) = match (parent_snapshot, config.replay) {
        (Some(cut), Some(ratio)) => {
            let (old, new): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.id <= cut);
            if new.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "no feedback arrived since the stable generation's data (row {cut}); \
                     set \"replay\": null to retrain on all of it"
                )));
            }
            let want = ((new.len() as f64 * ratio).ceil() as usize).min(old.len());
            let mut old = old;
            crate::rng::Rng::new(config.seed ^ 0x2E91A7).shuffle(&mut old);
            old.truncate(want);
            let (n, r) = (new.len(), old.len());
            (new.into_iter().chain(old).collect::<Vec<_>>(), n, r)
        }
        _ => {
            let n = rows.len();
            (rows, n, 0)
        }
    };
    chosen.sort_by_key(|r| r.id);
    let mut examples = Vec::with_capacity(chosen.len());
    let mut serving_ids = Vec::with_capacity(chosen.len());
    for row in &chosen {
        let Some(label) = task.labels.iter().position(|l| *l == row.label) else {
            continue;
        };
        let ids = deps
            .model
            .tokenizer
            .encode(&row.text)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        examples.push(Example {
            ids: truncate(ids.clone(), config.max_length),
            label,
        });
        serving_ids.push(ids);
    }
    for (i, label) in task.labels.iter().enumerate() {
        let n = examples.iter().filter(|e| e.label == i).count();
        if n < 2 {
            return Err(TrainError::Invalid(format!(
                "label {label:?} has {n} feedback examples in this job's data; training needs at least 2"
            )));
        }
    }
    Ok(Dataset {
        examples,
        serving_ids,
        snapshot_id,
        new_rows,
        replayed_rows,
    })
}

/// Writes into a fresh temporary directory beside `final_dir`, fsyncs, and renames it into place, so a
/// crash leaves either nothing or the whole directory.
fn publish_dir(
    final_dir: &Path,
    tag: &str,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let io = |e: std::io::Error| TrainError::Invalid(format!("publishing the result: {e}"));
    let parent = final_dir
        .parent()
        .ok_or_else(|| TrainError::Invalid("bad output path".to_owned()))?;
    std::fs::create_dir_all(parent).map_err(io)?;
    let tmp = parent.join(format!(".tmp-{tag}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io)?;
    }
    std::fs::create_dir_all(&tmp).map_err(io)?;
    write(&tmp)?;
    std::fs::rename(&tmp, final_dir).map_err(io)?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// What a finished job produced.
enum Output {
    /// A registered adapter generation.
    Adapter(String),
    /// A full checkpoint directory.
    Checkpoint(String),
}

fn train_and_publish(
    shared: &Shared,
    deps: &TrainerDeps,
    job: &JobStatus,
    cancel: &AtomicBool,
    clock: &JobClock<'_>,
) -> Result<Output, TrainError> {
    let task = deps
        .registry
        .task(&job.task)
        .ok_or_else(|| TrainError::Invalid(format!("no task {:?}", job.task)))?;
    let config = &job.config;
    let model = &deps.model;
    let labels = task.labels.len();
    let stable = deps
        .registry
        .resolve(&task.name)
        .filter(|g| g.task == task.name);
    let warm = stable.as_ref().and_then(|g| g.adapter.clone()).filter(|a| {
        config.method == Method::Lora
            && config.warm_start
            && warm_startable(a, labels, config.pooling)
    });
    let parent_snapshot = warm
        .as_ref()
        .and(stable.as_ref())
        .and_then(|g| g.sidecar.metrics.get("feedback_snapshot_id"))
        .and_then(serde_json::Value::as_i64);
    let data = select_data(deps, &task, config, parent_snapshot)?;
    let paired: Vec<(Example, Vec<u32>)> =
        data.examples.into_iter().zip(data.serving_ids).collect();
    let (train, val) = stratified_split_by(
        paired,
        |(e, _)| e.label,
        labels,
        config.val_fraction,
        config.seed,
    );
    let (train, train_serving): (Vec<Example>, Vec<Vec<u32>>) = train.into_iter().unzip();
    let (val, val_serving): (Vec<Example>, Vec<Vec<u32>>) = val.into_iter().unzip();
    let cpu = model.cpu().ok_or_else(|| {
        TrainError::Invalid("training runs on the CPU path only for now".to_owned())
    })?;
    let truth: Vec<usize> = val.iter().map(|e| e.label).collect();
    let stable_val = match stable.as_ref().and_then(|g| g.adapter.clone()) {
        Some(a) => Some(evaluate(&predict(cpu, &a, &val)?, &truth, labels)),
        None => None,
    };
    shared.update(&job.id, |j| {
        j.stable_val = stable_val.clone();
        j.train_examples = Some(train.len());
        j.replayed_examples = Some(data.replayed_rows);
    });
    let mut progress = |p: &Progress| {
        let (elapsed, yielded) = clock.read();
        deps.metrics
            .training_loss
            .with_label_values(&[task.name.as_str()])
            .set(p.train_loss);
        deps.metrics
            .training_samples_per_second
            .with_label_values(&[task.name.as_str()])
            .set(p.examples_per_second);
        shared.update(&job.id, |j| {
            j.step = p.step;
            j.total_steps = p.total_steps;
            j.epoch = p.epoch;
            j.train_loss = Some(p.train_loss);
            if p.val.is_some() {
                j.val = p.val.clone();
            }
            j.wall_seconds = elapsed;
            j.yielded_seconds = yielded;
            j.eta_seconds =
                (p.step > 0).then(|| elapsed / p.step as f64 * (p.total_steps - p.step) as f64);
        });
    };
    // Records the chosen epoch's scores on the job and returns the metadata stored with the result.
    let record = |run: &TrainReport<()>| {
        shared.update(&job.id, |j| {
            j.val = Some(run.val.clone());
            j.trainable_params = Some(run.trainable_params);
        });
        serde_json::json!({
            "method": config.method,
            "val": run.val,
            "stable_val": stable_val,
            "best_epoch": run.best_epoch,
            "steps": run.steps,
            "wall_seconds": run.wall_seconds,
            "trainable_params": run.trainable_params,
            "train_examples": train.len(),
            "val_examples": truth.len(),
            "new_examples": data.new_rows,
            "replayed_examples": data.replayed_rows,
            "feedback_snapshot_id": data.snapshot_id,
            "hyperparameters": config,
            "job": job.id,
            "warm_started": warm.is_some(),
        })
    };
    let invalid = |e: &dyn std::fmt::Display| TrainError::Invalid(format!("publishing: {e}"));
    match config.method {
        Method::Full => {
            let (weights, run) = train_full(
                &deps.bert,
                labels,
                &train,
                &val,
                config,
                &mut progress,
                cancel,
            )?
            .split();
            let name = format!("{}-{}", task.name, job.id);
            let final_dir = deps.models_dir.join(&name);
            let meta = record(&run);
            publish_dir(&final_dir, &job.id, |tmp| {
                write_checkpoint(tmp, &weights, &task.labels, &deps.model_dir)
                    .map_err(|e| invalid(&e))?;
                let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| invalid(&e))?;
                write_atomically(&tmp.join(SIDECAR_FILE), &bytes).map_err(|e| invalid(&e))
            })?;
            tracing::info!(job = %job.id, dir = %final_dir.display(), macro_f1 = run.val.macro_f1, "full fine-tuning wrote a checkpoint");
            Ok(Output::Checkpoint(format!("models/{name}")))
        }
        Method::Lora => {
            let (adapter, run) = train_lora(
                &deps.bert,
                cpu,
                labels,
                &train,
                &val,
                config,
                warm.as_deref(),
                &mut progress,
                cancel,
            )?
            .split();
            let name = format!("trained/{}-{}", task.name, job.id);
            let meta = record(&run);
            let reference = match deps.reference_size {
                0 => None,
                size => Some(
                    drift_reference(
                        cpu,
                        &adapter,
                        &train_serving,
                        &val_serving,
                        size,
                        config.seed,
                    )?
                    .to_bytes()
                    .map_err(|e| invalid(&e))?,
                ),
            };
            let sidecar = Sidecar {
                task: Some(task.name.clone()),
                labels: Some(task.labels.clone()),
                head: adapter.head.as_ref().map(|h| h.pooling),
                parent: stable.map(|g| g.id.clone()),
                metrics: meta.as_object().cloned().unwrap_or_default(),
            };
            // The rank and alpha of a warm start are the parent's.
            let alpha = adapter
                .deltas()
                .next()
                .map_or(config.alpha, |(_, _, d)| d.scale as f64 * d.rank as f64);
            publish_dir(&deps.registry.root().join(&name), &job.id, |tmp| {
                peft::write_dir(tmp, &adapter, alpha, &model.name).map_err(|e| invalid(&e))?;
                if let Some(bytes) = &reference {
                    write_atomically(&tmp.join(REFERENCE_FILE), bytes).map_err(|e| invalid(&e))?;
                }
                let bytes = serde_json::to_vec_pretty(&sidecar).map_err(|e| invalid(&e))?;
                write_atomically(&tmp.join(SIDECAR_FILE), &bytes).map_err(|e| invalid(&e))
            })?;
            let (generation, _) = deps
                .registry
                .load(&name, &task.name, None)
                .map_err(|e| TrainError::Invalid(e.to_string()))?;
            tracing::info!(job = %job.id, adapter = %generation.id, macro_f1 = run.val.macro_f1, "training published a generation");
            Ok(Output::Adapter(generation.id.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, created_at: u64, state: JobState) -> JobStatus {
        JobStatus {
            id: id.to_owned(),
            state,
            created_at,
            ..JobStatus::queued("spam", TrainConfig::default())
        }
    }

    #[test]
    fn an_unreadable_job_list_is_moved_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.json");
        std::fs::write(&path, b"[{\"id\": \"from another version\"}]").unwrap();
        assert!(read_job_list(&path).is_empty());
        assert!(!path.exists());
        let kept: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(kept.len(), 1, "the old list is kept beside");
        assert!(read_job_list(&path).is_empty(), "no list: nothing to read");
    }

    #[test]
    fn a_cancel_request_wins_over_an_interruption_and_is_never_re_run() {
        let mut asked = job("a", 1, JobState::Running);
        asked.cancel_requested = true;
        asked.interrupt(Interruption::Shutdown);
        assert_eq!(asked.state, JobState::Cancelled);
        assert!(!asked.wants_rerun());
        let mut stopped = job("b", 1, JobState::Running);
        stopped.interrupt(Interruption::Crash);
        assert_eq!(stopped.state, JobState::Failed);
        assert!(stopped.wants_rerun());
        // A re-run: again after a shutdown, not after a crash.
        let mut rerun = job("r", 1, JobState::Running);
        rerun.rerun_of = Some("b".into());
        rerun.interrupt(Interruption::Shutdown);
        assert!(
            rerun.wants_rerun(),
            "a graceful restart does not use up the re-run"
        );
        rerun.interrupt(Interruption::Crash);
        assert!(
            !rerun.wants_rerun(),
            "a re-run a crash stopped is not re-run again"
        );
        let mut jobs: BTreeMap<String, JobStatus> = [stopped, job("c", 2, JobState::Succeeded)]
            .into_iter()
            .map(|j| (j.id.clone(), j))
            .collect();
        forget_oldest_finished(&mut jobs, 0);
        assert_eq!(
            jobs.keys().collect::<Vec<_>>(),
            ["b"],
            "a job waiting to be re-run stays"
        );
    }

    #[test]
    fn retention_forgets_the_oldest_finished_jobs_and_never_a_live_one() {
        let mut jobs: BTreeMap<String, JobStatus> = [
            job("a", 1, JobState::Succeeded),
            job("b", 2, JobState::Running),
            job("c", 3, JobState::Failed),
            job("d", 4, JobState::Cancelled),
            job("e", 0, JobState::Queued),
            job("f", 5, JobState::Succeeded),
        ]
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect();
        forget_oldest_finished(&mut jobs, 2);
        let left: Vec<&str> = jobs.keys().map(String::as_str).collect();
        assert_eq!(left, ["b", "d", "e", "f"]);
        forget_oldest_finished(&mut jobs, 2);
        assert_eq!(jobs.len(), 4, "within the limit nothing goes");
    }
}
