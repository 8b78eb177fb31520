//! `Config`: every setting of the server, with defaults, read from `config/flywheel.toml`, then
//! `FLYWHEEL_<SECTION>__<FIELD>` environment variables, then command-line flags (each later source wins).
//!
//! One `Config` is built at start and passed down; modules read their own section.
//!
//! Past 500 lines as one concern: every section with its defaults and the checks across them, in one
//! place.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Variables of an earlier scheme that Flywheel no longer reads, and what replaced each: a start with one
/// of them set fails rather than quietly ignoring it.
const RETIRED_ENV: [(&str, &str); 6] = [
    ("FLYWHEEL_HOST", "FLYWHEEL_SERVER__HOST"),
    ("FLYWHEEL_PORT", "FLYWHEEL_SERVER__PORT"),
    ("FLYWHEEL_WORKERS", "FLYWHEEL_SERVER__WORKERS"),
    ("FLYWHEEL_MODEL", "FLYWHEEL_MODEL__DIR"),
    ("FLYWHEEL_MAX_LENGTH", "FLYWHEEL_MODEL__MAX_LENGTH"),
    ("FLYWHEEL_DATA_DIR", "FLYWHEEL_DATA__DIR"),
];

/// Prefix of every environment variable Flywheel reads.
pub const ENV_PREFIX: &str = "FLYWHEEL_";

/// The variables without a `__` that some part of Flywheel reads (the configuration file, the API keys, the
/// kernel switches, fault injection for tests); `FLYWHEEL_TEST_*` belong to the test suite.
const READ_ENV: [&str; 6] = [
    "FLYWHEEL_CONFIG",
    "FLYWHEEL_ADMIN_KEYS",
    "FLYWHEEL_API_KEYS",
    "FLYWHEEL_INT8_KERNEL",
    "FLYWHEEL_AVX512",
    "FLYWHEEL_FAULTS",
];

/// The `FLYWHEEL_*` variables in `env` that nothing reads: most often a setting spelt with one underscore
/// (`FLYWHEEL_SERVER_PORT` for `FLYWHEEL_SERVER__PORT`), which would otherwise be ignored without a word.
/// Kubernetes' service links (`FLYWHEEL_SERVICE_HOST`, `FLYWHEEL_METRICS_PORT_9090_TCP`, …) are not listed:
/// the cluster sets them, not the operator. The caller warns; a start does not fail, since a variable meant
/// for another program may share the prefix.
pub fn unread_variables(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut unread: Vec<String> = env
        .into_iter()
        .filter(|(key, value)| {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                return false;
            };
            !(rest.contains("__")
                || rest.starts_with("TEST_")
                || READ_ENV.contains(&key.as_str())
                || RETIRED_ENV.iter().any(|(old, _)| old == key)
                || is_service_link(key, value))
        })
        .map(|(key, _)| key)
        .collect();
    unread.sort();
    unread
}

/// Whether a variable has the shape of one Kubernetes sets for a Service: `<NAME>_SERVICE_HOST`,
/// `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT=tcp://…` and `<NAME>_PORT_<n>_<PROTO>[_ADDR|_PORT|_PROTO]`.
fn is_service_link(key: &str, value: &str) -> bool {
    let protocols = ["tcp://", "udp://", "sctp://"];
    if protocols.iter().any(|p| value.starts_with(p))
        || key.contains("_SERVICE_HOST")
        || key.contains("_SERVICE_PORT")
    {
        return true;
    }
    key.split("_PORT_").skip(1).any(|tail| {
        let mut parts = tail.split('_');
        let number = parts
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        number
            && parts
                .next()
                .is_some_and(|p| matches!(p, "TCP" | "UDP" | "SCTP"))
    })
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file or an override is not valid TOML for `Config`.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listener.
    pub server: ServerConfig,
    /// The pretrained model.
    pub model: ModelConfig,
    /// Dynamic batching of inference work.
    pub batching: BatchingConfig,
    /// Limits on what a caller controls.
    pub limits: LimitsConfig,
    /// Where state lives.
    pub data: DataConfig,
    /// Where feedback and the registry's index live: embedded files, or a PostgreSQL several replicas share.
    pub store: StoreConfig,
    /// Adapter admission limits.
    pub adapters: AdaptersConfig,
    /// API keys (set them through the environment, not the file).
    pub auth: AuthConfig,
    /// Feedback handling.
    pub feedback: FeedbackConfig,
    /// The trainer.
    pub trainer: TrainerConfig,
    /// A/B rollouts and their guardrails.
    pub rollouts: RolloutConfig,
    /// Drift monitoring.
    pub drift: DriftConfig,
}

