//! One job on the trainer thread: its data, its training, and publishing what it produced (a new adapter
//! generation, or a full fine-tuning checkpoint) into place atomically.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::adapters::peft;
use crate::adapters::reference::REFERENCE_FILE;
use crate::adapters::registry::{Sidecar, SIDECAR_FILE};
use crate::durable::write_atomically;
use crate::pressure::ServingPressure;
use crate::trainer::data::{validation_split, Example, SmallValidation, Split};
use crate::trainer::eval::evaluate;
use crate::trainer::full::write_checkpoint;
use crate::trainer::reference::drift_reference;
use crate::trainer::train::{
    predict, train_full, train_lora, Method, Progress, TrainError, TrainReport,
};

use super::select::select_data;
use super::status::{Interruption, JobRecord, JobState};
use super::{Shared, TrainerDeps};

/// A job's wall time and the part of it spent yielding to serving, from one starting point.
pub(super) struct JobClock<'a> {
    started: Instant,
    pressure: &'a ServingPressure,
    yielded_before: Duration,
}

impl<'a> JobClock<'a> {
    pub(super) fn start(pressure: &'a ServingPressure) -> Self {
        Self {
            started: Instant::now(),
            pressure,
            yielded_before: pressure.yielded(),
        }
    }

    /// Seconds since the start, and seconds of those spent yielding.
    pub(super) fn read(&self) -> (f64, f64) {
        (
            self.started.elapsed().as_secs_f64(),
            (self.pressure.yielded() - self.yielded_before).as_secs_f64(),
        )
    }
}

/// Lowers the calling thread's scheduling priority by `nice` (Linux: per thread), so training yields the
/// cores to serving whenever both want them.
pub(super) fn lower_priority(nice: i32) {
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

pub(super) fn run_job(shared: &Shared, deps: &TrainerDeps, id: &str) {
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
    // A cancel may have landed since the job was read: it is then cancelled, and stays so.
    let mut started = false;
    shared.update(id, |j| {
        if j.state == JobState::Queued {
            j.state = JobState::Running;
            started = true;
        }
    });
    if !started {
        return;
    }
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
        deps.metrics
            .training_jobs
            .with_label_values(&[job.task.as_str(), state.name()])
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
    let _ = deps
        .metrics
        .training_grad_norm
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

/// Whether training can continue from `adapter`: a head of the task's width pooling as the job asks, or any
/// way when the job leaves `pooling` unset (a pooler of the head's own, if any, trains on).
pub(super) fn warm_startable(
    adapter: &crate::model::adapter::Adapter,
    labels: usize,
    pooling: Option<crate::model::adapter::Pooling>,
) -> bool {
    adapter.head.as_ref().is_some_and(|h| {
        pooling.is_none_or(|p| h.pooling == p) && h.classifier.out_features == labels
    }) && adapter.deltas().next().is_some()
}

/// Writes into a fresh temporary directory beside `final_dir`, fsyncs, and renames it into place, so a
/// crash leaves either nothing or the whole directory.
pub(super) fn publish_dir(
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
    let published = write(&tmp).and_then(|()| std::fs::rename(&tmp, final_dir).map_err(io));
    if published.is_err() {
        // A full fine-tune's checkpoint is tens of MB: left behind, it keeps a full disk full.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    published?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Removes the temporary directories [`publish_dir`] leaves in `parent` when the process dies mid-write.
/// Only for a single process: on shared storage another replica may be writing one right now.
pub(super) fn sweep_unpublished(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed an unpublished result")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove an unpublished result")
                }
            }
        }
    }
}

/// The name of this run of `job` for what it publishes: its id, and for a run again after its worker died
/// (attempt 2 of the shared queue) the attempt too, since the first run may have published already, or may
/// still be running on a stalled worker, under the plain name.
/// Where a LoRA job publishes its generation, relative to the adapter root.
pub(super) fn published_path(job: &JobRecord) -> String {
    format!("trained/{}-{}", job.task, run_name(job))
}

