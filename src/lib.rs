//! Flywheel: a fine-tune-and-serve server. It hosts a pretrained transformer (all-MiniLM-L6-v2 by default),
//! serves embeddings over HTTP with dynamic batching, and exports Prometheus metrics.
//!
//! # Layout
//! - [`config`]: the one `Config` (file, environment, flags), passed down.
//! - [`model`]: Hugging Face loading, the BERT encoder (candle reference path and fused CPU path),
//!   tokenization, pooling. Knows nothing above it.
//! - [`feedback`]: the durable feedback store (SQLite) and the memory of recent requests.
//! - [`infer`]: the queue and the model thread: dynamic batching, backpressure. Knows no HTTP.
//! - [`http`]: actix-web routes, JSON bodies, the error table, server start and shutdown.
//! - [`trainer`]: LoRA training on the candle path, evaluation, and the job queue that publishes generations.
//! - [`metrics`]: every Prometheus metric name, help text and bucket.
//!
//! Data flows one way: `http` → `infer` → `model`; `metrics` and `config` are shared by all.

pub mod adapters;
pub mod config;
pub mod feedback;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod trainer;

pub use config::Config;

/// Serves until a shutdown signal: the library entry point of `flywheel serve`.
pub async fn run(config: Config) -> Result<(), http::ServeError> {
    http::serve(config).await
}
