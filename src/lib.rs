//! Flywheel: a fine-tune-and-serve server. It hosts a pretrained transformer (all-MiniLM-L6-v2 by default),
//! serves embeddings and classifications over HTTP with dynamic batching and per-request LoRA adapters,
//! stores feedback, trains new adapter generations from it, and exports Prometheus metrics.
//!
//! # Layout
//! - [`config`]: the one `Config` (file, environment, flags), passed down.
//! - [`rng`]: a seeded generator shared by every layer.
//! - [`metrics`]: every Prometheus metric name, help text and bucket; the sliding-window latency summary.
//! - [`model`]: Hugging Face loading, the BERT encoder (candle reference path and fused CPU path), LoRA
//!   deltas and heads, tokenization, pooling. Knows nothing above it.
//! - [`adapters`]: PEFT reading and writing; the registry of tasks, generations and aliases.
//! - [`feedback`]: the durable feedback store (SQLite) and the memory of recent requests.
//! - [`infer`]: the queue and the model thread: dynamic batching, backpressure. Knows no HTTP.
//! - [`trainer`]: LoRA training on the candle path, evaluation, and the job queue that publishes generations.
//! - [`http`]: actix-web routes, JSON bodies, the error table, auth, server start and shutdown.
//!
//! Data flows one way, top of this list to bottom never the reverse: `http` → `trainer`/`infer` →
//! `feedback`/`adapters` → `model`; `config`, `rng` and `metrics` are shared by all.

pub mod adapters;
pub mod config;
pub mod feedback;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod rng;
pub mod trainer;

pub use config::Config;

/// Serves until a shutdown signal: the library entry point of `flywheel serve`.
pub async fn run(config: Config) -> Result<(), http::ServeError> {
    http::serve(config).await
}