fn run_name(job: &JobRecord) -> String {
    if job.attempts > 1 {
        format!("{}-a{}", job.id, job.attempts)
    } else {
        job.id.clone()
    }
}

/// What a finished job produced.
pub(super) enum Output {
    /// A registered adapter generation.
    Adapter(String),
    /// A full checkpoint directory.
    Checkpoint(String),
}

pub(super) fn train_and_publish(
    shared: &Shared,
    deps: &TrainerDeps,
    job: &JobRecord,
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
    let stable_snapshot = stable
        .as_ref()
        .and_then(|g| g.sidecar.metrics.get("feedback_snapshot_id"))
        .and_then(serde_json::Value::as_i64);
    let parent_snapshot = warm.as_ref().and(stable_snapshot);
    let data = select_data(deps, &task, config, parent_snapshot)?;
    // A warm start validates on the rows its parent never saw: the rest (replayed or not) only train, or the
    // validation would favour the parent's memory, in choosing the epoch and in comparing with the stable
    // generation.
    let (paired, known): (Vec<_>, Vec<_>) = data
        .examples
        .into_iter()
        .zip(data.serving_ids)
        .zip(data.fresh)
        .partition(|(_, fresh)| *fresh);
    let paired: Vec<(Example, Vec<u32>)> = paired.into_iter().map(|(pair, _)| pair).collect();
    let Split {
        mut train,
        val,
        skipped,
    } = validation_split(
        paired,
        |(e, _)| e.label,
        labels,
        config.val_fraction,
        config.min_val_per_label,
        config.seed,
    );
    let known_rows = known.len();
    train.extend(known.into_iter().map(|(pair, _)| pair));
    let validation_note = skipped.map(|s| {
        SmallValidation {
            total: s.total + known_rows,
            ..s
        }
        .describe(&task.labels, config.epochs())
    });
    let (train, train_serving): (Vec<Example>, Vec<Vec<u32>>) = train.into_iter().unzip();
    let (val, val_serving): (Vec<Example>, Vec<Vec<u32>>) = val.into_iter().unzip();
    let cpu = model.cpu().ok_or_else(|| {
        TrainError::Invalid("training runs on the CPU path only for now".to_owned())
    })?;
    let truth: Vec<usize> = val.iter().map(|e| e.label).collect();
    // The stable generation is scored only where it cannot have trained on the validation rows: a warm
    // start from it validates on rows newer than its data; a cold start, while it was trained here on
    // feedback, validates on rows it may have learned, which would flatter it.
    let stable_trained_on_val = stable_snapshot.is_some() && parent_snapshot != stable_snapshot;
    let stable_val = match stable.as_ref().and_then(|g| g.adapter.clone()) {
        Some(a) if !val.is_empty() && !stable_trained_on_val => {
            Some(evaluate(&predict(cpu, &a, &val)?, &truth, labels))
        }
        _ => None,
    };
    if let Some(note) = &validation_note {
        tracing::info!(job = %job.id, "{note}");
    }
    shared.update(&job.id, |j| {
        j.stable_val = stable_val.clone();
        j.validation_note = validation_note.clone();
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
        if let Some(norm) = p.grad_norm {
            deps.metrics
                .training_grad_norm
                .with_label_values(&[task.name.as_str()])
                .set(norm);
        }
        shared.update(&job.id, |j| {
            j.step = p.step;
            j.total_steps = p.total_steps;
            j.epoch = p.epoch;
            j.train_loss = Some(p.train_loss);
            j.grad_norm = p.grad_norm;
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
            j.val = run.val.clone();
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
            "validation_note": validation_note,
            "new_examples": data.new_rows,
            "replayed_examples": data.replayed_rows,
            "superseded_examples": data.superseded_rows,
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
            let name = format!("{}-{}", task.name, run_name(job));
            let final_dir = deps.models_dir.join(&name);
            let meta = record(&run);
            publish_dir(&final_dir, &run_name(job), |tmp| {
                write_checkpoint(tmp, &weights, &task.labels, &deps.model_dir)
                    .map_err(|e| invalid(&e))?;
                let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| invalid(&e))?;
                write_atomically(&tmp.join(SIDECAR_FILE), &bytes).map_err(|e| invalid(&e))
            })?;
            tracing::info!(job = %job.id, dir = %final_dir.display(), val_macro_f1 = run.val.as_ref().map(|v| v.macro_f1), "full fine-tuning wrote a checkpoint");
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
            let name = published_path(job);
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
            publish_dir(&deps.registry.root().join(&name), &run_name(job), |tmp| {
                peft::write_dir(tmp, &adapter, alpha, &model.name).map_err(|e| invalid(&e))?;
                if let Some(bytes) = &reference {
                    write_atomically(&tmp.join(REFERENCE_FILE), bytes).map_err(|e| invalid(&e))?;
                }
                let bytes = serde_json::to_vec_pretty(&sidecar).map_err(|e| invalid(&e))?;
                write_atomically(&tmp.join(SIDECAR_FILE), &bytes).map_err(|e| invalid(&e))
            })?;
            let (generation, _) = deps.registry.load(&name, &task.name, None).map_err(|e| {
                // Refused (the adapter limit): nothing names the directory, which would only fill
                // the disk. After another failure it stays, for `POST /v1/adapters` to load.
                if matches!(e, crate::adapters::RegistryError::Conflict(_)) {
                    let _ = std::fs::remove_dir_all(deps.registry.root().join(&name));
                }
                TrainError::Invalid(e.to_string())
            })?;
            tracing::info!(job = %job.id, adapter = %generation.id, val_macro_f1 = run.val.as_ref().map(|v| v.macro_f1), "training published a generation");
            Ok(Output::Adapter(generation.id.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{publish_dir, sweep_unpublished, warm_startable};
    use crate::model::adapter::{Adapter, Dense, Head, LoraDelta, Pooling, Target};
    use crate::trainer::train::TrainError;

    #[test]
    fn a_failed_publish_leaves_nothing_and_a_crashed_ones_leftovers_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let fin = root.path().join("trained/spam-job-1");
        let failed = publish_dir(&fin, "job-1", |tmp| {
            std::fs::write(tmp.join("adapter_model.safetensors"), vec![0u8; 1 << 20]).unwrap();
            Err(TrainError::Invalid("disk full".to_owned()))
        });
        assert!(failed.is_err());
        let left: Vec<_> = std::fs::read_dir(root.path().join("trained"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        publish_dir(&fin, "job-2", |tmp| {
            std::fs::write(tmp.join("adapter_config.json"), b"{}")
                .map_err(|e| TrainError::Invalid(e.to_string()))
        })
        .unwrap();
        // What a crash mid-write leaves: swept; what was published: kept.
        std::fs::create_dir_all(root.path().join("trained/.tmp-job-3/x")).unwrap();
        sweep_unpublished(&root.path().join("trained"));
        let mut left: Vec<String> = std::fs::read_dir(root.path().join("trained"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["spam-job-1"]);
    }

    #[test]
    fn a_job_without_a_pooling_of_its_own_warm_starts_from_either_head() {
        let mut adapter = Adapter::empty(1);
        let delta = LoraDelta {
            a: vec![0.1; 2 * 4],
            b: vec![0.1; 4 * 2],
            rank: 2,
            scale: 1.0,
        };
        adapter.set(0, Target::Query, delta).unwrap();
        let head = |pooling| Head {
            pooling,
            pooler: None,
            classifier: Dense {
                weight: vec![0.0; 2 * 4],
                bias: vec![0.0; 2],
                in_features: 4,
                out_features: 2,
            },
        };
        adapter.head = Some(head(Pooling::Cls));
        assert!(warm_startable(&adapter, 2, None));
        assert!(warm_startable(&adapter, 2, Some(Pooling::Cls)));
        assert!(!warm_startable(&adapter, 2, Some(Pooling::Mean)));
        assert!(!warm_startable(&adapter, 3, None), "another label count");
        adapter.head = Some(head(Pooling::Mean));
        assert!(warm_startable(&adapter, 2, None));
        assert!(!warm_startable(&adapter, 2, Some(Pooling::Cls)));
    }
}