/// Drift monitoring: each task's served inputs and predictions against a reference window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// Monitor drift at all.
    pub enabled: bool,
    /// Predictions of a new stable generation that form its reference (the warm-up window).
    pub reference_size: usize,
    /// What a trained generation is compared with: `training`, the reference it was published with (its
    /// training inputs and validation predictions, which assumes feedback looks like traffic: the same
    /// label mix), or `live`, its own first `reference_size` predictions and inputs.
    pub reference: String,
    /// Latest predictions compared against the reference.
    pub window_size: usize,
    /// Predictions the window needs before a report is computed.
    pub min_window: usize,
    /// PSI over which the predicted-label or confidence distribution counts as drifted (0.2 is the usual).
    pub psi_threshold: f64,
    /// Permutation-test significance under which the embedding statistics count as drifted.
    pub p_value: f64,
    /// Minimum cosine distance between mean embeddings to count as drifted besides significance (Evidently
    /// uses 0.2, which misses real shifts on this model; see docs/DRIFT.md).
    pub min_distance: f64,
    /// Minimum MMD² to count as drifted besides significance (Evidently uses 0.015).
    pub min_mmd: f64,
    /// Permutations of each embedding test.
    pub permutations: usize,
    /// Embeddings per side both embedding tests use (a seeded subsample of the reference and the window),
    /// which bounds their cost.
    pub mmd_sample: usize,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reference_size: 500,
            reference: "training".to_owned(),
            window_size: 500,
            min_window: 100,
            psi_threshold: 0.2,
            p_value: 0.001,
            min_distance: 0.0,
            min_mmd: 0.0,
            permutations: 999,
            mmd_sample: 200,
        }
    }
}

/// A/B rollouts: how a candidate generation is put in front of traffic and judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Candidate traffic shares, advanced one by one as the analysis passes; passing the last promotes.
    pub steps: Vec<f64>,
    /// `split` (the candidate answers its share) or `shadow` (it runs on its share, stable answers).
    pub mode: String,
    /// Start a rollout automatically for every generation the trainer publishes.
    pub auto_canary: bool,
    /// Judged feedback items each arm needs in a step before accuracy decides anything.
    pub min_feedback: u64,
    /// Requests each arm needs in a step before latency decides anything.
    pub min_requests: u64,
    /// The candidate passes when its accuracy is not worse than stable's by more than this, at `confidence`.
    pub margin: f64,
    /// One-sided confidence of both the pass and the rollback decision.
    pub confidence: f64,
    /// Roll back when the candidate's P99 exceeds stable's by this factor.
    pub max_p99_ratio: f64,
    /// Roll back when the candidate's error rate exceeds stable's by this much.
    pub max_error_rate_increase: f64,
    /// How often the analysis runs, in milliseconds.
    pub evaluate_every_ms: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            steps: vec![0.1, 0.5],
            mode: "split".to_owned(),
            auto_canary: true,
            min_feedback: 100,
            min_requests: 200,
            margin: 0.02,
            confidence: 0.95,
            max_p99_ratio: 1.5,
            max_error_rate_increase: 0.05,
            evaluate_every_ms: 2000,
        }
    }
}

