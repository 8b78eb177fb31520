//! The registry: tasks, immutable content-addressed adapter generations, and aliases that point at them.
//!
//! A generation's id is a hash of its configuration and weights, so loading the same files twice yields the
//! same generation. Aliases (a task's stable alias is the task's name) move atomically under a write lock;
//! readers get an `Arc` lease, so a generation removed or replaced lives until its last request ends. The
//! index (tasks, generations, aliases) is persisted through an [`IndexStore`] — `registry.json` in the data
//! directory, or a row in PostgreSQL that several replicas share — and restored at start. With a shared
//! index, each change is applied to the newest stored state under the store's lock, and
//! [`Registry::sync`] takes in the changes other replicas made. Adapter files are read only from under the
//! adapter root; with an object store ([`Objects`]) each generation loaded here is stored there too, and one
//! missing here is fetched from it into the adapter root, which then serves as this replica's cache.
//!
//! Past 500 lines as one concern: tasks, generations and aliases change under one lock and persist as one
//! index.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::index_store::{FileIndex, Index, IndexEntry, IndexStore, Stored};
use super::objects::Objects;
use super::peft::{self, AdapterConfig, PeftError};
use super::reference::{DriftReference, REFERENCE_FILE};
use crate::clock::unix_seconds;
use crate::config::AdaptersConfig;
use crate::model::adapter::{Adapter, Pooling, Target};
use crate::model::BertConfig;

/// Flywheel's sidecar file beside a PEFT adapter (task, labels, head kind, lineage, metrics).
pub const SIDECAR_FILE: &str = "flywheel.json";
/// The index file in the data directory (without a shared store).
pub const INDEX_FILE: &str = "registry.json";

/// A generation's files as read to load it, by name: what an object store keeps of it.
type Files = Vec<(&'static str, Vec<u8>)>;

/// `files` as [`Objects::upload`] takes them.
fn named(files: &Files) -> Vec<(&str, &[u8])> {
    files.iter().map(|(n, b)| (*n, b.as_slice())).collect()
}

/// How often generations that failed to load are tried again.
const RETRY_FAILED: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a registry operation failed; each kind maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such task, generation or alias.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (in use, exists, limit reached).
    #[error("{0}")]
    Conflict(String),
    /// The request or the adapter is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The path leaves the adapter root.
    #[error("{0}")]
    Forbidden(String),
    /// The index could not be persisted.
    #[error("registry storage: {0}")]
    Storage(String),
}

impl From<PeftError> for RegistryError {
    fn from(e: PeftError) -> Self {
        RegistryError::Invalid(e.to_string())
    }
}

/// A task: a named classification problem with an ordered label set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Name, also the task's stable alias.
    pub name: String,
    /// Classifier output `i` is `labels[i]`.
    pub labels: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
}

/// Lifecycle of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum State {
    /// Loaded and serving.
    Ready,
    /// Could not be restored (e.g. its files changed or vanished); never served.
    Failed(String),
}

/// The sidecar's content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// The task the adapter was made for.
    #[serde(default)]
    pub task: Option<String>,
    /// Its label order.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// `cls` (default) or `mean`.
    #[serde(default)]
    pub head: Option<Pooling>,
    /// The generation it was trained from.
    #[serde(default)]
    pub parent: Option<String>,
    /// Evaluation results and anything else a trainer records.
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// An immutable adapter generation.
#[derive(Debug)]
pub struct Generation {
    /// Content hash of config and weights.
    pub id: String,
    /// Owning task.
    pub task: String,
    /// Directory relative to the adapter root.
    pub path: String,
    /// The PEFT config.
    pub config: AdapterConfig,
    /// Flywheel's metadata.
    pub sidecar: Sidecar,
    /// Unix seconds of registration.
    pub created_at: u64,
    /// Size of the weights file.
    pub bytes: u64,
    /// Lifecycle state.
    pub state: State,
    /// The weights, shared with in-flight batches.
    pub adapter: Option<Arc<Adapter>>,
    /// What it was trained and validated on, for drift monitoring (generations Flywheel trained; none for
    /// adapters made elsewhere).
    pub reference: Option<Arc<DriftReference>>,
}

