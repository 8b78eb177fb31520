//! The job queue in PostgreSQL, shared by every replica on the database (`[store] backend = "postgres"`):
//! any replica queues a job, a training replica claims it (`FOR UPDATE SKIP LOCKED`, so each job is claimed
//! once however many claim at the same moment) and holds it under a lease that its heartbeats extend. A job
//! whose lease ran out (its worker died) is claimed again, once: a job that outlives two workers fails.

use std::time::Duration;

use super::status::{JobRecord, JobState};
use crate::postgres::{describe, Conn, Pool};
use crate::trainer::train::TrainError;

/// The `LISTEN`/`NOTIFY` channel on which queued jobs are announced.
pub const CHANNEL: &str = "flywheel_jobs";

/// How many times a job is claimed at most: the first run and one re-run after its worker died.
const MAX_ATTEMPTS: i32 = 2;

fn storage(e: postgres::Error) -> TrainError {
    TrainError::Storage(describe(&e))
}

/// The database's clock in milliseconds: leases are written and compared on one clock, whatever the
/// replicas' own clocks say.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// Whether PostgreSQL's text can hold `key`: one with a NUL names no stored job, and asking would be a
/// query error (a 503) rather than the 404 or empty list the caller's mistake deserves.
fn storable(key: &str) -> bool {
    !key.contains('\0')
}

fn record(json: &str) -> Result<JobRecord, TrainError> {
    serde_json::from_str(json).map_err(|e| TrainError::Storage(format!("a stored job: {e}")))
}

/// A row selected as `record, cancel`: the record with the cancel request its worker may not know yet.
fn read(row: &postgres::Row) -> Result<JobRecord, TrainError> {
    let mut job = record(row.get(0))?;
    job.cancel_requested |= row.get::<_, bool>(1);
    Ok(job)
}

fn json(job: &JobRecord) -> Result<String, TrainError> {
    serde_json::to_string(job).map_err(|e| TrainError::Storage(e.to_string()))
}

/// Stores `job` as it is, within the caller's transaction on `client`: for moving a single process's
/// `jobs.json` into the shared queue (`flywheel migrate`). A queued job is announced to the workers when the
/// transaction commits. A running one is refused: it belongs to no worker here, so the caller settles it
/// first.
pub fn import(
    client: &mut impl postgres::GenericClient,
    job: &JobRecord,
) -> Result<(), TrainError> {
    if job.state == JobState::Running {
        return Err(TrainError::Invalid(format!(
            "job {} is running; only queued and finished jobs can be stored as they are",
            job.id
        )));
    }
    client
        .execute(
            "INSERT INTO jobs (id, task, state, record, attempts, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &job.id,
                &job.task,
                &job.state.name(),
                &json(job)?,
                &i32::try_from(job.attempts).unwrap_or(i32::MAX),
                &i64::try_from(job.created_at).unwrap_or(i64::MAX),
            ],
        )
        .map_err(storage)?;
    if job.state == JobState::Queued {
        client
            .batch_execute(&format!("NOTIFY {CHANNEL}"))
            .map_err(storage)?;
    }
    Ok(())
}

/// The shared queue, as one process (a worker named `worker`) sees it.
pub struct SharedQueue {
    pool: Pool,
    worker: String,
    lease: Duration,
    listener: std::sync::Mutex<Option<Conn>>,
}

impl SharedQueue {
    /// The queue in the database behind `pool`; this process claims jobs as `worker`, each for `lease`
    /// past its last heartbeat.
    pub fn new(pool: Pool, worker: String, lease: Duration) -> Self {
        Self {
            pool,
            worker,
            lease,
            listener: std::sync::Mutex::new(None),
        }
    }