/// The trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Whether this process trains. `false` (`serve --no-trainer`): `POST /v1/train` answers 503
    /// `trainer_disabled` and the autopilot starts no job (its rollout analysis goes on); for serving
    /// replicas beside a training one on a shared store (docs/SCALING.md).
    pub enabled: bool,
    /// Threads the trainer may use; the rest of the cores keep serving.
    pub threads: usize,
    /// Niceness of the trainer's threads (0–19, Linux): training yields the cores to serving when both want
    /// them.
    pub nice: i32,
    /// Longest the trainer waits, at each of its yield points (every frozen linear's forward and backward,
    /// every encoder layer, every optimizer step), for inference in flight to finish. Serving's latency
    /// barely notices training; a saturated server still trains, slowly. 0: never wait.
    pub yield_to_serving_ms: u64,
    /// Most jobs queued or running (`POST /v1/train` answers 429 `queue_full` beyond).
    pub max_queued_jobs: usize,
    /// Most finished jobs `GET /v1/jobs` remembers (and `jobs.json` keeps); older ones are forgotten,
    /// oldest first. Their generations and checkpoints stay.
    pub keep_finished_jobs: usize,
    /// At start-up, queue again (once, as new jobs) the jobs a shutdown or crash interrupted.
    pub rerun_interrupted: bool,
    /// With a shared job queue (`[store] backend = "postgres"`): seconds a claimed job stays this
    /// process's past its last heartbeat (heartbeats come every third of it). A worker silent that long
    /// is taken for dead and its job is run again by another, once.
    pub lease_secs: u64,
    /// Where training runs: `cpu`; `cuda` or `cuda:N` (a build with the `cuda` cargo feature); or `auto`, the
    /// first GPU when the build has CUDA and the machine has one, else the CPU. The trainer keeps its own
    /// copy of the base weights there; serving stays on `model.device`. Checked at start-up.
    pub device: String,
    /// Train a task automatically once this many feedback items arrived since its last job (0: never).
    pub auto_every_feedback: u64,
    /// ...but at most once per this many seconds per task.
    pub auto_min_interval_secs: u64,
    /// Also train automatically when drift is detected on a task (with at least 1 new feedback item).
    pub auto_on_drift: bool,
    /// Hyperparameters of automatic jobs, as `POST /v1/train` takes them (e.g. `{ epochs = 3 }`); unset
    /// ones keep the job defaults. Checked at start-up.
    pub auto_params: toml::Table,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threads: 1,
            nice: 10,
            yield_to_serving_ms: 250,
            max_queued_jobs: 4,
            keep_finished_jobs: 1000,
            rerun_interrupted: true,
            lease_secs: 30,
            device: "cpu".to_owned(),
            auto_every_feedback: 0,
            auto_min_interval_secs: 600,
            auto_on_drift: false,
            auto_params: toml::Table::new(),
        }
    }
}

/// Feedback handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Recent `/v1/predict` requests remembered so feedback can name their `request_id`.
    pub recent_requests: usize,
    /// Bytes of input text those remembered requests may hold.
    pub recent_bytes: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            recent_requests: 100_000,
            recent_bytes: 64 * 1024 * 1024,
        }
    }
}

/// API keys. `FLYWHEEL_ADMIN_KEYS` and `FLYWHEEL_API_KEYS` (comma-separated) fill these.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys for admin endpoints (adapters, aliases, training, rollouts). Empty: loopback clients only.
    pub admin_keys: Vec<String>,
    /// Keys for inference and feedback. Empty: open.
    pub api_keys: Vec<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("AuthConfig")
            .field("admin_keys", &self.admin_keys.len())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

/// HTTP listener settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one (the bound address is logged).
    pub port: u16,
    /// HTTP worker threads. The model runs on its own thread; 2 is enough for JSON and tokenization.
    pub workers: usize,
    /// Seconds to let in-flight requests finish on shutdown.
    pub shutdown_timeout_secs: u64,
    /// Seconds a client has, from the request's arrival, to send its whole body; 0 waits forever. A body
    /// sent a byte at a time would otherwise hold its connection and buffer without end.
    pub body_timeout_secs: u64,
    /// Record per-request metrics (request counts, duration histograms, the P99 window). Turn off only to
    /// measure what they cost (docs/BENCHMARKS.md).
    pub request_metrics: bool,
    /// The task (or alias, or generation) TEI's `POST /predict` classifies with, since TEI clients cannot
    /// name one; empty means the only task when there is exactly one.
    pub tei_predict_model: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 8080,
            workers: 2,
            shutdown_timeout_secs: 10,
            body_timeout_secs: 30,
            request_metrics: true,
            tei_predict_model: String::new(),
        }
    }
}

