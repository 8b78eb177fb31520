//! `flywheel device-check`: whether the encoder and a LoRA training step give the CPU's answers on another
//! device, in f32 and under bf16 autocast, and how fast both run there.
//!
//! It runs on seeded random weights with all-MiniLM-L6-v2's shapes, so nothing but the binary has to reach a
//! GPU machine, and the timings are what the real weights would give. `scripts/gpu-check.sh` runs it beside
//! PyTorch on the same shapes and writes the table (docs/GPU.md).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use serde::Serialize;

use crate::model::lora::{Adapter, Dense, Head, LoraDelta, Pooling, Target};
use crate::model::{bert, random, Bert, BertConfig, CpuEncoder};
use crate::trainer::lora::{cross_entropy, LoraTrainable};
use crate::trainer::optim::FusedAdamW;

/// Seed of the random weights and inputs: the CPU and the device see the same ones.
const SEED: u64 = 20_261_206;
/// Weights uniform in ±0.05 (std ≈ 0.03, about BERT's initialisation), so attention is not saturated.
const WEIGHT_SCALE: f32 = 0.05;
/// LoRA as the trainer's defaults have it: rank 8, alpha 16, dropout 0.1, on query and value.
const RANK: usize = 8;
const ALPHA: f64 = 16.0;
const DROPOUT: f64 = 0.1;
const TARGETS: [Target; 2] = [Target::Query, Target::Value];
/// The trainer's default label smoothing and LoRA learning rate.
const SMOOTHING: f64 = 0.1;
const LR: f64 = 2e-3;
/// Relative error from the CPU allowed in f32.
pub const F32_TOLERANCE: f64 = 1e-4;
/// Allowed under bf16 autocast (8 significant bits: ~0.4 % per rounding, compounded over six layers).
pub const BF16_TOLERANCE: f64 = 5e-2;
/// Allowed for gradients under bf16 autocast: they pass through the six layers twice, forward and back
/// (seen on the CPU: 3.3e-2).
pub const BF16_GRADIENT_TOLERANCE: f64 = 1e-1;

/// What to run and at which sizes (`batch × tokens`).
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The device checked (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// Inference timing shape.
    pub infer: (usize, usize),
    /// LoRA training step timing shape.
    pub train: (usize, usize),
    /// Parity shape (the CPU computes it too, so keep it small).
    pub parity: (usize, usize),
    /// Least time spent repeating each timed inference, in seconds.
    pub seconds: f64,
    /// Timed training steps (after two warm-up steps).
    pub steps: usize,
}

/// The whole result; `scripts/gpu-check.sh` turns it into the table.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The device checked.
    pub device: String,
    /// Whether this binary was built with the `cuda` feature.
    pub cuda_build: bool,
    /// The network's shapes (random weights).
    pub model: String,
    /// The agreement checks.
    pub parity: Vec<Parity>,
    /// The timings.
    pub timings: Vec<Timing>,
    /// Checks and timings that failed to run, with the reason.
    pub errors: Vec<String>,
}

impl Report {
    /// Whether every check ran and is within its tolerance.
    pub fn passed(&self) -> bool {
        self.errors.is_empty() && self.parity.iter().all(|p| p.pass)
    }
}

/// One agreement check against the CPU in f32.
#[derive(Debug, Serialize)]
pub struct Parity {
    /// What was compared.
    pub check: String,
    /// The device's compute format.
    pub precision: &'static str,
    /// `‖device − cpu‖ / ‖cpu‖` over every value compared.
    pub relative_error: f64,
    /// The bound it must stay under.
    pub tolerance: f64,
    /// `relative_error ≤ tolerance` (and, for gradients, every one non-zero).
    pub pass: bool,
}

/// One timed operation.
#[derive(Debug, Serialize)]
pub struct Timing {
    /// `inference` (encoder and mean pooling, embeddings copied back to the host) or `lora_step` (forward,
    /// backward and AdamW update).
    pub what: &'static str,
    /// Which implementation: `candle` or `fused-cpu` (the CPU serving path).
    pub path: &'static str,
    /// The compute format.
    pub precision: &'static str,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub length: usize,
    /// Median milliseconds per batch or step.
    pub median_ms: f64,
    /// How many were timed.
    pub repeats: usize,
}

