//! Where the registry's index (tasks, generations, aliases) is kept: `registry.json` in the data directory
//! for one process, or one versioned row in PostgreSQL that several replicas share.
//!
//! A change is read-modify-write under the store's lock ([`IndexStore::begin`]): with PostgreSQL the row is
//! locked (`FOR UPDATE`) for the change, so replicas changing the registry at once apply their changes one
//! after the other, each to the newest index, and none is lost.

use serde::{Deserialize, Serialize};

use super::registry::Task;
use super::RegistryError;
use crate::postgres::document::{Change, Document, Versioned, CHANNEL};
use crate::postgres::{Conn, Pool};

/// One generation as the index records it; its files are under the adapter root at `path`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Content id.
    pub id: String,
    /// Its task.
    pub task: String,
    /// Directory relative to the adapter root.
    pub path: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The persisted registry state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Index {
    /// Every task.
    pub tasks: Vec<Task>,
    /// Every generation.
    pub generations: Vec<IndexEntry>,
    /// Alias to generation id.
    pub aliases: std::collections::BTreeMap<String, String>,
}

/// An index and the version it was stored as (a shared store counts every change; a file is always 0).
#[derive(Debug, Clone)]
pub struct Stored {
    /// Increases with every change.
    pub version: i64,
    /// The state.
    pub index: Index,
}

/// Where the index lives.
pub trait IndexStore: Send + Sync {
    /// Whether other processes change this index too, so a replica must look for their changes.
    fn shared(&self) -> bool;
    /// The stored index, `None` while nothing was ever stored.
    fn load(&self) -> Result<Option<Stored>, RegistryError>;
    /// Starts a change, holding the store's lock until it commits or is dropped (which abandons it).
    fn begin(&self) -> Result<Box<dyn IndexWrite + '_>, RegistryError>;
    /// Returns when another process may have changed the index, or after `timeout` at the latest.
    fn wait(&self, timeout: std::time::Duration) {
        std::thread::sleep(timeout);
    }
}

/// A change in progress.
pub trait IndexWrite {
    /// The stored index when its version is newer than `seen`: another process changed it since.
    fn newer_than(&mut self, seen: i64) -> Result<Option<Stored>, RegistryError>;
    /// Stores `index` as the next version and returns that version.
    fn commit(self: Box<Self>, index: &Index) -> Result<i64, RegistryError>;
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// `registry.json`: written atomically (temporary file, fsync, rename); this process is its only writer.
pub struct FileIndex {
    path: std::path::PathBuf,
}

impl FileIndex {
    /// The index file at `path`.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self { path }
    }
}

impl IndexStore for FileIndex {
    fn shared(&self) -> bool {
        false
    }

    fn load(&self) -> Result<Option<Stored>, RegistryError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(|index| Some(Stored { version: 0, index }))
                .map_err(|e| storage(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    fn begin(&self) -> Result<Box<dyn IndexWrite + '_>, RegistryError> {
        Ok(Box::new(FileWrite { path: &self.path }))
    }
}

struct FileWrite<'a> {
    path: &'a std::path::Path,
}

impl IndexWrite for FileWrite<'_> {
    fn newer_than(&mut self, _seen: i64) -> Result<Option<Stored>, RegistryError> {
        Ok(None)
    }

    fn commit(self: Box<Self>, index: &Index) -> Result<i64, RegistryError> {
        let bytes = serde_json::to_vec_pretty(index).map_err(storage)?;
        crate::durable::write_atomically(self.path, &bytes).map_err(storage)?;
        Ok(0)
    }
}

/// The `registry_index` row in PostgreSQL, shared by every replica on the database. Each change is
/// announced on [`crate::postgres::document::CHANNEL`] as it commits; [`IndexStore::wait`] listens on it, so
/// replicas take changes in within milliseconds, and look anyway at every timeout should a notification be
/// missed.
pub struct PostgresIndex {
    document: Document,
    pool: Pool,
    /// A connection kept for `LISTEN` (taken from the pool once; replaced when it breaks).
    listener: std::sync::Mutex<Option<Conn>>,
}

/// The table of the shared index document.
const TABLE: &str = "registry_index";

/// Stores `index` as the shared index's next version within the caller's transaction on `client`: for
/// moving a single process's `registry.json` into PostgreSQL (`flywheel migrate`).
pub fn import(
    client: &mut impl postgres::GenericClient,
    index: &Index,
) -> Result<(), RegistryError> {
    let body = serde_json::to_string(index).map_err(storage)?;
    crate::postgres::document::put(client, TABLE, &body).map_err(storage)?;
    Ok(())
}

impl PostgresIndex {
    /// The index in the database behind `pool` (migrated by [`crate::postgres::connect`]).
    pub fn new(pool: Pool) -> Self {
        Self {
            document: Document::new(pool.clone(), TABLE),
            pool,
            listener: std::sync::Mutex::new(None),
        }
    }
}

fn parse((version, body): &Versioned) -> Result<Option<Stored>, RegistryError> {
    if *version == 0 {
        return Ok(None);
    }
    serde_json::from_str(body)
        .map(|index| {
            Some(Stored {
                version: *version,
                index,
            })
        })
        .map_err(|e| storage(format!("registry_index version {version}: {e}")))
}

impl IndexStore for PostgresIndex {
    fn shared(&self) -> bool {
        true
    }

    fn load(&self) -> Result<Option<Stored>, RegistryError> {
        match self.document.newer_than(-1).map_err(storage)? {
            Some(stored) => parse(&stored),
            None => Ok(None),
        }
    }

    fn wait(&self, timeout: std::time::Duration) {
        crate::postgres::wait_for_notification(&self.pool, &self.listener, CHANNEL, timeout);
    }

    fn begin(&self) -> Result<Box<dyn IndexWrite + '_>, RegistryError> {
        Ok(Box::new(self.document.begin().map_err(storage)?))
    }
}

impl IndexWrite for Change {
    fn newer_than(&mut self, seen: i64) -> Result<Option<Stored>, RegistryError> {
        if self.current().0 <= seen {
            return Ok(None);
        }
        parse(self.current())
    }

    fn commit(self: Box<Self>, index: &Index) -> Result<i64, RegistryError> {
        let body = serde_json::to_string(index).map_err(storage)?;
        Change::commit(*self, &body).map_err(storage)
    }
}
