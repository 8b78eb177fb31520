//! `flywheel device-check`: whether the encoder and a LoRA training step give the CPU's answers on another
//! device, in f32 and under bf16 autocast, and how fast both run there.
//!
//! It runs on seeded random weights with all-MiniLM-L6-v2's shapes, so nothing but the binary has to reach a
//! GPU machine, and the timings are what the real weights would give. `scripts/gpu-check.sh` runs it beside
//! PyTorch on the same shapes and writes the table (docs/GPU.md). [`parity`] compares, [`timing`] measures.

mod parity;
mod timing;

use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;
use serde::Serialize;

use crate::model::adapter::Target;
use crate::model::{bert, random, Bert, BertConfig};
use parity::Reference;
use timing::{time_fused_inference, time_inference, time_lora_step};

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

/// Alternating labels 0, 1, 0, … for `batch` examples.
fn targets(batch: usize, device: &Device) -> anyhow::Result<Tensor> {
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 2).collect();
    Ok(Tensor::from_vec(labels, batch, device)?)
}

/// Mean-pooled f32 embeddings `[batch, hidden]` on the host.
fn embeddings(bert: &Bert, ids: &Tensor, mask: &Tensor) -> anyhow::Result<Tensor> {
    let hidden = bert.forward(ids, mask)?.to_dtype(DType::F32)?;
    Ok(bert::mean_pool(&hidden, mask)?.to_device(&Device::Cpu)?)
}

fn adamw() -> ParamsAdamW {
    ParamsAdamW {
        lr: LR,
        weight_decay: 0.01,
        ..ParamsAdamW::default()
    }
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
