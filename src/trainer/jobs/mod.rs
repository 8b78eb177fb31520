//! Training jobs: a queue served by one trainer thread (so one job runs at a time, and serving keeps the
//! cores its thread share leaves), job status for the API, cancellation, persistence of finished jobs, and
//! publishing the result as a new adapter generation.
//!
//! The record of a job is `status.rs`, one job's run `run.rs`, and the rows it learns from `select.rs`.
//! With several replicas on PostgreSQL the queue is the shared table of `queue.rs`: any replica queues, a
//! training replica's trainer thread claims, and the jobs this process holds are the only ones it keeps in
//! memory, written to the table at every state change and heartbeat.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::train::{TrainConfig, TrainError};
use crate::adapters::registry::Registry;
use crate::config::TrainerConfig;
use crate::durable::write_atomically;
use crate::feedback::FeedbackStore;
use crate::model::{Bert, Model};
use crate::pressure::ServingPressure;
use crate::supervise::Alive;

pub mod queue;
mod run;
mod select;
mod status;

use queue::SharedQueue;
use run::{lower_priority, run_job};
pub(crate) use status::Interruption;
use status::{forget_oldest_finished, read_job_list};
pub use status::{JobRecord, JobState};

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

/// Called on the trainer thread with the task and generation id after a LoRA job published.
pub type PublishHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

struct Shared {
    jobs: Mutex<BTreeMap<String, JobRecord>>,
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
    /// The shared queue, with several replicas on PostgreSQL; `None`: this process's own `jobs.json`.
    queue: Option<Arc<SharedQueue>>,
}

/// The job queue handle.
pub struct Jobs {
    shared: Arc<Shared>,
    /// Where LoRA jobs publish: one is refused while it is full.
    registry: Arc<Registry>,
    tx: Mutex<mpsc::Sender<String>>,
    max_queued: usize,
    /// `[trainer] enabled`: false refuses every job.
    enabled: bool,
    alive: Alive,
}

