//! `flywheel migrate`: moves a single process's state into PostgreSQL, so an installation that outgrew one
//! machine goes on as several replicas (docs/SCALING.md) with what it learned: the feedback (SQLite), the
//! registry's tasks, generations and aliases, the jobs and the finished rollouts (JSON files).
//!
//! Nothing is written to the database until every generation's files are where the replicas will look for
//! them (copied into the shared adapter directory, or stored in the object store) and load there; then
//! everything goes in one transaction, into a database that must hold no Flywheel state yet. A failure at any
//! point leaves the database as it was, and the single process's files are only read.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::adapters::index_store::{self, FileIndex, Index, IndexStore};
use crate::adapters::objects::Objects;
use crate::adapters::registry::{State, INDEX_FILE};
use crate::adapters::{Registry, RegistryError};
use crate::config::{Config, StoreBackend};
use crate::dirlock::{DataDirLock, DirLockError};
use crate::feedback::sqlite::SqliteStore;
use crate::feedback::FeedbackError;
use crate::model::{LoadOptions, Model, ModelError};
use crate::postgres::PgError;
use crate::rollout::store::{self as rollout_store, FileStore, RolloutStore};
use crate::rollout::RolloutError;
use crate::trainer::jobs::{queue, Interruption, JobRecord, JobState};
use crate::trainer::train::TrainError;

/// Feedback rows read and written per statement.
const PAGE: usize = 1000;