    /// This process's name on the jobs it claims.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The lease a claim or heartbeat grants.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn conn(&self) -> Result<Conn, TrainError> {
        crate::postgres::checkout(&self.pool).map_err(|e| TrainError::Storage(e.to_string()))
    }

    /// Queues `job` unless `max_live` jobs are queued or running already; announces it to the workers.
    pub fn insert(&self, job: &JobRecord, max_live: usize) -> Result<(), TrainError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(storage)?;
        // One queuer at a time, so two replicas cannot both take the last place.
        tx.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE", &[])
            .map_err(storage)?;
        let live: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')",
                &[],
            )
            .map_err(storage)?
            .get(0);
        if usize::try_from(live).unwrap_or(usize::MAX) >= max_live {
            return Err(TrainError::QueueFull(format!(
                "{live} jobs are waiting; at most {max_live} may"
            )));
        }
        tx.execute(
            "INSERT INTO jobs (id, task, state, record, created_at) VALUES ($1, $2, 'queued', $3, $4)",
            &[
                &job.id,
                &job.task,
                &json(job)?,
                &i64::try_from(job.created_at).unwrap_or(i64::MAX),
            ],
        )
        .map_err(storage)?;
        tx.batch_execute(&format!("NOTIFY {CHANNEL}"))
            .map_err(storage)?;
        tx.commit().map_err(storage)
    }

    /// One job, as stored.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, TrainError> {
        if !storable(id) {
            return Ok(None);
        }
        self.conn()?
            .query_opt("SELECT record, cancel FROM jobs WHERE id = $1", &[&id])
            .map_err(storage)?
            .map(|row| read(&row))
            .transpose()
    }

    /// Every job, or those of `task`, newest first (a row this build cannot read, written by another
    /// version, is left out with a warning).
    pub fn list(&self, task: Option<&str>) -> Result<Vec<JobRecord>, TrainError> {
        if !task.is_none_or(storable) {
            return Ok(Vec::new());
        }
        Ok(self
            .conn()?
            .query(
                "SELECT record, cancel FROM jobs WHERE $1::TEXT IS NULL OR task = $1
                 ORDER BY seq DESC",
                &[&task],
            )
            .map_err(storage)?
            .iter()
            .filter_map(|row| {
                read(row)
                    .map_err(|e| tracing::warn!(error = %e, "a job row this build cannot read"))
                    .ok()
            })
            .collect())
    }

    /// Forgets the oldest finished jobs beyond the newest `keep` (`[trainer] keep_finished_jobs`).
    pub fn forget_finished(&self, keep: usize) -> Result<u64, TrainError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.conn()?
            .execute(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND seq NOT IN (
                     SELECT seq FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
                     ORDER BY seq DESC LIMIT $1)",
                &[&keep],
            )
            .map_err(storage)
    }

    /// Whether `task` has a job queued or running.
    pub fn busy(&self, task: &str) -> Result<bool, TrainError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT 1 FROM jobs WHERE task = $1 AND state IN ('queued', 'running') LIMIT 1",
                &[&task],
            )
            .map_err(storage)?
            .is_some())
    }

    /// Cancels a queued job at once; asks the worker of a running one to stop it (its next heartbeat
    /// reads the request). Returns the job as it stands, `None` if unknown.
    pub fn cancel(&self, id: &str) -> Result<Option<JobRecord>, TrainError> {
        if !storable(id) {
            return Ok(None);
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(storage)?;
        let Some(row) = tx
            .query_opt(
                "SELECT record, cancel, state FROM jobs WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .map_err(storage)?
        else {
            return Ok(None);
        };
        let mut job = read(&row)?;
        // The row's state, not the record's: a job just claimed is the worker's before its record says so.
        let state: String = row.get(2);
        if matches!(state.as_str(), "queued" | "running") {
            job.cancel_requested = true;
            let state = if state == "queued" {
                job.state = JobState::Cancelled;
                "cancelled"
            } else {
                // The worker ends it at its next heartbeat; the row stays its worker's until then.
                "running"
            };
            tx.execute(
                "UPDATE jobs SET record = $2, state = $3, cancel = true WHERE id = $1",
                &[&id, &json(&job)?, &state],
            )
            .map_err(storage)?;
        }
        tx.commit().map_err(storage)?;
        Ok(Some(job))
    }

    /// Claims the oldest job waiting: a queued one, or a running one whose worker's lease ran out (a job
    /// that has had its [`MAX_ATTEMPTS`] fails instead, and the next is looked at). Returns it ready to run
    /// (queued, progress cleared, this worker's), or `None` when nothing waits.
    pub fn claim(&self) -> Result<Option<JobRecord>, TrainError> {
        let mut conn = self.conn()?;
        loop {
            let mut tx = conn.transaction().map_err(storage)?;
            let Some(row) = tx
                .query_opt(
                    &format!(
                        "SELECT record, cancel, attempts, id FROM jobs
                         WHERE state = 'queued' OR (state = 'running' AND lease_until < {NOW_MS})
                         ORDER BY seq
                         LIMIT 1 FOR UPDATE SKIP LOCKED"
                    ),
                    &[],
                )
                .map_err(storage)?
            else {
                return Ok(None);
            };
            let mut job = match read(&row) {
                Ok(job) => job,
                Err(e) => {
                    // Written by a build that knows more (a newer hyperparameter): never runnable here,
                    // so it must not hold up the queue.
                    let id: String = row.get(3);
                    tracing::warn!(job = %id, error = %e, "a queued job this build cannot read: failed");
                    tx.execute("UPDATE jobs SET state = 'failed' WHERE id = $1", &[&id])
                        .map_err(storage)?;
                    tx.commit().map_err(storage)?;
                    continue;
                }
            };
            let attempts: i32 = row.get(2);
            if job.state == JobState::Queued && !job.cancel_requested && attempts == 0 {
                job.worker = Some(self.worker.clone());
                job.attempts = 1;
            } else if attempts < MAX_ATTEMPTS && !job.cancel_requested {
                // Its worker died: run it again, from the start.
                job = JobRecord {
                    worker: Some(self.worker.clone()),
                    attempts: u32::try_from(attempts).unwrap_or(0) + 1,
                    ..job.requeued()
                };
            } else {
                // Cancelled, or its workers died twice: it ends here.
                if job.cancel_requested {
                    job.state = JobState::Cancelled;
                } else {
                    job.state = JobState::Failed;
                    job.interrupted = true;
                    job.crashed = true;
                    job.error = Some(format!(
                        "its worker stopped during each of its {attempts} runs; not run again"
                    ));
                }
                tx.execute(
                    "UPDATE jobs SET record = $2, state = $3 WHERE id = $1",
                    &[&job.id, &json(&job)?, &job.state.name()],
                )
                .map_err(storage)?;
                tx.commit().map_err(storage)?;
                continue;
            }
            tx.execute(
                &format!(
                    "UPDATE jobs SET state = 'running', worker = $2, lease_until = {NOW_MS} + $3,
                     attempts = attempts + 1, record = $4 WHERE id = $1"
                ),
                &[&job.id, &self.worker, &self.lease_ms(), &json(&job)?],
            )
            .map_err(storage)?;
            tx.commit().map_err(storage)?;
            return Ok(Some(job));
        }
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Stores the progress of a job this worker holds and extends its lease. Returns whether the worker
    /// should stop it: a caller asked to cancel it, or the job is no longer this worker's (its lease ran
    /// out during a stall and another worker claimed it).
    pub fn heartbeat(&self, job: &JobRecord) -> Result<bool, TrainError> {
        let live = matches!(job.state, JobState::Queued | JobState::Running);
        // The row stays `running` while this worker holds the job, even before its record says so.
        let state = if live { "running" } else { job.state.name() };
        let row = self
            .conn()?
            .query_opt(
                &format!(
                    "UPDATE jobs SET record = $2, state = $3, lease_until = {NOW_MS} + $4
                     WHERE id = $1 AND worker = $5
                     RETURNING cancel"
                ),
                &[&job.id, &json(job)?, &state, &self.lease_ms(), &self.worker],
            )
            .map_err(storage)?;
        Ok(match row {
            Some(row) => row.get(0),
            None => true,
        })
    }

    /// Puts a job this worker holds back in the queue, as it was queued (a graceful shutdown: the run does
    /// not count as an attempt).
    pub fn release(&self, job: &JobRecord) -> Result<(), TrainError> {
        let requeued = job.requeued();
        self.conn()?
            .execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL,
                 attempts = GREATEST(attempts - 1, 0), record = $2
                 WHERE id = $1 AND worker = $3",
                &[&job.id, &json(&requeued)?, &self.worker],
            )
            .map_err(storage)?;
        let _ = self.conn()?.batch_execute(&format!("NOTIFY {CHANNEL}"));
        Ok(())
    }

    /// Returns when a job may have been queued, or after `timeout` at the latest.
    pub fn wait(&self, timeout: Duration) {
        crate::postgres::wait_for_notification(&self.pool, &self.listener, CHANNEL, timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::train::TrainConfig;

    /// A queue on a fresh database as `workers` processes see it, each holding claims for `lease`.
    fn queues(workers: usize, lease: Duration) -> Option<Vec<SharedQueue>> {
        let config = crate::postgres::testing::scratch()?;
        let pool = crate::postgres::connect(&config).unwrap();
        Some(
            (0..workers)
                .map(|w| SharedQueue::new(pool.clone(), format!("worker-{w}"), lease))
                .collect(),
        )
    }

    fn job(task: &str) -> JobRecord {
        JobRecord::queued(task, TrainConfig::default())
    }

    #[test]
    fn a_key_with_a_nul_names_no_job_rather_than_failing_the_query() {
        let Some(q) = queues(1, Duration::from_secs(60)) else {
            return;
        };
        q[0].insert(&job("t"), 10).unwrap();
        assert!(q[0].get("job-\0").unwrap().is_none());
        assert!(q[0].cancel("\0").unwrap().is_none());
        assert!(q[0].list(Some("t\0")).unwrap().is_empty());
        assert_eq!(q[0].list(Some("t")).unwrap().len(), 1);
    }

    #[test]
    fn each_job_is_claimed_once_however_many_claim_at_once() {
        let Some(queues) = queues(4, Duration::from_secs(60)) else {
            return;
        };
        let ids: std::collections::BTreeSet<String> = (0..12)
            .map(|i| {
                let j = job(&format!("t{i}"));
                queues[0].insert(&j, 100).unwrap();
                j.id
            })
            .collect();
        let claimed: Vec<String> = std::thread::scope(|s| {
            let claimers: Vec<_> = queues
                .iter()
                .map(|q| {
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        while let Some(j) = q.claim().unwrap() {
                            assert_eq!(j.worker.as_deref(), Some(q.worker()));
                            assert_eq!(j.attempts, 1);
                            mine.push(j.id);
                        }
                        mine
                    })
                })
                .collect();
            claimers
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect()
        });
        assert_eq!(
            claimed.len(),
            ids.len(),
            "no job claimed twice: {claimed:?}"
        );
        assert_eq!(
            claimed
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>(),
            ids
        );
    }

    #[test]
    fn a_dead_workers_job_is_claimed_again_once_then_fails() {
        let Some(q) = queues(3, Duration::from_millis(50)) else {
            return;
        };
        let j = job("t");
        q[0].insert(&j, 10).unwrap();
        let first = q[0].claim().unwrap().expect("the job");
        assert!(q[1].claim().unwrap().is_none(), "held under its lease");
        std::thread::sleep(Duration::from_millis(120));
        let second = q[1]
            .claim()
            .unwrap()
            .expect("claimed again after the lease ran out");
        assert_eq!(
            (second.id.as_str(), second.attempts),
            (first.id.as_str(), 2)
        );
        assert_eq!(
            second.state,
            JobState::Queued,
            "ready to run from the start"
        );
        assert!(
            q[0].heartbeat(&first).unwrap(),
            "the first worker learns the job is no longer its own"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(q[2].claim().unwrap().is_none(), "not a third time");
        let failed = q[2].get(&j.id).unwrap().unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert!(failed.crashed && failed.interrupted, "{failed:?}");
    }

    #[test]
    fn a_heartbeat_keeps_the_job_and_a_release_returns_it_unspent() {
        let Some(q) = queues(2, Duration::from_millis(200)) else {
            return;
        };
        let j = job("t");
        q[0].insert(&j, 10).unwrap();
        let mut held = q[0].claim().unwrap().unwrap();
        held.state = JobState::Running;
        held.step = 3;
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(80));
            assert!(!q[0].heartbeat(&held).unwrap(), "still its own");
        }
        assert!(
            q[1].claim().unwrap().is_none(),
            "the heartbeats kept the lease"
        );
        assert_eq!(
            q[1].get(&j.id).unwrap().unwrap().step,
            3,
            "progress is shared"
        );
        q[0].release(&held).unwrap();
        let again = q[1].claim().unwrap().expect("released to the queue");
        assert_eq!(again.attempts, 1, "a graceful release spends no attempt");
        assert_eq!(again.step, 0);
    }

    #[test]
    fn a_queued_job_is_cancelled_at_once_and_a_running_ones_worker_is_told() {
        let Some(q) = queues(1, Duration::from_secs(60)) else {
            return;
        };
        let (running, waiting) = (job("a"), job("b"));
        q[0].insert(&running, 10).unwrap();
        q[0].insert(&waiting, 10).unwrap();
        let held = q[0].claim().unwrap().unwrap();
        assert_eq!(held.id, running.id, "oldest first");
        let cancelled = q[0].cancel(&waiting.id).unwrap().unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(
            q[0].claim().unwrap().is_none(),
            "a cancelled job is never claimed"
        );
        let asked = q[0].cancel(&running.id).unwrap().unwrap();
        assert!(asked.cancel_requested && asked.state != JobState::Cancelled);
        assert!(q[0].heartbeat(&held).unwrap(), "the worker is told to stop");
        assert!(q[0].get(&running.id).unwrap().unwrap().cancel_requested);
        assert!(q[0].cancel("job-none").unwrap().is_none());
    }

    #[test]
    fn the_queue_holds_at_most_max_live_jobs_and_lists_newest_first() {
        let Some(q) = queues(1, Duration::from_secs(60)) else {
            return;
        };
        let (a, b) = (job("a"), job("b"));
        q[0].insert(&a, 2).unwrap();
        q[0].insert(&b, 2).unwrap();
        assert!(matches!(
            q[0].insert(&job("c"), 2),
            Err(TrainError::QueueFull(_))
        ));
        assert!(q[0].busy("a").unwrap() && !q[0].busy("c").unwrap());
        let listed: Vec<String> = q[0]
            .list(None)
            .unwrap()
            .into_iter()
            .map(|j| j.task)
            .collect();
        assert_eq!(listed.len(), 2);
        assert_eq!(q[0].list(Some("b")).unwrap()[0].id, b.id);
    }

    #[test]
    fn a_row_this_build_cannot_read_fails_instead_of_blocking_the_queue() {
        let Some(q) = queues(1, Duration::from_secs(60)) else {
            return;
        };
        q[0].conn()
            .unwrap()
            .execute(
                "INSERT INTO jobs (id, task, state, record, created_at)
                 VALUES ('job-future', 't', 'queued', '{\"from\": \"a newer build\"}', 0)",
                &[],
            )
            .unwrap();
        let readable = job("t");
        q[0].insert(&readable, 10).unwrap();
        let claimed = q[0].claim().unwrap().expect("the readable job");
        assert_eq!(claimed.id, readable.id);
        let listed = q[0].list(None).unwrap();
        assert_eq!(
            listed.len(),
            1,
            "the unreadable row is left out of listings"
        );
        let state: String = q[0]
            .conn()
            .unwrap()
            .query_one("SELECT state FROM jobs WHERE id = 'job-future'", &[])
            .unwrap()
            .get(0);
        assert_eq!(state, "failed");
    }

    #[test]
    fn cancelling_a_job_just_claimed_leaves_it_its_workers_to_stop() {
        let Some(q) = queues(2, Duration::from_secs(60)) else {
            return;
        };
        let j = job("t");
        q[0].insert(&j, 10).unwrap();
        let held = q[0].claim().unwrap().unwrap();
        assert_eq!(held.state, JobState::Queued, "claimed, not yet running");
        let asked = q[1].cancel(&j.id).unwrap().unwrap();
        assert!(asked.cancel_requested);
        assert!(q[1].busy("t").unwrap(), "still its worker's");
        assert!(
            q[1].claim().unwrap().is_none(),
            "not handed to another worker"
        );
        assert!(q[0].heartbeat(&held).unwrap(), "its worker is told to stop");
    }

    #[test]
    fn finished_jobs_beyond_the_retention_are_forgotten_and_live_ones_never() {
        let Some(q) = queues(1, Duration::from_secs(60)) else {
            return;
        };
        for _ in 0..3 {
            q[0].insert(&job("done"), 10).unwrap();
            let mut held = q[0].claim().unwrap().unwrap();
            held.state = JobState::Succeeded;
            q[0].heartbeat(&held).unwrap();
        }
        let live = job("live");
        q[0].insert(&live, 10).unwrap();
        assert_eq!(q[0].forget_finished(1).unwrap(), 2);
        let left: Vec<String> = q[0]
            .list(None)
            .unwrap()
            .into_iter()
            .map(|j| j.task)
            .collect();
        assert_eq!(
            left,
            ["live", "done"],
            "the newest finished one and the live one"
        );
    }
}
