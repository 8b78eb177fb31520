//! The timings: inference and a LoRA training step on the device, medians after warm-up.

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::Optimizer;

use super::{
    adamw, embeddings, inputs, precision_name, targets, Timing, ALPHA, DROPOUT, RANK, SEED,
    SMOOTHING, TARGETS,
};
use crate::model::{Bert, CpuEncoder};
use crate::trainer::lora::{cross_entropy, LoraTrainable};
use crate::trainer::optim::FusedAdamW;

/// Median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Repeats `f` after two warm-up calls until `seconds` have passed and at least five were timed.
fn repeat(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, usize)> {
    f()?;
    f()?;
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let n = times.len();
    Ok((median(times), n))
}

pub(super) fn time_inference(
    bert: &Bert,
    (batch, len): (usize, usize),
    seconds: f64,
) -> anyhow::Result<Timing> {
    let (ids, mask) = inputs(batch, len, false, bert.device())?;
    let (median_ms, repeats) = repeat(seconds, || {
        embeddings(bert, &ids, &mask)?.to_vec2::<f32>()?;
        Ok(())
    })?;
    Ok(Timing {
        what: "inference",
        path: "candle",
        precision: precision_name(bert.dtype()),
        batch,
        length: len,
        median_ms,
        repeats,
    })
}

/// The CPU serving path: the fused encoder on unpadded sequences, then mean pooling.
pub(super) fn time_fused_inference(
    bert: &Bert,
    (batch, len): (usize, usize),
    seconds: f64,
) -> anyhow::Result<Timing> {
    let fused = CpuEncoder::from_bert(bert)?;
    let (ids, _) = inputs(batch, len, false, &Device::Cpu)?;
    let rows = ids.to_vec2::<u32>()?;
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (median_ms, repeats) = repeat(seconds, || {
        crate::model::pooling::mean_pool(&fused.forward(&refs)?, false);
        Ok(())
    })?;
    Ok(Timing {
        what: "inference",
        path: "fused-cpu",
        precision: "f32",
        batch,
        length: len,
        median_ms,
        repeats,
    })
}

/// Median of `steps` LoRA steps (fresh factors, the trainer's defaults) after two warm-up steps.
pub(super) fn time_lora_step(
    bert: &Bert,
    precision: DType,
    (batch, len): (usize, usize),
    steps: usize,
) -> anyhow::Result<Timing> {
    let device = bert.device().clone();
    let _heap = crate::heap::TrainingHeap::enter();
    let lora = LoraTrainable::new(&bert.config, &TARGETS, RANK, ALPHA, 2, SEED, &device)?
        .with_dropout(DROPOUT, SEED);
    let compute = bert.to_dtype(precision)?;
    let (ids, mask) = inputs(batch, len, false, &device)?;
    let targets = targets(batch, &device)?;
    let mut optimizer = FusedAdamW::new(lora.vars(), adamw())?;
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let t = Instant::now();
        let loss = cross_entropy(
            &lora.logits(&compute, &ids, &mask)?,
            &targets,
            SMOOTHING,
            None,
        )?;
        optimizer.step(&loss.backward()?)?;
        device.synchronize()?;
        if step >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(Timing {
        what: "lora_step",
        path: "candle",
        precision: precision_name(precision),
        batch,
        length: len,
        median_ms: median(times),
        repeats: steps,
    })
}
