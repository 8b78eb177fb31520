//! The agreement checks: the device's embeddings and one LoRA step against the CPU's f32 answers.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;

use super::{
    adamw, embeddings, inputs, precision_name, targets, Parity, ALPHA, BF16_GRADIENT_TOLERANCE,
    BF16_TOLERANCE, F32_TOLERANCE, RANK, SEED, SMOOTHING, TARGETS,
};
use crate::model::adapter::{Adapter, Dense, Head, LoraDelta, Pooling};
use crate::model::{Bert, BertConfig, CpuEncoder};
use crate::trainer::lora::{cross_entropy, LoraTrainable};
use crate::trainer::optim::FusedAdamW;

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
    let targets = targets(batch, &device)?;
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
pub(super) struct Reference {
    ids: Tensor,
    mask: Tensor,
    embeddings: Tensor,
    adapter: Adapter,
    step: StepResult,
    shape: (usize, usize),
}

impl Reference {
    pub(super) fn new(cpu_bert: &Bert, shape: (usize, usize)) -> anyhow::Result<Self> {
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
    pub(super) fn fused(&self, cpu_bert: &Bert) -> anyhow::Result<Parity> {
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
    pub(super) fn embeddings(&self, bert: &Bert, precision: DType) -> anyhow::Result<Parity> {
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
    pub(super) fn lora_step(&self, bert: &Bert, precision: DType) -> anyhow::Result<Vec<Parity>> {
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