/// The pretrained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face model directory (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub dir: PathBuf,
    /// Truncation length in tokens including `[CLS]`/`[SEP]` (sentence-transformers uses 256 for
    /// all-MiniLM-L6-v2; at most the model's 512 positions).
    pub max_length: usize,
    /// `cpu`, or `cuda:N` in builds with the `cuda` feature.
    pub device: String,
    /// Threads for the model's kernels (0 = all cores).
    pub threads: usize,
    /// The CPU serving path's number format: `f32`, `int8` (the `int8_projections` on AVX512-VNNI; f32
    /// where the CPU lacks it) or `auto` (int8 where the CPU has VNNI). Training always runs in f32.
    pub precision: crate::model::Precision,
    /// The projections quantised at `int8`: `query`, `key`, `value`, `attention_output`, `intermediate`,
    /// `output` (the default: all six; `output` loses the most, docs/BENCHMARKS.md, "int8 serving").
    pub int8_projections: Vec<crate::model::adapter::Target>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/all-MiniLM-L6-v2"),
            max_length: 256,
            device: "cpu".to_owned(),
            threads: 0,
            precision: crate::model::Precision::F32,
            int8_projections: crate::model::DEFAULT_INT8_PROJECTIONS.to_vec(),
        }
    }
}

/// Dynamic batching: the model thread takes whatever is queued, up to these bounds, for each forward pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most tokens in one forward pass (sequences are packed, so this is real work, not padding).
    pub max_batch_tokens: usize,
    /// Most sequences in one forward pass.
    pub max_batch_size: usize,
    /// Microseconds to wait for more work once a batch has started filling. 0 runs at once: under load
    /// batches fill while the previous one computes, so waiting only adds latency when idle.
    pub max_wait_us: u64,
    /// Most sequences waiting in the queue; beyond it requests get 429 with `Retry-After`.
    pub queue_capacity: usize,
    /// Under overload (more work offered per second than the model serves), refuse a request (429 with
    /// `Retry-After`) when its answer is expected later than this: the work ahead of it and its own, cut
    /// into the batches the batcher forms and priced by the batch cost model fitted at start-up and after
    /// every batch. Admitted requests then keep a bounded latency instead of joining a long queue. Below
    /// overload a request is refused only when the work waiting ahead of it exceeds a batch and eight
    /// times this (callers that wait for their answers bound the queue themselves). A large request is
    /// queued in parts of at most half this much work and judged by its first. A request with nothing
    /// ahead is always admitted. 0: admit up to `queue_capacity`.
    pub max_expected_wait_ms: u64,
    /// Longest a request waits for the model, queued and running, before it is answered 503 with
    /// `Retry-After` (its queued work is then dropped unrun). 0: no limit.
    pub request_timeout_ms: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16_384,
            max_batch_size: 128,
            max_wait_us: 0,
            queue_capacity: 2_048,
            max_expected_wait_ms: 200,
            request_timeout_ms: 30_000,
        }
    }
}

/// Limits on what a caller controls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most texts in one request (422 beyond).
    pub max_inputs: usize,
    /// Longest text in bytes (422 beyond); texts are also truncated at `model.max_length` tokens.
    pub max_text_bytes: usize,
    /// Most items in one `POST /v1/feedback` (422 beyond).
    pub max_feedback_items: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_inputs: 256,
            max_text_bytes: 64 * 1024,
            max_feedback_items: 1000,
        }
    }
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Data directory: the embedded store and `adapters/`.
    pub dir: PathBuf,
    /// The adapter root, when not `<dir>/adapters`: with `[store] backend = "postgres"`, one directory
    /// every replica mounts, so the generations one publishes the others load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapters_dir: Option<PathBuf>,
}

impl DataConfig {
    /// Where adapters live.
    pub fn adapters(&self) -> PathBuf {
        self.adapters_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("adapters"))
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            adapters_dir: None,
        }
    }
}

/// Which engine stores feedback and the registry's index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// `feedback.sqlite` and `registry.json` in the data directory: one machine, nothing to run beside it.
    #[default]
    Sqlite,
    /// A PostgreSQL server at `store.url`, which several replicas may share.
    Postgres,
}