/// all-MiniLM-L6-v2's shapes: 6 layers, hidden 384, 12 heads, 1,536 intermediate, 30,522 tokens.
pub fn minilm_shapes() -> BertConfig {
    BertConfig {
        vocab_size: 30_522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1_536,
        max_position_embeddings: 512,
        ..BertConfig::tiny()
    }
}

/// Runs every check and timing. Each one runs on its own: one that fails (an op missing on the device,
/// say) is recorded in [`Report::errors`] and the others still run, so one run on a borrowed GPU tells
/// everything it can.
pub fn run(options: &CheckOptions) -> anyhow::Result<Report> {
    let device = crate::model::parse_device(&options.device)?;
    crate::trainer::train::flush_denormals();
    let config = minilm_shapes();
    let cpu_bert = random::bert(&config, SEED, WEIGHT_SCALE, &Device::Cpu)?;
    let bert = cpu_bert.to_device(&device)?;
    let reference = Reference::new(&cpu_bert, options.parity)?;
    let mut report = Report {
        device: options.device.clone(),
        cuda_build: cfg!(feature = "cuda"),
        model: "all-MiniLM-L6-v2 shapes (6 × 384, 12 heads), seeded random weights".to_owned(),
        parity: Vec::new(),
        timings: Vec::new(),
        errors: Vec::new(),
    };
    let errors = &mut report.errors;
    let mut attempt = |what: String, result: anyhow::Result<()>| {
        if let Err(e) = result {
            errors.push(format!("{what}: {e:#}"));
        }
    };
    // On the CPU itself the f32 comparison would be the same code twice: the fused serving path is
    // compared with the candle path instead.
    if device.is_cpu() {
        let result = reference.fused(&cpu_bert).map(|p| report.parity.push(p));
        attempt("parity of the fused path".into(), result);
    }
    for precision in [DType::F32, DType::BF16] {
        if device.is_cpu() && precision == DType::F32 {
            continue;
        }
        let name = precision_name(precision);
        let result = reference
            .embeddings(&bert, precision)
            .map(|p| report.parity.push(p));
        attempt(format!("{name} embedding parity"), result);
        let result = reference
            .lora_step(&bert, precision)
            .map(|p| report.parity.extend(p));
        attempt(format!("{name} LoRA step parity"), result);
    }
    for precision in [DType::F32, DType::BF16] {
        let name = precision_name(precision);
        let result = bert
            .to_dtype(precision)
            .map_err(anyhow::Error::from)
            .and_then(|compute| time_inference(&compute, options.infer, options.seconds))
            .map(|t| report.timings.push(t));
        attempt(format!("{name} inference timing"), result);
    }
    if device.is_cpu() {
        let result = time_fused_inference(&cpu_bert, options.infer, options.seconds)
            .map(|t| report.timings.push(t));
        attempt("fused inference timing".into(), result);
    }
    for precision in [DType::F32, DType::BF16] {
        let name = precision_name(precision);
        let result = time_lora_step(&bert, precision, options.train, options.steps)
            .map(|t| report.timings.push(t));
        attempt(format!("{name} LoRA step timing"), result);
    }
    Ok(report)
}

fn precision_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// Seeded token ids (never the pad id 0) and a mask, `batch × len`; with `ragged`, sequence `i` keeps
/// `len − i·len/(2·batch)` tokens so padding is exercised.
fn inputs(
    batch: usize,
    len: usize,
    ragged: bool,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = crate::rng::Rng::new(SEED ^ (batch * len) as u64)
        .uniform(batch * len, 1.0)
        .into_iter()
        .map(|u| 1_000 + ((u + 1.0) * 14_000.0) as u32)
        .collect();
    let mask: Vec<u8> = (0..batch * len)
        .map(|k| {
            let (row, col) = (k / len, k % len);
            let kept = if ragged {
                len - row * len / (2 * batch)
            } else {
                len
            };
            u8::from(col < kept)
        })
        .collect();
    Ok((
        Tensor::from_vec(ids, (batch, len), device)?,
        Tensor::from_vec(mask, (batch, len), device)?,
    ))
}

/// Mean-pooled f32 embeddings `[batch, hidden]` on the host.
fn embeddings(bert: &Bert, ids: &Tensor, mask: &Tensor) -> anyhow::Result<Tensor> {
    let hidden = bert.forward(ids, mask)?.to_dtype(DType::F32)?;
    Ok(bert::mean_pool(&hidden, mask)?.to_device(&Device::Cpu)?)
}