impl Shared {
    fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) {
        let mut jobs = self.jobs.lock().expect("jobs lock poisoned; this is a bug");
        if let Some(job) = jobs.get_mut(id) {
            f(job);
        }
    }

    /// Forgets the oldest finished jobs beyond the retention limit, then writes the list (with a shared
    /// queue: writes the jobs this process holds to it). Returns whether every write went through.
    fn persist(&self) -> bool {
        let _writing = self
            .persisting
            .lock()
            .expect("persist lock poisoned; this is a bug");
        self.persist_holding_the_lock()
    }

    /// [`Self::persist`] for a caller that holds `persisting` already.
    fn persist_holding_the_lock(&self) -> bool {
        if let Some(queue) = &self.queue {
            return self.persist_shared(queue);
        }
        let jobs = {
            let mut jobs = self.jobs.lock().expect("jobs lock poisoned; this is a bug");
            forget_oldest_finished(&mut jobs, self.keep_finished);
            jobs.values().cloned().collect::<Vec<_>>()
        };
        match serde_json::to_vec_pretty(&jobs) {
            Ok(bytes) => match write_atomically(&self.path, &bytes) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not persist the job list");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not serialise the job list");
                false
            }
        }
    }

    /// Writes each job this process holds to the shared queue (extending its lease), stops those whose
    /// cancellation was asked for elsewhere, and puts back those a shutdown interrupted. Returns whether
    /// every write went through.
    fn persist_shared(&self, queue: &SharedQueue) -> bool {
        let held: Vec<JobRecord> = self
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .values()
            .cloned()
            .collect();
        let shutting_down = self.shutting_down.load(Ordering::Relaxed);
        let mut all = true;
        for job in held {
            let written = if shutting_down && job.interrupted && !job.crashed {
                queue.release(&job).map(|()| false)
            } else {
                queue.heartbeat(&job)
            };
            match written {
                Ok(stop) => {
                    if stop {
                        if let Some(flag) = self
                            .cancel
                            .lock()
                            .expect("cancel lock poisoned; this is a bug")
                            .get(&job.id)
                        {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
                // Kept in memory: the next heartbeat writes it again.
                Err(e) => {
                    all = false;
                    tracing::warn!(job = %job.id, error = %e, "cannot write the job to the shared queue");
                }
            }
        }
        all
    }
}

impl Jobs {
    /// Restores the job list from `data_dir/jobs.json` (jobs a restart interrupted are marked failed), or
    /// with a shared `queue` starts from it, and starts the trainer thread.
    /// `limits` gives the queue's length and how many finished jobs are remembered.
    pub fn start(
        data_dir: &Path,
        deps: TrainerDeps,
        limits: &TrainerConfig,
        queue: Option<SharedQueue>,
    ) -> std::io::Result<Self> {
        let path = data_dir.join("jobs.json");
        let registry = deps.registry.clone();
        let mut jobs: BTreeMap<String, JobRecord> = match queue {
            Some(_) => BTreeMap::new(),
            None => read_job_list(&path)?
                .into_iter()
                .map(|j| (j.id.clone(), j))
                .collect(),
        };
        // A job whose generation the registry already holds finished its work: the crash came between the
        // publish and the write of its state. Recorded as succeeded, it is not trained and published again.
        let published: BTreeMap<String, String> = deps
            .registry
            .list()
            .into_iter()
            .map(|(g, _)| (g.path.clone(), g.id.clone()))
            .collect();
        for job in jobs.values_mut() {
            if job.state == JobState::Running && !job.cancel_requested {
                if let Some(id) = published.get(&run::published_path(job)) {
                    tracing::info!(job = %job.id, generation = %id, "a job published before a crash is recorded as succeeded");
                    job.state = JobState::Succeeded;
                    job.adapter = Some(id.clone());
                    continue;
                }
            }
            if matches!(job.state, JobState::Queued | JobState::Running) {
                job.interrupt(Interruption::Crash);
            }
        }
        if queue.is_none() {
            // One process (the data directory's lock says so): what a crash left half-written is nobody's.
            run::sweep_unpublished(&deps.models_dir);
            run::sweep_unpublished(&deps.registry.root().join("trained"));
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
            queue: queue.map(Arc::new),
        });
        shared.persist();
        let claims = limits.enabled.then(|| shared.queue.clone()).flatten();
        if let Some(queue) = &claims {
            heartbeat(&shared, queue.lease() / 3)?;
        }
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
                match claims {
                    Some(queue) => claim_and_run(&worker, &deps, &queue, &pool),
                    None => {
                        for id in rx {
                            pool.install(|| run_job(&worker, &deps, &id));
                        }
                    }
                }
            })?;
        Ok(Self {
            shared,
            registry,
            tx: Mutex::new(tx),
            max_queued: limits.max_queued_jobs,
            enabled: limits.enabled,
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
        // A shared queue re-runs a dead worker's job itself, when its lease runs out.
        if self.shared.queue.is_some() {
            return;
        }
        let mut waiting: Vec<JobRecord> = self
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

    /// Whether jobs are queued in PostgreSQL, for whichever process trains.
    pub fn shared(&self) -> bool {
        self.shared.queue.is_some()
    }

    /// Whether `task` has a job queued or running (also when the shared queue cannot be read: then no job
    /// should be started for it).
    pub fn busy(&self, task: &str) -> bool {
        if let Some(queue) = &self.shared.queue {
            return queue.busy(task).unwrap_or(true);
        }
        self.shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .values()
            .any(|j| j.task == task && matches!(j.state, JobState::Queued | JobState::Running))
    }

    /// Queues a job for `task`.
    pub fn submit(&self, task: &str, config: TrainConfig) -> Result<JobRecord, TrainError> {
        self.queue(task, config, None)
    }

    /// Refuses a LoRA job while the registry is full: at once, rather than after the job's compute, when its
    /// publish would fail.
    fn check_room(&self, config: &TrainConfig) -> Result<(), TrainError> {
        if config.method == super::train::Method::Lora && self.registry.is_full() {
            return Err(TrainError::Conflict(
                "the adapter limit ([adapters] max_adapters) is reached: a new generation could not be \
                 published; delete one (DELETE /v1/adapters/{id}) first"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Queues a job for `task`, a re-run of `rerun_of` when given.
    fn queue(
        &self,
        task: &str,
        config: TrainConfig,
        rerun_of: Option<String>,
    ) -> Result<JobRecord, TrainError> {
        config.validate()?;
        if let Some(queue) = &self.shared.queue {
            // Any replica queues; the training replicas claim.
            if self.shared.shutting_down.load(Ordering::Relaxed) {
                return Err(TrainError::ShuttingDown);
            }
            self.check_room(&config)?;
            let status = JobRecord::queued(task, config);
            queue.insert(&status, self.max_queued)?;
            return Ok(status);
        }
        if !self.enabled {
            return Err(TrainError::Disabled);
        }
        self.check_room(&config)?;
        // Held from the count to the write (and the undoing of a failed one): two submissions cannot both
        // take the queue's last place, and no other write may put the job on disk in between, or a job
        // answered 503 could run after a crash.
        let _writing = self
            .shared
            .persisting
            .lock()
            .expect("persist lock poisoned; this is a bug");
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
        let status = JobRecord {
            rerun_of: rerun_of.clone(),
            ..JobRecord::queued(task, config)
        };
        // A re-run and its link from the job it repeats land in one write, so a crash between them cannot
        // make the next start re-run the job again.
        let unlinked = {
            let mut jobs = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug");
            let unlinked = rerun_of.and_then(|id| jobs.get_mut(&id)).map(|old| {
                let before = old.clone();
                old.link_rerun(&status.id);
                before
            });
            jobs.insert(status.id.clone(), status.clone());
            unlinked
        };
        self.shared
            .cancel
            .lock()
            .expect("cancel lock poisoned; this is a bug")
            .insert(status.id.clone(), Arc::new(AtomicBool::new(false)));
        if !self.shared.persist_holding_the_lock() {
            // Not acknowledged, so not kept: a job answered 202 must survive a crash.
            let mut jobs = self
                .shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug");
            jobs.remove(&status.id);
            if let Some(before) = unlinked {
                jobs.insert(before.id.clone(), before);
            }
            drop(jobs);
            self.shared
                .cancel
                .lock()
                .expect("cancel lock poisoned; this is a bug")
                .remove(&status.id);
            return Err(TrainError::Storage(
                "the job list could not be written (the reason is logged); the job was not queued"
                    .to_owned(),
            ));
        }
        self.tx
            .lock()
            .expect("job sender lock poisoned; this is a bug")
            .send(status.id.clone())
            .map_err(|_| TrainError::Invalid("the trainer has stopped".to_owned()))?;
        Ok(status)
    }

    /// A job's status.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, TrainError> {
        let held = self
            .shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug")
            .get(id)
            .cloned();
        if let Some(queue) = &self.shared.queue {
            // This process's own record of a job it runs is fresher than the last heartbeat's.
            return match held {
                Some(job) => Ok(Some(job)),
                None => queue.get(id),
            };
        }
        Ok(held)
    }

    /// Every job, optionally of one task, newest first.
    pub fn list(&self, task: Option<&str>) -> Result<Vec<JobRecord>, TrainError> {
        if let Some(queue) = &self.shared.queue {
            return queue.list(task);
        }
        let jobs = self
            .shared
            .jobs
            .lock()
            .expect("jobs lock poisoned; this is a bug");
        let mut out: Vec<JobRecord> = jobs
            .values()
            .filter(|j| task.is_none_or(|t| j.task == t))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
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
    pub fn cancel(&self, id: &str) -> Result<Option<JobRecord>, TrainError> {
        if let Some(queue) = &self.shared.queue {
            // The worker that runs it reads the request at its next heartbeat.
            return queue.cancel(id);
        }
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
        if !self.shared.persist() {
            return Err(TrainError::Storage(
                "the cancellation could not be written (the reason is logged): it holds until the server \
                 stops; retry to record it"
                    .to_owned(),
            ));
        }
        self.get(id)
    }
}

/// The trainer thread's loop with a shared queue: claims the oldest waiting job, runs it, and waits for the
/// next to be announced (or looks again every second), until the server stops.
fn claim_and_run(
    shared: &Shared,
    deps: &TrainerDeps,
    queue: &SharedQueue,
    pool: &rayon::ThreadPool,
) {
    let every = Duration::from_secs(1);
    while !shared.shutting_down.load(Ordering::Relaxed) {
        match queue.claim() {
            Ok(Some(job)) if shared.shutting_down.load(Ordering::Relaxed) => {
                // Claimed as the server began to stop: back to the queue, for another worker.
                if let Err(e) = queue.release(&job) {
                    tracing::warn!(job = %job.id, error = %e, "cannot put a job back in the shared queue");
                }
            }
            Ok(Some(job)) => {
                let id = job.id.clone();
                tracing::info!(job = %id, task = %job.task, attempt = job.attempts, "claimed a job");
                let cancel = Arc::new(AtomicBool::new(false));
                shared
                    .cancel
                    .lock()
                    .expect("cancel lock poisoned; this is a bug")
                    .insert(id.clone(), cancel.clone());
                // A shutdown that began since the check above set the flags it found: this one too.
                if shared.shutting_down.load(Ordering::Relaxed) {
                    cancel.store(true, Ordering::Relaxed);
                }
                shared
                    .jobs
                    .lock()
                    .expect("jobs lock poisoned; this is a bug")
                    .insert(id.clone(), job);
                pool.install(|| run_job(shared, deps, &id));
                // The job ends this worker's once its last state is in the table. PostgreSQL may be down
                // for a while; past the lease another worker may claim it and run it again, publishing
                // under a name of its own (`run_name`).
                while !shared.persist() && !shared.shutting_down.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                }
                shared
                    .jobs
                    .lock()
                    .expect("jobs lock poisoned; this is a bug")
                    .remove(&id);
                shared
                    .cancel
                    .lock()
                    .expect("cancel lock poisoned; this is a bug")
                    .remove(&id);
                if let Err(e) = queue.forget_finished(shared.keep_finished) {
                    tracing::warn!(error = %e, "cannot forget old jobs in the shared queue");
                }
            }
            Ok(None) => queue.wait(every),
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim from the shared job queue");
                std::thread::sleep(every);
            }
        }
    }
}

/// Starts the thread that writes the progress of the jobs this process holds to the shared queue every
/// `every`, extending their leases, until the queue is dropped.
fn heartbeat(shared: &Arc<Shared>, every: Duration) -> std::io::Result<()> {
    let shared = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("flywheel-job-heartbeat".to_owned())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let holds = !shared
                .jobs
                .lock()
                .expect("jobs lock poisoned; this is a bug")
                .is_empty();
            if holds {
                shared.persist();
            }
        })
        .map(drop)
}