/// The store of feedback and the registry's index.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (the default) or `postgres`.
    pub backend: StoreBackend,
    /// For `postgres`: a connection URL, `postgres://user:password@host:port/database` (set it through
    /// `FLYWHEEL_STORE__URL`, not the file, when it holds a password).
    pub url: String,
    /// Most connections one process holds open to PostgreSQL.
    pub pool_size: u32,
    /// Longest wait for a connection, in milliseconds, before a request fails with 503.
    pub connect_timeout_ms: u64,
    /// With `postgres`: how often, in milliseconds, a replica looks for registry and rollout changes other
    /// replicas made (tasks, generations, alias moves, rollouts), and exchanges rollout evidence with them.
    pub sync_interval_ms: u64,
    /// Where generations' files are shared: empty (the adapter directory, shared or not), `file:///dir`,
    /// or `s3://bucket/prefix` (credentials, region and endpoint from the `AWS_*` variables). With one, the
    /// adapter directory is each replica's own cache.
    pub objects_url: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            url: String::new(),
            pool_size: 8,
            connect_timeout_ms: 5_000,
            sync_interval_ms: 500,
            objects_url: String::new(),
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("url", &(!self.url.is_empty()).then_some("<set>"))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("sync_interval_ms", &self.sync_interval_ms)
            .field(
                "objects_url",
                &(!self.objects_url.is_empty()).then_some("<set>"),
            )
            .finish()
    }
}

/// Admission limits for adapters and tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersConfig {
    /// Most generations ready at once.
    pub max_adapters: usize,
    /// Highest LoRA rank accepted.
    pub max_rank: usize,
    /// Largest adapter file in bytes.
    pub max_bytes: u64,
    /// Most tasks.
    pub max_tasks: usize,
    /// Most labels per task.
    pub max_labels: usize,
    /// Most aliases besides the tasks' stable ones.
    pub max_aliases: usize,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        Self {
            max_adapters: 64,
            max_rank: 64,
            max_bytes: 64 * 1024 * 1024,
            max_tasks: 256,
            max_labels: 1000,
            max_aliases: 256,
        }
    }
}

