//! Start-up calibration of the batch cost model: a few forward passes of realistic shapes on the loaded
//! model, so that the first requests are judged on a warm estimate rather than on one cold batch.

use std::time::{Duration, Instant};

use super::cost::{CostFit, Work};
use crate::config::BatchingConfig;
use crate::model::ServingModel;

/// Batch shapes (sequences × tokens) measured at start: single requests from a short sentence to a long
/// text, and the batches concurrent short and medium requests form. Lengths are capped at the model's
/// truncation and batches at the batcher's limits.
const SHAPES: [(usize, usize); 7] = [
    (1, 8),
    (1, 32),
    (1, 128),
    (1, 256),
    (16, 16),
    (32, 32),
    (8, 128),
];

/// Runs the calibration batches on `model`, adds their timings to `fit` and returns them. The first batch
/// only warms caches and the allocator; it is not measured.
pub(super) fn calibrate(
    model: &ServingModel,
    config: &BatchingConfig,
    fit: &mut CostFit,
) -> crate::model::Result<Vec<(Work, Duration)>> {
    let started = Instant::now();
    let max_length = model.tokenizer.max_length();
    let vocab = model.vocab_size as u32;
    let mut measured = Vec::new();
    let shapes = SHAPES.iter().map(|&(n, len)| {
        let len = len.min(max_length);
        let n = n
            .min(config.max_batch_size)
            .min(config.max_batch_tokens / len);
        (n.max(1), len)
    });
    for (i, (n, len)) in std::iter::once((32.min(config.max_batch_size), 16))
        .chain(shapes)
        .enumerate()
    {
        // Token ids spread over the vocabulary (the cost does not depend on which ids).
        let sequence: Vec<u32> = (0..len as u32).map(|t| (t * 7919 + 1000) % vocab).collect();
        let sequences: Vec<&[u32]> = vec![sequence.as_slice(); n];
        let took = Instant::now();
        model.encode(&sequences)?;
        let took = took.elapsed();
        if i > 0 {
            let work = Work::of_lengths(std::iter::repeat_n(len, n));
            fit.calibrate(work, took.as_nanos() as f64);
            measured.push((work, took));
        }
    }
    let cost = fit.model();
    tracing::info!(
        per_batch_ms = cost.per_batch_ns / 1e6,
        per_token_us = cost.per_token_ns / 1e3,
        per_square_ns = cost.per_square_ns,
        seconds = started.elapsed().as_secs_f64(),
        "batch cost calibrated"
    );
    Ok(measured)
}
