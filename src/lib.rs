//! Flywheel: a fine-tune-and-serve server. It hosts a pretrained transformer (all-MiniLM-L6-v2 by default),
//! serves embeddings and classifications over HTTP with dynamic batching and per-request LoRA adapters,
//! stores feedback, trains new adapter generations from it, and exports Prometheus metrics.
//!
//! # Layout
//! - [`config`]: the one `Config` (file, environment, flags), passed down.
//! - [`rng`]: a seeded generator shared by every layer.
//! - [`pressure`]: inference work in flight, which training yields to.
//! - [`heap`]: the C heap's policy (keep freed memory for the next batch or step; return it after training).
//! - [`durable`]: state files written atomically (temp file, fsync, rename).
//! - [`dirlock`]: one process per data directory (an advisory lock the system drops when the process ends).
//! - [`faults`]: fault injection for the supervision and crash tests (`FLYWHEEL_FAULTS`; off unless set).
//! - [`supervise`]: panics caught per batch and per job, and whether the model and trainer threads live.
//! - [`testenv`]: the services the test suites run against, named in the environment by `scripts/test.sh`.
//! - [`metrics`]: every Prometheus metric name, help text and bucket; the sliding-window latency summary.
//! - [`model`]: Hugging Face loading, the BERT encoder (candle reference path and fused CPU path, both
//!   behind the [`model::Encoder`] trait serving takes), LoRA deltas and heads, tokenization, pooling.
//!   Knows nothing above it.
//! - [`adapters`]: PEFT reading and writing; the registry of tasks, generations and aliases; generations'
//!   files in an object store.
//! - [`postgres`]: the PostgreSQL connection pool, embedded migrations, shared versioned documents, and the
//!   election of the process whose autopilot acts, for stores replicas share.
//! - [`feedback`]: the durable feedback store (embedded SQLite, or PostgreSQL) and the memory of recent
//!   requests.
//! - [`infer`]: the queue and the model thread: dynamic batching, backpressure (admission by expected
//!   wait). Knows no HTTP.
//! - [`trainer`]: LoRA and full fine-tuning on the candle path, evaluation, the job queue that publishes
//!   generations, and offline training (`flywheel train`).
//! - [`device_check`]: `flywheel device-check`: the encoder and a LoRA step on a GPU (or the CPU) against the
//!   CPU's f32 answers, and their timings, on random weights with the default model's shapes.
//! - [`rollout`]: A/B rollouts: sticky routing, per-arm evidence, guardrail analysis, promote and rollback;
//!   online accuracy; kept in `rollouts.json` or shared on PostgreSQL with every replica's evidence.
//! - [`drift`]: per-task drift of predictions, confidence and embeddings against a warm-up reference.
//! - [`autopilot`]: the policy thread: rollout analysis, automatic training on feedback growth or drift.
//! - [`serving`]: the service the HTTP dialects share: what a `model` name selects, classification through a
//!   task's rollout with its evidence, drift and recent-request memory.
//! - [`app`]: the application built from the `Config`: the model loaded, stores opened, threads started.
//! - [`migrate`]: `flywheel migrate`: a single process's feedback, registry, jobs and finished rollouts moved
//!   into PostgreSQL, and its generations' files to where replicas find them.
//! - [`http`]: actix-web routes, JSON bodies, the error table, auth, the OpenAPI document, server start
//!   and shutdown.
//!
//! Data flows one way, top of this list to bottom never the reverse: `http` → `app` → `serving` →
//! `rollout`/`trainer`/`infer` → `feedback`/`adapters` → `model`; `config`, `rng`, `pressure`, `heap`, `durable`, `faults`, `supervise`,
//! `testenv`, `postgres` and `metrics` are shared by all.

pub mod adapters;
pub mod app;
pub mod autopilot;
pub mod clock;
pub mod config;
pub mod device_check;
pub mod dirlock;
pub mod drift;
pub mod durable;
pub mod faults;
pub mod feedback;
pub mod heap;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod postgres;
pub mod pressure;
pub mod rng;
pub mod rollout;
pub mod serving;
pub mod supervise;
pub mod testenv;
pub mod trainer;

pub use config::Config;

/// Serves until a shutdown signal: the library entry point of `flywheel serve`.
pub async fn run(config: Config) -> Result<(), http::ServeError> {
    http::serve(config).await
}

/// Trains jobs from the shared queue until a shutdown signal, answering only `/health`, `/ready` and
/// `/metrics`: the library entry point of `flywheel worker`.
pub async fn run_worker(config: Config) -> Result<(), http::ServeError> {
    http::serve_as(config, http::Role::Worker).await
}
