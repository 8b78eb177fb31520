//! Where rollouts are kept: `rollouts.json` in the data directory for one process, or PostgreSQL for
//! replicas that share them: the rollouts as one versioned document (changed under its row lock and announced
//! on commit, see [`crate::postgres::document`]), and each replica's evidence as a row of its own, which the
//! replica overwrites and every other replica adds up.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::analysis::{ArmRecord, ArmStats};
use super::{Arms, Phase, Rollout, RolloutError};
use crate::postgres::document::{Change, Document, Versioned};
use crate::postgres::{checkout, describe, Pool};

/// The rollouts, per task oldest first (the last may be active).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Persisted {
    /// Per task.
    pub rollouts: BTreeMap<String, Vec<Rollout>>,
}

impl Persisted {
    /// The active rollouts, at most one per task.
    pub fn active(&self) -> impl Iterator<Item = &Rollout> {
        self.rollouts
            .values()
            .filter_map(|l| l.last())
            .filter(|r| r.phase == Phase::Active)
    }
}

/// Rollouts and the version they were stored as (a shared store counts every change; a file is always 0).
#[derive(Debug)]
pub struct Stored {
    /// Increases with every change.
    pub version: i64,
    /// The rollouts.
    pub state: Persisted,
}

/// What one replica saw of one rollout.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// The rollout's step the replica was in when it counted `arms`.
    pub step: usize,
    /// Evidence of that step.
    pub arms: Arms,
    /// Evidence over the whole rollout.
    pub totals: Arms,
}

#[derive(Serialize, Deserialize)]
struct EvidenceRecord {
    step: usize,
    stable: ArmRecord,
    candidate: ArmRecord,
    stable_total: ArmRecord,
    candidate_total: ArmRecord,
}

impl From<&Evidence> for EvidenceRecord {
    fn from(e: &Evidence) -> Self {
        Self {
            step: e.step,
            stable: (&e.arms.stable).into(),
            candidate: (&e.arms.candidate).into(),
            stable_total: (&e.totals.stable).into(),
            candidate_total: (&e.totals.candidate).into(),
        }
    }
}

impl From<&EvidenceRecord> for Evidence {
    fn from(r: &EvidenceRecord) -> Self {
        let arms = |stable: &ArmRecord, candidate: &ArmRecord| Arms {
            stable: ArmStats::from(stable),
            candidate: ArmStats::from(candidate),
        };
        Self {
            step: r.step,
            arms: arms(&r.stable, &r.candidate),
            totals: arms(&r.stable_total, &r.candidate_total),
        }
    }
}

/// Where rollouts live.
pub trait RolloutStore: Send + Sync {
    /// Whether other processes change these rollouts too.
    fn shared(&self) -> bool;
    /// The stored rollouts when their version is above `seen` (pass -1 for any); `None` otherwise, and
    /// while nothing was ever stored.
    fn newer_than(&self, seen: i64) -> Result<Option<Stored>, RolloutError>;
    /// Starts a change, holding the store's lock until it commits or is dropped (which abandons it).
    fn begin(&self) -> Result<Box<dyn RolloutChange + '_>, RolloutError>;
    /// Stores this replica's evidence `mine` (by rollout id) and returns the other replicas' evidence of
    /// the rollouts `of`. A store no one else writes has none.
    fn exchange(
        &self,
        mine: &[(String, Evidence)],
        of: &[String],
    ) -> Result<Vec<(String, Evidence)>, RolloutError>;
}

/// A change in progress.
pub trait RolloutChange {
    /// The stored rollouts when their version is above `seen`: another process changed them since.
    fn newer_than(&self, seen: i64) -> Result<Option<Stored>, RolloutError>;
    /// Stores `state` as the next version and returns that version.
    fn commit(self: Box<Self>, state: &Persisted) -> Result<i64, RolloutError>;
}

fn storage(e: impl std::fmt::Display) -> RolloutError {
    RolloutError::Storage(e.to_string())
}

/// `rollouts.json`: written atomically (temporary file, fsync, rename); this process is its only writer.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// The rollouts file at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

impl RolloutStore for FileStore {
    fn shared(&self) -> bool {
        false
    }

    fn newer_than(&self, seen: i64) -> Result<Option<Stored>, RolloutError> {
        if seen >= 0 {
            return Ok(None);
        }
        match std::fs::read(&self.path) {
            // One this build cannot parse is set aside, not overwritten by the next change.
            Ok(bytes) => Ok(match serde_json::from_slice(&bytes) {
                Ok(state) => Some(Stored { version: 0, state }),
                Err(e) => {
                    crate::durable::set_aside(&self.path, &e);
                    None
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage(format!("{}: {e}", self.path.display()))),
        }
    }

    fn begin(&self) -> Result<Box<dyn RolloutChange + '_>, RolloutError> {
        Ok(Box::new(FileChange { path: &self.path }))
    }

    fn exchange(
        &self,
        _mine: &[(String, Evidence)],
        _of: &[String],
    ) -> Result<Vec<(String, Evidence)>, RolloutError> {
        Ok(Vec::new())
    }
}

struct FileChange<'a> {
    path: &'a std::path::Path,
}