impl Config {
    /// Reads `path` (when given it must exist) and applies `FLYWHEEL_<SECTION>__<FIELD>` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        let mut keys: Vec<(&str, Vec<String>)> = Vec::new();
        for (key, value) in env {
            // Kubernetes sets `FLYWHEEL_PORT=tcp://10.0.0.7:80` in every pod of a namespace with a Service
            // named `flywheel` (service links): that is not a setting, so it neither fails nor counts.
            let service_link = value.starts_with("tcp://") || value.starts_with("udp://");
            if let Some((_, now)) = RETIRED_ENV
                .iter()
                .find(|(old, _)| *old == key && !service_link)
            {
                return Err(ConfigError::Invalid(format!(
                    "{key} is no longer read; set {now} instead"
                )));
            }
            if key == "FLYWHEEL_ADMIN_KEYS" || key == "FLYWHEEL_API_KEYS" {
                let list = value
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect();
                keys.push((
                    if key == "FLYWHEEL_ADMIN_KEYS" {
                        "admin_keys"
                    } else {
                        "api_keys"
                    },
                    list,
                ));
                continue;
            }
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, field)) = rest.split_once("__") else {
                continue;
            };
            let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Parse(format!("[{section}] is not a table")))?;
            entry.insert(field, parse_env_value(&value));
        }
        for (field, list) in keys {
            let auth = table
                .entry("auth")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Parse("[auth] is not a table".to_owned()))?;
            auth.insert(
                field.to_owned(),
                toml::Value::Array(list.into_iter().map(toml::Value::String).collect()),
            );
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        for (name, keys) in [
            ("admin_keys", &self.auth.admin_keys),
            ("api_keys", &self.auth.api_keys),
        ] {
            // A presented key is compared trimmed: a blank key would let a bare `Bearer` in, and one with
            // white space around it could never match.
            if keys.iter().any(|k| k.trim().is_empty() || k.trim() != k) {
                return fail(format!(
                    "auth.{name} holds a key that is empty or has white space around it"
                ));
            }
        }
        if !(2..=512).contains(&self.model.max_length) {
            return fail(format!(
                "model.max_length {} must be within 2..=512",
                self.model.max_length
            ));
        }
        if self.batching.max_batch_size == 0
            || self.batching.max_batch_tokens < self.model.max_length
        {
            return fail(format!(
                "batching.max_batch_size must be ≥ 1 and batching.max_batch_tokens ({}) ≥ model.max_length ({})",
                self.batching.max_batch_tokens, self.model.max_length
            ));
        }
        if self.batching.queue_capacity < self.limits.max_inputs {
            return fail(format!(
                "batching.queue_capacity ({}) must be ≥ limits.max_inputs ({}) or large requests could never run",
                self.batching.queue_capacity, self.limits.max_inputs
            ));
        }
        if self.limits.max_inputs == 0
            || self.limits.max_text_bytes == 0
            || self.limits.max_body_bytes == 0
        {
            return fail("limits must be positive".to_owned());
        }
        if self.server.workers == 0 {
            return fail("server.workers must be ≥ 1".to_owned());
        }
        if self.trainer.lease_secs < 3 {
            return fail(format!(
                "trainer.lease_secs ({}) must be ≥ 3 (heartbeats come every third of it)",
                self.trainer.lease_secs
            ));
        }
        if self.store.backend == StoreBackend::Postgres && self.store.url.trim().is_empty() {
            return fail(
                "store.backend = \"postgres\" needs store.url (or FLYWHEEL_STORE__URL)".to_owned(),
            );
        }
        if !(5..=1000).contains(&self.store.pool_size)
            || self.store.connect_timeout_ms == 0
            || self.store.sync_interval_ms == 0
        {
            return fail(format!(
                "store.pool_size ({}) must be within 5..=1000 (two connections listen for changes, the autopilot's leader holds one, a promotion takes two), store.connect_timeout_ms and sync_interval_ms positive",
                self.store.pool_size
            ));
        }
        let d = &self.drift;
        if d.reference_size < 20
            || d.window_size < 20
            || d.min_window == 0
            || d.min_window > d.window_size
            || d.reference_size > 100_000
            || d.window_size > 100_000
            || d.mmd_sample < 10
            || d.mmd_sample > 2000
            || d.permutations > 10_000
            || !(d.p_value > 0.0 && d.p_value < 1.0)
        {
            return fail(
                "drift: reference_size and window_size 20..=100000, min_window 1..=window_size, mmd_sample 10..=2000, permutations ≤ 10000, p_value in (0, 1)".to_owned(),
            );
        }
        // A permutation p-value is at least 1 / (1 + permutations): a p_value below it never fires.
        let floor = 1.0 / (1.0 + d.permutations as f64);
        if floor > d.p_value * (1.0 + 1e-9) {
            return fail(format!(
                "drift: with {} permutations no p-value falls below {floor:.4}, so p_value {} could never \
                 detect drift; raise permutations to at least {}",
                d.permutations,
                d.p_value,
                (1.0 / d.p_value).ceil() as u64 - 1
            ));
        }
        if !(0..=19).contains(&self.trainer.nice) {
            return fail("trainer.nice must be 0 to 19".to_owned());
        }
        if self.trainer.keep_finished_jobs == 0 {
            return fail(
                "trainer.keep_finished_jobs must be ≥ 1, or a finished job's result could never be read"
                    .to_owned(),
            );
        }
        let r = &self.rollouts;
        if r.steps.is_empty()
            || r.steps.len() > 10
            || r.steps.iter().any(|s| !(*s > 0.0 && *s <= 1.0))
            || r.steps.windows(2).any(|w| w[1] <= w[0])
        {
            return fail("rollouts.steps must be 1 to 10 rising shares in (0, 1]".to_owned());
        }
        if !matches!(r.mode.as_str(), "split" | "shadow") {
            return fail(format!("rollouts.mode {:?} is not split or shadow", r.mode));
        }
        if r.mode == "split" && r.steps.iter().any(|s| *s >= 1.0) {
            return fail(
                "rollouts.steps must stay below 1 in split mode: stable's share is what the guardrails \
                 compare the candidate with (passing the last step promotes)"
                    .to_owned(),
            );
        }
        if !(0.5..1.0).contains(&r.confidence) || !(0.0..0.5).contains(&r.margin) {
            return fail(
                "rollouts.confidence must be in [0.5, 1) and margin in [0, 0.5)".to_owned(),
            );
        }
        // NaN (which TOML and the environment accept) must fail too: it compares false with everything, so a
        // NaN threshold would switch its guardrail off silently.
        // `inf` (a ratio) and 1 (an error rate) are how one switches a guard off, and stay allowed.
        if r.max_p99_ratio.is_nan()
            || r.max_p99_ratio < 1.0
            || !(0.0..=1.0).contains(&r.max_error_rate_increase)
            || r.min_feedback == 0
            || r.min_requests == 0
            || r.evaluate_every_ms == 0
        {
            return fail(
                "rollouts.max_p99_ratio must be a number ≥ 1 (inf: no latency guard), \
                 max_error_rate_increase in [0, 1] (1: no error-rate guard), \
                 min_feedback, min_requests and evaluate_every_ms ≥ 1"
                    .to_owned(),
            );
        }
        if !matches!(d.reference.as_str(), "training" | "live") {
            return fail(format!(
                "drift.reference {:?} is not training or live",
                d.reference
            ));
        }
        if [d.psi_threshold, d.min_distance, d.min_mmd]
            .iter()
            .any(|x| x.is_nan() || *x < 0.0)
        {
            return fail(
                "drift.psi_threshold, min_distance and min_mmd must be numbers ≥ 0".to_owned(),
            );
        }
        if self.limits.max_feedback_items == 0
            || self.trainer.max_queued_jobs == 0
            || self.adapters.max_tasks == 0
            || self.adapters.max_labels < 2
        {
            return fail(
                "limits.max_feedback_items, trainer.max_queued_jobs and adapters.max_tasks must be ≥ 1, \
                 adapters.max_labels ≥ 2: below that no feedback, job or task could ever be accepted"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Reads an environment value as TOML (numbers, booleans, arrays), falling back to a plain string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_file_parses_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flywheel.toml");
        let config = Config::load(Some(&path), Vec::new()).expect("config/flywheel.toml loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn thresholds_that_would_switch_a_guard_off_or_refuse_everything_are_refused() {
        for (key, value) in [
            ("FLYWHEEL_ROLLOUTS__MAX_P99_RATIO", "nan"),
            ("FLYWHEEL_ROLLOUTS__MAX_ERROR_RATE_INCREASE", "-0.01"),
            ("FLYWHEEL_ROLLOUTS__MAX_ERROR_RATE_INCREASE", "nan"),
            ("FLYWHEEL_ROLLOUTS__MIN_REQUESTS", "0"),
            ("FLYWHEEL_DRIFT__PSI_THRESHOLD", "-1.0"),
            ("FLYWHEEL_DRIFT__MIN_MMD", "nan"),
            ("FLYWHEEL_LIMITS__MAX_FEEDBACK_ITEMS", "0"),
            ("FLYWHEEL_TRAINER__MAX_QUEUED_JOBS", "0"),
            ("FLYWHEEL_ADAPTERS__MAX_LABELS", "1"),
        ] {
            let env = vec![(key.to_owned(), value.to_owned())];
            assert!(
                Config::load(None, env).is_err(),
                "{key}={value} was accepted"
            );
        }
        // How one switches a guard off stays allowed.
        for (key, value) in [
            ("FLYWHEEL_ROLLOUTS__MAX_P99_RATIO", "inf"),
            ("FLYWHEEL_ROLLOUTS__MAX_ERROR_RATE_INCREASE", "1.0"),
            ("FLYWHEEL_DRIFT__MIN_MMD", "inf"),
        ] {
            let env = vec![(key.to_owned(), value.to_owned())];
            assert!(Config::load(None, env).is_ok(), "{key}={value} was refused");
        }
    }

    #[test]
    fn a_blank_key_or_one_with_white_space_around_it_is_refused() {
        for keys in [r#"admin_keys = [""]"#, r#"api_keys = ["k", " k2"]"#] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flywheel.toml");
            std::fs::write(&path, format!("[auth]\n{keys}\n")).unwrap();
            match Config::load(Some(&path), Vec::new()) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains("white space"), "{m}"),
                other => panic!("{keys}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn variables_nothing_reads_are_named_but_service_links_are_not() {
        let env = [
            ("FLYWHEEL_SERVER_PORT", "9000"),
            ("FLYWHEEL_STORE_URL", "postgres://db/flywheel"),
            ("FLYWHEEL_SERVER__PORT", "9000"),
            ("FLYWHEEL_API_KEYS", "k"),
            ("FLYWHEEL_CONFIG", "/etc/flywheel.toml"),
            ("FLYWHEEL_TEST_S3_ENDPOINT", "http://127.0.0.1:1"),
            ("FLYWHEEL_PORT", "tcp://10.96.0.12:80"),
            ("FLYWHEEL_SERVICE_HOST", "10.96.0.12"),
            ("FLYWHEEL_SERVICE_PORT_HTTP", "80"),
            ("FLYWHEEL_METRICS_PORT_9090_TCP_ADDR", "10.96.0.13"),
            ("FLYWHEEL_METRICS_PORT_9090_TCP", "tcp://10.96.0.13:9090"),
            ("FLYWHEEL_PORT_IS_8080", "x"),
            ("RUST_LOG", "debug"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(
            unread_variables(env),
            [
                "FLYWHEEL_PORT_IS_8080",
                "FLYWHEEL_SERVER_PORT",
                "FLYWHEEL_STORE_URL"
            ]
        );
    }

    #[test]
    fn a_variable_of_the_retired_scheme_names_its_replacement() {
        let env = vec![("FLYWHEEL_PORT".to_owned(), "9000".to_owned())];
        let err = Config::load(None, env).unwrap_err().to_string();
        assert!(err.contains("set FLYWHEEL_SERVER__PORT instead"), "{err}");
        // What Kubernetes puts in every pod beside a Service named `flywheel` is no setting of ours.
        let links = vec![
            ("FLYWHEEL_PORT".to_owned(), "tcp://10.96.0.12:80".to_owned()),
            ("FLYWHEEL_SERVICE_HOST".to_owned(), "10.96.0.12".to_owned()),
            (
                "FLYWHEEL_PORT_80_TCP".to_owned(),
                "tcp://10.96.0.12:80".to_owned(),
            ),
        ];
        assert_eq!(Config::load(None, links).unwrap(), Config::default());
    }

    #[test]
    fn environment_overrides_beat_the_file() {
        let env = vec![
            ("FLYWHEEL_SERVER__PORT".to_owned(), "9999".to_owned()),
            (
                "FLYWHEEL_MODEL__DIR".to_owned(),
                "/tmp/some model".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let config = Config::load(None, env).unwrap();
        assert_eq!(config.server.port, 9999);
        assert_eq!(config.model.dir, PathBuf::from("/tmp/some model"));
    }

    #[test]
    fn unknown_fields_and_bad_ranges_are_refused() {
        let env = vec![("FLYWHEEL_MODEL__MAX_LEN".to_owned(), "12".to_owned())];
        assert!(matches!(
            Config::load(None, env),
            Err(ConfigError::Parse(_))
        ));
        let env = vec![("FLYWHEEL_MODEL__MAX_LENGTH".to_owned(), "1024".to_owned())];
        assert!(matches!(
            Config::load(None, env),
            Err(ConfigError::Invalid(_))
        ));
        let env = vec![(
            "FLYWHEEL_TRAINER__KEEP_FINISHED_JOBS".to_owned(),
            "0".to_owned(),
        )];
        assert!(matches!(
            Config::load(None, env),
            Err(ConfigError::Invalid(m)) if m.contains("keep_finished_jobs")
        ));
        // 99 permutations cannot reach the default p-value of 0.001; 999 (the default) just can.
        let permutations =
            |n: &str| vec![("FLYWHEEL_DRIFT__PERMUTATIONS".to_owned(), n.to_owned())];
        assert!(matches!(
            Config::load(None, permutations("99")),
            Err(ConfigError::Invalid(m)) if m.contains("at least 999")
        ));
        assert!(Config::load(None, permutations("999")).is_ok());
        let steps = vec![(
            "FLYWHEEL_ROLLOUTS__STEPS".to_owned(),
            "[0.5, 0.1]".to_owned(),
        )];
        assert!(matches!(
            Config::load(None, steps),
            Err(ConfigError::Invalid(m)) if m.contains("rising")
        ));
        let to_all = |mode: &str| {
            [
                ("FLYWHEEL_ROLLOUTS__STEPS", "[0.5, 1.0]"),
                ("FLYWHEEL_ROLLOUTS__MODE", mode),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        };
        assert!(matches!(
            Config::load(None, to_all("split")),
            Err(ConfigError::Invalid(m)) if m.contains("below 1")
        ));
        assert!(Config::load(None, to_all("shadow")).is_ok());
    }
}