/// `‖a − b‖ / ‖b‖` (Euclidean norms), both copied to the host in f32; `‖a − b‖` where `b` is zero.
fn relative_error(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let host = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    let (a, b) = (host(a)?, host(b)?);
    anyhow::ensure!(a.len() == b.len(), "compared tensors differ in size");
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    Ok(if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    })
}

/// An adapter on the trainer's targets with random A and B (B is non-zero, so A gets a gradient too) and a
/// two-label `[CLS]` head.
fn random_adapter(config: &BertConfig) -> anyhow::Result<Adapter> {
    let mut rng = crate::rng::Rng::new(SEED ^ 0xADA);
    let mut adapter = Adapter::empty(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        for target in TARGETS {
            let (i, o) = target.shape(config);
            let delta = LoraDelta {
                a: rng.uniform(RANK * i, 1.0 / (i as f32).sqrt()),
                b: rng.uniform(o * RANK, 0.05),
                rank: RANK,
                scale: (ALPHA / RANK as f64) as f32,
            };
            adapter.set(layer, target, delta)?;
        }
    }
    let h = config.hidden_size;
    adapter.head = Some(Head {
        pooling: Pooling::Cls,
        pooler: None,
        classifier: Dense {
            weight: rng.uniform(2 * h, 0.05),
            bias: vec![0.0; 2],
            in_features: h,
            out_features: 2,
        },
    });
    Ok(adapter)
}

/// One LoRA step's observable results: logits, loss, gradients of every variable, and the loss after
/// the AdamW update.
struct StepResult {
    logits: Tensor,
    loss: Tensor,
    grads: Vec<Tensor>,
    loss_after: Tensor,
}

fn lora_step(
    bert: &Bert,
    precision: DType,
    adapter: &Adapter,
    (batch, len): (usize, usize),
) -> anyhow::Result<StepResult> {
    let device = bert.device().clone();
    let lora = LoraTrainable::from_adapter(adapter, &device)?;
    let compute = bert.to_dtype(precision)?;
    let (ids, mask) = inputs(batch, len, true, &device)?;
    let targets = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
        batch,
        &device,
    )?;
    let logits = lora.logits(&compute, &ids, &mask)?;
    let loss = cross_entropy(&logits, &targets, SMOOTHING, None)?;
    let store = loss.backward()?;
    let grads = gradients(&lora.vars(), &store)?;
    let mut optimizer = FusedAdamW::new(lora.vars(), adamw())?;
    optimizer.step(&store)?;
    let loss_after = cross_entropy(
        &lora.logits(&compute, &ids, &mask)?,
        &targets,
        SMOOTHING,
        None,
    )?;
    Ok(StepResult {
        logits,
        loss,
        grads,
        loss_after,
    })
}

fn adamw() -> ParamsAdamW {
    ParamsAdamW {
        lr: LR,
        weight_decay: 0.01,
        ..ParamsAdamW::default()
    }
}

/// The gradient of each of `vars`; an error names a variable that got none.
fn gradients(vars: &[Var], store: &GradStore) -> anyhow::Result<Vec<Tensor>> {
    vars.iter()
        .enumerate()
        .map(|(k, v)| {
            store
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("trainable tensor {k} got no gradient"))
        })
        .collect()
}