impl Generation {
    /// Targeted modules, by name.
    pub fn targets(&self) -> Vec<&'static str> {
        let mut t: Vec<Target> = self
            .adapter
            .iter()
            .flat_map(|a| a.deltas().map(|(_, t, _)| t))
            .collect();
        t.sort();
        t.dedup();
        t.into_iter().map(Target::module_path).collect()
    }

    /// Trainable values.
    pub fn trainable_params(&self) -> usize {
        self.adapter.as_ref().map_or(0, |a| a.parameter_count())
    }
}

#[derive(Default, Clone)]
struct Inner {
    tasks: BTreeMap<String, Task>,
    generations: BTreeMap<String, Arc<Generation>>,
    aliases: BTreeMap<String, String>,
    /// The stored index's version this state reflects.
    version: i64,
}

/// The registry handle; cheap to share behind an `Arc`.
pub struct Registry {
    root: PathBuf,
    store: Box<dyn IndexStore>,
    /// Where generations' files are shared, when they are not in one directory every replica mounts.
    objects: Option<Objects>,
    /// When generations that failed to load here were last tried again.
    retried: std::sync::Mutex<std::time::Instant>,
    /// When fetching a generation from the object store last failed, by id.
    fetch_failed: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    limits: AdaptersConfig,
    model: BertConfig,
    base_has_pooler: bool,
    inner: RwLock<Inner>,
    /// Serialises writers: each builds the next state from the current one, writes it, then swaps it in.
    write: std::sync::Mutex<()>,
}

/// Checks a task or alias name: 1–64 of `[A-Za-z0-9_.-]`, not starting with `g-` (reserved for generation
/// ids, so an alias can never hide one).
pub fn valid_name(name: &str) -> bool {
    !name.starts_with("g-") && plain_name(name)
}

fn plain_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// Refuses a task or alias name that [`valid_name`] rejects, saying what kind of name it was.
fn check_name(what: &str, name: &str) -> Result<(), RegistryError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{what} {name:?} must be 1-64 of A-Z a-z 0-9 _ . - and not start with g-"
        )))
    }
}

impl Registry {
    /// Applies `change` to a copy of the state and, when it succeeds, makes the copy durable and then current.
    /// Writers are serialised; readers ([`Registry::resolve`] on every request) never wait for the disk,
    /// only for the swap. A failed change or write leaves the state as it was.
    fn mutate<T>(
        &self,
        change: impl FnOnce(&mut Inner) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let _writer = self
            .write
            .lock()
            .expect("registry writer lock poisoned; this is a bug");
        let mut write = self.store.begin()?;
        let mut next = self.read().clone();
        // Another replica changed the shared index since this one last looked: change the newest state.
        if let Some(stored) = write.newer_than(next.version)? {
            next = self.rebuild(&next, stored);
        }
        let out = change(&mut next)?;
        next.version = write.commit(&index_of(&next))?;
        *self
            .inner
            .write()
            .expect("registry lock poisoned; this is a bug") = next;
        Ok(out)
    }

    /// Returns when another replica may have changed a shared index, or after `timeout` at the latest.
    pub fn wait_for_change(&self, timeout: std::time::Duration) {
        self.store.wait(timeout);
    }

    /// Takes in what other replicas changed in a shared index (new tasks, generations, alias moves); returns
    /// whether anything changed. A no-op for an index no one else writes.
    pub fn sync(&self) -> Result<bool, RegistryError> {
        if !self.store.shared() {
            return Ok(false);
        }
        let Some(stored) = self.store.load()? else {
            return Ok(false);
        };
        // What this replica lacks is fetched before the writer lock is taken: a slow object store holds up
        // no change made here. A change committed meanwhile is taken in at the next look.
        let fetched = self.prefetch(&stored.index);
        let _writer = self
            .write
            .lock()
            .expect("registry writer lock poisoned; this is a bug");
        let old = self.read().clone();
        if stored.version <= old.version && !fetched && !self.retry_due(&old) {
            return Ok(false);
        }
        // A change made here while the files were fetched is newer than what was read: read again (under
        // the writer lock, nothing here can change it meanwhile), or the older index would be installed
        // over it, undoing an alias move or a generation just published until the next look.
        let stored = if stored.version < old.version {
            match self.store.load()? {
                Some(newest) => newest,
                None => return Ok(false),
            }
        } else {
            stored
        };
        let next = self.rebuild(&old, stored);
        let ready = |inner: &Inner| {
            inner
                .generations
                .values()
                .filter(|g| g.state == State::Ready)
                .count()
        };
        let changed = next.version > old.version || ready(&next) != ready(&old);
        *self
            .inner
            .write()
            .expect("registry lock poisoned; this is a bug") = next;
        Ok(changed)
    }

