//! A job's record: its lifecycle, progress and result as the trainer keeps it and `jobs.json` stores it
//! (the HTTP layer shows it in a body of its own), what a restart does to it, and the stored list's
//! reading and retention.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::clock::unix_seconds;
use crate::trainer::eval::Evaluation;
use crate::trainer::train::{Method, TrainConfig};

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

impl JobState {
    /// The state's name, as the API and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job, in memory and in `jobs.json`. Fields added later carry `#[serde(default)]` so older lists read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
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
    /// Mean gradient norm before clipping over the current epoch's steps; `None` with clipping off.
    #[serde(default)]
    pub grad_norm: Option<f64>,
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
    /// Why the job trained without a validation split (the small-data guard), when it did.
    #[serde(default)]
    pub validation_note: Option<String>,
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
    /// The process that claimed it from the shared queue (`[store] backend = "postgres"`).
    #[serde(default)]
    pub worker: Option<String>,
    /// How many times a worker claimed it from the shared queue: 2 after a re-run for a worker that died.
    #[serde(default)]
    pub attempts: u32,
}

impl JobRecord {
    /// A new job of `task`, queued now under a fresh id.
    pub(crate) fn queued(task: &str, config: TrainConfig) -> Self {
        Self {
            id: format!("job-{}", uuid::Uuid::new_v4().simple()),
            task: task.to_owned(),
            method: config.method,
            state: JobState::Queued,
            step: 0,
            total_steps: 0,
            epoch: 0,
            train_loss: None,
            grad_norm: None,
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
            validation_note: None,
            error: None,
            created_at: unix_seconds(),
            config,
            interrupted: false,
            crashed: false,
            cancel_requested: false,
            rerun_as: None,
            rerun_of: None,
            worker: None,
            attempts: 0,
        }
    }

    /// The same job queued again from the start: its id, task, configuration and creation time, nothing
    /// of a run.
    pub(super) fn requeued(&self) -> Self {
        Self {
            id: self.id.clone(),
            created_at: self.created_at,
            ..Self::queued(&self.task, self.config.clone())
        }
    }

    /// Marks the job stopped because the server stopped under it: failed and interrupted, or cancelled
    /// when a caller had asked for that.
    pub(crate) fn interrupt(&mut self, by: Interruption) {
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

    /// Records that `rerun`, a new job, repeats this interrupted one.
    pub(crate) fn link_rerun(&mut self, rerun: &str) {
        self.error = Some(format!(
            "{}; re-run as {rerun}",
            self.error.as_deref().unwrap_or("interrupted")
        ));
        self.rerun_as = Some(rerun.to_owned());
    }

    /// Whether the next start should queue it again: interrupted, not cancelled, not yet re-run, and not a
    /// re-run that a crash stopped (a job that keeps killing the server runs twice, not forever; one that
    /// only meets graceful restarts keeps being re-run).
    pub(crate) fn wants_rerun(&self) -> bool {
        self.interrupted
            && !self.cancel_requested
            && self.rerun_as.is_none()
            && !(self.crashed && self.rerun_of.is_some())
    }
}

/// What stopped a job under it.
#[derive(Clone, Copy)]
pub(crate) enum Interruption {
    /// A graceful shutdown (SIGTERM, SIGINT).
    Shutdown,
    /// A crash or kill: the next start found the job still live.
    Crash,
}

/// The saved job list; empty when there is none. A list this build cannot parse (another version's, or
/// damaged) is set aside, not overwritten; one that cannot be read at all (permissions, I/O) is an error,
/// so a start never replaces history it could not see.
pub(super) fn read_job_list(path: &Path) -> std::io::Result<Vec<JobRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        }
    };
    Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        crate::durable::set_aside(path, &e);
        Vec::new()
    }))
}

/// Removes the oldest finished (succeeded, failed or cancelled) jobs until at most `keep` remain; jobs still
/// waiting to be re-run stay.
pub(super) fn forget_oldest_finished(jobs: &mut BTreeMap<String, JobRecord>, keep: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, created_at: u64, state: JobState) -> JobRecord {
        JobRecord {
            id: id.to_owned(),
            state,
            created_at,
            ..JobRecord::queued("spam", TrainConfig::default())
        }
    }

    #[test]
    fn an_unreadable_job_list_is_moved_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.json");
        std::fs::write(&path, b"[{\"id\": \"from another version\"}]").unwrap();
        assert!(read_job_list(&path).unwrap().is_empty());
        assert!(!path.exists());
        let kept: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(kept.len(), 1, "the old list is kept beside");
        assert!(
            read_job_list(&path).unwrap().is_empty(),
            "no list: nothing to read"
        );
        // One that cannot be read at all (here a directory) is an error: starting empty would overwrite it.
        std::fs::create_dir(&path).unwrap();
        assert!(read_job_list(&path).is_err());
        assert!(path.is_dir());
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
        let mut jobs: BTreeMap<String, JobRecord> = [stopped, job("c", 2, JobState::Succeeded)]
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
        let mut jobs: BTreeMap<String, JobRecord> = [
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