/// Whether every gradient has a non-zero value (an op without a backward pass leaves zeros or none).
fn all_nonzero(grads: &[Tensor]) -> anyhow::Result<bool> {
    for g in grads {
        let largest = g
            .to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        if largest == 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn tolerance(precision: DType, gradients: bool) -> f64 {
    match precision {
        DType::F32 => F32_TOLERANCE,
        _ if gradients => BF16_GRADIENT_TOLERANCE,
        _ => BF16_TOLERANCE,
    }
}

/// A check of `value` against its bound; `ok` carries a condition beyond the error (every gradient
/// non-zero).
fn parity_row(check: String, precision: DType, value: f64, gradients: bool, ok: bool) -> Parity {
    let tolerance = tolerance(precision, gradients);
    Parity {
        check,
        precision: precision_name(precision),
        relative_error: value,
        tolerance,
        pass: ok && value <= tolerance,
    }
}

/// The CPU's f32 answers the device is compared with, on a padded batch of ragged sequences.
struct Reference {
    ids: Tensor,
    mask: Tensor,
    embeddings: Tensor,
    adapter: Adapter,
    step: StepResult,
    shape: (usize, usize),
}

impl Reference {
    fn new(cpu_bert: &Bert, shape: (usize, usize)) -> anyhow::Result<Self> {
        let (ids, mask) = inputs(shape.0, shape.1, true, &Device::Cpu)?;
        let embeddings = embeddings(cpu_bert, &ids, &mask)?;
        let adapter = random_adapter(&cpu_bert.config)?;
        let step = lora_step(cpu_bert, DType::F32, &adapter, shape)?;
        Ok(Self {
            ids,
            mask,
            embeddings,
            adapter,
            step,
            shape,
        })
    }

    /// The fused CPU serving path (unpadded sequences) against the candle path.
    fn fused(&self, cpu_bert: &Bert) -> anyhow::Result<Parity> {
        let fused = CpuEncoder::from_bert(cpu_bert)?;
        let rows = self.ids.to_vec2::<u32>()?;
        let kept = self.mask.to_vec2::<u8>()?;
        let sequences: Vec<Vec<u32>> = rows
            .iter()
            .zip(&kept)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let pooled = crate::model::pooling::mean_pool(&fused.forward(&refs)?, false);
        let pooled = Tensor::from_vec(pooled.concat(), self.embeddings.shape(), &Device::Cpu)?;
        Ok(parity_row(
            "embeddings: fused CPU serving path vs candle path".into(),
            DType::F32,
            relative_error(&pooled, &self.embeddings)?,
            false,
            true,
        ))
    }

    /// Mean-pooled embeddings on the device in `precision`.
    fn embeddings(&self, bert: &Bert, precision: DType) -> anyhow::Result<Parity> {
        let device = bert.device();
        let (ids, mask) = (self.ids.to_device(device)?, self.mask.to_device(device)?);
        let ours = embeddings(&bert.to_dtype(precision)?, &ids, &mask)?;
        let (batch, len) = self.shape;
        Ok(parity_row(
            format!("embeddings {batch}×{len}"),
            precision,
            relative_error(&ours, &self.embeddings)?,
            false,
            true,
        ))
    }

    /// One LoRA step on the device in `precision`: logits, loss, every gradient, the loss after AdamW.
    fn lora_step(&self, bert: &Bert, precision: DType) -> anyhow::Result<Vec<Parity>> {
        let got = lora_step(bert, precision, &self.adapter, self.shape)?;
        let want = &self.step;
        let (batch, len) = self.shape;
        let what = format!("LoRA step {batch}×{len}");
        let mut worst: f64 = 0.0;
        for (g, w) in got.grads.iter().zip(&want.grads) {
            worst = worst.max(relative_error(g, w)?);
        }
        Ok(vec![
            parity_row(
                format!("{what}: logits"),
                precision,
                relative_error(&got.logits, &want.logits)?,
                false,
                true,
            ),
            parity_row(
                format!("{what}: loss"),
                precision,
                relative_error(&got.loss, &want.loss)?,
                false,
                true,
            ),
            parity_row(
                format!(
                    "{what}: gradients of all {} trainable tensors (each non-zero)",
                    got.grads.len()
                ),
                precision,
                worst,
                true,
                all_nonzero(&got.grads)?,
            ),
            parity_row(
                format!("{what}: loss after the AdamW update"),
                precision,
                relative_error(&got.loss_after, &want.loss_after)?,
                false,
                true,
            ),
        ])
    }
}

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

fn time_inference(
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
fn time_fused_inference(
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
fn time_lora_step(
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
    let targets = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
        batch,
        &device,
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole check on the CPU at small sizes: the fused path and bf16 autocast agree with the f32
    /// reference within their tolerances, every gradient is non-zero, and every timing is there.
    #[test]
    fn the_cpu_check_passes_at_small_sizes() {
        let report = run(&CheckOptions {
            device: "cpu".into(),
            infer: (2, 16),
            train: (2, 16),
            parity: (3, 16),
            seconds: 0.0,
            steps: 1,
        })
        .unwrap();
        assert!(report.passed(), "{report:#?}");
        assert_eq!(report.parity.len(), 6, "{report:#?}");
        assert!(report.parity.iter().all(|p| p.relative_error.is_finite()));
        assert_eq!(report.timings.len(), 5);
        assert!(report.timings.iter().all(|t| t.median_ms > 0.0));
    }
}