    /// Whether to try again the generations that failed to load here (their files may have reached this
    /// replica's directory or the object store since): at most every [`RETRY_FAILED`].
    fn retry_due(&self, inner: &Inner) -> bool {
        if !inner
            .generations
            .values()
            .any(|g| matches!(g.state, State::Failed(_)))
        {
            return false;
        }
        let mut retried = self.retried.lock().unwrap_or_else(|e| e.into_inner());
        if retried.elapsed() < RETRY_FAILED {
            return false;
        }
        *retried = std::time::Instant::now();
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .expect("registry lock poisoned; this is a bug")
    }

    /// Opens the registry in `data_dir` (creating `adapters/`), restoring tasks, generations and aliases from
    /// its `registry.json`.
    pub fn open(
        data_dir: &Path,
        limits: AdaptersConfig,
        model: BertConfig,
        base_has_pooler: bool,
    ) -> Result<Self, RegistryError> {
        let store = Box::new(FileIndex::new(data_dir.join(INDEX_FILE)));
        Self::open_in(
            &data_dir.join("adapters"),
            store,
            None,
            limits,
            model,
            base_has_pooler,
        )
    }

    /// Opens the registry over the adapter root `root` (created if missing), the index in `store` and the
    /// generations' files in `objects` when given, restoring tasks, generations and aliases.
    pub fn open_in(
        root: &Path,
        store: Box<dyn IndexStore>,
        objects: Option<Objects>,
        limits: AdaptersConfig,
        model: BertConfig,
        base_has_pooler: bool,
    ) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(root).map_err(storage)?;
        let root = root.canonicalize().map_err(storage)?;
        let registry = Self {
            root,
            store,
            objects,
            retried: std::sync::Mutex::new(std::time::Instant::now()),
            fetch_failed: std::sync::Mutex::new(std::collections::HashMap::new()),
            limits,
            model,
            base_has_pooler,
            inner: RwLock::new(Inner::default()),
            write: std::sync::Mutex::new(()),
        };
        registry.restore()?;
        Ok(registry)
    }

    /// The canonical adapter root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object store generations are kept in, when there is one.
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    /// The configuration of the model every generation is checked against.
    pub fn model(&self) -> &BertConfig {
        &self.model
    }

    fn restore(&self) -> Result<(), RegistryError> {
        if let Some(stored) = self.store.load()? {
            self.prefetch(&stored.index);
            let next = self.rebuild(&Inner::default(), stored);
            // Generations registered before the object store was configured go up now, so replicas with
            // an empty cache find them (one existence check each for those stored already).
            if let Some(objects) = &self.objects {
                for g in next.generations.values() {
                    if g.state != State::Ready {
                        continue;
                    }
                    if let Err(e) = self.backfill(objects, g, &next.tasks) {
                        tracing::warn!(id = %g.id, error = %e, "generation not stored in the object store");
                    }
                }
            }
            *self
                .inner
                .write()
                .expect("registry lock poisoned; this is a bug") = next;
        }
        Ok(())
    }

    /// The state `stored` describes, keeping the generations `old` has loaded already; the others are loaded
    /// from their files (a generation whose files are missing or changed is kept as failed, never served).
    fn rebuild(&self, old: &Inner, stored: Stored) -> Inner {
        let Stored { version, index } = stored;
        let tasks: BTreeMap<String, Task> = index
            .tasks
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut generations = BTreeMap::new();
        for entry in index.generations {
            let generation = match old.generations.get(&entry.id) {
                // A generation that failed to load here is tried again: its files may have reached this
                // replica's view of the shared directory since.
                Some(loaded) if loaded.path == entry.path && loaded.state == State::Ready => {
                    loaded.clone()
                }
                _ => {
                    let generation = match self.load_files(&entry.path, &entry.task, &tasks) {
                        Ok((g, _)) if g.id == entry.id => Generation {
                            created_at: entry.created_at,
                            ..g
                        },
                        Ok((g, _)) => {
                            failed(&entry, format!("files changed on disk (now hash {})", g.id))
                        }
                        Err(e) => failed(&entry, e.to_string()),
                    };
                    if let State::Failed(reason) = &generation.state {
                        // Retried every few seconds: a failure is logged when it first happens or changes.
                        let before = old.generations.get(&entry.id).map(|g| &g.state);
                        if before != Some(&generation.state) {
                            tracing::warn!(id = %entry.id, %reason, "generation could not be restored");
                        }
                    }
                    Arc::new(generation)
                }
            };
            generations.insert(entry.id.clone(), generation);
        }
        Inner {
            tasks,
            generations,
            aliases: index.aliases,
            version,
        }
    }

    /// Stores generation `g` in `objects` unless it is there already, from its files here, once they are
    /// checked to still hash to its id.
    fn backfill(
        &self,
        objects: &Objects,
        g: &Generation,
        tasks: &BTreeMap<String, Task>,
    ) -> Result<(), RegistryError> {
        if objects.contains(&g.id)? {
            return Ok(());
        }
        let (again, files) = self.load_files(&g.path, &g.task, tasks)?;
        if again.id != g.id {
            return Err(RegistryError::Conflict(format!(
                "its files changed on disk (now hash {})",
                again.id
            )));
        }
        objects.upload(&g.id, &named(&files))
    }

    /// Fetches from the object store the generations of `index` whose files are not in the adapter root
    /// (those other replicas registered), each at most every [`RETRY_FAILED`] while fetching it fails. A
    /// no-op without an object store. Failures are logged; the generation then loads as failed. Returns
    /// whether any was fetched.
    fn prefetch(&self, index: &Index) -> bool {
        let Some(objects) = &self.objects else {
            return false;
        };
        let mut fetched = false;
        for entry in &index.generations {
            let relative = Path::new(&entry.path);
            if entry.path.is_empty()
                || !relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            {
                continue; // Refused by `resolve_path` when loaded.
            }
            let dir = self.root.join(relative);
            if dir.exists() {
                continue;
            }
            {
                let mut failed = self.fetch_failed.lock().unwrap_or_else(|e| e.into_inner());
                if failed
                    .get(&entry.id)
                    .is_some_and(|at| at.elapsed() < RETRY_FAILED)
                {
                    continue;
                }
                failed.remove(&entry.id);
            }
            match objects.download(&entry.id, &dir, self.limits.max_bytes) {
                Ok(()) => {
                    fetched = true;
                    tracing::info!(id = %entry.id, from = objects.url(), "generation fetched from the object store")
                }
                Err(e) => {
                    tracing::warn!(id = %entry.id, error = %e, "generation not fetched from the object store");
                    self.fetch_failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(entry.id.clone(), std::time::Instant::now());
                }
            }
        }
        fetched
    }

    /// Creates a task; its name becomes its stable alias once a generation exists.
    pub fn create_task(&self, name: &str, labels: Vec<String>) -> Result<Task, RegistryError> {
        check_name("task name", name)?;
        if labels.len() < 2 || labels.len() > self.limits.max_labels {
            return Err(RegistryError::Invalid(format!(
                "a task needs 2 to {} labels",
                self.limits.max_labels
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &labels {
            if l.trim().is_empty()
                || l.len() > 128
                || l.chars().any(char::is_control)
                || !seen.insert(l)
            {
                return Err(RegistryError::Invalid(format!(
                    "label {l:?} is empty, over 128 bytes, holds a control character or is repeated"
                )));
            }
        }
        // Creating an existing task with the same labels changes nothing and writes nothing.
        if let Some(existing) = self.read().tasks.get(name).filter(|t| t.labels == labels) {
            return Ok(existing.clone());
        }
        self.mutate(|inner| {
            if !inner.tasks.contains_key(name) && inner.aliases.contains_key(name) {
                return Err(RegistryError::Conflict(format!(
                    "{name:?} is already an alias of another task's generation"
                )));
            }
            if let Some(existing) = inner.tasks.get(name) {
                return if existing.labels == labels {
                    Ok(existing.clone())
                } else {
                    Err(RegistryError::Conflict(format!(
                        "task {name:?} exists with labels {:?}",
                        existing.labels
                    )))
                };
            }
            if inner.tasks.len() >= self.limits.max_tasks {
                return Err(RegistryError::Conflict(format!(
                    "the task limit ({}) is reached",
                    self.limits.max_tasks
                )));
            }
            let task = Task {
                name: name.to_owned(),
                labels,
                created_at: unix_seconds(),
            };
            inner.tasks.insert(name.to_owned(), task.clone());
            Ok(task)
        })
    }

    /// A task by name.
    pub fn task(&self, name: &str) -> Option<Task> {
        self.inner
            .read()
            .expect("registry lock poisoned; this is a bug")
            .tasks
            .get(name)
            .cloned()
    }

    /// Every task.
    pub fn tasks(&self) -> Vec<Task> {
        self.inner
            .read()
            .expect("registry lock poisoned; this is a bug")
            .tasks
            .values()
            .cloned()
            .collect()
    }

    /// Resolves `path` (relative to the adapter root) to a canonical directory inside the root.
    pub fn resolve_path(&self, path: &str) -> Result<PathBuf, RegistryError> {
        let relative = Path::new(path);
        if path.is_empty()
            || relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(RegistryError::Forbidden(format!(
                "adapter path {path:?} must be a relative path inside the adapter root, without '..'"
            )));
        }
        let full = self.root.join(relative);
        let canonical = full.canonicalize().map_err(|_| {
            RegistryError::NotFound(format!(
                "no adapter directory {path:?} under the adapter root"
            ))
        })?;
        if !canonical.starts_with(&self.root) {
            return Err(RegistryError::Forbidden(format!(
                "adapter path {path:?} leaves the adapter root"
            )));
        }
        if !canonical.is_dir() {
            return Err(RegistryError::Invalid(format!(
                "adapter path {path:?} is not a directory"
            )));
        }
        Ok(canonical)
    }

    /// Reads `name` in `dir`: a regular file (no symlink, FIFO or device), at most `max_bytes`.
    fn read_limited(&self, dir: &Path, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RegistryError::Invalid(format!("{name}: {e}"))),
            Ok(m) if !m.file_type().is_file() => {
                return Err(RegistryError::Invalid(format!(
                    "{name} is not a regular file"
                )));
            }
            Ok(_) => {}
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| RegistryError::Invalid(format!("{name}: {e}")))?;
        let mut bytes = Vec::new();
        file.take(self.limits.max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Invalid(format!("{name}: {e}")))?;
        if bytes.len() as u64 > self.limits.max_bytes {
            return Err(RegistryError::Invalid(format!(
                "{name} exceeds the limit of {} bytes",
                self.limits.max_bytes
            )));
        }
        Ok(Some(bytes))
    }

    fn read_required(&self, dir: &Path, name: &str) -> Result<Vec<u8>, RegistryError> {
        self.read_limited(dir, name)?
            .ok_or_else(|| RegistryError::Invalid(format!("the adapter has no {name}")))
    }

    /// Loads the generation in `path`, returning it with the files it was read from.
    fn load_files(
        &self,
        path: &str,
        task: &str,
        tasks: &BTreeMap<String, Task>,
    ) -> Result<(Generation, Files), RegistryError> {
        let task = tasks
            .get(task)
            .ok_or_else(|| RegistryError::NotFound(format!("no task {task:?}")))?;
        let dir = self.resolve_path(path)?;
        let config_bytes = self.read_required(&dir, peft::CONFIG_FILE)?;
        let weights = self.read_required(&dir, peft::WEIGHTS_FILE)?;
        let sidecar_bytes = self.read_limited(&dir, SIDECAR_FILE)?;
        let sidecar: Sidecar = match &sidecar_bytes {
            Some(b) => serde_json::from_slice(b)
                .map_err(|e| RegistryError::Invalid(format!("{SIDECAR_FILE}: {e}")))?,
            None => Sidecar::default(),
        };
        let config: AdapterConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", peft::CONFIG_FILE)))?;
        if config.r > self.limits.max_rank {
            return Err(RegistryError::Invalid(format!(
                "rank {} exceeds the limit {}",
                config.r, self.limits.max_rank
            )));
        }
        let adapter = peft::decode(
            &config,
            &weights,
            &self.model,
            sidecar.head.unwrap_or(Pooling::Cls),
        )?;
        if adapter
            .deltas()
            .any(|(_, _, d)| d.rank > self.limits.max_rank)
        {
            return Err(RegistryError::Invalid(format!(
                "a LoRA factor exceeds the rank limit {}",
                self.limits.max_rank
            )));
        }
        let head = adapter.head.as_ref().ok_or_else(|| {
            RegistryError::Invalid(
                "the adapter has no classifier head, so it cannot serve a task".to_owned(),
            )
        })?;
        if head.classifier.out_features != task.labels.len() {
            return Err(RegistryError::Invalid(format!(
                "the classifier has {} outputs but task {:?} has {} labels",
                head.classifier.out_features,
                task.name,
                task.labels.len()
            )));
        }
        if let Some(labels) = &sidecar.labels {
            if labels != &task.labels {
                return Err(RegistryError::Invalid(format!(
                    "the adapter's labels {labels:?} differ from task {:?}'s {:?}",
                    task.name, task.labels
                )));
            }
        }
        if head.pooling == Pooling::Cls && head.pooler.is_none() && !self.base_has_pooler {
            return Err(RegistryError::Invalid(
                "the adapter's [CLS] head needs a pooler, and neither it nor the base model has one".to_owned(),
            ));
        }
        // The id covers everything that changes what the generation serves: its task, config, weights and
        // sidecar (head kind, labels).
        let mut hasher = Sha256::new();
        hasher.update(task.name.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(&config).map_err(storage)?);
        hasher.update(&weights);
        hasher.update(sidecar_bytes.as_deref().unwrap_or_default());
        let hash = hasher.finalize();
        let id: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        // The reference does not change what the generation serves, so the id leaves it out, and one that
        // cannot be read only costs the generation its training reference (drift falls back to a live one).
        let reference_bytes = self
            .read_limited(&dir, REFERENCE_FILE)
            .map_err(|e| tracing::warn!(path, error = %e, "drift reference ignored"))
            .ok()
            .flatten();
        let reference = reference_bytes.as_ref().and_then(|bytes| {
            DriftReference::from_bytes(bytes, self.model.hidden_size, task.labels.len())
                .map_err(|e| tracing::warn!(path, error = %e, "drift reference ignored"))
                .ok()
                .map(Arc::new)
        });
        let generation = Generation {
            id: format!("g-{id}"),
            task: task.name.clone(),
            path: path.to_owned(),
            config,
            sidecar,
            created_at: unix_seconds(),
            bytes: weights.len() as u64,
            state: State::Ready,
            adapter: Some(Arc::new(adapter)),
            reference,
        };
        let mut files = vec![
            (peft::CONFIG_FILE, config_bytes),
            (peft::WEIGHTS_FILE, weights),
        ];
        files.extend(sidecar_bytes.map(|b| (SIDECAR_FILE, b)));
        files.extend(reference_bytes.map(|b| (REFERENCE_FILE, b)));
        Ok((generation, files))
    }

    /// Loads the PEFT directory `path` (relative to the adapter root) as a generation of `task`. Returns the
    /// generation and whether it is new. The task's stable alias is set if it had none; `alias` is set too.
    pub fn load(
        &self,
        path: &str,
        task: &str,
        alias: Option<&str>,
    ) -> Result<(Arc<Generation>, bool), RegistryError> {
        if let Some(a) = alias {
            check_name("alias", a)?;
        }
        // The task may be another replica's, created since this one last looked.
        self.sync()?;
        let tasks = self
            .inner
            .read()
            .expect("registry lock poisoned; this is a bug")
            .tasks
            .clone();
        let (generation, files) = self.load_files(path, task, &tasks)?;
        // Files someone else wrote (an operator's copy) reach the disk before the index names them: the
        // files, their directory, and each directory above it up to the root.
        let dir = self.resolve_path(path)?;
        let names = [peft::CONFIG_FILE, peft::WEIGHTS_FILE, SIDECAR_FILE];
        crate::durable::sync_files(&dir, &names)
            .and_then(|()| {
                dir.ancestors()
                    .skip(1)
                    .take_while(|d| d.starts_with(&self.root))
                    .try_for_each(|d| crate::durable::sync_files(d, &[]))
            })
            .map_err(|e| RegistryError::Storage(format!("flushing {path}'s files to disk: {e}")))?;
        // Stored before the index names it, so a replica that reads the index can fetch it: the bytes
        // hashed into its id, not the directory read again.
        if let Some(objects) = &self.objects {
            objects.upload(&generation.id, &named(&files))?;
        }
        self.mutate(|inner| {
            if let Some(a) = alias {
                self.check_alias(inner, a, task)?;
            }
            let (generation, new) = match inner.generations.get(&generation.id) {
                Some(existing) if existing.state == State::Ready => (existing.clone(), false),
                _ => {
                    let live = inner
                        .generations
                        .values()
                        .filter(|g| g.state == State::Ready)
                        .count();
                    if live >= self.limits.max_adapters {
                        return Err(RegistryError::Conflict(format!(
                            "the adapter limit ({}) is reached; delete one first",
                            self.limits.max_adapters
                        )));
                    }
                    let g = Arc::new(generation);
                    inner.generations.insert(g.id.clone(), g.clone());
                    (g, true)
                }
            };
            inner
                .aliases
                .entry(task.to_owned())
                .or_insert_with(|| generation.id.clone());
            if let Some(a) = alias {
                inner.aliases.insert(a.to_owned(), generation.id.clone());
            }
            Ok((generation, new))
        })
    }

    fn check_alias(&self, inner: &Inner, alias: &str, task: &str) -> Result<(), RegistryError> {
        let new = !inner.aliases.contains_key(alias) && !inner.tasks.contains_key(alias);
        if new {
            let named = inner
                .aliases
                .keys()
                .filter(|a| !inner.tasks.contains_key(*a))
                .count();
            if named >= self.limits.max_aliases {
                return Err(RegistryError::Conflict(format!(
                    "the alias limit ({}) is reached; delete one first",
                    self.limits.max_aliases
                )));
            }
        }
        if inner.tasks.contains_key(alias) && alias != task {
            return Err(RegistryError::Conflict(format!(
                "alias {alias:?} is another task's stable alias"
            )));
        }
        if let Some(g) = inner
            .aliases
            .get(alias)
            .and_then(|id| inner.generations.get(id))
        {
            if g.task != task {
                return Err(RegistryError::Conflict(format!(
                    "alias {alias:?} belongs to task {:?}",
                    g.task
                )));
            }
        }
        Ok(())
    }

    /// Points `alias` at generation `id` (same task only), atomically.
    pub fn set_alias(&self, alias: &str, id: &str) -> Result<Arc<Generation>, RegistryError> {
        check_name("alias", alias)?;
        self.mutate(|inner| {
            let generation = inner
                .generations
                .get(id)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("no adapter {id:?}")))?;
            if generation.state != State::Ready {
                return Err(RegistryError::Conflict(format!(
                    "adapter {id:?} is not ready"
                )));
            }
            self.check_alias(inner, alias, &generation.task)?;
            inner.aliases.insert(alias.to_owned(), id.to_owned());
            Ok(generation)
        })
    }

    /// Removes `alias`. A task's stable alias stays: it moves (a promotion, [`Registry::set_alias`]) but
    /// always names the generation that serves the task.
    pub fn delete_alias(&self, alias: &str) -> Result<(), RegistryError> {
        self.mutate(|inner| {
            if inner.tasks.contains_key(alias) && inner.aliases.contains_key(alias) {
                return Err(RegistryError::Conflict(format!(
                    "{alias:?} is the task's stable alias: it can be moved, not removed"
                )));
            }
            inner
                .aliases
                .remove(alias)
                .map(|_| ())
                .ok_or_else(|| RegistryError::NotFound(format!("no alias {alias:?}")))
        })
    }

    /// Removes generation `id` unless an alias points at it. In-flight requests keep their lease.
    pub fn delete(&self, id: &str) -> Result<(), RegistryError> {
        self.mutate(|inner| {
            if !inner.generations.contains_key(id) {
                return Err(RegistryError::NotFound(format!("no adapter {id:?}")));
            }
            let users: Vec<&String> = inner
                .aliases
                .iter()
                .filter(|(_, g)| g.as_str() == id)
                .map(|(a, _)| a)
                .collect();
            if !users.is_empty() {
                return Err(RegistryError::Conflict(format!(
                    "adapter {id:?} is used by alias(es) {users:?}"
                )));
            }
            inner.generations.remove(id);
            Ok(())
        })
    }

    /// A generation by id or alias: the lease a request holds while it runs.
    pub fn resolve(&self, id_or_alias: &str) -> Option<Arc<Generation>> {
        let inner = self
            .inner
            .read()
            .expect("registry lock poisoned; this is a bug");
        let id = inner
            .aliases
            .get(id_or_alias)
            .map(String::as_str)
            .unwrap_or(id_or_alias);
        inner.generations.get(id).cloned()
    }

    /// Whether generation `id` exists: loaded here, or, with a shared index, stored by another replica and
    /// not taken in here yet (its files may still be on their way). An index that cannot be read counts as
    /// listing it: nothing should end for want of an answer.
    pub fn listed(&self, id: &str) -> bool {
        if self.read().generations.contains_key(id) {
            return true;
        }
        if !self.store.shared() {
            return false;
        }
        match self.store.load() {
            Ok(Some(stored)) => stored.index.generations.iter().any(|g| g.id == id),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Every generation with the aliases that point at it.
    pub fn list(&self) -> Vec<(Arc<Generation>, Vec<String>)> {
        let inner = self
            .inner
            .read()
            .expect("registry lock poisoned; this is a bug");
        inner
            .generations
            .values()
            .map(|g| {
                let aliases = inner
                    .aliases
                    .iter()
                    .filter(|(_, id)| **id == g.id)
                    .map(|(a, _)| a.clone())
                    .collect();
                (g.clone(), aliases)
            })
            .collect()
    }

    /// Whether the generations ready to serve have reached `[adapters] max_adapters`: no other can be
    /// loaded or published until one is deleted.
    pub fn is_full(&self) -> bool {
        self.ready_count() >= self.limits.max_adapters
    }

    /// Number of generations ready to serve.
    pub fn ready_count(&self) -> usize {
        let inner = self
            .inner
            .read()
            .expect("registry lock poisoned; this is a bug");
        inner
            .generations
            .values()
            .filter(|g| g.state == State::Ready)
            .count()
    }
}

/// The index that persists `inner`.
fn index_of(inner: &Inner) -> Index {
    Index {
        tasks: inner.tasks.values().cloned().collect(),
        generations: inner
            .generations
            .values()
            .map(|g| IndexEntry {
                id: g.id.clone(),
                task: g.task.clone(),
                path: g.path.clone(),
                created_at: g.created_at,
            })
            .collect(),
        aliases: inner.aliases.clone(),
    }
}

fn failed(entry: &IndexEntry, reason: String) -> Generation {
    Generation {
        id: entry.id.clone(),
        task: entry.task.clone(),
        path: entry.path.clone(),
        config: AdapterConfig::for_adapter(&Adapter::empty(0), 0.0, ""),
        sidecar: Sidecar::default(),
        created_at: entry.created_at,
        bytes: 0,
        state: State::Failed(reason),
        adapter: None,
        reference: None,
    }
}
