//! The application built from one [`Config`]: the model loaded, the stores opened, and the model, trainer,
//! drift and autopilot threads started. [`crate::http::serve`] runs [`load`] on a loader thread while its
//! listener answers 503; in-process tests run [`assemble`] with an encoder of their own.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::adapters::index_store::{FileIndex, IndexStore, PostgresIndex};
use crate::adapters::objects::Objects;
use crate::adapters::registry::INDEX_FILE;
use crate::adapters::Registry;
use crate::autopilot::Autopilot;
use crate::config::{Config, StoreBackend};
use crate::drift::DriftMonitor;
use crate::feedback::postgres::PostgresStore;
use crate::feedback::recent::RecentRequests;
use crate::feedback::sqlite::SqliteStore;
use crate::feedback::FeedbackStore;
use crate::infer::Infer;
use crate::metrics::Metrics;
use crate::model::{LoadOptions, Model, ModelError, ServingModel};
use crate::postgres::election::Election;
use crate::pressure::ServingPressure;
use crate::rollout::store::{FileStore, PostgresStore as PostgresRollouts, RolloutStore};
use crate::rollout::{Rollouts, StartRequest};
use crate::serving::Services;
use crate::trainer::jobs::queue::SharedQueue;
use crate::trainer::jobs::{Jobs, TrainerDeps};
use crate::trainer::train::TrainConfig;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be bound, a thread could not start, or the server failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// The model could not be loaded.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The feedback store could not be opened.
    #[error(transparent)]
    Feedback(#[from] crate::feedback::FeedbackError),
    /// PostgreSQL could not be reached or migrated.
    #[error("store: {0}")]
    Store(#[from] crate::postgres::PgError),
    /// The adapter registry could not be opened.
    #[error("registry: {0}")]
    Registry(#[from] crate::adapters::RegistryError),
    /// The shared rollouts could not be read.
    #[error("rollouts: {0}")]
    Rollouts(#[from] crate::rollout::RolloutError),
    /// Another process holds the data directory.
    #[error(transparent)]
    DataDir(#[from] crate::dirlock::DirLockError),
    /// A setting is invalid in a way the configuration layer cannot check.
    #[error("config: {0}")]
    Config(String),
}

/// What can be checked before the listener binds: the model directory holds its files, both devices exist
/// in this build, and the automatic jobs' hyperparameters parse. Returns those hyperparameters.
pub fn preflight(config: &Config) -> Result<TrainConfig, ServeError> {
    crate::model::parse_device(&config.model.device)?;
    crate::model::parse_device(&config.trainer.device)?;
    for file in [
        crate::model::CONFIG_FILE,
        crate::model::TOKENIZER_FILE,
        crate::model::WEIGHTS_FILE,
    ] {
        if !config.model.dir.join(file).is_file() {
            return Err(ModelError::MissingFile {
                dir: config.model.dir.clone(),
                file,
            }
            .into());
        }
    }
    let auto = TrainConfig::from_table(&config.trainer.auto_params).and_then(|auto| {
        auto.check_fits(config.adapters.max_rank, None)
            .map(|()| auto)
    });
    auto.map_err(|e| ServeError::Config(format!("[trainer] auto_params: {e}")))
}

/// Loads the model `config` names and assembles the services around it.
pub fn load(config: &Config, metrics: Metrics) -> Result<Services, ServeError> {
    let started = Instant::now();
    let model = Model::load(
        &config.model.dir,
        &LoadOptions {
            max_length: config.model.max_length,
            device: crate::model::parse_device(&config.model.device)?,
            precision: config.model.precision,
            int8_projections: config.model.int8_projections.clone(),
        },
    )?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        name = %model.name,
        dtype = model.serving_dtype(),
        kernel = model.serving_kernel(),
        "model loaded"
    );
    let serving = model.serving();
    assemble(config, metrics, Arc::new(model), serving)
}

/// The services around `model`: requests run on `serving` (the model's own encoder in production), the
/// trainer on `model`.
pub fn assemble(
    config: &Config,
    metrics: Metrics,
    model: Arc<Model>,
    serving: ServingModel,
) -> Result<Services, ServeError> {
    let train_device = crate::model::parse_device(&config.trainer.device)?;
    metrics
        .model_info
        .with_label_values(&[serving.encoder.dtype(), serving.encoder.kernel()])
        .set(1);
    // With PostgreSQL, one pool serves the feedback store and the registry's index.
    let shared = match config.store.backend {
        StoreBackend::Sqlite => None,
        StoreBackend::Postgres => Some(crate::postgres::connect(&config.store)?),
    };
    let index: Box<dyn IndexStore> = match &shared {
        None => Box::new(FileIndex::new(config.data.dir.join(INDEX_FILE))),
        Some(pool) => Box::new(PostgresIndex::new(pool.clone())),
    };
    let objects = Objects::configured(&config.store.objects_url)?;
    let registry = Registry::open_in(
        &config.data.adapters(),
        index,
        objects,
        config.adapters.clone(),
        model.config.clone(),
        model.bert.pooler.is_some(),
    )?;
    let pressure = ServingPressure::new();
    let infer = Infer::start(
        serving.clone(),
        &config.batching,
        metrics.clone(),
        pressure.clone(),
    )?;
    let feedback: Arc<dyn FeedbackStore> = match &shared {
        None => Arc::new(SqliteStore::open(&config.data.dir.join("feedback.sqlite"))?),
        Some(pool) => Arc::new(PostgresStore::new(pool.clone())),
    };
    let recent = RecentRequests::new(
        config.feedback.recent_requests,
        config.feedback.recent_bytes,
    );
    let registry = Arc::new(registry);
    let deps = TrainerDeps {
        bert: Arc::new(model.bert.to_device(&train_device)?),
        model,
        registry: registry.clone(),
        feedback: feedback.clone(),
        threads: config.trainer.threads,
        nice: config.trainer.nice,
        yield_to: (
            pressure.clone(),
            Duration::from_millis(config.trainer.yield_to_serving_ms),
        ),
        model_dir: config.model.dir.clone(),
        models_dir: config.data.dir.join("models"),
        metrics: metrics.clone(),
        reference_size: if config.drift.enabled {
            config.drift.reference_size
        } else {
            0
        },
    };
    let queue = shared.as_ref().map(|pool| {
        SharedQueue::new(
            pool.clone(),
            worker_name(),
            Duration::from_secs(config.trainer.lease_secs),
        )
    });
    let jobs = Arc::new(Jobs::start(&config.data.dir, deps, &config.trainer, queue)?);
    let drift = Arc::new(DriftMonitor::new(config.drift.clone(), metrics.clone()));
    drift.start_embedder(serving, pressure)?;
    let rollout_store: Box<dyn RolloutStore> = match &shared {
        None => Box::new(FileStore::new(config.data.dir.join("rollouts.json"))),
        // Unique per start: a restarted container keeps its host name and process id, and must not
        // overwrite the evidence its previous run stored.
        Some(pool) => Box::new(PostgresRollouts::new(
            pool.clone(),
            format!("{}/{}", worker_name(), uuid::Uuid::new_v4().simple()),
        )),
    };
    let rollouts = Arc::new(Rollouts::open_in(
        rollout_store,
        registry.clone(),
        metrics.clone(),
        config.rollouts.clone(),
    )?);
    if shared.is_some() {
        follow_shared_state(
            &registry,
            &rollouts,
            Duration::from_millis(config.store.sync_interval_ms),
        )?;
    }
    if config.rollouts.auto_canary {
        let canaries = rollouts.clone();
        jobs.on_published(Arc::new(move |task, generation| {
            let request = StartRequest {
                task: task.to_owned(),
                candidate: generation.to_owned(),
                ..StartRequest::default()
            };
            match canaries.start(request, "trainer", true) {
                Ok(r) => {
                    tracing::info!(task, rollout = %r.id, "canary started for the new generation")
                }
                // The task's first generation is its stable one already: nothing to compare.
                Err(e) => tracing::info!(task, generation, reason = %e, "no canary started"),
            }
        }));
    }
    if config.trainer.rerun_interrupted && config.trainer.enabled {
        jobs.rerun_interrupted();
    }
    Ok(Services {
        infer,
        registry,
        feedback,
        recent: Arc::new(recent),
        jobs,
        rollouts,
        drift,
        watch_drift: config.drift.enabled,
        loaded_at: crate::clock::unix_seconds(),
        election: shared.map(|pool| Arc::new(Election::new(pool, AUTOPILOT_LEADER))),
    })
}

/// This process's name on the jobs it claims from a shared queue: the host's name (a pod's, on Kubernetes)
/// and the process id.
fn worker_name() -> String {
    format!("{}/{}", crate::dirlock::host_name(), std::process::id())
}

/// Key of the advisory lock whose holder's autopilot acts ("autopilot" in ASCII, truncated).
const AUTOPILOT_LEADER: i64 = 0x6175_746f_7069_6c6f;

/// Starts the threads that take in the registry and rollout changes other replicas make, as they are
/// announced and every `every` anyway, and exchange rollout evidence every `every`, until the registry or
/// the rollouts are dropped. Two threads: the registry's may wait on the object store for a new generation's
/// files, and the rollouts must not wait with it.
fn follow_shared_state(
    registry: &Arc<Registry>,
    rollouts: &Arc<Rollouts>,
    every: Duration,
) -> std::io::Result<()> {
    // Set by the registry's thread when a change is announced; the rollouts' thread waits on it.
    let announced = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (registry, rollouts) = (Arc::downgrade(registry), Arc::downgrade(rollouts));
    let wake = announced.clone();
    std::thread::Builder::new()
        .name("flywheel-registry-sync".to_owned())
        .spawn(move || loop {
            let Some(registry) = registry.upgrade() else {
                return;
            };
            registry.wait_for_change(every);
            *wake.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            wake.1.notify_one();
            // PostgreSQL is unreachable: serve what is loaded and look again next time.
            if let Err(e) = registry.sync() {
                tracing::warn!(error = %e, "cannot read the shared registry");
            }
        })?;
    std::thread::Builder::new()
        .name("flywheel-rollout-sync".to_owned())
        .spawn(move || {
            let mut exchanged = Instant::now();
            loop {
                {
                    let (flag, signal) = &*announced;
                    let flag = flag.lock().unwrap_or_else(|e| e.into_inner());
                    let (mut flag, _) = signal
                        .wait_timeout_while(flag, every, |set| !*set)
                        .unwrap_or_else(|e| e.into_inner());
                    *flag = false;
                }
                let Some(rollouts) = rollouts.upgrade() else {
                    return;
                };
                if let Err(e) = rollouts.sync() {
                    tracing::warn!(error = %e, "cannot read the shared rollouts");
                }
                if exchanged.elapsed() >= every {
                    exchanged = Instant::now();
                    if let Err(e) = rollouts.exchange() {
                        tracing::warn!(error = %e, "cannot exchange rollout evidence");
                    }
                }
            }
        })
        .map(drop)
}

/// Starts the autopilot over `services` with `job` as its jobs' hyperparameters; it stops when `stop` is
/// set.
pub fn start_autopilot(
    config: &Config,
    services: &Services,
    job: TrainConfig,
    metrics: &Metrics,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    Autopilot {
        registry: services.registry.clone(),
        feedback: services.feedback.clone(),
        jobs: services.jobs.clone(),
        rollouts: services.rollouts.clone(),
        drift: services.drift.clone(),
        policy: config.trainer.clone(),
        job,
        every: Duration::from_millis(config.rollouts.evaluate_every_ms),
        election: services.election.clone(),
        metrics: metrics.clone(),
    }
    .spawn(stop)
    .map(drop)
}