/// Why a migration stopped; the database is then as it was.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The migration cannot go ahead as things are; the message says what to change.
    #[error("{0}")]
    Refused(String),
    /// A state file or directory could not be read or copied.
    #[error("{0}")]
    Io(String),
    /// The model, whose shape the generations are checked against, could not be loaded.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The registry's index, a generation or the object store failed.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The feedback store failed.
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    /// The rollouts could not be read or stored.
    #[error("rollouts: {0}")]
    Rollout(#[from] RolloutError),
    /// A job could not be stored.
    #[error("jobs: {0}")]
    Jobs(#[from] TrainError),
    /// PostgreSQL failed.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// The single process still holds the data directory.
    #[error(transparent)]
    DataDir(#[from] DirLockError),
}

impl From<postgres::Error> for MigrateError {
    fn from(e: postgres::Error) -> Self {
        MigrateError::Postgres(PgError::Query(crate::postgres::describe(&e)))
    }
}

/// What a migration moved.
#[derive(Debug, Default, Serialize)]
pub struct Migrated {
    /// Feedback rows, each with its id, count and first-posting time.
    pub feedback_rows: u64,
    /// Tasks.
    pub tasks: usize,
    /// Generations in the index.
    pub generations: usize,
    /// Of those, the ones whose files were copied into the shared adapter directory.
    pub copied_generations: usize,
    /// Of those, the ones the object store holds (`[store] objects_url`); 0 without one.
    pub stored_generations: usize,
    /// Aliases.
    pub aliases: usize,
    /// Rollouts, all finished, with their decision logs.
    pub rollouts: usize,
    /// Jobs carried over. Those queued or running when the single process stopped are carried over as its
    /// next start would have found them: failed as interrupted (or cancelled, when a caller had asked).
    pub jobs: usize,
    /// Re-runs queued, as the single process's next start would have queued them: a new job for each
    /// interrupted one not re-run yet (`[trainer] rerun_interrupted`), linked to it (`rerun_of`, `rerun_as`).
    pub requeued_jobs: usize,
}

/// Moves the single process's state in `config.data.dir` into the PostgreSQL at `config.store.url`.
/// Generations' files are read from `from_adapters` (by default the data directory's `adapters/`, where a
/// single process keeps them), copied to `config.data.adapters()` when that is elsewhere, and stored in the
/// object store when `config` names one.
pub fn to_postgres(
    config: &Config,
    from_adapters: Option<&Path>,
) -> Result<Migrated, MigrateError> {
    if config.store.backend != StoreBackend::Postgres {
        return Err(MigrateError::Refused(
            "flywheel migrate writes into PostgreSQL: set [store] backend = \"postgres\" and its url \
             (FLYWHEEL_STORE__BACKEND, FLYWHEEL_STORE__URL), as the replicas will run"
                .to_owned(),
        ));
    }
    let data = &config.data.dir;
    if !data.is_dir() {
        return Err(MigrateError::Refused(format!(
            "the data directory {} does not exist",
            data.display()
        )));
    }
    // Held to the end: a single process still running could change what is read after it is read.
    let _held = DataDirLock::acquire(data, "migrate")?;
    let index = FileIndex::new(data.join(INDEX_FILE))
        .load()?
        .map(|s| s.index)
        .unwrap_or_default();
    let rollouts = FileStore::new(data.join("rollouts.json"))
        .newer_than(-1)?
        .map(|s| s.state)
        .unwrap_or_default();
    if let Some(active) = rollouts.active().next() {
        return Err(MigrateError::Refused(format!(
            "task {:?} has an active rollout ({}), whose evidence the replicas would not have: promote it or \
             roll it back on the single process first (POST /v1/rollouts/{}/promote or /rollback)",
            active.task, active.id, active.task
        )));
    }
    let jobs = read_jobs(&data.join("jobs.json"))?;
    // A database in use is refused before the slow part (the model, copies, uploads), and again under the
    // transaction's locks.
    let pool = crate::postgres::connect(&config.store)?;
    refuse_unless_empty(&mut crate::postgres::checkout(&pool)?.transaction()?)?;
    let mut migrated = Migrated {
        tasks: index.tasks.len(),
        generations: index.generations.len(),
        aliases: index.aliases.len(),
        rollouts: rollouts.rollouts.values().map(Vec::len).sum(),
        ..Migrated::default()
    };
    place_generations(config, from_adapters, &index, &mut migrated)?;
    let mut conn = crate::postgres::checkout(&pool)?;
    let mut tx = conn.transaction()?;
    // Durable when the command says so, whatever the server's default.
    tx.batch_execute("SET LOCAL synchronous_commit = on")?;
    refuse_unless_empty(&mut tx)?;
    let feedback = data.join("feedback.sqlite");
    if feedback.is_file() {
        SqliteStore::open(&feedback)?.export(PAGE, |rows| {
            if let Some(row) = rows.iter().find(|r| r.text.contains('\0')) {
                return Err(MigrateError::Refused(format!(
                    "feedback row {} of task {:?} has a NUL character in its text, which PostgreSQL \
                     cannot store: remove the row from feedback.sqlite first",
                    row.id, row.task
                )));
            }
            crate::feedback::postgres::import(&mut tx, rows)?;
            migrated.feedback_rows += rows.len() as u64;
            Ok(())
        })?;
        crate::feedback::postgres::continue_ids(&mut tx)?;
    }
    for mut job in jobs {
        // What the single process's next start would do: a job still live when it stopped was stopped by
        // it, and an interrupted job is re-run by a new job linked to it.
        if matches!(job.state, JobState::Queued | JobState::Running) {
            job.interrupt(Interruption::Crash);
        }
        if config.trainer.rerun_interrupted && job.wants_rerun() {
            let rerun = JobRecord {
                rerun_of: Some(job.id.clone()),
                ..JobRecord::queued(&job.task, job.config.clone())
            };
            job.link_rerun(&rerun.id);
            queue::import(&mut tx, &job)?;
            queue::import(&mut tx, &rerun)?;
            migrated.requeued_jobs += 1;
        } else {
            queue::import(&mut tx, &job)?;
        }
        migrated.jobs += 1;
    }
    if migrated.rollouts > 0 {
        rollout_store::import(&mut tx, &rollouts)?;
    }
    if index.tasks.len() + index.generations.len() + index.aliases.len() > 0 {
        index_store::import(&mut tx, &index)?;
    }
    tx.commit()?;
    Ok(migrated)
}

/// The single process's job list, oldest first; an unreadable list stops the migration rather than being
/// set aside, as a start would.
fn read_jobs(path: &Path) -> Result<Vec<JobRecord>, MigrateError> {
    let mut jobs: Vec<JobRecord> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| MigrateError::Io(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(MigrateError::Io(format!("{}: {e}", path.display()))),
    };
    jobs.sort_by_key(|j| j.created_at);
    Ok(jobs)
}

/// Fails unless the database holds no feedback, index, jobs or rollouts: a migration never merges.
fn refuse_unless_empty(tx: &mut postgres::Transaction<'_>) -> Result<(), MigrateError> {
    // Replicas started too early wait for the migration instead of writing beside it.
    tx.batch_execute("LOCK TABLE feedback, registry_index, jobs, rollout_state IN EXCLUSIVE MODE")?;
    let row = tx.query_one(
        "SELECT (SELECT COUNT(*) FROM feedback), (SELECT version FROM registry_index WHERE id = 1),
                (SELECT COUNT(*) FROM jobs), (SELECT version FROM rollout_state WHERE id = 1)",
        &[],
    )?;
    let (feedback, index, jobs, rollouts): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if feedback + index + jobs + rollouts > 0 {
        return Err(MigrateError::Refused(format!(
            "the database already holds Flywheel state ({feedback} feedback rows, {jobs} jobs, registry \
             version {index}, rollouts version {rollouts}): migrate into a new, empty database"
        )));
    }
    Ok(())
}

/// Puts every generation's files where the replicas will look: copied into `config`'s adapter directory
/// when `from` is another one, then loaded there as a replica would (which checks them against the model
/// and stores them in the object store, when there is one). Counts into `migrated`.
fn place_generations(
    config: &Config,
    from: Option<&Path>,
    index: &Index,
    migrated: &mut Migrated,
) -> Result<(), MigrateError> {
    if index.generations.is_empty() {
        return Ok(());
    }
    let root = config.data.adapters();
    let from = from.map_or_else(|| config.data.dir.join("adapters"), Path::to_path_buf);
    if !same_dir(&from, &root) {
        for entry in &index.generations {
            let source = safe_join(&from, &entry.path)?;
            let target = safe_join(&root, &entry.path)?;
            if source.is_dir() && !target.exists() {
                copy_dir(&source, &target)?;
                migrated.copied_generations += 1;
            }
        }
    }
    let model = Model::load(
        &config.model.dir,
        &LoadOptions {
            max_length: config.model.max_length,
            ..LoadOptions::default()
        },
    )?;
    // Opened over the single process's index: loading restores every generation from `root` and, with an
    // object store, stores there each one it does not hold yet.
    let registry = Registry::open_in(
        &root,
        Box::new(FileIndex::new(config.data.dir.join(INDEX_FILE))),
        Objects::configured(&config.store.objects_url)?,
        config.adapters.clone(),
        model.config.clone(),
        model.bert.pooler.is_some(),
    )?;
    let mut failed = Vec::new();
    for (generation, _) in registry.list() {
        match &generation.state {
            State::Failed(reason) => failed.push(format!("{}: {reason}", generation.id)),
            State::Ready => {
                if let Some(objects) = registry.objects() {
                    if !objects.contains(&generation.id)? {
                        return Err(MigrateError::Refused(format!(
                            "generation {} could not be stored in {} (the log says why); nothing was \
                             written to the database",
                            generation.id,
                            objects.url()
                        )));
                    }
                    migrated.stored_generations += 1;
                }
            }
        }
    }
    if !failed.is_empty() {
        return Err(MigrateError::Refused(format!(
            "generations that would not load on the replicas: {}. Name where their files are with \
             --from-adapters, or delete them on the single process (DELETE /v1/adapters/{{id}}) first",
            failed.join("; ")
        )));
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `root` joined with an index's relative `path`, refused when the path would leave the root.
fn safe_join(root: &Path, path: &str) -> Result<PathBuf, MigrateError> {
    let relative = Path::new(path);
    let mut parts = relative.components().peekable();
    if parts.peek().is_some() && parts.all(|c| matches!(c, std::path::Component::Normal(_))) {
        Ok(root.join(relative))
    } else {
        Err(MigrateError::Refused(format!(
            "the index names a generation at {path:?}, outside the adapter directory"
        )))
    }
}

/// Copies the files of directory `from` into a new directory `to`, through a temporary sibling renamed into
/// place, so `to` is either whole or absent.
fn copy_dir(from: &Path, to: &Path) -> Result<(), MigrateError> {
    let io = |what: &Path, e: std::io::Error| MigrateError::Io(format!("{}: {e}", what.display()));
    let parent = to
        .parent()
        .ok_or_else(|| MigrateError::Io(format!("{} has no parent", to.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let partial = parent.join(format!(".migrating-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&partial).map_err(|e| io(&partial, e))?;
    let copied = (|| {
        for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
            let entry = entry.map_err(|e| io(from, e))?;
            let path = entry.path();
            if path.is_file() {
                let target = partial.join(entry.file_name());
                std::fs::copy(&path, &target).map_err(|e| io(&path, e))?;
                std::fs::File::open(&target)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(&target, e))?;
            }
        }
        std::fs::rename(&partial, to).map_err(|e| io(to, e))?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(parent, e))
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::{copy_dir, safe_join, to_postgres, MigrateError};
    use crate::config::{Config, DataConfig};
    use crate::feedback::postgres::PostgresStore;
    use crate::feedback::sqlite::SqliteStore;
    use crate::feedback::{FeedbackStore, NewFeedback};
    use crate::trainer::jobs::queue::SharedQueue;
    use crate::trainer::jobs::{JobRecord, JobState};
    use crate::trainer::train::TrainConfig;
    use std::path::Path;

    fn row(task: &str, text: &str, label: &str) -> NewFeedback {
        NewFeedback {
            task: task.to_owned(),
            text: text.to_owned(),
            label: label.to_owned(),
            request_id: None,
            adapter: None,
            arm: None,
        }
    }

    fn job(created_at: u64, change: impl FnOnce(&mut JobRecord)) -> JobRecord {
        let mut job = JobRecord::queued("spam", TrainConfig::default());
        job.created_at = created_at;
        change(&mut job);
        job
    }

    #[test]
    fn feedback_keeps_its_ids_and_interrupted_jobs_are_re_run_as_a_restart_would() {
        let Some(store) = crate::postgres::testing::scratch() else {
            return;
        };
        let data = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&data.path().join("feedback.sqlite")).unwrap();
        sqlite
            .append(&[
                row("spam", "win a prize", "spam"),
                row("intents", "where is my parcel", "x"),
                row("spam", "win a prize", "spam"),
                row("spam", "minutes attached", "ham"),
            ])
            .unwrap();
        let before = sqlite.list("spam", 0, 10).unwrap();
        drop(sqlite);
        // Written out of order: they are stored oldest first.
        let jobs = [
            job(4, |j| j.state = JobState::Cancelled),
            job(1, |j| j.state = JobState::Succeeded),
            job(3, |j| {
                j.state = JobState::Failed;
                j.interrupted = true;
                j.error = Some("interrupted by a shutdown".to_owned());
            }),
            job(2, |j| {
                j.state = JobState::Running;
                j.step = 7;
            }),
            // Asked to cancel while running: cancelled, never re-run.
            job(5, |j| {
                j.state = JobState::Running;
                j.cancel_requested = true;
            }),
            // A re-run that a crash stopped is not re-run again.
            job(6, |j| {
                j.state = JobState::Running;
                j.rerun_of = Some("job-before".to_owned());
            }),
        ];
        std::fs::write(
            data.path().join("jobs.json"),
            serde_json::to_vec(&jobs).unwrap(),
        )
        .unwrap();
        let config = Config {
            store,
            data: DataConfig {
                dir: data.path().to_owned(),
                adapters_dir: None,
            },
            ..Config::default()
        };
        let migrated = to_postgres(&config, None).unwrap();
        assert_eq!(
            (
                migrated.feedback_rows,
                migrated.jobs,
                migrated.requeued_jobs
            ),
            (3, 6, 2),
            "{migrated:?}"
        );

        let pool = crate::postgres::connect(&config.store).unwrap();
        let feedback = PostgresStore::new(pool.clone());
        assert_eq!(feedback.list("spam", 0, 10).unwrap(), before);
        assert_eq!(before[0].count, 2);
        let next = feedback.append(&[row("spam", "a new one", "ham")]).unwrap();
        assert_eq!(next[0].id, 4, "new rows continue after the migrated ids");

        let queue = SharedQueue::new(pool, "w".to_owned(), std::time::Duration::from_secs(30));
        let listed = queue.list(None).unwrap();
        let old: Vec<(u64, JobState, bool)> = listed
            .iter()
            .filter(|j| j.created_at < 100)
            .map(|j| (j.created_at, j.state, j.rerun_as.is_some()))
            .collect();
        assert_eq!(
            old,
            [
                (6, JobState::Failed, false),
                (5, JobState::Cancelled, false),
                (4, JobState::Cancelled, false),
                (3, JobState::Failed, true),
                (2, JobState::Failed, true),
                (1, JobState::Succeeded, false)
            ],
            "newest first, each as the single process's next start would have left it"
        );
        let first = queue
            .claim()
            .unwrap()
            .expect("the re-run of the job that was running");
        assert_eq!(first.rerun_of.as_deref(), Some(jobs[3].id.as_str()));
        assert_eq!(first.step, 0);
        let second = queue
            .claim()
            .unwrap()
            .expect("the re-run of the interrupted job");
        assert_eq!(second.rerun_of.as_deref(), Some(jobs[2].id.as_str()));
        assert!(queue.claim().unwrap().is_none());
        let linked = listed.iter().find(|j| j.id == jobs[3].id).unwrap();
        assert_eq!(linked.rerun_as.as_deref(), Some(first.id.as_str()));

        assert!(
            matches!(to_postgres(&config, None), Err(MigrateError::Refused(_))),
            "a database that holds state is never merged into"
        );
    }

    #[test]
    fn an_index_path_may_not_leave_the_adapter_directory() {
        let root = Path::new("/adapters");
        assert_eq!(
            safe_join(root, "trained/spam-job-1").unwrap(),
            root.join("trained/spam-job-1")
        );
        for path in ["../elsewhere", "/etc", "a/../../b", "./a", ""] {
            assert!(
                matches!(safe_join(root, path), Err(MigrateError::Refused(_))),
                "{path:?}"
            );
        }
    }

    #[test]
    fn a_generation_directory_is_copied_whole() {
        let from = tempfile::tempdir().unwrap();
        std::fs::write(from.path().join("adapter_config.json"), b"{}").unwrap();
        std::fs::write(from.path().join("adapter_model.safetensors"), [7u8; 300]).unwrap();
        let to_root = tempfile::tempdir().unwrap();
        let to = to_root.path().join("trained/g");
        copy_dir(from.path(), &to).unwrap();
        assert_eq!(
            std::fs::read(to.join("adapter_config.json")).unwrap(),
            b"{}"
        );
        assert_eq!(
            std::fs::read(to.join("adapter_model.safetensors")).unwrap(),
            [7u8; 300]
        );
        let left: Vec<_> = std::fs::read_dir(to_root.path().join("trained"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["g"], "no temporary directory is left beside it");
        assert!(
            copy_dir(from.path(), &to).is_err(),
            "an existing directory is never replaced"
        );
    }
}