impl RolloutChange for FileChange<'_> {
    fn newer_than(&self, _seen: i64) -> Result<Option<Stored>, RolloutError> {
        Ok(None)
    }

    fn commit(self: Box<Self>, state: &Persisted) -> Result<i64, RolloutError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(storage)?;
        crate::durable::write_atomically(self.path, &bytes)
            .map_err(|e| storage(format!("{}: {e}", self.path.display())))?;
        Ok(0)
    }
}

/// The table of the shared rollouts document.
const TABLE: &str = "rollout_state";

/// Stores `state` as the shared rollouts' next version within the caller's transaction on `client`: for
/// moving a single process's `rollouts.json` into PostgreSQL (`flywheel migrate`). Active rollouts are the
/// caller's to refuse: their evidence is this file's, which replicas do not read.
pub fn import(
    client: &mut impl postgres::GenericClient,
    state: &Persisted,
) -> Result<(), RolloutError> {
    let body = serde_json::to_string(state).map_err(storage)?;
    crate::postgres::document::put(client, TABLE, &body).map_err(storage)?;
    Ok(())
}

/// The `rollout_state` document and the `rollout_evidence` rows in PostgreSQL, shared by every replica.
pub struct PostgresStore {
    document: Document,
    pool: Pool,
    /// This replica's name on its evidence rows.
    replica: String,
}

impl PostgresStore {
    /// The rollouts in the database behind `pool` (migrated by [`crate::postgres::connect`]), with this
    /// replica's evidence stored as `replica`'s.
    pub fn new(pool: Pool, replica: String) -> Self {
        Self {
            document: Document::new(pool.clone(), TABLE),
            pool,
            replica,
        }
    }
}

fn parse((version, body): Versioned) -> Result<Option<Stored>, RolloutError> {
    if version == 0 {
        return Ok(None);
    }
    serde_json::from_str(&body)
        .map(|state| Some(Stored { version, state }))
        .map_err(|e| storage(format!("rollout_state version {version}: {e}")))
}

fn query(e: postgres::Error) -> RolloutError {
    RolloutError::Storage(describe(&e))
}

impl RolloutStore for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    fn newer_than(&self, seen: i64) -> Result<Option<Stored>, RolloutError> {
        match self.document.newer_than(seen).map_err(storage)? {
            Some(stored) => parse(stored),
            None => Ok(None),
        }
    }

    fn begin(&self) -> Result<Box<dyn RolloutChange + '_>, RolloutError> {
        Ok(Box::new(self.document.begin().map_err(storage)?))
    }

    fn exchange(
        &self,
        mine: &[(String, Evidence)],
        of: &[String],
    ) -> Result<Vec<(String, Evidence)>, RolloutError> {
        let mut conn = checkout(&self.pool).map_err(storage)?;
        let now = crate::clock::unix_seconds() as i64;
        for (rollout, evidence) in mine {
            let body = serde_json::to_string(&EvidenceRecord::from(evidence)).map_err(storage)?;
            conn.execute(
                "INSERT INTO rollout_evidence (rollout, replica, body, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (rollout, replica)
                 DO UPDATE SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at",
                &[rollout, &self.replica, &body, &now],
            )
            .map_err(query)?;
        }
        let rows = conn
            .query(
                "SELECT rollout, body FROM rollout_evidence WHERE rollout = ANY($1) AND replica <> $2",
                &[&of, &self.replica],
            )
            .map_err(query)?;
        rows.iter()
            .map(|row| {
                let record: EvidenceRecord = serde_json::from_str(row.get(1)).map_err(storage)?;
                Ok((row.get(0), Evidence::from(&record)))
            })
            .collect()
    }
}

impl RolloutChange for Change {
    fn newer_than(&self, seen: i64) -> Result<Option<Stored>, RolloutError> {
        if self.current().0 <= seen {
            return Ok(None);
        }
        parse(self.current().clone())
    }

    fn commit(mut self: Box<Self>, state: &Persisted) -> Result<i64, RolloutError> {
        let body = serde_json::to_string(state).map_err(storage)?;
        // The evidence of finished rollouts goes with the change that finished them.
        self.conn()
            .execute(
                "DELETE FROM rollout_evidence WHERE NOT (rollout = ANY($1))",
                &[&state.active().map(|r| r.id.clone()).collect::<Vec<_>>()],
            )
            .map_err(query)?;
        Change::commit(*self, &body).map_err(storage)
    }
}
